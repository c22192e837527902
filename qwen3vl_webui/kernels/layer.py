"""The decode step's decoder layer in ~11 kernels instead of ~55: the engine's eager path at the compiled path's speed.

In a CUDA graph a decode step costs its kernels, and an eager layer of transformers launches ~55 at one token a row:
RMSNorm alone is 7 (cast, pow, mean, add, rsqrt, mul, cast, weight), q_norm and k_norm 7 each, RoPE 5 each for q
and k, the KV cache's writes and copies, SiLU and its product, the residual adds. Each is a few microseconds of an
idle GPU: ~3 ms of a 4B step's ~7 ms at one stream on an H100 (bench/RESULTS.md: eager graphs 146 tok/s against the
compiled step's ~260). torch.compile fuses them, but costs a compile (a minute per batch size cold, seconds from
artifacts) before the engine reaches that speed. The kernels here do what vLLM's custom ops do without a compiler:

- `add_rms_norm`: residual add and RMSNorm in one pass over the row (or RMSNorm alone);
- `qk_norm_rope_kv`: from the fused q/k/v product, q_norm + RoPE for q, k_norm + RoPE for k and v, written
  straight into the per-layer flat KV cache at the step's slots (what `LayerSlotCache.update` does with two
  `index_copy_`s after transformers' copies);
- `silu_mul`: the MLP's SiLU and product.

Each rounds where transformers' eager ops round (kernels/layer_triton.py), so a fused layer differs from the eager
one only in the order of a norm's fp32 sum. `decode_layer_forward` is the layer: one token per row, the split-KV
decode attention (`kv_lengths`), a cache that hands out its flat tensors (`flat()`). Anything else — prefill, a
trace, a cache of another kind, an activation that is not SiLU — takes transformers' own forward. The torch
references below are the same arithmetic in torch ops, what runs off CUDA (and what tests compare the kernels to).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen3vl_webui.kernels import attention

if TYPE_CHECKING:
    import torch

SILU_BLOCK = 1024


@functools.cache
def _kernels() -> Any:
    try:
        from qwen3vl_webui.kernels import layer_triton
    except Exception:
        return None
    return layer_triton


def _triton(x: torch.Tensor) -> Any:
    """The kernels where they run for `x`: CUDA, or Triton's interpreter on CPU (tests)."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return _kernels()
    return None


# ------------------------------------------------------------------------------------------ the torch references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3VLTextRMSNorm.forward, op for op."""
    import torch

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [rows, heads, dim]: the head norm then `apply_rotary_pos_emb` with cos/sin [rows, dim]."""
    n = rms_norm_reference(x, weight, eps)
    return n * cos[:, None] + rotate_half(n) * sin[:, None]


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.silu(gate) * up


# ------------------------------------------------------------------------------------------ the ops


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) over the last axis of `x [rows, n]`; without `residual`, of x."""
    import torch

    kernels = _triton(x)
    if kernels is None:
        total = x if residual is None else x + residual
        return rms_norm_reference(total, weight, eps), total
    rows, n = x.shape
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    total = x if residual is None else torch.empty_like(out)
    r = x if residual is None else residual
    kernels.add_rms_norm[(rows,)](
        x, r, weight, out, total, eps, n, x.stride(0), r.stride(0), out.stride(0), total.stride(0),
        HAS_R=residual is not None, BLOCK=triton_block(n), num_warps=8 if n >= 2048 else 4,
    )  # fmt: skip
    return out, total


def qk_norm_rope_kv(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """From `qkv [rows, (heads + 2 kv_heads) dim]` (rows may be strided): returns q [rows, heads, dim] normed and
    rotated; writes k (normed, rotated) and v into the flat `keys`/`values` [*, dim] at `index [rows * kv_heads]`."""
    import torch

    rows = qkv.shape[0]
    dim = q_weight.shape[0]
    kernels = _triton(qkv)
    if kernels is None:
        split = qkv.view(rows, heads + 2 * kv_heads, dim)
        q = norm_rope_reference(split[:, :heads], q_weight, cos, sin, eps)
        k = norm_rope_reference(split[:, heads : heads + kv_heads], k_weight, cos, sin, eps)
        keys.index_copy_(0, index, k.reshape(-1, dim))
        values.index_copy_(0, index, split[:, heads + kv_heads :].reshape(-1, dim))
        return q
    q = torch.empty((rows, heads, dim), device=qkv.device, dtype=qkv.dtype)
    kernels.qk_norm_rope_kv[(rows, heads + 2 * kv_heads)](
        qkv, q_weight, k_weight, cos, sin, q, keys, values, index, eps,
        qkv.stride(0), cos.stride(0), q.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, HAS_KV=True, num_warps=1,
    )  # fmt: skip
    return q


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `[rows, n]` (rows may be strided)."""
    import torch

    kernels = _triton(gate)
    if kernels is None:
        return silu_mul_reference(gate, up)
    rows, n = gate.shape
    out = torch.empty((rows, n), device=gate.device, dtype=gate.dtype)
    kernels.silu_mul[(rows, -(-n // SILU_BLOCK))](
        gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0), BLOCK=SILU_BLOCK, num_warps=4
    )
    return out


def triton_block(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------ the layer


def fusable(layer: Any) -> str | None:
    """Why `layer` cannot take `decode_layer_forward`, or None."""

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = (attn, mlp, getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    if any(part is None for part in needed):
        return "not a Qwen3-VL text decoder layer"
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")):
        return "its attention lacks q/k/v/o projections or q/k norms"
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return f"its MLP's activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
    if any(getattr(m, "bias", None) is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        return "its attention projections have biases"
    if getattr(attn, "training", False):
        return "training mode"
    return None


def _adjacent(parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether `parts` are consecutive column ranges of one row-major buffer (a fused product's slices)."""
    first = parts[0]
    if first.dim() != 2 or first.stride(1) != 1:
        return False
    offset = first.storage_offset()
    for part in parts:
        same = part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same or part.stride() != first.stride() or part.storage_offset() != offset:
            return False
        offset += part.shape[1]
    return offset - first.storage_offset() <= first.stride(0)


def _qkv(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """The q/k/v product as one [rows, q|k|v] tensor: the fused product itself (its three slices), else concatenated."""
    import torch

    parts = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    if _adjacent(parts):
        first = parts[0]
        width = sum(p.shape[1] for p in parts)
        return first.as_strided((first.shape[0], width), first.stride())
    return torch.cat(parts, dim=-1)


def decode_layer_forward(layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    """A forward for `layer` (transformers' signature): the fused decode layer where it applies, else `original`."""
    import torch

    attn, mlp = layer.self_attn, layer.mlp
    heads = attn.config.num_attention_heads
    kv_heads = attn.config.num_key_value_heads
    dim = attn.head_dim
    eps_in, eps_post = layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon
    eps_q, eps_k = attn.q_norm.variance_epsilon, attn.k_norm.variance_epsilon
    if eps_q != eps_k:
        return original

    def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                position_ids: Any = None, past_key_values: Any = None, use_cache: bool | None = False,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        lengths = kwargs.get("kv_lengths")
        plain = not torch.compiler.is_compiling() and lengths is not None and hidden_states.dim() == 3
        cache = past_key_values
        if plain and hasattr(cache, "layer"):
            cache = cache.layer(attn.layer_idx)
        if not plain or hidden_states.shape[1] != 1 or not hasattr(cache, "flat"):
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                            **kwargs)  # fmt: skip
        rows, _, width = hidden_states.shape
        x = hidden_states.view(rows, width)
        normed, _ = add_rms_norm(x, None, layer.input_layernorm.weight, eps_in)
        cos, sin = position_embeddings
        keys, values, index = cache.flat()
        q = qk_norm_rope_kv(
            _qkv(attn, normed), heads, kv_heads, attn.q_norm.weight, attn.k_norm.weight,
            cos.reshape(rows, dim), sin.reshape(rows, dim), eps_q, keys, values, index,
        )  # fmt: skip
        k, v = cache.views()
        out = attention.decode_attention(q.view(rows, heads, 1, dim), k, v, lengths, attn.scaling)
        o = attn.o_proj(out.view(rows, heads * dim))
        normed, total = add_rms_norm(o, x, layer.post_attention_layernorm.weight, eps_post)
        down = mlp.down_proj(silu_mul(mlp.gate_proj(normed), mlp.up_proj(normed)))
        return (total + down).view(rows, 1, width)

    return forward


def use_fused_layers(layers: list[Any]) -> Callable[[], None]:
    """Gives each layer `decode_layer_forward` (over the forward it has); returns the undo. Layers `fusable` refuses
    keep theirs."""
    changed: list[tuple[Any, Any]] = []
    for layer in layers:
        if fusable(layer) is not None:
            continue
        previous = vars(layer).get("forward")
        layer.forward = decode_layer_forward(layer, layer.forward)
        changed.append((layer, previous))

    def restore() -> None:
        for layer, previous in changed:
            if previous is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = previous
        changed.clear()

    return restore


# ------------------------------------------------------------------------------------------ where they run


@functools.cache
def probe(device: str, dtype: Any, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Why the fused layer's kernels cannot run here (CUDA, `dtype`, these head shapes), or None: each is built on
    this GPU and checked against its torch reference on small random data (a GPU or Triton that cannot build or
    computes wrong is refused at start-up; the decode step then keeps transformers' layer forward)."""
    import torch

    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if _kernels() is None:
        return "triton is not importable"
    try:
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=gen).to(dtype)

        rows, hidden, width = 3, 320, 1000
        x, r, w = rand(rows, hidden), rand(rows, hidden), rand(hidden)
        got, total = add_rms_norm(x, r, w, 1e-6)
        errors = {"add_rms_norm": _error(got, rms_norm_reference(x + r, w, 1e-6)), "add": _error(total, x + r)}
        qkv = rand(rows, (heads + 2 * kv_heads) * head_dim + 16)[:, : (heads + 2 * kv_heads) * head_dim]
        qw, kw, cos, sin = rand(head_dim), rand(head_dim), rand(rows, head_dim), rand(rows, head_dim)
        index = torch.randperm(rows * kv_heads * 2, device=device, generator=gen)[: rows * kv_heads]
        keys, values = torch.zeros(2, rows * kv_heads * 2, head_dim, device=device, dtype=dtype)
        q = qk_norm_rope_kv(qkv, heads, kv_heads, qw, kw, cos, sin, 1e-6, keys, values, index)
        split = qkv.view(rows, heads + 2 * kv_heads, head_dim)
        errors["q"] = _error(q, norm_rope_reference(split[:, :heads], qw, cos, sin, 1e-6))
        k = norm_rope_reference(split[:, heads : heads + kv_heads], kw, cos, sin, 1e-6)
        errors["k"] = _error(keys[index], k.reshape(-1, head_dim))
        errors["v"] = _error(values[index], split[:, heads + kv_heads :].reshape(-1, head_dim))
        gate, up = rand(rows, 2 * width).split(width, dim=-1)
        errors["silu_mul"] = _error(silu_mul(gate, up), silu_mul_reference(gate, up))
    except Exception as exc:
        return f"the fused layer's kernels failed here: {type(exc).__name__}: {str(exc)[:200]}"
    wrong = [name for name, error in errors.items() if not error < 1e-2]  # NaN is wrong too
    return f"the fused layer's {wrong[0]} disagreed with torch (relative {errors[wrong[0]]:.3g})" if wrong else None


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:

    ref = ref.float()
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12))
