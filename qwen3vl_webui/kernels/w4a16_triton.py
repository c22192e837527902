"""Triton kernels for 4-bit group-quantized weights with 16-bit activations (W4A16, kernels/int4.py's layout).

Layout (nn.Linear's `[N, K]` orientation): `qweight` int32 `[N, K // 8]`, weight `(n, k)` is the unsigned nibble
`(qweight[n, k // 8] >> 4 * (k % 8)) & 0xF`; `scales` 16-bit `[N, K // G]`; `zeros` uint8 `[N, K // G]`; the weight is
`(q - zero) * scale`, `G` the group size (a multiple of 8 dividing K).

Both matmul kernels walk K one group at a time and unpack by **nibble planes**: plane j of a `[BLOCK_N, G // 8]` tile
of packed words is `(words >> 4j) & 0xF`, the weights of columns `8w + j`, multiplied against the activations read
with stride 8 from column j. No tensor is reshaped (v1 built `[BLOCK_N, groups, G]` through `tl.reshape`, which
Triton lays out through shared memory: 0.2-0.3 TB/s on an H200, bench/RESULTS.md), and a group's scale multiplies
its partial sum once. K is split over `split_k` programs where N alone gives too few (o and down have N = 2560:
80 tiles of 32 rows for 132 SMs); their fp32 partial sums are added and rounded by one small kernel (kernels/splitk.py).

- `_gemv_kernel` (decode, one token row per program): fp32 FMAs, no tensor cores; each packed byte read once per row.
- `_skinny_kernel` (2..SKINNY_MAX_ROWS rows, G >= 128): each plane `q - zero` (integers in [-15, 15], exact in
  bf16/fp16) goes to `tl.dot` against the rows' plane of activations (K = G / 8 = 16 per dot); no weight is ever
  rounded to 16 bits. Smaller groups (tiny test models, some checkpoints) take the GEMV per row.
- `_tile_kernel` (2..32 rows, the `tile` configs): the `[G, BLOCK_N]` tile of `q - zero` built in k order by
  reading each packed word once per nibble (element `(k, n)` loads word `k // 8` of row `n` and shifts it by
  `4 (k % 8)`; the repeats are served by L1, so each byte still crosses from HBM once) and fed to one `tl.dot` with
  K = G per group instead of eight with K = 16, the scale applied to the group's product as above (session 10's
  sweep had the planes kernel at 0.29-0.70x cuBLAS bf16's time at 16 and 32 rows: bench/RESULTS.md).
- `_swap_kernel` (1..32 rows, session 18; `tile` 2, 3, 4, 6): the same product transposed, Yᵀ = W Xᵀ, so the weight
  tile is the dot's first operand (M = BLOCK_N >= 64: Hopper's wgmma takes it from registers, where the rows as the
  first operand, 16 or 32 of them, are below its 64) and each packed word is read once, four to a 16-byte load, then
  unpacked in registers by a shift per nibble and one merge of its two last dims (tile 2). Tile 3: two nibbles per
  shift and mask, `q - zero` by one packed 16-bit fma per pair (inline PTX; ~1.5 integer/fp operations a weight
  against ~4.5), the activations read in the pairs' column order (1.5-3.7x the earlier kernels at 16-32 rows on session 18's
  H200, still 0.65-0.73x cuBLAS bf16 at 32). Tile 4: the scale
  folded into the weights too (one accumulator over K; not run on a GPU yet). Tile 6 (session 21): tile 3 with the
  activations read in k order, 16 bytes a pipelined load, then permuted to the pairs' order on their way to shared
  memory; tile 3 gathers them one 2-byte load at a time (compiled for sm_90 here: 2 global loads a thread per group
  instead of 18 at 16 rows and 34 at 32, bench/kernel_asm.py). On an H100 (session 21) it took 1.2-1.85x less time
  than tile 3 at 32 rows and 1.07-1.24x less at 16 (1.4x cuBLAS bf16's speed at 32 rows, summed over the four
  shapes), and TUNED picks it for every shape at 16 and 32 rows.
- `_dequant_kernel` (prefill): the weight written out in 16 bits once per call, then cuBLAS (kernels/int4.py).

Nibble to float: `q | 0x4B000000` read as fp32 is 2^23 + q exactly, so one OR and one subtract (of 2^23 + zero)
replace the int-to-float conversion, which issues at a quarter of the fp32 rate on sm_80/sm_90.
Nothing imports this module at package import time: callers import it inside functions, where Triton runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from qwen3vl_webui.kernels import pdl, splitk, tuning
from qwen3vl_webui.kernels.tuning import row_class


class W4Config(NamedTuple):
    """One launch shape. block_m == 1 selects the GEMV kernel (one program per row); `split_k` programs share K
    (0: as many as `tuning.default_split` says for the shape); for many rows `tile` picks the kernel: 0 `_skinny_kernel`
    (planes), 1 `_tile_kernel`, 2 `_swap_kernel` (weights as the dot's first operand), 3 the same with nibble pairs
    (inline PTX: CUDA only), 4 with pairs and the scales in the weights (one accumulator over K), 6 tile 3 with the
    activations read in k order and permuted to the pairs' order in the kernel, 8 tile 6 with each pair's mask and
    merge in one lop3 (session 27; TUNED's one-row pick since session 28's sweep). 5 was session 21's atomic GEMV,
    removed: it lost every one-row shape to tile 3, bench/results/h100/s21_quant_a.json. 7, session 26's tiles 4 and
    6 together reading 2 or 4 groups a loop step, lost every one-row shape to tile 6, 1.13-1.33x its time,
    bench/results/h100/s26/call1_quant.json."""

    block_m: int
    block_n: int
    split_k: int
    warps: int
    stages: int
    tile: int = 0


# Chosen for the 4B's shapes by bench/quant_check.py's sweep on the GPU; other shapes take the defaults below.
# Session 18's sweep on one H200 (bench/results/h200/s18_quant_swap.json): the swap kernel with nibble pairs (tile 3)
# won every shape and row count. Session 20's H100 sweep split K 4-16 ways at one and 16 rows (1-10%). Session 21's
# H100 sweeps (bench/results/h100/s21_quant_{a,b,c}.json, merged in s21_tuned.json): tile 6, which reads the
# activations in k order, won every shape at 16 and 32 rows (1.2-1.85x tile 3 at 32: gate/up 42.7 -> 23.0 us) and
# qkv and gate/up at one row; the atomic GEMV (tile 5) lost everywhere (1.3-2.2x tile 3's time at one row). Session 26's
# one-row sweep on an H100 with programmatic dependent launch (bench/results/h100/s26/call1_quant.json): tile 6 for
# qkv and o with K split the default ways (split_k 0: `tuning.default_split`, 4 and 8 ways at one row), gate/up
# split 4 ways (17.9 us against 19.1). Session 28's one-row sweep on an H100 (PDL late,
# bench/results/h100/s28/c1/quant.json): tile 8 won all four shapes against tile 6, 3.8-14% less time (o: 6.27 us
# against 7.28), and the engine gained 2.9% at one stream with these picks (bench/results/h100/s28/c3). Until then
# the sweep timed a split config with the split-K sum's launch, which the engine never makes (the fused layer's next
# kernel sums the parts); it now times each product with that kernel (bench/quant_check.py `consumer`).
TUNED: dict[tuple[int, int, int], W4Config] = {
    (1, 6144, 2560): W4Config(16, 64, 0, 4, 3, 8),
    (16, 6144, 2560): W4Config(16, 64, 4, 4, 3, 6),
    (32, 6144, 2560): W4Config(32, 64, 4, 4, 3, 6),
    (1, 2560, 4096): W4Config(16, 64, 0, 4, 3, 8),
    (16, 2560, 4096): W4Config(16, 64, 0, 4, 3, 6),
    (32, 2560, 4096): W4Config(32, 64, 0, 4, 3, 6),
    (1, 19456, 2560): W4Config(16, 64, 4, 4, 3, 8),
    (16, 19456, 2560): W4Config(16, 64, 0, 4, 3, 6),
    (32, 19456, 2560): W4Config(32, 64, 0, 4, 3, 6),
    (1, 2560, 9728): W4Config(16, 64, 16, 4, 3, 8),
    (16, 2560, 9728): W4Config(16, 64, 16, 4, 3, 6),
    (32, 2560, 9728): W4Config(32, 64, 0, 4, 3, 6),
}
GEMV_DEFAULT = W4Config(1, 32, 0, 4, 3)
SKINNY_DEFAULT = W4Config(16, 64, 0, 4, 3)
SKINNY32_DEFAULT = W4Config(32, 64, 0, 4, 3)


def load_tuning(path: str | None = None) -> int:
    """A sweep's best int4 configs into TUNED (kernels/tuning.py); read at import from $QWEN3VL_KERNEL_TUNING."""
    return tuning.load("int4", W4Config, TUNED, path)


def pick_config(rows: int, n: int, k: int) -> W4Config:
    m = row_class(rows)
    found = TUNED.get((m, n, k))
    if found is not None:
        return found
    return GEMV_DEFAULT if m == 1 else SKINNY_DEFAULT if m == 16 else SKINNY32_DEFAULT


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym, groups_per_split,
    BLOCK_N: tl.constexpr, G: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    WORDS: tl.constexpr = G // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    offs_w = tl.arange(0, WORDS)
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // G)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (g_start * WORDS + offs_w)[None, :]
    x_row = x_ptr + row * stride_xm + offs_w * 8
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for g in range(g_start, g_end):
        words = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        zero = tl.load(z_ptr + rows_n * stride_sn + g, mask=n_ok, other=0).to(tl.float32) + 8388608.0
        scale = tl.load(s_ptr + rows_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        for j in tl.static_range(8):
            q = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, None]
            xj = tl.load(x_row + g * G + j).to(tl.float32)
            part += q * xj[None, :]
        acc += part * scale[:, None]
        w_ptrs += WORDS
    out = tl.sum(acc, axis=1)
    pdl.finish(PDL)
    tl.store(y_ptr + split * stride_ys + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
    groups_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    WORDS: tl.constexpr = G // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // G)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (g_start * WORDS + offs_w)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (offs_w * 8)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(g_start, g_end):
        words = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        zero = tl.load(z_ptr + rows_n * stride_sn + g, mask=n_ok, other=0).to(tl.float32) + 8388608.0
        scale = tl.load(s_ptr + rows_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):
            q = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, None]
            xj = tl.load(x_ptrs + g * G + j, mask=m_ok[:, None], other=0.0)
            part = tl.dot(xj, tl.trans(q.to(x_ptr.dtype.element_ty)), part)
        acc += part * scale[None, :]
        w_ptrs += WORDS
    y_ptrs = y_ptr + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    pdl.finish(PDL)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _tile_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
    groups_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, G)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // G)
    # Element (k, n) of the [G, BLOCK_N] tile: nibble k % 8 of word k // 8 in row n.
    w_ptrs = w_ptr + rows_n[None, :] * stride_wn + (g_start * (G // 8) + offs_k // 8)[:, None]
    shifts = ((offs_k % 8) * 4)[:, None]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (g_start * G + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(g_start, g_end):
        words = tl.load(w_ptrs, mask=n_ok[None, :], other=0)
        zero = tl.load(z_ptr + rows_n * stride_sn + g, mask=n_ok, other=0).to(tl.float32) + 8388608.0
        scale = tl.load(s_ptr + rows_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        q = (((words >> shifts) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zero[None, :]
        a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        acc += tl.dot(a, q.to(x_ptr.dtype.element_ty)) * scale[None, :]
        w_ptrs += G // 8
        x_ptrs += G
    y_ptrs = y_ptr + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    pdl.finish(PDL)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Two 16-bit lanes `magic | q` (bf16: 128 + q, fp16: 1024 + q, exactly) -> (q_lo - zero, q_hi - zero): one packed fma
# per pair with the lanes' -(magic + zero); elementwise, so right for any grouping of elements Triton picks. $4 (the
# lanes' scale) is read by the scaled forms only: `(q - zero) * scale` rounded once (the dequantized weight), a second
# packed fma with -0.0 added (`mul.bf16x2` needs sm_90).
_PAIR_ASM = "{ .reg .b32 one, mz, t; mov.b32 one, %s; mov.b32 mz, 0x80008000; fma.rn.%s t, $2, one, $3; %s mov.b32 {$0, $1}, t; }"
_PAIR_BF16 = tl.constexpr(_PAIR_ASM % ("0x3F803F80", "bf16x2", ""))
_PAIR_FP16 = tl.constexpr(_PAIR_ASM % ("0x3C003C00", "f16x2", ""))
_SCALED_BF16 = tl.constexpr(_PAIR_ASM % ("0x3F803F80", "bf16x2", "fma.rn.bf16x2 t, t, $4, mz;"))
_SCALED_FP16 = tl.constexpr(_PAIR_ASM % ("0x3C003C00", "f16x2", "fma.rn.f16x2 t, t, $4, mz;"))
# Tile 8: the same, from the shifted word: `(w & 0x000F000F) | magic` as one lop3 (ptxas kept tile 6's `and` and
# `or` as two LOP3s, each taking its constant as the one immediate a LOP3 has: 66 LOP3s a loop for 32 pairs).
_SHIFTED_ASM = (
    "{ .reg .b32 one, mz, t, m; mov.b32 m, %s; lop3.b32 t, $2, 0x000F000F, m, 0xEA; mov.b32 one, %s; "
    "mov.b32 mz, 0x80008000; fma.rn.%s t, t, one, $3; mov.b32 {$0, $1}, t; }"
)
_SHIFTED_BF16 = tl.constexpr(_SHIFTED_ASM % ("0x43004300", "0x3F803F80", "bf16x2"))
_SHIFTED_FP16 = tl.constexpr(_SHIFTED_ASM % ("0x64006400", "0x3C003C00", "f16x2"))


@triton.jit
def _pair_values(pairs, neg_zero, scales, ASM: tl.constexpr, DTYPE: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM, "=h,=h,r,r,r", [pairs, neg_zero, scales], dtype=(DTYPE.value, DTYPE.value), is_pure=True, pack=1
    )


@triton.jit
def _swap_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
    groups_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, PAIRS: tl.constexpr,
    SCALED: tl.constexpr, NATURAL: tl.constexpr = False, LOP3: tl.constexpr = False, PDL: tl.constexpr = 0,
):  # fmt: skip
    """Yᵀ = W Xᵀ per group: the weights are the dot's first operand (BLOCK_N >= 64 rows, what Hopper's wgmma takes
    from registers), the rows the second (BLOCK_M = 8, 16 or 32 columns). Each packed word is loaded once, 16 bytes a
    thread along K (row n's words for a group are contiguous), and unpacked in registers.

    PAIRS off: each nibble through fp32 (`[BLOCK_N, G // 8, 8]` merged into `[BLOCK_N, G]` in k order). PAIRS on
    (GPU only: inline PTX): nibbles j and j + 4 of a word land in the two 16-bit lanes of one register with one
    shift and one and/or, become `q - zero` by one packed fma, and are joined as columns 2j, 2j + 1 of the word's 8;
    the activations are read in that order, so the dot sums the same products. SCALED (with PAIRS): the scale too
    goes into the weights (a second packed fma: the dequantized 16-bit weight), so one accumulator runs through the
    whole K and the dots chain without a per-group multiply-add of the accumulator in fp32. NATURAL (with PAIRS, tile
    6): the activations are read in k order, 16 bytes a load, pipelined like the weights, and their tile is permuted
    to the pairs' order on its way to shared memory (tile 3 gathers them one value at a time in the pairs' order).
    Putting the weights' pairs back in k order instead compiles to a shared-memory round trip of the larger tile
    (28 KB of shared memory against 20 KB, ~1.8x the PTX: bench/kernel_asm.py). LOP3 (with PAIRS and NATURAL, not
    SCALED; tile 8): a pair's `& 0x000F000F` and `| magic` in one lop3 of the inline PTX (tile 6: two LOP3s in SASS)."""
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    WORDS: tl.constexpr = G // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, G)
    if PAIRS and not NATURAL:  # column p of the tile holds k = 8 (p // 8) + (p % 8) // 2 + 4 (p % 2)
        offs_k = (offs_k // 8) * 8 + (offs_k % 8) // 2 + 4 * (offs_k % 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    g_start = split * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // G)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + (g_start * WORDS + offs_w)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (g_start * G + offs_k)[:, None]
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g in range(g_start, g_end):
        words = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        zero = tl.load(z_ptr + rows_n * stride_sn + g, mask=n_ok, other=0).to(tl.int32)
        if not SCALED:
            scale = tl.load(s_ptr + rows_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        if PAIRS:
            BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
            # 128 + q in bf16 (1024 + q in fp16) is the lane `magic | q`; -(128 + z) is `neg | z`, in both lanes.
            magic: tl.constexpr = 0x43004300 if BF16 else 0x64006400
            neg: tl.constexpr = 0xC300 if BF16 else 0xE400
            nz = (zero | neg) * 65537
            shifted = words[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]
            pairs = shifted if LOP3 else (shifted & 0x000F000F) | magic  # LOP3: masked and merged in the asm
            both = nz[:, None, None]  # not read unless SCALED
            if LOP3:
                ASM: tl.constexpr = _SHIFTED_BF16 if BF16 else _SHIFTED_FP16
            elif SCALED:
                bits = tl.load(s_ptr + rows_n * stride_sn + g, mask=n_ok, other=0.0).to(x_ptr.dtype.element_ty)
                bits = bits.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                both = (bits | (bits << 16))[:, None, None]
                ASM: tl.constexpr = _SCALED_BF16 if BF16 else _SCALED_FP16
            else:
                ASM: tl.constexpr = _PAIR_BF16 if BF16 else _PAIR_FP16
            lo, hi = _pair_values(pairs, nz[:, None, None], both, ASM, x_ptr.dtype.element_ty)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, G))
        else:
            q = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, G))
            zf = zero.to(tl.float32) + 8388608.0
            w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - zf[:, None]).to(x_ptr.dtype.element_ty)
        xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        if NATURAL:  # row 8a + 4h + j -> row 8a + 2j + h, the pairs' order
            xt = tl.reshape(tl.permute(tl.reshape(xt, (G // 8, 2, 4, BLOCK_M)), (0, 2, 1, 3)), (G, BLOCK_M))
        if SCALED:
            acc = tl.dot(w, xt, acc)
        else:
            acc += tl.dot(w, xt) * scale[:, None]  # w: integers in [-15, 15], exact in 16 bits
        w_ptrs += WORDS
        x_ptrs += G
    y_ptrs = y_ptr + split * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
    pdl.finish(PDL)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _nibbles(words, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """int32 `[BLOCK_N, WORDS]` -> fp32 2^23 + nibble, `[BLOCK_N, WORDS * 8]` in k order (the prefill's dequantization,
    where writing the 16-bit weight in order matters more than the reshape)."""
    shifts = tl.arange(0, 8) * 4
    q = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    q = tl.reshape(q, (BLOCK_N, WORDS * 8))
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, BLOCK_N: tl.constexpr, G: tl.constexpr
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    WORDS: tl.constexpr = G // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    words = tl.load(w_ptr + rows[:, None] * stride_wn + g * WORDS + tl.arange(0, WORDS)[None, :], mask=n_ok[:, None])
    zero = tl.load(z_ptr + rows * stride_sn + g, mask=n_ok, other=0)
    scale = tl.load(s_ptr + rows * stride_sn + g, mask=n_ok, other=0.0)
    w = (_nibbles(words, BLOCK_N, WORDS) - (8388608.0 + zero.to(tl.float32)[:, None])) * scale.to(tl.float32)[:, None]
    out = out_ptr + rows[:, None] * stride_on + g * G + tl.arange(0, G)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


TILES = (0, 1, 2, 3, 4, 6, 8)  # W4Config.tile values with a kernel (5 and 7 were removed: see W4Config)


def swap_constexprs(cfg: W4Config) -> dict[str, Any]:
    """`_swap_kernel`'s variant for a config of tile 2, 3, 4, 6 or 8."""
    return {"PAIRS": cfg.tile >= 3, "SCALED": cfg.tile == 4, "NATURAL": cfg.tile in (6, 8), "LOP3": cfg.tile == 8}


SPLIT_LEAST_GROUPS = 4  # a default split keeps this many groups of K at least (tuning.default_split)


def _launch_split(rows: int, n: int, k: int, group: int, cfg: W4Config) -> tuple[bool, int, int]:
    """(GEMV?, K's splits, groups per split) of a launch."""
    gemv = cfg.block_m == 1 or group < 128  # tl.dot needs K >= 16 words' planes: groups of 128 and more
    tiles = triton.cdiv(n, cfg.block_n) * (rows if gemv else triton.cdiv(rows, cfg.block_m))
    return (gemv, *tuning.split_k(cfg.split_k, tiles, k // group, SPLIT_LEAST_GROUPS))


def w4_split(rows: int, n: int, k: int, group: int, config: W4Config | None = None) -> int:
    """How many partial sums `w4_partials` returns for this product (1: the product itself, in x's dtype)."""
    return _launch_split(rows, n, k, group, config or pick_config(rows, n, k))[1]


def w4_matmul(x: Any, qweight: Any, scales: Any, zeros: Any, group: int, config: W4Config | None = None) -> Any:
    """`x [M, K]` (bf16/fp16, rows contiguous) times the W4 weight ᵀ: `[M, N]` in x's dtype."""
    out = w4_partials(x, qweight, scales, zeros, group, config)
    return out[0] if out.shape[0] == 1 else splitk.reduce_partials(out, x.dtype)


def w4_partials(x: Any, qweight: Any, scales: Any, zeros: Any, group: int, config: W4Config | None = None) -> Any:
    """The product's K split into `w4_split(...)` parts: `[split, M, N]`, fp32 partial sums (their sum is the product),
    or the product itself in x's dtype when split is 1. Left unsummed, a compiled caller adds them in the kernel that
    consumes the product (Int4Linear under torch.compile) instead of a launch of their own."""
    import torch

    rows, k = x.shape
    n = qweight.shape[0]
    cfg = config or pick_config(rows, n, k)
    if cfg.tile not in TILES:  # e.g. a sweep report of session 21's removed atomic GEMV (tile 5)
        raise ValueError(f"W4Config tile {cfg.tile} is not a kernel here (tiles: {', '.join(map(str, TILES))})")
    gemv, split, per_split = _launch_split(rows, n, k, group, cfg)
    out = torch.empty((split, rows, n), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    if gemv:
        grid = (triton.cdiv(n, cfg.block_n), split, rows)
        _gemv_kernel[grid](
            x, qweight, scales, zeros, out, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            out.stride(1), per_split, BLOCK_N=cfg.block_n, G=group, num_warps=cfg.warps, num_stages=cfg.stages,
            **pdl.args(x, "int4"),
        )  # fmt: skip
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m), split)
        kernel = (_skinny_kernel, _tile_kernel, *[_swap_kernel] * 3, None, _swap_kernel, None, _swap_kernel)[cfg.tile]
        extra = swap_constexprs(cfg) if cfg.tile >= 2 else {}
        kernel[grid](
            x, qweight, scales, zeros, out, rows, n, k, x.stride(0), qweight.stride(0), scales.stride(0),
            out.stride(0), out.stride(1), per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, G=group,
            num_warps=cfg.warps, num_stages=cfg.stages, **extra, **pdl.args(x, "int4"),
        )  # fmt: skip
    return out


def w4_dequantize(qweight: Any, scales: Any, zeros: Any, group: int, dtype: Any) -> Any:
    """The 16-bit `[N, K]` weight (each value rounded once from fp32's exact `(q - zero) * scale`)."""
    import torch

    n = qweight.shape[0]
    k = qweight.shape[1] * 8
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    block_n = 32
    grid = (triton.cdiv(n, block_n), k // group)
    _dequant_kernel[grid](
        qweight, scales, zeros, out, n, k, qweight.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=block_n, G=group, num_warps=4,
    )  # fmt: skip
    return out


load_tuning()
