"""fp8's decode products (1-64 rows) in CUDA C: e4m3 weights turned into 16-bit tensor-core fragments by bit moves.

Why (docs/engine.md v21): at one row fp8's Triton kernels read the weights at ~1.3-1.9 TB/s of the H100's ~3 (the
atomic GEMV: 8.3 us for o's 10.5 MB, 13.0 for down's 24.9), each value converted to fp32 and multiplied alone; fp8
made 1.36x bf16's tokens at one stream where the issue asks 1.4x. This is kernels/w4_mma.py's design with one byte a
weight and 128x128 block scales (kernels/fp8.py's, Qwen's FP8 checkpoint's):
- **The layout is the fragment.** `repack` orders the weights so that a lane's two 32-bit words are its whole A
  fragment of one `mma.sync.m16n8k16` (16 rows x 16 k); a warp reads 512 contiguous bytes a 16-byte load. A 16-row
  tile's words take the memory of those 16 rows, so a weight is repacked in place and fused rows stay each layer's.
- **e4m3 as 16 bits is a bit move.** An e4m3 value `s eeee mmm` is the 16-bit float with sign s and the bits
  `eeeemmm` at the exponent's low end (bf16: bits 10-4, fp16: 13-7), times 2^120 (bf16) or 2^8 (fp16): e4m3's
  subnormals land on the 16-bit format's (the factor is folded into the block scale, as vLLM's fp8 Marlin does). The
  repack stores the word so that register 1 (row g) is `w & MASK` and register 2 (row g + 8) two rotations and two
  masks: 5 instructions for 4 weights (`unpack_bits` is the same in torch).
- **The scale after the dot.** A 16-row tile lies in one 128-row block, so one fp32 scale a group of K multiplies the
  lane's four sums once (no zero point: one mma a k-tile and n-tile).
- **Weights before the wait**, activations after it (kernels/cuda.py's DECODE_HELPERS, the same k order and loads).

The batch's rows are the mma's columns (1, 2 or 4 n-tiles of 8 a launch, launches of 32), a program of WARPS warps a
16-row tile and a range of K's groups, `[split, M, N]` fp32 partial sums for the fused layer's next kernel to add.
Prefill dequantizes from this layout (`dequantize`: fp8_mma_triton.py), then cuBLAS.

On by default (QWEN3VL_FP8_MMA=0 turns it off): the loader converts each fp8 weight (`fp8.use_mma_layout`) on a GPU
that runs it, and every product of it runs from this layout. No memory is added: the kernel reads the block scales as
they are. Measured (bench/RESULTS.md, session 30, H100): fp8 1.58x bf16's tokens at one stream against 1.29x with its
Triton kernels, 1.09-1.16x at 32 streams.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any, NamedTuple

import torch

from qwen3vl_webui.kernels import cuda
from qwen3vl_webui.kernels.fp8_blocks import BLOCK, dequantize_weight
from qwen3vl_webui.kernels.w4_mma import (
    CHUNK,
    DECODE_ROWS,
    MAX_ROWS,
    ROWS_PER_TILE,
    MmaConfig,
    activation_fragments,
    n_tiles,
    row_class,
    swept,
)

GROUPS = (64, 128)  # a group of K (one or two 64-k chunks) shares a scale: 128 where K is whole blocks (the 4B)


class Bits(NamedTuple):
    """How a 32-bit word holds four e4m3 weights for one 16-bit kind: register 1 (row g's two values) is
    `w & mask`, register 2 (row g + 8's) `rotl(w, r1) & m1 | rotl(w, r2) & m2`; each 16-bit half is
    `s << 15 | (eeeemmm) << shift`, worth the e4m3 value / `factor`."""

    mask: int
    r1: int
    m1: int
    r2: int
    m2: int
    shift: int
    factor: float


BITS = {
    # bf16: eeeemmm at bits 10-4 (the exponent's low 4 bits, the mantissa's top 3): e4m3's bias 7 against 127
    torch.bfloat16: Bits(0x87F087F0, 28, 0x87808780, 4, 0x00700070, 4, 2.0**120),
    # fp16: eeeemmm at bits 13-7: bias 7 against 15
    torch.float16: Bits(0xBF80BF80, 1, 0x80008000, 7, 0x3F803F80, 7, 2.0**8),
}


def enabled() -> bool:
    """On unless QWEN3VL_FP8_MMA=0 (then fp8 runs its Triton kernels in its own layout)."""
    return os.environ.get("QWEN3VL_FP8_MMA", "").strip() != "0"


# The 4B's shapes (row class, n, k) -> config: session 30's sweep on one H100 (`bench.quant_check --sections sweep
# --rows 1,32,8,16 --formats fp8mma`, QWEN3VL_PDL=2, commit 9f2849c; bench/results/h100/s30/f1_mma8.json). At one row,
# us a layer's product with its consumer against fp8's Triton TUNED pick in the same call: q/k/v 7.92 (10.95), o 6.76
# (8.61), gate/up 18.86 (21.67), down 11.64 (13.25); at 32 rows 13.03 (13.38), 9.48 (13.01), 26.61 (32.93), 17.67
# (20.70). Shapes not here take `pick_config`'s guess.
TUNED: dict[tuple[int, int, int], MmaConfig] = {
    (1, 6144, 2560): MmaConfig(4, 2, 1),
    (16, 6144, 2560): MmaConfig(4, 1, 1),
    (32, 6144, 2560): MmaConfig(4, 1, 1),
    (1, 2560, 4096): MmaConfig(8, 1, 1),
    (16, 2560, 4096): MmaConfig(4, 1, 2),
    (32, 2560, 4096): MmaConfig(4, 1, 1),
    (1, 19456, 2560): MmaConfig(4, 1, 1),
    (16, 19456, 2560): MmaConfig(4, 1, 1),
    (32, 19456, 2560): MmaConfig(4, 1, 1),
    (1, 2560, 9728): MmaConfig(4, 1, 4),
    (16, 2560, 9728): MmaConfig(4, 1, 2),
    (32, 2560, 9728): MmaConfig(4, 1, 1),
}


def configs(n: int, k: int, group: int = 128, rows: int = 1) -> list[MmaConfig]:
    """The sweep's launch configs for a shape and row count, today's pick first (w4_mma's `swept`)."""
    return swept(pick_config(n, k, rows), k, group, rows)


def pick_config(n: int, k: int, rows: int = 1) -> MmaConfig:
    found = TUNED.get((row_class(rows), n, k))
    return found if found is not None else MmaConfig(4, 1, max(1, min(4, k // 1024)))


def load_tuning(path: str | None = None) -> int:
    """A sweep's best configs into TUNED (kernels/tuning.py); read at import from $QWEN3VL_KERNEL_TUNING."""
    from qwen3vl_webui.kernels import tuning

    return tuning.load("fp8mma", MmaConfig, TUNED, path)


def group_of(k: int) -> int:
    return 128 if k % 128 == 0 else 64


def split_of(n: int, k: int, config: MmaConfig | None = None, rows: int = 1) -> tuple[int, int]:
    """(partial sums a launch writes, groups of K each): its K split, clipped so that each split has a group."""
    cfg = config or pick_config(n, k, rows)
    groups = k // group_of(k)
    per = -(-groups // cfg.split)
    return -(-groups // per), per


def supports(n: int, k: int) -> bool:
    return n % ROWS_PER_TILE == 0 and k % CHUNK == 0 and k > 0


# ----------------------------------------------------------------------------------------------------- layout ---


def _rotl(v: torch.Tensor, r: int) -> torch.Tensor:
    """32-bit rotation of int64 values holding unsigned 32-bit words."""
    return ((v << r) | (v >> (32 - r))) & 0xFFFFFFFF


def _place(weight: torch.Tensor) -> torch.Tensor:
    """`[N, K]` values -> `[N/16, K/64, 2, 32, 4, 2, 2]`: (tile t, chunk c, half f, lane 4g + q, word 2p + j, register
    h, half-word e) holds row 16t + g + 8h, k = 64c + 16q + 4(2f + p) + 2j + e."""
    n, k = weight.shape
    v = weight.reshape(n // 16, 2, 8, k // CHUNK, 4, 2, 2, 2, 2)  # t, h, g, c, q, f, p, j, e
    return v.permute(0, 3, 5, 2, 4, 6, 7, 1, 8).reshape(n // 16, k // CHUNK, 2, 32, 4, 2, 2)


def repack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn `[N, K]` (kernels/fp8.py's) -> int32 words `[N/16, K/64, 2, 32, 4]` for 16-bit kind `dtype`.

    Word 2p + j of lane (g, q) in half f of 64-k chunk c of row tile t holds four weights: k = 64c + 16q + 4i + 2j + e
    (k-tile i = 2f + p; e the 16-bit half of a register) of rows 16t + g (register 1, the lane's a0 or a2) and
    16t + g + 8 (register 2: a1 or a3), stored so that `unpack_bits` makes the registers (`Bits`)."""
    bits = BITS[dtype]
    raw = weight.contiguous().view(torch.uint8).to(torch.int64)
    half = ((raw >> 7) << 15) | ((raw & 0x7F) << bits.shift)  # the 16-bit pattern of each value
    placed = _place(half)  # [T, C, 2, 32, 4, h, e]
    regs = placed[..., 0] | (placed[..., 1] << 16)  # [T, C, 2, 32, 4, h]: the two registers a word makes
    first, second = regs[..., 0], regs[..., 1]
    # register 2's bits go where the word's rotations bring them back from: the inverse rotations of its masks
    word = (first & bits.mask) | _rotl(second & bits.m1, 32 - bits.r1) | _rotl(second & bits.m2, 32 - bits.r2)
    return word.to(torch.uint32).view(torch.int32).contiguous()


def repack_in_place(weight: torch.Tensor, kind: torch.dtype, rows: int = 1024) -> None:
    """`weight` reordered into `repack`'s words within its own memory (a 16-row tile's words take those rows' bytes),
    `rows` rows at a time: the repack's int64 work is ~40 bytes a weight, ~0.9 GB at once for the 4B's down."""
    for r in range(0, weight.shape[0], rows):
        part = weight[r : r + rows]
        part.view(torch.uint8).view(-1).copy_(repack(part, kind).view(torch.uint8).view(-1))


def unpack_bits(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's bit moves in torch: int32 words `[...]` -> the 16-bit values `[..., 2 (register), 2 (half)]` as
    fp32, each the e4m3 value / `BITS[dtype].factor`."""
    bits = BITS[dtype]
    w = words.to(torch.int64) & 0xFFFFFFFF
    first = w & bits.mask
    second = (_rotl(w, bits.r1) & bits.m1) | (_rotl(w, bits.r2) & bits.m2)
    regs = torch.stack([first, second], dim=-1)
    halves = torch.stack([regs & 0xFFFF, regs >> 16], dim=-1)
    signed = halves - ((halves & 0x8000) << 1)
    return signed.to(torch.int16).view(dtype).to(torch.float32)


def emulate(
    x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, split: int = 1
) -> torch.Tensor:
    """The kernel's arithmetic in torch (fp32), fragment by fragment from the repacked words: `[split, M, N]`.

    Lane (g, q)'s registers are read as the kernel makes them (`unpack_bits`): word 2p + j's register 1 is a0 (j 0)
    or a2 (j 1) at row g, register 2 a1 or a3 at row g + 8, their halves e at kl = 2q + 8j + e; a group's four sums
    times its block's scale and the factor. A wrong index in `repack` or here fails the tests."""
    if x.shape[0] > 8:  # each n-tile of 8 rows is the same computation on its rows
        return torch.cat([emulate(x[r : r + 8], words, scale_inv, dtype, split) for r in range(0, x.shape[0], 8)], 1)
    m, k = x.shape
    chunks = k // CHUNK
    tiles = words.numel() // (chunks * 256)  # repack's `[T, C, 2, 32, 4]` or the weight's own `[N, K/4]` view
    values = unpack_bits(words.reshape(tiles, chunks, 2, 32, 4), dtype)  # [T, C, f, lane, word, h, e]
    lane = torch.arange(32)
    g, qq = lane // 4, lane % 4
    a = torch.zeros(tiles, chunks, 4, 16, 16)  # [T, C, k-tile i, row, kl]
    for f in range(2):
        for p in range(2):
            for j in range(2):
                for h in range(2):
                    for e in range(2):
                        a[:, :, 2 * f + p, g + 8 * h, 2 * qq + 8 * j + e] = values[:, :, f, :, 2 * p + j, h, e]
    b = activation_fragments(x)  # [C, i, kl, n]
    t = torch.einsum("tcirk,cikn->tcrn", a, b)  # [T, C, 16, 8]
    group = group_of(k)
    cpg = group // CHUNK
    groups = k // group
    t = t.reshape(tiles, groups, cpg, 16, 8).sum(dim=2)
    blocks = torch.arange(groups) * group // BLOCK
    scale = scale_inv.to(torch.float32)[torch.arange(tiles) * 16 // BLOCK][:, blocks] * BITS[dtype].factor  # [T, G]
    per_group = scale[..., None, None] * t
    per = -(-groups // split)
    parts = [per_group[:, s * per : (s + 1) * per].sum(dim=1) for s in range(-(-groups // per))]
    out = torch.stack(parts)  # [S, T, 16, 8]
    return out.permute(0, 3, 1, 2).reshape(len(parts), 8, tiles * 16)[:, :m]


def original(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `repack`: float8_e4m3fn `[N, K]` in kernels/fp8.py's layout (torch's ops: tests, CPUs)."""
    n = words.shape[0] * (16 if words.dim() == 5 else 1)  # repack's `[T, C, 2, 32, 4]` or the weight's `[N, K/4]`
    k = words.numel() * 4 // n
    values = unpack_bits(words.reshape(n // 16, k // CHUNK, 2, 32, 4), dtype) * BITS[dtype].factor
    v = values.reshape(n // 16, k // CHUNK, 2, 8, 4, 2, 2, 2, 2)  # t, c, f, g, q, p, j, h, e
    return v.permute(0, 7, 3, 1, 4, 2, 5, 6, 8).reshape(n, k).to(torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------------------ CUDA ---

SOURCE = r"""
// A lane's 64-k chunk: two 16-byte word loads (8 words: 4 k-tiles of 16 rows), two 16-byte activation loads.

__device__ __forceinline__ unsigned rotl(unsigned w, int r) { return __funnelshift_l(w, w, r); }

// Groups gg, gg + WARPS, ... (UNROLL of them, those before `end`): their words and block scales (`sg`: the tile's
// row of scales; group G's is column G * GSIZE / 128).
__device__ __forceinline__ void load_group_weights(uint4 (&w)[UNROLL][CPG][2], float (&s)[UNROLL], const uint4* wg,
                                                   const float* sg, int gg, int end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (gg + u * WARPS < end) {
#pragma unroll
            for (int c = 0; c < CPG; ++c)
#pragma unroll
                for (int f = 0; f < 2; ++f) w[u][c][f] = load_weights(wg + ((u * WARPS * CPG + c) * 2 + f) * 32);
            s[u] = __ldg(sg + (gg + u * WARPS) * CPG / 2);
        }
    }
}

// One step's math: for each of its groups, the words' registers made once for all n-tiles (register 1 a mask,
// register 2 two rotations and masks), one mma a k-tile and n-tile, then the group's sums times its block's scale.
__device__ __forceinline__ void group_math(float (&acc)[NT][4], const uint4 (&w)[UNROLL][CPG][2],
                                           const float (&s)[UNROLL], const uint4 (&x)[UNROLL][NT][2 * CPG],
                                           int gg, int end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (gg + u * WARPS < end) {
            float t[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) t[nt][c] = 0.f;
#pragma unroll
            for (int ch = 0; ch < CPG; ++ch)
#pragma unroll
                for (int f = 0; f < 2; ++f) {
                    const unsigned wv[4] = {w[u][ch][f].x, w[u][ch][f].y, w[u][ch][f].z, w[u][ch][f].w};
#pragma unroll
                    for (int p = 0; p < 2; ++p) {  // k-tile 2f + p: words 2p (a0 a1) and 2p + 1 (a2 a3)
                        unsigned a[4];
#pragma unroll
                        for (int j = 0; j < 2; ++j) {
                            const unsigned v = wv[2 * p + j];
                            a[2 * j] = v & MASK;
                            a[2 * j + 1] = (rotl(v, R1) & M1) | (rotl(v, R2) & M2);
                        }
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            const uint4 xq = x[u][nt][2 * ch + f];  // values 8f..8f+7 of the lane's 16
                            mma(t[nt], a, p ? xq.z : xq.x, p ? xq.w : xq.y);
                        }
                    }
                }
            const float scale = s[u] * FACTOR;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[nt][c] += scale * t[nt][c];
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) fp8_mma(
    const uint4* __restrict__ W, const float* __restrict__ S, const unsigned short* X,
    float* __restrict__ Y, int M, int N, int K, int sx, int ss, int per_split, long long ys)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int groups = K / GSIZE, chunks = K / 64;
    const int first = split * per_split + warp;
    const int end = min(split * per_split + per_split, groups);
    constexpr int STEP = UNROLL * WARPS;
    // Group gg's half f of chunk c for this lane: wg[((gg * CPG + c) * 2 + f) * 32]; the tile's scales: row
    // 16 tile / 128 of S (stride ss); its activations: xg[gg * GSIZE / 8] on. Batch rows past M read row M - 1.
    const uint4* wg = W + (size_t)tile * chunks * 64 + lane + (size_t)first * CPG * 64;
    const float* sg = S + (size_t)(tile * 16 / 128) * ss;
    const uint4* xg[NT];
    float acc[NT][4];
    start_rows(xg, acc, X, M, sx, first);
    uint4 wa[UNROLL][CPG][2], wb[UNROLL][CPG][2], xa[UNROLL][NT][2 * CPG], xb[UNROLL][NT][2 * CPG];
    float sa[UNROLL], sb[UNROLL];

    // The first step's weights and scales before the wait, in a loop of their own (kernels/w4_mma.py says why).
#pragma unroll 1
    for (int once = 0; once < 1 + (per_split == 0); ++once) load_group_weights(wa, sa, wg, sg, first, end);
    PDL_WAIT();
    load_group_x(xa, xg, first, end);
    for (int gg0 = first; gg0 < end; gg0 += 2 * STEP) {
        wg += STEP * CPG * 64;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xg[nt] += STEP * GSIZE / 8;
        load_group_weights(wb, sb, wg, sg, gg0 + STEP, end);
        load_group_x(xb, xg, gg0 + STEP, end);
        group_math(acc, wa, sa, xa, gg0, end);
        if (gg0 + STEP >= end) break;
        wg += STEP * CPG * 64;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xg[nt] += STEP * GSIZE / 8;
        load_group_weights(wa, sa, wg, sg, gg0 + 2 * STEP, end);
        load_group_x(xa, xg, gg0 + 2 * STEP, end);
        group_math(acc, wb, sb, xb, gg0 + STEP, end);
    }
    store_parts(acc, Y, M, N, tile, split, ys);
}
"""


def source(dtype: torch.dtype, warps: int, unroll: int, pdl_mode: int, group: int = 128, tiles: int = 1) -> str:
    """The kernel's CUDA C for one variant (macros first): `tiles` n-tiles of 8 batch rows (1, 2 or 4)."""
    bits = BITS[dtype]
    defines = {
        "KIND": '"bf16"' if dtype == torch.bfloat16 else '"f16"', "MASK": f"{bits.mask:#010x}u",
        "R1": str(bits.r1), "M1": f"{bits.m1:#010x}u", "R2": str(bits.r2), "M2": f"{bits.m2:#010x}u",
        "FACTOR": f"{bits.factor:.1f}f", "WARPS": str(warps), "UNROLL": str(unroll), "PDL": str(pdl_mode),
        "CPG": str(group // CHUNK), "NT": str(tiles),
    }  # fmt: skip
    head = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return head + cuda.DECODE_HELPERS + SOURCE


@functools.cache
def _function(index: int, dtype: torch.dtype, warps: int, unroll: int, pdl_mode: int, group: int, tiles: int) -> Any:
    return cuda.function(index, source(dtype, warps, unroll, pdl_mode, group, tiles), "fp8_mma")


def launch(
    x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, n: int, config: MmaConfig | None = None,
    pdl_mode: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """`x [M <= DECODE_ROWS, K]` (bf16/fp16, rows contiguous, 16-byte aligned) times the repacked weight ᵀ:
    `[split, M, N]` fp32 partial sums on the current stream; more than 32 rows in launches of 32."""
    m, k = x.shape
    if m > DECODE_ROWS or x.stride(1) != 1 or x.data_ptr() % 16 or (m > 1 and x.stride(0) % 8):
        raise ValueError(f"fp8_mma takes up to {DECODE_ROWS} rows, contiguous and 16-byte aligned; got {tuple(x.shape)}")
    if scale_inv.dtype != torch.float32 or scale_inv.stride(1) != 1:
        raise ValueError("fp8_mma reads fp32 block scales with contiguous rows")
    cfg = config or pick_config(n, k, m)
    split, per = split_of(n, k, cfg)
    out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    index = x.get_device()
    pdl_mode = cuda.pdl_mode_for(x, "fp8", pdl_mode)
    for start in range(0, m, MAX_ROWS):
        rows = min(MAX_ROWS, m - start)
        values = [
            ctypes.c_void_p(words.data_ptr()), ctypes.c_void_p(scale_inv.data_ptr()),
            ctypes.c_void_p(x[start].data_ptr()), ctypes.c_void_p(out[0, start].data_ptr()), ctypes.c_int(rows),
            ctypes.c_int(n), ctypes.c_int(k), ctypes.c_int(x.stride(0)), ctypes.c_int(scale_inv.stride(0)),
            ctypes.c_int(per), ctypes.c_longlong(m * n),
        ]  # fmt: skip
        func = _function(index, x.dtype, cfg.warps, cfg.unroll, pdl_mode, group_of(k), n_tiles(rows))
        cuda.launch(func, (n // ROWS_PER_TILE, split), 32 * cfg.warps, values, index, pdl_mode)
    return out


# ------------------------------------------------------------------------------------------------ the weights ---


def wanted(device: Any) -> bool:
    """Whether fp8 weights loaded onto `device` take this kernel's layout: not QWEN3VL_FP8_MMA=0, and a GPU where it
    builds (compute capability 8.0+, NVRTC and the driver found, one variant compiled and loaded: `builds`)."""
    dev = torch.device(device)
    return enabled() and dev.type == "cuda" and builds(dev.index if dev.index is not None else 0)


@functools.cache
def builds(index: int) -> bool:
    """The GPU runs the kernel and one variant compiles for it and loads (`cuda.builds`), once a process."""
    return cuda.builds(index, lambda: _function(index, torch.bfloat16, 4, 1, 0, 128, 1), __name__)


def decodes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """A product this kernel runs: 1..DECODE_ROWS rows of 16-bit activations of the layout's kind `dtype` on a GPU;
    prefill's dequantizes. Shapes and dtypes only."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.is_cuda and x.dtype in BITS and x.dtype == dtype and 0 < rows <= DECODE_ROWS


def parts_count(x: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> int:
    """How many partial sums `parts` returns for `x` (shapes only: a fake tensor gets the same answer)."""
    return split_of(n, k, rows=x.numel() // k)[0] if decodes(x, dtype) else 1


def parts(x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x [..., K]` times the weight in this layout (for kind `dtype`) ᵀ as `[parts_count(...), ..., N]` partial
    sums: fp32 from the kernel for a decode product, else the product itself in x's dtype, `[1, ..., N]`."""
    k, n = x.shape[-1], words.shape[0]
    if not decodes(x, dtype):
        return linear(x, words, scale_inv, dtype)[None]
    out = launch(cuda.kernel_rows(x), words.view(torch.int32).view(n // 16, k // CHUNK, 2, 32, 4), scale_inv, n)
    return out.reshape(out.shape[0], *x.shape[:-1], n)


def linear(x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x [..., K] @ Wᵀ` in x's dtype for a weight in this layout: the kernel's parts summed for a decode product,
    else the weight dequantized to x's dtype and cuBLAS (torch's ops on a CPU)."""
    if decodes(x, dtype):
        return cuda.summed(parts(x, words, scale_inv, dtype), x)
    return torch.nn.functional.linear(x, dequantize(words, scale_inv, dtype, x.dtype))


def dequantize(words: torch.Tensor, scale_inv: torch.Tensor, kind: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The `[N, K]` weight `value * scale` from words in this layout (for 16-bit kind `kind`) in `dtype`: a Triton
    kernel on a GPU (prefill), torch's ops elsewhere."""
    if words.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from qwen3vl_webui.kernels import fp8_mma_triton

        return fp8_mma_triton.dequantize(words, scale_inv, BITS[kind], dtype)
    return dequantize_weight(original(words.view(torch.int32), kind), scale_inv, dtype)


load_tuning()
