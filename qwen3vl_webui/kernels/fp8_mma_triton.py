"""Prefill's fp8 weight from kernels/fp8_mma.py's layout: `value * scale` into a 16-bit `[N, K]`, then cuBLAS.

One program a 16-row tile and BLOCK_K values of k, written row by row: value (row 16t + g + 8h, k = 64c + 16q +
4(2f + p) + 2j + e) is half e of register h that the kernel's bit moves (`fp8_mma.Bits`) make of lane (g, q)'s word
2p + j in half f of chunk c (`fp8_mma.repack`'s placement), the words read where they lie (L1 serves the repeats),
turned back into its e4m3 byte, times its block's scale, rounded once from fp32.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

BLOCK_K = 256  # k a program: its 16 x 256 values stored row by row (contiguous, coalesced)


@triton.jit
def _rotl(w, r: tl.constexpr):
    return ((w << r) | (w >> (32 - r))) & 0xFFFFFFFF


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, y_ptr, K, stride_sn, stride_yn, MASK: tl.constexpr, R1: tl.constexpr, M1: tl.constexpr,
    R2: tl.constexpr, M2: tl.constexpr, SHIFT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    r = tl.arange(0, 16)[:, None]  # the tile's row
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    ok = kk < K
    g, h = r % 8, r // 8
    c, kl = kk // 64, kk % 64
    q, i, j, e = kl // 16, (kl % 16) // 4, (kl % 4) // 2, kl % 2
    f, p = i // 2, i % 2
    offs = (((t * (K // 64) + c) * 2 + f) * 32 + 4 * g + q) * 4 + 2 * p + j
    w = tl.load(w_ptr + offs, mask=ok, other=0).to(tl.int64) & 0xFFFFFFFF  # L1 serves the repeats
    reg = tl.where(h == 0, w & MASK, (_rotl(w, R1) & M1) | (_rotl(w, R2) & M2))
    half = (reg >> (16 * e)) & 0xFFFF  # s << 15 | eeeemmm << SHIFT: the e4m3 byte back, then as fp8 does
    byte = (((half >> 15) << 7) | ((half >> SHIFT) & 0x7F)).to(tl.uint8)
    value = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    scale = tl.load(s_ptr + ((16 * t) // 128) * stride_sn + kk // 128, mask=ok, other=0.0)
    row = 16 * t + r
    tl.store(y_ptr + row.to(tl.int64) * stride_yn + kk, (value * scale).to(y_ptr.dtype.element_ty), mask=ok)


def dequantize(words: Any, scale_inv: Any, bits: Any, dtype: Any) -> Any:
    """words (the weight's `[N, K]` bytes) in fp8_mma's layout with its bit moves `bits` (an `fp8_mma.Bits`), fp32
    block scales `[N/128, K/128]` (rounded up) -> `[N, K]` in `dtype`."""
    import torch

    w = words.view(torch.int32)
    n, k = w.shape[0], w.numel() * 4 // w.shape[0]
    scale_inv = scale_inv.to(torch.float32).contiguous()
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    grid = (n // 16, triton.cdiv(k, BLOCK_K))
    _dequant_kernel[grid](w, scale_inv, out, k, scale_inv.stride(0), out.stride(0), MASK=bits.mask, R1=bits.r1,
                          M1=bits.m1, R2=bits.r2, M2=bits.m2, SHIFT=bits.shift, BLOCK_K=BLOCK_K,
                          num_warps=4)  # fmt: skip
    return out
