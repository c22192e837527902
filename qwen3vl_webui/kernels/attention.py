"""Decode attention for one-token queries over each row's live KV length: split-KV Triton on CUDA, torch elsewhere.

`decode_attention(q, k, v, lengths, scale)`: q [rows, heads, 1, dim]; k, v [rows, kv_heads, max_len, dim] (any
strides: the engine passes views of its flat per-layer KV); lengths [rows] (keys 0..length-1 of each row are live,
length >= 1); returns [rows, heads, 1, dim] contiguous, in q's dtype. Query head h reads KV head h // (heads //
kv_heads), as transformers' `repeat_kv` does.

On CUDA, one program handles the query heads that share a KV head (K/V read once) over one of `num_splits` ranges
of the row's live keys ("flash-decoding"); a second small kernel combines the splits. The split count depends only
on shapes, and each program derives its range from the row's length in the kernel, so a captured CUDA graph stays
right as lengths grow, and no work is spent on the slot's dead tail. It is a torch custom op, so torch.compile
(fullgraph) treats it as one opaque call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

OP_NAME = "qwen3vl_webui::decode_attention"
SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor"
# Registered in transformers' attention and mask interfaces; the text config points at it while an engine compiles.
PACKED_DECODE_ATTENTION = "qwen3vl_webui_sdpa"
# Keys per inner step of a program. 64 x head_dim 128 in bf16 is 16 KiB for K and as much for V.
BLOCK_N = 64
MAX_SPLITS = 16
# Programs to aim for per streaming multiprocessor (enough loads in flight to stream KV near copy bandwidth).
PROGRAMS_PER_SM = 2


def decode_attention_reference(q: Any, k: Any, v: Any, lengths: Any, scale: float) -> Any:
    """Plain torch, float32 math at least: softmax(q k^T * scale, keys past each row's length masked) v."""
    import torch

    rows, heads, _, dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim).to(math_dtype)
    scores = torch.matmul(grouped, k.to(math_dtype).transpose(-1, -2)) * scale  # [rows, kv_heads, group, max_len]
    live = torch.arange(max_len, device=q.device).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)
    probs = scores.masked_fill(~live, float("-inf")).softmax(-1)
    return torch.matmul(probs, v.to(math_dtype)).reshape(rows, heads, 1, dim).to(q.dtype)


def num_splits(rows: int, kv_heads: int, max_len: int, sms: int) -> int:
    """Splits per (row, KV head): enough programs to fill the GPU, none shorter than one block of keys."""
    want = math.ceil(PROGRAMS_PER_SM * sms / max(1, rows * kv_heads))
    return max(1, min(want, MAX_SPLITS, math.ceil(max_len / BLOCK_N)))


@functools.cache
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_attention_triton(
    q: Any, k: Any, v: Any, lengths: Any, scale: float, splits: int | None = None, out: Any = None
) -> Any:
    """The Triton path (CUDA, or any device under TRITON_INTERPRET=1). `splits` None: chosen from the shapes.

    `out` (contiguous [rows, heads, 1, dim]) is written in place if given (checks poison it first).
    """
    import torch
    import triton

    from qwen3vl_webui.kernels import attention_triton as kernels
    from qwen3vl_webui.kernels import pdl

    rows, heads, _, dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of KV heads {kv_heads}")
    group = heads // kv_heads
    if splits is None:
        sms = _sm_count(q.device.index or 0) if q.is_cuda else 8
        splits = num_splits(rows, kv_heads, max_len, sms)
    if out is None:
        out = torch.empty(rows, heads, 1, dim, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot wants 16 rows at least: the pad heads are masked
    direct = splits == 1
    if direct:
        part = lse = out  # unused
    else:
        part = torch.empty(rows, heads, splits, block_d, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device)
    kernels.split_kv_partials[(rows, kv_heads, splits)](
        q, k, v, lengths, out, part, lse,
        scale * math.log2(math.e), splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=block_h, BLOCK_N=BLOCK_N, BLOCK_D=block_d, DIM=dim,
        DIRECT=direct, IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2, **pdl.args(q, "attention"),
    )  # fmt: skip
    if not direct:
        kernels.combine_splits[(rows, heads)](
            part, lse, out, splits, out.stride(0), out.stride(1),
            HEADS=heads, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, DIM=dim, num_warps=4,
            **pdl.args(q, "attention"),
        )  # fmt: skip
    return out


@functools.cache
def decode_attention_op() -> Any:
    """The custom op (registered on first use): Triton on CUDA, the torch reference elsewhere."""
    import torch

    # An explicit schema: this module's annotations are strings (`from __future__ import annotations`).
    @torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
    def decode_attention(q: Any, k: Any, v: Any, lengths: Any, scale: float) -> Any:
        if q.is_cuda:
            return decode_attention_triton(q, k, v, lengths, scale)
        return decode_attention_reference(q, k, v, lengths, scale).contiguous()

    @decode_attention.register_fake
    def _(q: Any, k: Any, v: Any, lengths: Any, scale: float) -> Any:
        return q.new_empty(q.shape)

    return decode_attention


def decode_attention(q: Any, k: Any, v: Any, lengths: Any, scale: float) -> Any:
    """See the module docstring; dispatches through the custom op.

    Under torch.compile the op must already be registered (`decode_attention_op()`, which the engine calls before
    compiling): dynamo cannot trace a registration, while `torch.ops` look-ups are free for it.
    """
    import torch

    if not torch.compiler.is_dynamo_compiling():
        decode_attention_op()
    return torch.ops.qwen3vl_webui.decode_attention(q, k, v, lengths, float(scale))


@functools.cache
def kernel_blocker(device: Any, dtype: Any, heads: int, kv_heads: int, dim: int) -> str | None:
    """Why the Triton kernel cannot serve this model here, or None: it must import, compile and match the reference.

    Runs once per process and shape (cached) on small random data of the model's head shapes, building the kernel
    for them; the batch engine runs it beside the other kernels' probes (engine/batch/graphs.py `_probe_kernels`).
    """
    import torch

    if torch.device(device).type != "cuda":
        return "not on CUDA"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        rows, max_len = 2, 4 * BLOCK_N
        q = torch.randn(rows, heads, 1, dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(rows, kv_heads, max_len, dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(rows, kv_heads, max_len, dim, device=device, dtype=dtype, generator=gen)
        lengths = torch.tensor([max_len - 7, 3], device=device)
        ref = decode_attention_reference(q, k, v, lengths, dim**-0.5).float()
        for splits in (1, 3):
            got = decode_attention_triton(q, k, v, lengths, dim**-0.5, splits=splits).float()
            err = float((got - ref).norm() / ref.norm())
            if not err < 2e-2:  # NaN fails too
                return f"Triton decode attention differs from the reference (relative error {err:.3g}, {splits} splits)"
    except Exception as exc:  # no Triton, no compiler, unsupported GPU: decode attention stays on SDPA
        return f"Triton decode attention unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    return None


# ------------------------------------------------------------ routing the text model's attention here


def packed_decode_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' SDPA attention, except for one-token queries: the decode kernel, else SDPA GQA-packed.

    With `kv_lengths` ([rows], keys 0..length-1 live; the batch engine passes it) a one-token query runs
    `attention.decode_attention`, which reads only each row's live keys and ignores `attention_mask`.
    Without it, one-token queries still run GQA-packed: transformers packs the 4 query heads of each KV head into
    the query-length axis, so SDPA reads K/V once, but not while dynamo traces (`is_torchdynamo_compiling`):
    compiled, it materialises `repeat_kv`, 4x the KV bytes per step (at 32 streams x 1k tokens, ~20 GB per step).
    Everything else is delegated, so prefill and plain `generate` are unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop("kv_lengths", None)
    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] == 1 and not dropout and kwargs.get("position_bias") is None
    if lengths is not None and plain:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, lengths, scale).transpose(1, 2), None
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if not plain or groups == 1 or per_head_mask:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_packed_decode_attention(text_config: Any) -> Callable[[], None]:
    """Routes the text model's attention through `packed_decode_attention` (if it uses SDPA); returns the undo."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    previous = text_config._attn_implementation
    if previous != "sdpa":
        return lambda: None
    decode_attention_op()  # registered before any trace (dynamo cannot trace a registration)
    AttentionInterface.register(PACKED_DECODE_ATTENTION, packed_decode_attention)
    AttentionMaskInterface.register(PACKED_DECODE_ATTENTION, sdpa_mask)  # prefill masks exactly as for "sdpa"
    text_config._attn_implementation = PACKED_DECODE_ATTENTION

    def restore() -> None:
        text_config._attn_implementation = previous

    return restore


def decode_kernel_blocker(device: str, text_config: Any, dtype: Any) -> str | None:
    """Why decode steps cannot use the split-KV Triton attention (above) here, or None.

    It needs CUDA, transformers' SDPA as the text model's attention (the engine routes through
    `packed_decode_attention`), and a kernel that compiles and matches the torch reference on this GPU.
    """
    if not str(device).startswith("cuda"):
        return "not on CUDA"
    if text_config._attn_implementation not in ("sdpa", PACKED_DECODE_ATTENTION):
        return f"attention implementation {text_config._attn_implementation!r} is not sdpa"
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return kernel_blocker(device, dtype, heads, kv_heads, head_dim)
