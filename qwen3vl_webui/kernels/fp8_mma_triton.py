"""Prefill's fp8 weight from kernels/fp8_mma.py's layout: `value * scale` into a 16-bit `[N, K]`, then cuBLAS.

One program a 16-row tile and CHUNKS 64-k chunks: it reads the tile's words for those chunks (two halves of the 32
lanes' 4 words each, contiguous), makes each word's two registers with the kernel's bit moves (`fp8_mma.Bits`), and
takes half e of register h of lane (g, q)'s word 2p + j in half f to row 16t + g + 8h and k = 64c + 16q + 4(2f + p) +
2j + e (`fp8_mma.repack`'s placement), as the e4m3 byte again times its block's scale, rounded once from fp32.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

CHUNKS = 2  # 64-k chunks a program


@triton.jit
def _rotl(w, r: tl.constexpr):
    return ((w << r) | (w >> (32 - r))) & 0xFFFFFFFF


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, y_ptr, K, stride_sn, stride_yn, MASK: tl.constexpr, R1: tl.constexpr, M1: tl.constexpr,
    R2: tl.constexpr, M2: tl.constexpr, SHIFT: tl.constexpr, CHUNKS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    c0 = tl.program_id(1) * CHUNKS
    chunks = K // 64
    c = c0 + tl.arange(0, CHUNKS)[:, None, None, None]  # [C, 1, 1, 1]
    f = tl.arange(0, 2)[None, :, None, None]
    lane = tl.arange(0, 32)[None, None, :, None]
    word = tl.arange(0, 4)[None, None, None, :]
    ok = c < chunks
    offs = (((t * chunks + c) * 2 + f) * 32 + lane) * 4 + word
    w = tl.load(w_ptr + offs, mask=ok, other=0).to(tl.int64) & 0xFFFFFFFF  # [C, 2, 32, 4]
    g, q = lane // 4, lane % 4
    p, j = word // 2, word % 2
    k = 64 * c + 16 * q + 4 * (2 * f + p) + 2 * j
    group_scale = tl.load(s_ptr + (16 * t // 128) * stride_sn + (64 * c) // 128, mask=ok, other=0.0)
    first = w & MASK
    second = (_rotl(w, R1) & M1) | (_rotl(w, R2) & M2)
    for h in tl.static_range(2):
        reg = first if h == 0 else second
        row = 16 * t + g + 8 * h
        for e in tl.static_range(2):
            half = (reg >> (16 * e)) & 0xFFFF  # s << 15 | eeeemmm << SHIFT: the e4m3 byte back, then as fp8 does
            byte = (((half >> 15) << 7) | ((half >> SHIFT) & 0x7F)).to(tl.uint8)
            value = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            out = (value * group_scale).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + row.to(tl.int64) * stride_yn + k + e, out, mask=ok & (row >= 0))


def dequantize(words: Any, scale_inv: Any, kind: Any, dtype: Any) -> Any:
    """words (the weight's `[N, K]` bytes) in fp8_mma's layout for 16-bit kind `kind`, fp32 block scales
    `[N/128, K/128]` (rounded up) -> `[N, K]` in `dtype`."""
    import torch

    from qwen3vl_webui.kernels import fp8_mma

    bits = fp8_mma.BITS[kind]
    w = words.view(torch.int32)
    n, k = w.shape[0], w.numel() * 4 // w.shape[0]
    scale_inv = scale_inv.to(torch.float32).contiguous()
    out = torch.empty((n, k), device=words.device, dtype=dtype)
    grid = (n // 16, triton.cdiv(k // 64, CHUNKS))
    _dequant_kernel[grid](w, scale_inv, out, k, scale_inv.stride(0), out.stride(0), MASK=bits.mask, R1=bits.r1,
                          M1=bits.m1, R2=bits.r2, M2=bits.m2, SHIFT=bits.shift, CHUNKS=CHUNKS,
                          num_warps=4)  # fmt: skip
    return out
