"""The last step of a split-K product: `[split, rows, n]` fp32 partial sums added and written in the output's dtype by
one Triton kernel. `out.sum(dim=0).to(dtype)` was two kernels (the sum, then the cast), and the decode step runs
three split products per layer (o and down at every row count, qkv where its tuned config splits), so each layer
paid three extra launches inside the CUDA graph. Nothing imports this module at package import time: the kernel
modules import it, where Triton runs.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from qwen3vl_webui.kernels import pdl

BLOCK = 1024  # outputs per program: 2560 outputs (o, down at one row) make 3 programs, 32 rows x 2560 make 80


@triton.jit
def _reduce_kernel(p_ptr, y_ptr, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * total + offs, mask=ok, other=0.0)
    pdl.finish(PDL)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def reduce_partials(partials: Any, dtype: Any) -> Any:
    """`partials` fp32 `[split, rows, n]` (contiguous) -> their sum over `split`, `[rows, n]` in `dtype`, rounded once."""
    import torch

    split, rows, n = partials.shape
    out = torch.empty((rows, n), device=partials.device, dtype=dtype)
    total = rows * n
    _reduce_kernel[(triton.cdiv(total, BLOCK),)](
        partials, out, total, SPLIT=split, BLOCK=BLOCK, num_warps=4, **pdl.args(partials, "splitk")
    )
    return out


@triton.jit
def _zero_kernel(y_ptr, total, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pdl.finish(PDL)
    tl.store(y_ptr + offs, tl.zeros([BLOCK], dtype=y_ptr.dtype.element_ty), mask=offs < total)


def zeros(shape: tuple[int, ...], device: Any, launch: dict[str, Any]) -> Any:
    """An fp32 tensor of zeros that atomic partial sums are added into. With programmatic dependent launch on
    (`launch`: pdl.args' answer) it is cleared by our kernel, launched the same way, so no torch fill (launched
    without it) sits between two PDL launches. It was a guess at session 26's fp8 loss under PDL (9% at one stream,
    its one-row atomic GEMV following such a fill); session 27 measured 5% with this fill and 1% with fp8's own
    kernels launched without PDL: the loss is in those kernels, so fp8 launches without PDL by default and this
    runs only where QWEN3VL_PDL turns it on. Without PDL, torch.zeros."""
    import torch

    if not launch:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    out = torch.empty(shape, device=device, dtype=torch.float32)
    total = out.numel()
    _zero_kernel[(triton.cdiv(total, BLOCK),)](out, total, BLOCK=BLOCK, num_warps=4, **launch)
    return out
