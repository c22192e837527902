"""Triton kernels of the fused decode layer (kernels/layer.py): imported only where Triton runs (CUDA, its interpreter).

Each kernel computes what transformers' eager ops compute, rounding to the activations' dtype where they round
(every bf16 op rounds its result), so the fused layer differs from the eager one only in the order of the fp32 sums
of a norm's squares. Where torch's CUDA op is exact, so is ours: a norm's mean is its sum times 1/n (torch's
MeanOps), SiLU divides with `div_rn` and exponentiates with libdevice's expf (Triton's `/` and `tl.exp` are the
approximate div.full / ex2.approx, a bf16 step off torch's SiLU for some hundreds of bf16 inputs). PRECISE is off only
under Triton's interpreter, which has no libdevice.

A product's output comes in as its partial sums `P [SPLIT, rows, n]` (strides `sp` between parts, `sr` between rows):
a split-K product's fp32 parts (int4, fp8), added here in part order and rounded to the activations' dtype once, as
its own reduction kernel would (kernels/splitk.py), or the product itself (SPLIT 1, already in that dtype: the
rounding is exact). The reduction's launch is saved.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from qwen3vl_webui.kernels import pdl


@triton.jit
def _product(P, sp, offs, ok, SPLIT: tl.constexpr, DTYPE: tl.constexpr):
    """The product at `offs`: its SPLIT partial sums added in order, rounded to DTYPE, as fp32."""
    acc = tl.load(P + offs, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(P + s * sp + offs, mask=ok, other=0.0).to(tl.float32)
    return acc.to(DTYPE).to(tl.float32)


@triton.jit
def add_rms_norm(
    X, R, W, Out, Sum, eps, n, inv_n, sx_p, sx, sr, so, ss,
    HAS_R: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    """One program per row: x = the product in X (its SPLIT parts); Sum = x + R (rounded) and Out = W * (Sum *
    rsqrt(mean(Sum²) + eps)) (HAS_R), or Out of x alone."""
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    dtype = Out.dtype.element_ty
    x = _product(X, sx_p, row * sx + cols, ok, SPLIT, dtype)
    if HAS_R:
        x = (x + tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) * inv_n + eps)
    y = (x * inv).to(dtype).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    pdl.finish(PDL)
    if HAS_R:
        tl.store(Sum + row * ss + cols, x.to(dtype), mask=ok)
    tl.store(Out + row * so + cols, (w * y).to(dtype), mask=ok)


@triton.jit
def _norm_rope(x, xp, w, wp, c, s, first, eps, DIM: tl.constexpr, DTYPE: tl.constexpr):
    """One head's RMSNorm then RoPE, as transformers rounds: x at each position, xp at its rotate_half partner."""
    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) * (1.0 / DIM) + eps)
    n = (w * (x * inv).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    npart = (wp * (xp * inv).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    rot = tl.where(first, -npart, npart)  # rotate_half: cat(-x[half:], x[:half])
    return ((n * c).to(DTYPE).to(tl.float32) + (rot * s).to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def qk_norm_rope_kv(
    QKV, QW, KW, Cos, Sin, Q, Keys, Values, Index, eps,
    s_part, s_row, s_cos, s_q,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    """One program per (row, head) of q, k and v from one row of the fused q/k/v product [q | k | v] (SPLIT parts).

    q heads: RMSNorm (q_norm) then RoPE, into Q [rows, HEADS, DIM]. k heads: RMSNorm (k_norm) then RoPE, into the
    flat per-layer cache Keys at row Index[row * KV_HEADS + head]. v heads: into Values there.
    """
    pdl.start(PDL)  # (each branch below calls `finish` once, after its last load)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, DIM)
    half: tl.constexpr = DIM // 2
    partner = (d + half) % DIM
    first = d < half
    dtype = Q.dtype.element_ty
    base = row * s_row + head * DIM
    everywhere = d < DIM
    if head < HEADS + KV_HEADS:
        x = _product(QKV, s_part, base + d, everywhere, SPLIT, dtype)
        xp = _product(QKV, s_part, base + partner, everywhere, SPLIT, dtype)
        c = tl.load(Cos + row * s_cos + d).to(tl.float32)
        s = tl.load(Sin + row * s_cos + d).to(tl.float32)
        if head < HEADS:
            w = tl.load(QW + d).to(tl.float32)
            wp = tl.load(QW + partner).to(tl.float32)
            pdl.finish(PDL)
            tl.store(Q + row * s_q + head * DIM + d, _norm_rope(x, xp, w, wp, c, s, first, eps, DIM, dtype))
        else:
            w = tl.load(KW + d).to(tl.float32)
            wp = tl.load(KW + partner).to(tl.float32)
            dst = tl.load(Index + row * KV_HEADS + head - HEADS).to(tl.int64)
            pdl.finish(PDL)
            tl.store(Keys + dst * DIM + d, _norm_rope(x, xp, w, wp, c, s, first, eps, DIM, dtype))
    else:
        dst = tl.load(Index + row * KV_HEADS + head - HEADS - KV_HEADS).to(tl.int64)
        v = _product(QKV, s_part, base + d, everywhere, SPLIT, dtype).to(dtype)
        pdl.finish(PDL)
        tl.store(Values + dst * DIM + d, v)


@triton.jit
def silu_mul(
    P, Out, n, sp, sr, so, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr = 0
):
    """Out = silu(gate) * up from the gate/up product [gate | up] (n columns each, SPLIT parts), rounded after each op
    as transformers' eager MLP; one program per (row, block of columns)."""
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    dtype = Out.dtype.element_ty
    g = _product(P, sp, row * sr + cols, ok, SPLIT, dtype)
    u = _product(P, sp, row * sr + n + cols, ok, SPLIT, dtype)
    if PRECISE:  # torch's CUDA SiLU: x / (1 + expf(-x)), an IEEE division
        act = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
    else:
        act = tl.math.div_rn(g, 1.0 + tl.exp(-g))
    act = act.to(dtype).to(tl.float32)
    pdl.finish(PDL)
    tl.store(Out + row * so + cols, (act * u).to(dtype), mask=ok)


@triton.jit
def add_product(R, P, Out, n, sr, sp, spr, so, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    """Out = R + the product in P (its SPLIT parts), rounded: the layer's last residual add."""
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    dtype = Out.dtype.element_ty
    y = _product(P, sp, row * spr + cols, ok, SPLIT, dtype)
    r = tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
    pdl.finish(PDL)
    tl.store(Out + row * so + cols, (r + y).to(dtype), mask=ok)
