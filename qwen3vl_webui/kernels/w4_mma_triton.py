"""Prefill's int4 weight from kernels/w4_mma.py's layout: `(q - zero) * scale` into a 16-bit `[N, K]`, then cuBLAS.

One program a 16-row tile and CHUNKS 64-k chunks: it reads the tile's words for those chunks (the 32 lanes' 4 words
each, contiguous), takes nibble 4e + 2b + h of lane (g, q)'s word i to row 16t + g + 8h and k = 64c + 16q + 4i + 2b
+ e (`w4_mma.repack`'s placement), and rounds each value once from fp32, as kernels/int4.py's `dequantize_weight`.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

CHUNKS = 4  # 64-k chunks a program


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, K, stride_sn, stride_yn, G: tl.constexpr, CHUNKS: tl.constexpr):
    t = tl.program_id(0)
    c0 = tl.program_id(1) * CHUNKS
    chunks = K // 64
    c = c0 + tl.arange(0, CHUNKS)[:, None, None, None]  # [C, 1, 1, 1]
    lane = tl.arange(0, 32)[None, :, None, None]
    i = tl.arange(0, 4)[None, None, :, None]
    p = tl.arange(0, 8)[None, None, None, :]
    ok = c < chunks
    words = tl.load(w_ptr + ((t * chunks + c) * 32 + lane) * 4 + i, mask=ok, other=0)  # [C, 32, 4, 1]
    nib = (words >> (4 * p)) & 0xF  # [C, 32, 4, 8]
    g, q = lane // 4, lane % 4
    e, b, h = p // 4, (p // 2) % 2, p % 2
    row = 16 * t + g + 8 * h
    k = 64 * c + 16 * q + 4 * i + 2 * b + e
    group = (64 * c) // G
    scale = tl.load(s_ptr + row * stride_sn + group, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + row * stride_sn + group, mask=ok, other=0).to(tl.float32)
    value = (nib.to(tl.float32) - zero) * scale
    tl.store(y_ptr + row.to(tl.int64) * stride_yn + k, value.to(y_ptr.dtype.element_ty), mask=ok & (nib >= 0))


def dequantize(words: Any, scales: Any, zeros: Any, dtype: Any) -> Any:
    """words int32 `[N, K/8]` in w4_mma's layout, scales and zeros `[N, K/G]` (kernels/int4.py's) -> `[N, K]`."""
    import torch

    n, k = words.shape[0], words.shape[1] * 8
    group = k // scales.shape[1]
    if scales.stride(0) != zeros.stride(0) or scales.stride(1) != 1 or zeros.stride(1) != 1:
        scales, zeros = scales.contiguous(), zeros.contiguous()
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    grid = (n // 16, triton.cdiv(k // 64, CHUNKS))
    _dequant_kernel[grid](words, scales, zeros, out, k, scales.stride(0), out.stride(0), G=group, CHUNKS=CHUNKS,
                          num_warps=4)  # fmt: skip
    return out
