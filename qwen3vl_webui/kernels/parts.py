"""A quantized Linear's product under torch.compile: the whole product from one custom op, or, for one row, its split-K
partial sums from another, added by the compiled graph where it consumes the product (int4.py, fp8.py).

Our decode kernels split K where N alone gives too few programs (o and down at every row count, qkv where TUNED says),
and adding the fp32 partial sums inside the custom op costs a kernel launch of its own in the CUDA graph. Returned
unsummed, their sum is an inductor op that fuses into the next one (the residual add, the activation, the norm). The
op's fake must know the split, which depends on the row count: so only one row takes this path. Dynamo specializes a
size of 1, so the one-stream decode step's graph is static; larger buckets share a symbolic row count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def compiled_product(x: torch.Tensor, whole: Callable[..., torch.Tensor], parts: Callable[..., torch.Tensor],
                     *buffers: Any) -> torch.Tensor:  # fmt: skip
    """`x @ Wᵀ` in x's dtype while dynamo traces: `parts(x, *buffers)` (`[split, ..., N]`, fp32 unless it is the
    product itself in x's dtype) summed here for one row, `whole(x, *buffers)` for more."""
    if x.numel() != x.shape[-1]:
        return whole(x, *buffers)
    out = parts(x, *buffers)
    if out.shape[0] == 1:
        return out[0] if out.dtype == x.dtype else out[0].to(x.dtype)
    return out.sum(dim=0).to(x.dtype)


def decode_kernels(x: torch.Tensor, kernels: Callable[[], Any], max_rows: int) -> Any | None:
    """`kernels()` (a Triton kernel module, or None without Triton) when `x` is a decode-sized product the kernels
    serve: 16-bit on CUDA, 1..max_rows rows. None otherwise (the torch path, or prefill's dequantize + cuBLAS)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < rows <= max_rows):
        return None
    return kernels()


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` as the contiguous `[rows, K]` the kernels read (a view where it already is)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 and x2.stride(0) == k else x2.contiguous()
