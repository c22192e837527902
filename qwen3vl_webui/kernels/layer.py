"""The decode step's decoder layer in 10 launches instead of 53: the engine's eager path near the compiled path's speed.

In a CUDA graph a decode step costs its kernels, and transformers' eager layer launches 53 at one token a row
(`python -m bench.layer_launches`): RMSNorm alone is 8 (cast, pow, mean, add, rsqrt, mul, cast, weight), q_norm and
k_norm as many each, RoPE 5 each for q and k, the KV cache's writes, SiLU and its product, the residual adds. Each is a
few microseconds of an idle GPU: the eager graphs made 146 tok/s at one stream on an H200 where the compiled step made
~300. torch.compile fuses them, but costs a compile (a minute per batch size cold, seconds from artifacts) before the
engine reaches that speed. The kernels here do what vLLM's custom ops do without a compiler:

- `add_rms_norm`: residual add and RMSNorm in one pass over the row (or RMSNorm alone);
- `qk_norm_rope_kv`: from the fused q/k/v product, q_norm + RoPE for q, k_norm + RoPE for k, and k and v written
  straight into the per-layer flat KV cache at the step's rows (what `LayerSlotCache.update` does with two
  `index_copy_`s);
- `silu_mul`: the MLP's SiLU and product; `add_product`: the last residual add.

Each product reaches the kernel that consumes it as its partial sums (`partials`): int4's and fp8's split-K parts are
added there, so their reduction needs no launch either. Each kernel rounds where transformers' eager ops round
(kernels/layer_triton.py), so a fused layer differs from the eager one only in the order of a norm's fp32 sum.
`decode_layer_forward` is the layer: one token per row, the split-KV decode attention (`kv_lengths`), a cache that
hands out its flat tensors (`flat()`). Anything else (prefill, a trace, a cache of another kind) takes transformers'
own forward; `fusable` refuses layers of another shape or activation. The torch references below are the same
arithmetic in torch ops: what runs off CUDA, and what the probe and the tests compare the kernels to.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen3vl_webui.kernels import attention

if TYPE_CHECKING:
    import torch

BLOCK = 1024  # columns per program of the element-wise kernels (silu_mul, add_product)


@functools.cache
def _kernels() -> Any:
    try:
        from qwen3vl_webui.kernels import layer_triton
    except Exception:
        return None
    return layer_triton


def _triton(x: torch.Tensor) -> Any:
    """The kernels where they run for `x`: CUDA, or Triton's interpreter on CPU (tests)."""
    if x.is_cuda:
        return _kernels()
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    kernels = _kernels()  # the interpreter only if Triton was imported under it (the variable set later does not count)
    return kernels if kernels is not None and type(kernels._product).__name__ == "InterpretedFunction" else None


def _pdl(x: torch.Tensor) -> dict[str, Any]:
    """Programmatic dependent launch's arguments for a kernel on `x`'s device (kernels/pdl.py), or none."""
    from qwen3vl_webui.kernels import pdl

    return pdl.args(x, "layer")


# ------------------------------------------------------------------------------------------ the torch references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3VLTextRMSNorm.forward, op for op."""
    import torch

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [rows, heads, dim]: the head norm then transformers' RoPE (its `rotate_half`) with cos/sin [rows, dim]."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    n = rms_norm_reference(x, weight, eps)
    return n * cos[:, None] + rotate_half(n) * sin[:, None]


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.silu(gate) * up


# ------------------------------------------------------------------------------------------ the ops
#
# A product arrives as `parts [split, rows, n]`: a split-K product's partial sums (fp32: int4, fp8), or the product
# itself as [1, rows, n] (`Linear(x)[None]`). The kernels add the parts in order and round once, as the product's own
# reduction would (kernels/splitk.py); `product_reference` is that arithmetic in torch.


def product_reference(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The product from its parts: added in part order in fp32, rounded to `dtype` once."""
    if parts.shape[0] == 1 and parts.dtype == dtype:
        return parts[0]
    total = parts[0].float()
    for part in parts[1:]:
        total = total + part.float()
    return total.to(dtype)


def _rows(parts: torch.Tensor) -> torch.Tensor:
    """`parts` with unit stride along the last axis (what the kernels index)."""
    return parts if parts.stride(-1) == 1 else parts.contiguous()


def add_rms_norm(
    parts: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) over the last axis, x the product in `parts [split, rows, n]`; without
    `residual`, RMSNorm(x) and x. The activations' dtype is the residual's, else the product's if it comes whole
    (one part), else the weight's."""
    import torch

    dtype = residual.dtype if residual is not None else (parts.dtype if parts.shape[0] == 1 else weight.dtype)
    kernels = _triton(parts)
    if kernels is None:
        x = product_reference(parts, dtype)
        total = x if residual is None else residual + x
        return rms_norm_reference(total, weight, eps), total
    parts = _rows(parts)
    split, rows, n = parts.shape
    out = torch.empty((rows, n), device=parts.device, dtype=dtype)
    total = torch.empty_like(out) if residual is not None else None
    r = _rows(residual) if residual is not None else out
    kernels.add_rms_norm[(rows,)](
        parts, r, weight, out, total if total is not None else out, eps, n, 1.0 / n, parts.stride(0), parts.stride(1),
        r.stride(0), out.stride(0), out.stride(0) if total is None else total.stride(0),
        HAS_R=residual is not None, SPLIT=split, BLOCK=triton_block(n), num_warps=8 if n >= 2048 else 4,
        **_pdl(parts),
    )  # fmt: skip
    return out, total if total is not None else product_reference(parts, dtype)


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
    """From the fused q/k/v product `qkv [split, rows, (heads + 2 kv_heads) dim]` (its parts): returns q
    [rows, heads, dim] normed and rotated; writes k (normed, rotated) and v into the flat `keys`/`values` [*, dim] at
    `index [rows * kv_heads]`."""
    import torch

    split, rows, _ = qkv.shape
    dim = q_weight.shape[0]
    dtype = cos.dtype
    kernels = _triton(qkv)
    if kernels is None:
        heads_of = product_reference(qkv, dtype).view(rows, heads + 2 * kv_heads, dim)
        q = norm_rope_reference(heads_of[:, :heads], q_weight, cos, sin, eps)
        k = norm_rope_reference(heads_of[:, heads : heads + kv_heads], k_weight, cos, sin, eps)
        keys.index_copy_(0, index, k.reshape(-1, dim))
        values.index_copy_(0, index, heads_of[:, heads + kv_heads :].reshape(-1, dim))
        return q
    qkv = _rows(qkv)
    cos, sin, index = cos.contiguous(), sin.contiguous(), index.contiguous()  # as the kernel indexes them (no-ops)
    q = torch.empty((rows, heads, dim), device=qkv.device, dtype=dtype)
    kernels.qk_norm_rope_kv[(rows, heads + 2 * kv_heads)](
        qkv, q_weight, k_weight, cos, sin, q, keys, values, index, eps,
        qkv.stride(0), qkv.stride(1), cos.stride(0), q.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, SPLIT=split, num_warps=1, **_pdl(qkv),
    )  # fmt: skip
    return q


def silu_mul(gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up from the gate/up product `gate_up [split, rows, 2n]` ([gate | up], its parts), in `dtype`."""
    import torch

    kernels = _triton(gate_up)
    if kernels is None:
        gate, up = product_reference(gate_up, dtype).chunk(2, dim=-1)
        return silu_mul_reference(gate, up)
    gate_up = _rows(gate_up)
    split, rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), device=gate_up.device, dtype=dtype)
    kernels.silu_mul[(rows, -(-n // BLOCK))](
        gate_up, out, n, gate_up.stride(0), gate_up.stride(1), out.stride(0), SPLIT=split, BLOCK=BLOCK,
        PRECISE=gate_up.is_cuda, num_warps=4, **_pdl(gate_up),
    )  # fmt: skip
    return out


def add_product(residual: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """residual + the product in `parts [split, rows, n]`, rounded: the layer's last residual add."""
    import torch

    kernels = _triton(parts)
    if kernels is None:
        return residual + product_reference(parts, residual.dtype)
    parts = _rows(parts)
    split, rows, n = parts.shape
    residual = _rows(residual)
    out = torch.empty((rows, n), device=parts.device, dtype=residual.dtype)
    kernels.add_product[(rows, -(-n // BLOCK))](
        residual, parts, out, n, residual.stride(0), parts.stride(0), parts.stride(1), out.stride(0),
        SPLIT=split, BLOCK=BLOCK, num_warps=4, **_pdl(parts),
    )  # fmt: skip
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
    if attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
        return "its q and k norms have different epsilons"
    return None


def partials(linears: list[Any], x: torch.Tensor) -> torch.Tensor:
    """The product of `linears` (one Linear, or a group whose outputs are concatenated: q/k/v, gate/up) on `x
    [rows, K]` as `[split, rows, N]` parts: a fused group's one product (kernels/fusion.py), a quantized Linear's own
    partial sums (int4, fp8: their split-K reduction left to our kernels), else each product, concatenated."""
    import torch

    group = getattr(linears[0], "_qwen3vl_group", None)
    if group is not None and len(group.members) == len(linears) and all(a is b for a, b in zip(group.members, linears)):
        return group.partials(x)
    if len(linears) == 1:
        own = getattr(linears[0], "partials", None)
        parts = own(x) if own is not None else None
        return parts if parts is not None else linears[0](x)[None]
    return torch.cat([m(x) for m in linears], dim=-1)[None]


class Handoff:
    """A fused layer's output and the next norm of it (the next layer's input RMSNorm, or the model's final norm),
    computed by the layer's last kernel with its residual add: one `add_rms_norm` where `add_product` and the next
    layer's `add_rms_norm` (or the final norm's ~8 torch ops) were. The next one takes the norm only if it is handed
    the very tensor the layer returned, unchanged since (its version counter): a clone, an in-place edit or another
    caller's tensor takes the norm's own path. (Inference tensors, the engine's, keep no version counter: there the
    identity decides. Between two layers transformers' model assigns the output, or clones it to add deepstack's
    visual features.) What is held is the thread's own: a step run on another thread (the background compile's
    warm-ups) neither takes nor clears it. The final norm's sum then runs in our kernel's order, as every layer's
    input norm already did (kernels/layer_triton.py)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def put(self, hidden: torch.Tensor, normed: torch.Tensor) -> None:
        self._local.held = (hidden, _version(hidden), normed)

    def take(self, hidden: torch.Tensor | None) -> torch.Tensor | None:
        held, self._local.held = getattr(self._local, "held", None), None
        if held is None or held[0] is not hidden or held[1] != _version(hidden):
            return None
        return held[2]


def _version(t: Any) -> int | None:
    return None if t is None or t.is_inference() else t._version


def decode_layer_forward(
    layer: Any,
    original: Callable[..., Any],
    on: Callable[[], bool] = lambda: True,
    handoff: Handoff | None = None,
    next_norm: Any = None,
) -> Callable[..., Any]:
    """A forward for `layer` (transformers' signature): the fused decode layer where it applies and `on()`, else
    `original`. With `handoff`, its input norm is taken from there where the layer before left it, and where
    `next_norm` (an RMSNorm module: the next layer's input norm, or the model's final norm) is given, its output's
    norm is left there by its last kernel."""
    import torch

    attn, mlp = layer.self_attn, layer.mlp
    heads = attn.config.num_attention_heads
    kv_heads = attn.config.num_key_value_heads
    dim = attn.head_dim
    eps_in, eps_post = layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon
    eps_q = attn.q_norm.variance_epsilon  # k_norm's is the same (`fusable`): one kernel normalises both
    qkv_linears, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]

    def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                position_ids: Any = None, past_key_values: Any = None, use_cache: bool | None = False,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        lengths = kwargs.get("kv_lengths")
        plain = not torch.compiler.is_compiling() and lengths is not None and hidden_states.dim() == 3 and on()
        cache = past_key_values
        if plain and hasattr(cache, "layer"):
            cache = cache.layer(attn.layer_idx)
        if not plain or hidden_states.shape[1] != 1 or not hasattr(cache, "flat"):
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                            **kwargs)  # fmt: skip
        rows, _, width = hidden_states.shape
        x = hidden_states.view(rows, width)
        normed = handoff.take(hidden_states) if handoff is not None else None
        if normed is None:
            normed, _ = add_rms_norm(x[None], None, layer.input_layernorm.weight, eps_in)
        cos, sin = position_embeddings
        keys, values, index = cache.flat()
        q = qk_norm_rope_kv(
            partials(qkv_linears, normed), heads, kv_heads, attn.q_norm.weight, attn.k_norm.weight,
            cos.reshape(rows, dim), sin.reshape(rows, dim), eps_q, keys, values, index,
        )  # fmt: skip
        k, v = cache.views()
        out = attention.decode_attention(q.view(rows, heads, 1, dim), k, v, lengths, attn.scaling)
        o = partials([attn.o_proj], out.view(rows, heads * dim))
        normed, total = add_rms_norm(o, x, layer.post_attention_layernorm.weight, eps_post)
        act = silu_mul(partials(gate_up, normed), x.dtype)
        down = partials([mlp.down_proj], act)
        if handoff is None or next_norm is None:
            return add_product(total, down).view(rows, 1, width)
        normed, out = add_rms_norm(down, total, next_norm.weight, next_norm.variance_epsilon)
        out = out.view(rows, 1, width)
        handoff.put(out, normed)  # [rows, width]
        return out

    return forward


def handed_norm_forward(norm: Any, original: Callable[..., Any], handoff: Handoff) -> Callable[..., Any]:
    """A forward for the model's final RMSNorm: the norm the last fused layer left in `handoff` for this very tensor,
    else `original`."""
    import torch

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        normed = None if torch.compiler.is_compiling() else handoff.take(hidden_states)
        return normed.view(hidden_states.shape) if normed is not None else original(hidden_states)

    return forward


class FusedLayers:
    """The decoder layers given `decode_layer_forward` (over the forward each had; layers `fusable` refuses keep
    theirs). A layer followed by a fused layer, or the last one by the model's final norm (`final_norm`, whose
    forward then takes the norm it left: `handed_norm_forward`), ends in the next norm (`Handoff`). `turn_off` sends
    every later call to the layers' own forward at once, whatever wraps them since (the regional compile's eager side
    calls these); `restore` puts the forwards back."""

    def __init__(self, layers: list[Any], final_norm: Any = None) -> None:
        self.on = True
        self.handoff = Handoff()
        self._changed: list[tuple[Any, Any]] = []
        fused = [fusable(layer) is None for layer in layers]
        chained = os.environ.get("QWEN3VL_NORM_HANDOFF", "1").strip() != "0"  # 0: each layer as before (an A/B)
        norm_fused = chained and final_norm is not None and _is_rms_norm(final_norm) and bool(fused) and fused[-1]
        for i, layer in enumerate(layers):
            if not fused[i]:
                continue
            if not chained:
                after = None
            elif i + 1 < len(layers):
                after = layers[i + 1].input_layernorm if fused[i + 1] else None
            else:
                after = final_norm if norm_fused else None
            previous = vars(layer).get("forward")
            layer.forward = decode_layer_forward(layer, layer.forward, lambda: self.on, self.handoff, after)
            self._changed.append((layer, previous))
        if norm_fused:
            previous = vars(final_norm).get("forward")
            final_norm.forward = handed_norm_forward(final_norm, final_norm.forward, self.handoff)
            self._changed.append((final_norm, previous))
        self._layers = sum(fused)

    @property
    def count(self) -> int:
        return self._layers

    def turn_off(self) -> None:
        self.on = False
        self.handoff.take(None)  # nothing held for a layer's own forward

    def restore(self) -> None:
        self.handoff.take(None)  # a step that raised between a layer's put and the next take held tensors
        for layer, previous in self._changed:
            if previous is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = previous
        self._changed.clear()


def _is_rms_norm(norm: Any) -> bool:
    """Whether `norm` is transformers' RMSNorm as the fused kernel computes it (a weight, `variance_epsilon`)."""
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight")


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
        errors = {f"{name} ({split} parts)": error for split in (1, 3)
                  for name, error in check(device, dtype, heads, kv_heads, head_dim, split).items()}  # fmt: skip
    except Exception as exc:
        return f"the fused layer's kernels failed here: {type(exc).__name__}: {str(exc)[:200]}"
    wrong = [name for name, error in errors.items() if not error < 1e-2]  # NaN is wrong too
    return f"the fused layer's {wrong[0]} disagreed with torch (relative {errors[wrong[0]]:.3g})" if wrong else None


def check(
    device: str, dtype: Any, heads: int, kv_heads: int, head_dim: int, split: int, seed: int = 0
) -> dict[str, float]:
    """Each kernel against its torch reference on random data (products as `split` parts: fp32 partial sums, or the
    product itself in `dtype` for 1), relative errors; 1.0 where a cache row outside the step's changed. Runs
    wherever `_triton` finds the kernels (CUDA, or the interpreter: tests)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, like: Any = dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen).to(like)

    def product(rows: int, n: int) -> torch.Tensor:  # as a Linear hands it over, strided rows included
        return rand(split, rows, n + 8, like=dtype if split == 1 else torch.float32)[:, :, :n]

    rows, hidden, width = 3, 320, 1000
    o, r, w = product(rows, hidden), rand(rows, hidden), rand(hidden)
    got, total = add_rms_norm(o, r, w, 1e-6)
    want_total = r + product_reference(o, dtype)
    errors = {"add_rms_norm": _error(got, rms_norm_reference(want_total, w, 1e-6)), "add": _error(total, want_total)}
    alone, same = add_rms_norm(r[None], None, w, 1e-6)
    errors["rms_norm"] = _error(alone, rms_norm_reference(r, w, 1e-6))
    errors["rms_norm's x"] = _error(same, r)
    qkv = product(rows, (heads + 2 * kv_heads) * head_dim)
    qw, kw, cos, sin = rand(head_dim), rand(head_dim), rand(rows, head_dim), rand(rows, head_dim)
    index = torch.randperm(rows * kv_heads * 2, device=device, generator=gen)[: rows * kv_heads]
    keys, values = rand(2, rows * kv_heads * 2, head_dim)
    before = keys.clone(), values.clone()
    q = qk_norm_rope_kv(qkv, heads, kv_heads, qw, kw, cos, sin, 1e-6, keys, values, index)
    heads_of = product_reference(qkv, dtype).view(rows, heads + 2 * kv_heads, head_dim)
    errors["q"] = _error(q, norm_rope_reference(heads_of[:, :heads], qw, cos, sin, 1e-6))
    k = norm_rope_reference(heads_of[:, heads : heads + kv_heads], kw, cos, sin, 1e-6)
    errors["k"] = _error(keys[index], k.reshape(-1, head_dim))
    errors["v"] = _error(values[index], heads_of[:, heads + kv_heads :].reshape(-1, head_dim))
    untouched = torch.ones(keys.shape[0], dtype=torch.bool, device=device)
    untouched[index] = False
    kept = torch.equal(keys[untouched], before[0][untouched]) and torch.equal(values[untouched], before[1][untouched])
    errors["cache rows outside the step"] = 0.0 if kept else 1.0
    gate_up = product(rows, 2 * width)
    gate, up = product_reference(gate_up, dtype).chunk(2, dim=-1)
    errors["silu_mul"] = _error(silu_mul(gate_up, dtype), silu_mul_reference(gate, up))
    down = product(rows, hidden)
    errors["add_product"] = _error(add_product(r, down), r + product_reference(down, dtype))
    return errors


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12))
