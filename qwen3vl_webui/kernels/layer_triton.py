"""Triton kernels of the fused decode layer (kernels/layer.py): imported only where Triton runs (CUDA, its interpreter).

Each kernel computes what transformers' eager ops compute, rounding to the activations' dtype where they round
(every bf16 op rounds its result), so the fused layer differs from the eager one only in the order of the fp32 sums
of a norm's squares.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_rms_norm(
    X, R, W, Out, Sum, eps, n, sx, sr, so, ss,
    HAS_R: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: Sum = X + R (rounded), Out = W * (Sum * rsqrt(mean(Sum²) + eps)) (HAS_R), or of X alone."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0)
    if HAS_R:
        x = (x.to(tl.float32) + tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Sum + row * ss + cols, x, mask=ok)
    x = x.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * so + cols, (w * y).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _norm_rope(x, xp, w, wp, c, s, first, eps, DIM: tl.constexpr, DTYPE: tl.constexpr):
    """One head's RMSNorm then RoPE, as transformers rounds: x at each position, xp at its rotate_half partner."""
    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
    n = (w * (x * inv).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    npart = (wp * (xp * inv).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    rot = tl.where(first, -npart, npart)  # rotate_half: cat(-x[half:], x[:half])
    return ((n * c).to(DTYPE).to(tl.float32) + (rot * s).to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def qk_norm_rope_kv(
    QKV, QW, KW, Cos, Sin, Q, Keys, Values, Index, eps,
    s_row, s_cos, s_q,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, HAS_KV: tl.constexpr,
):  # fmt: skip
    """One program per (row, head) of q, k and v from one row of the fused q/k/v product [q | k | v].

    q heads: RMSNorm (q_norm) then RoPE, into Q [rows, HEADS, DIM]. k heads: RMSNorm (k_norm) then RoPE, into the
    flat per-layer cache Keys at row Index[row * KV_HEADS + head]. v heads: copied into Values there. Without the
    cache (not HAS_KV), k goes to Keys [rows, KV_HEADS, DIM] and v is left where it is.
    """
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, DIM)
    half: tl.constexpr = DIM // 2
    partner = (d + half) % DIM
    first = d < half
    dtype = Q.dtype.element_ty
    src = QKV + row * s_row + head * DIM
    if head < HEADS:
        x = tl.load(src + d).to(tl.float32)
        xp = tl.load(src + partner).to(tl.float32)
        w = tl.load(QW + d).to(tl.float32)
        wp = tl.load(QW + partner).to(tl.float32)
        c = tl.load(Cos + row * s_cos + d).to(tl.float32)
        s = tl.load(Sin + row * s_cos + d).to(tl.float32)
        tl.store(Q + row * s_q + head * DIM + d, _norm_rope(x, xp, w, wp, c, s, first, eps, DIM, dtype))
    elif head < HEADS + KV_HEADS:
        kvh = head - HEADS
        x = tl.load(src + d).to(tl.float32)
        xp = tl.load(src + partner).to(tl.float32)
        w = tl.load(KW + d).to(tl.float32)
        wp = tl.load(KW + partner).to(tl.float32)
        c = tl.load(Cos + row * s_cos + d).to(tl.float32)
        s = tl.load(Sin + row * s_cos + d).to(tl.float32)
        k = _norm_rope(x, xp, w, wp, c, s, first, eps, DIM, dtype)
        if HAS_KV:
            dst = tl.load(Index + row * KV_HEADS + kvh).to(tl.int64)
            tl.store(Keys + dst * DIM + d, k)
        else:
            tl.store(Keys + (row * KV_HEADS + kvh) * DIM + d, k)
    elif HAS_KV:
        kvh = head - HEADS - KV_HEADS
        dst = tl.load(Index + row * KV_HEADS + kvh).to(tl.int64)
        tl.store(Values + dst * DIM + d, tl.load(src + d))


@triton.jit
def silu_mul(G, U, Out, n, sg, su, so, BLOCK: tl.constexpr):
    """Out = silu(G) * U, rounded after each op as transformers' eager MLP; one program per (row, block of columns)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(G + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * so + cols, (act * u).to(Out.dtype.element_ty), mask=ok)
