"""Triton kernels of the split-KV decode attention (imported only where Triton runs: CUDA, or its interpreter)."""

from __future__ import annotations

import triton
import triton.language as tl

from qwen3vl_webui.kernels import pdl


@triton.jit
def split_kv_partials(
    Q, K, V, Lens, Out, Part, Lse,
    scale_log2, num_splits,
    sq_r, sq_h, sk_r, sk_h, sk_n, sv_r, sv_h, sv_n, so_r, so_h,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DIM: tl.constexpr,
    DIRECT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    """One program: one row, one KV head (its GROUP query heads packed), one split of the row's live keys.

    The split's range is derived from the row's length here, so one launch configuration serves any lengths
    (a CUDA graph replays it as positions grow). DIRECT (one split): writes the normalised output; otherwise
    the split's normalised partial output and its log2-sum-exp, combined by `combine_splits`.
    """
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lens + row).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    head_ok = h < GROUP
    d_ok = d < DIM
    heads = kvh * GROUP + h
    q = tl.load(Q + row * sq_r + heads[:, None] * sq_h + d[None, :], mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + row * sk_r + kvh * sk_h
    v_base = V + row * sv_r + kvh * sv_h
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for block in range(start, end, BLOCK_N):
        pos = block + n
        live = pos < end
        kv_mask = live[:, None] & d_ok[None, :]
        k = tl.load(k_base + pos[:, None] * sk_n + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(live[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + pos[:, None] * sv_n + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0  # a split past the row's length saw no key
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out_mask = head_ok[:, None] & d_ok[None, :]
    pdl.finish(PDL)
    if DIRECT:
        tl.store(Out + row * so_r + heads[:, None] * so_h + d[None, :], out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        # Part [rows, heads, splits, BLOCK_D] and Lse [rows, heads, splits], both contiguous fp32.
        slot = (row * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(Part + slot[:, None] * BLOCK_D + d[None, :], out, mask=out_mask)
        tl.store(Lse + slot, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=head_ok)


@triton.jit
def combine_splits(
    Part, Lse, Out, num_splits, so_r, so_h,
    HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DIM: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    """One program per (row, head): the splits' partial outputs weighted by their share of the softmax mass."""
    pdl.start(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    base = (row * HEADS + head) * num_splits
    lse = tl.load(Lse + base + s, mask=s_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(s_ok, weight, 0.0)
    part = tl.load(Part + (base + s)[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    pdl.finish(PDL)
    tl.store(Out + row * so_r + head * so_h + d, out.to(Out.dtype.element_ty), mask=d < DIM)
