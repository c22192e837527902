"""Prefill's int4 weight from kernels/w4_mma.py's layout: `(q - zero) * scale` into a 16-bit `[N, K]`, then cuBLAS.

One program a 16-row tile and BLOCK_K values of k, written row by row: value (row 16t + g + 8h, k = 64c + 16q + 4i +
2b + e) is nibble 4e + 2b + h of lane (g, q)'s word i in chunk c (`w4_mma.repack`'s placement), the words read where
they lie (the tile's few KB stay in L1), each value rounded once from fp32 as kernels/int4.py's `dequantize_weight`.
Session 30's first version wrote in the words' order (scattered 2-byte stores): a 512-token prefill took 53 ms
against 19 with int4's own layout (H100).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

BLOCK_K = 256  # k a program: its 16 x 256 values stored row by row (contiguous, coalesced)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, K, stride_sn, stride_yn, G: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    r = tl.arange(0, 16)[:, None]  # the tile's row
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    ok = kk < K
    g, h = r % 8, r // 8
    c, kl = kk // 64, kk % 64
    q, i, b, e = kl // 16, (kl % 16) // 4, (kl % 4) // 2, kl % 2
    word = tl.load(w_ptr + ((t * (K // 64) + c) * 32 + 4 * g + q) * 4 + i, mask=ok, other=0)  # L1 serves the repeats
    nib = (word >> (4 * (4 * e + 2 * b + h))) & 0xF
    row = 16 * t + r
    scale = tl.load(s_ptr + row * stride_sn + kk // G, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + row * stride_sn + kk // G, mask=ok, other=0).to(tl.float32)
    value = (nib.to(tl.float32) - zero) * scale
    tl.store(y_ptr + row.to(tl.int64) * stride_yn + kk, value.to(y_ptr.dtype.element_ty), mask=ok)


def dequantize(words: Any, scales: Any, zeros: Any, dtype: Any) -> Any:
    """words int32 `[N, K/8]` in w4_mma's layout, scales and zeros `[N, K/G]` (kernels/int4.py's) -> `[N, K]`."""
    import torch

    n, k = words.shape[0], words.shape[1] * 8
    group = k // scales.shape[1]
    if scales.stride(0) != zeros.stride(0) or scales.stride(1) != 1 or zeros.stride(1) != 1:
        scales, zeros = scales.contiguous(), zeros.contiguous()
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    grid = (n // 16, triton.cdiv(k, BLOCK_K))
    _dequant_kernel[grid](words, scales, zeros, out, k, scales.stride(0), out.stride(0), G=group, BLOCK_K=BLOCK_K,
                          num_warps=4)  # fmt: skip
    return out
