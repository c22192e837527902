"""int4's decode products (1-64 rows) in CUDA C: the weights unpacked straight into tensor-core fragments.

Why not Triton (docs/engine.md v20): at one row the Triton swap kernel reads packed weights at ~1.3 TB/s of the
H100's ~3 TB/s, issuing ~3.5 SASS instructions a weight, and like every kernel of the step it waits for the kernel
before (PDL) before its first load, weights included. Here:
- **The layout is the fragment.** `repack` orders the 4-bit weights so that one 32-bit word a lane is the lane's
  whole A fragment of one `mma.sync.m16n8k16` (16 weight rows x 16 k): nibbles j and j + 4 are register j's two
  lanes, so one `lop3` (`(w >> 4j) & 0x000F000F | magic`) makes register j as 16-bit `magic + q` (exact), and a
  warp reads 512 contiguous bytes a 16-byte load (4 k-tiles of 16 rows). A 16-row tile's words take the memory of
  those 16 rows in kernels/int4.py's layout, so a weight is repacked in place and fused rows stay each layer's own.
- **The zero point after the dot.** `Σ (magic + q) x - (magic + z) Σ x` per row and group: Σ x comes from a second
  mma with an all-ones A (one a k-tile, shared by the warp's rows), so a weight costs ~1 instruction (the lop3 and
  a quarter of a shift) and no packed subtract. Each group's sum is scaled in fp32 (4 FFMAs a lane and group).
- **The k order is ours.** Within a 64-k chunk, lane (g, q)'s fragments cover k = 16q + 4i + {0..3} for k-tile i, so
  its activations for four k-tiles are 16 contiguous values (two 16-byte loads).
- **Weights before the wait.** A program loads its first groups' weights and scales before `griddepcontrol.wait`
  (they are constants; only the activations depend on the kernel before), so under PDL its first loads overlap the
  kernel before. Its activation loads and stores come after the wait.

The batch's rows are the mma's 8 columns (columns past M read row M - 1 and are never stored), so 1-8 rows cost
the same; 2 or 4 n-tiles of 8 take up to 32 rows a launch, the weights unpacked once for all. A program (CTA) of
WARPS warps owns 16 output rows and a range of K's groups (the split), its warps taking every WARPS-th group; they
add their sums in shared memory and write `[split, M, N]` fp32 partial sums, which the fused layer's next kernel adds
(as the Triton kernels' parts). Compiled at first use with NVRTC (torch's CUDA wheels ship it), loaded and launched
through the driver API (`cuLaunchKernelEx`, PDL as an attribute), so it is captured into CUDA graphs like any
launch on the current stream. `emulate` is the same arithmetic in torch, fragment by fragment (the CPU tests).
Prefill dequantizes from this layout (`dequantize`: w4_mma_triton.py), then cuBLAS.

On by default (QWEN3VL_INT4_MMA=0 turns it off): the loader converts each int4 weight (`int4.use_mma_layout`, on a
GPU of compute capability 8.0+ with NVRTC), and every product of it runs from this layout. Measured (bench/RESULTS.md,
session 30, H100): int4 2.02-2.04x bf16's tokens at one stream against 1.47x with its Triton kernels, 1.16-1.18x at
32 streams.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any, NamedTuple

import torch

from qwen3vl_webui.kernels import cuda
from qwen3vl_webui.kernels.int4_words import dequantize_weight, pack, unpack

MAX_ROWS = 32  # a launch's rows: the mma's columns, 1, 2 or 4 n-tiles of 8
DECODE_ROWS = 64  # a decode product's rows at most (kernels/int4.py SKINNY_MAX_ROWS), in launches of 32
ROWS_PER_TILE = 16
CHUNK = 64  # k per 16-byte load of a lane (four k-tiles of 16)
GROUPS = (64, 128)  # group sizes this kernel takes: one or two chunks (the 4B's 128; the tiny test model's 64)
MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}  # `magic | q` read as a 16-bit float is magic + q


def enabled() -> bool:
    """On unless QWEN3VL_INT4_MMA=0 (then int4 runs its Triton kernels in their own layout)."""
    return os.environ.get("QWEN3VL_INT4_MMA", "").strip() != "0"


def n_tiles(rows: int) -> int:
    """The launch's n-tiles of 8 batch rows: 1, 2 or 4 (the row classes 1, 16 and 32 of TUNED)."""
    return 1 if rows <= 8 else 2 if rows <= 16 else 4


def row_class(rows: int) -> int:
    return (1, 16, 0, 32)[n_tiles(rows) - 1]


class MmaConfig(NamedTuple):
    """A launch: `warps` a program, `unroll` groups' weights loaded ahead a warp, K split `split` ways."""

    warps: int = 4
    unroll: int = 2
    split: int = 1


# The 4B's shapes (row class: 1 up to 8 rows, 16, 32; n, k) -> config: session 30's sweep on one H100
# (`bench.quant_check --sections sweep --rows 1,32,8,16 --formats int4mma`, QWEN3VL_PDL=2, commit 9f2849c;
# bench/results/h100/s30/n1_mma.json). At one row, us a layer's product with its consumer against Triton's TUNED pick
# in the same call: q/k/v 5.57 (7.20), o 5.48 (8.48), gate/up 13.50 (17.44), down 8.26 (14.49); at 32 rows 13.13
# (11.10), 9.27 (10.17), 25.62 (24.81), 17.42 (16.35). Shapes not here take `pick_config`'s guess.
TUNED: dict[tuple[int, int, int], MmaConfig] = {
    (1, 6144, 2560): MmaConfig(8, 1, 1),
    (16, 6144, 2560): MmaConfig(4, 1, 1),
    (32, 6144, 2560): MmaConfig(4, 1, 1),
    (1, 2560, 4096): MmaConfig(8, 1, 1),
    (16, 2560, 4096): MmaConfig(8, 1, 1),
    (32, 2560, 4096): MmaConfig(4, 1, 1),
    (1, 19456, 2560): MmaConfig(4, 1, 1),
    (16, 19456, 2560): MmaConfig(8, 1, 1),
    (32, 19456, 2560): MmaConfig(4, 1, 1),
    (1, 2560, 9728): MmaConfig(8, 1, 2),
    (16, 2560, 9728): MmaConfig(8, 1, 1),
    (32, 2560, 9728): MmaConfig(4, 1, 4),
}


def configs(n: int, k: int, group: int = 128, rows: int = 1) -> list[MmaConfig]:
    """The sweep's launch configs for a shape and row count, today's pick first (`swept`)."""
    return swept(pick_config(n, k, rows), k, group, rows)


def swept(default: MmaConfig, k: int, group: int, rows: int) -> list[MmaConfig]:
    """`default`, then 4 or 8 warps a program, 1 or 2 groups loaded ahead a warp (1 at four n-tiles), K split 1-16
    ways (a group for every warp of a split at least): the configs a sweep of a decode kernel times."""
    groups = k // group
    unrolls = (1, 2) if n_tiles(rows) < 4 else (1,)
    configs = [MmaConfig(w, u, s) for w in (4, 8) for u in unrolls for s in (1, 2, 4, 8, 16) if groups // s >= w]
    return [default, *(c for c in configs if c != default)]


def pick_config(n: int, k: int, rows: int = 1) -> MmaConfig:
    found = TUNED.get((row_class(rows), n, k))
    if found is not None:
        return found
    return MmaConfig(4, 2 if n_tiles(rows) < 4 else 1, max(1, min(4, k // 1024)))


def load_tuning(path: str | None = None) -> int:
    """A sweep's best configs into TUNED (kernels/tuning.py); read at import from $QWEN3VL_KERNEL_TUNING."""
    from qwen3vl_webui.kernels import tuning

    return tuning.load("int4mma", MmaConfig, TUNED, path)


def split_of(n: int, k: int, group: int, config: MmaConfig | None = None, rows: int = 1) -> tuple[int, int]:
    """(partial sums a launch writes, groups of K each): its K split, clipped so that each split has a group."""
    cfg = config or pick_config(n, k, rows)
    groups = k // group
    per = -(-groups // cfg.split)
    return -(-groups // per), per


def supports(n: int, k: int, group: int) -> bool:
    return group in GROUPS and n % ROWS_PER_TILE == 0 and k % group == 0


# ----------------------------------------------------------------------------------------------------- layout ---


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/int4.py's layout (int32 `[N, K/8]`, nibble j of word w = column 8w + j; 16-bit scales and uint8 zeros
    `[N, K/128]`) -> (int32 words `[N/16, K/64, 32, 4]`, int32 scale-and-zero `[N/16, K/128, 16]`).

    Word i of lane (g, q) = 4g + q in 64-k chunk c of row tile t holds, at nibble 4e + 2b + h, the weight at row
    16t + g + 8h and k = 64c + 16q + 4i + 2b + e: register j = 2b + h of the lane's A fragment for k-tile i is
    nibbles j (low lane) and j + 4 (high lane). Each scale-and-zero entry is the scale's 16 bits | zero << 16."""
    n, words = qweight.shape
    k = words * 8
    q = unpack(qweight).to(torch.int32)  # [N, K]
    # row = 16t + 8h + g, k = 64c + 16q + 4i + 2b + e
    q = q.reshape(n // 16, 2, 8, k // CHUNK, 4, 4, 2, 2)  # t, h, g, c, q, i, b, e
    q = q.permute(0, 3, 2, 4, 5, 7, 6, 1)  # t, c, g, q, i, e, b, h: nibble 4e + 2b + h
    q = q.reshape(n // 16, k // CHUNK, 32, 4, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    packed = (q << shifts).sum(dim=4, dtype=torch.int64).to(torch.uint32).view(torch.int32).contiguous()
    bits = scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    table = bits | (zeros.to(torch.int32) << 16)  # [N, G]
    table = table.reshape(n // 16, 16, -1).permute(0, 2, 1).contiguous()  # [N/16, G, 16]
    return packed, table


REPACK_ROWS = 1024  # rows repacked at a time in place: the repack's int64 work stays ~40 MB for the 4B's widest K


def repack_in_place(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """`qweight` reordered into `repack`'s words within its own memory (a 16-row tile's words take those rows'),
    REPACK_ROWS rows at a time so that the transient memory stays small; returns the scale-and-zero table."""
    n = qweight.shape[0]
    table = torch.empty((n // 16, scales.shape[1], 16), dtype=torch.int32, device=qweight.device)
    for r in range(0, n, REPACK_ROWS):
        words, part = repack(qweight[r : r + REPACK_ROWS], scales[r : r + REPACK_ROWS], zeros[r : r + REPACK_ROWS])
        qweight[r : r + REPACK_ROWS].view(-1).copy_(words.view(-1))
        table[r // 16 : (r + REPACK_ROWS) // 16] = part
    return table


def emulate(
    x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, dtype: torch.dtype, split: int = 1
) -> torch.Tensor:
    """The kernel's arithmetic in torch (fp32), fragment by fragment from the repacked buffers: `[split, M, N]`.

    It reads the words as the kernel's lanes do (register j of lane (g, q) = nibbles j and j + 4; activations
    k = 16q + 4i + {0, 1} for b0 b1 and + {2, 3} for b2 b3; rows g, g + 8 of the tile for a's registers j even,
    odd), so a wrong index in `repack` or in this mapping fails the tests against the dequantized weight."""
    if x.shape[0] > 8:  # each n-tile of 8 rows is the same computation on its rows (the kernel's NT loop)
        return torch.cat([emulate(x[r : r + 8], packed, table, dtype, split) for r in range(0, x.shape[0], 8)], dim=1)
    magic = MAGIC[dtype]
    tiles, chunks = packed.shape[0], packed.shape[1]
    m, k = x.shape
    groups = table.shape[1]
    per_group = k // groups // CHUNK  # chunks a group
    w = packed.to(torch.int64) & 0xFFFFFFFF  # [T, C, 32, 4]
    nib = torch.stack([(w >> (4 * p)) & 0xF for p in range(8)], dim=-1).to(torch.float32) + magic  # [T, C, 32, 4, 8]
    lane = torch.arange(32)
    g, qq = lane // 4, lane % 4
    # A[t, c, i, row, kl] for the m16n8k16 tile: register j = nibbles (j, j + 4) of word i; row g + 8 (j & 1),
    # kl = 2q + 8 (j >> 1) + e.
    a = torch.zeros(tiles, chunks, 4, 16, 16)
    for j in range(4):
        for e in range(2):
            rows = g + 8 * (j & 1)
            cols = 2 * qq + 8 * (j >> 1) + e
            a[:, :, :, rows, cols] = nib[:, :, lane, :, 4 * e + j].permute(0, 1, 3, 2)
    b = activation_fragments(x)
    t = torch.einsum("tcirk,cikn->tcrn", a, b)  # [T, C, 16, 8]: a chunk's four k-tiles summed
    sx = b.sum(dim=2).sum(dim=1)  # [C, 8]: the all-ones mma's Σ x
    t = t.reshape(tiles, groups, per_group, 16, 8).sum(dim=2)  # per group
    sx = sx.reshape(groups, per_group, 8).sum(dim=1)
    entry = table.to(torch.int64) & 0xFFFFFFFF  # [T, G, 16]
    bits = entry & 0xFFFF
    scale = (bits - ((bits & 0x8000) << 1)).to(torch.int16).view(dtype).to(torch.float32)
    zero = (entry >> 16).to(torch.float32) + magic
    per_group = scale[..., None] * (t - zero[..., None] * sx[None, :, None, :])  # [T, G, 16, 8]
    per = -(-groups // split)
    parts = [per_group[:, s * per : (s + 1) * per].sum(dim=1) for s in range(-(-groups // per))]
    out = torch.stack(parts)  # [S, T, 16, 8]
    return out.permute(0, 3, 1, 2).reshape(len(parts), 8, tiles * 16)[:, :m]


def activation_fragments(x: torch.Tensor) -> torch.Tensor:
    """The B fragments of up to 8 batch rows `x [M, K]` as the decode kernels' lanes load them (kernels/cuda.py's
    DECODE_HELPERS): `[K/64, 4, 16, 8]` (chunk, k-tile i, the tile's k, batch row), fp32, rows past M zero. Lane
    (g, q)'s b0 b1 are kl = 2q + e from k = 16q + 4i + e; its b2 b3 kl = 2q + 8 + e from k = 16q + 4i + 2 + e."""
    m, k = x.shape
    chunks = k // CHUNK
    xs = torch.zeros(8, k)
    xs[:m] = x.to(torch.float32)
    xc = xs.reshape(8, chunks, 4, 16)  # n, c, q, 16 contiguous values
    b = torch.zeros(chunks, 4, 16, 8)
    for q in range(4):
        for i in range(4):
            for e in range(2):
                b[:, i, 2 * q + e, :] = xc[:, :, q, 4 * i + e].T
                b[:, i, 2 * q + 8 + e, :] = xc[:, :, q, 4 * i + 2 + e].T
    return b


# ------------------------------------------------------------------------------------------------------ CUDA ---

SOURCE = r"""
// CPG: 64-k chunks a group (1 or 2: groups of 64 or 128 k). A lane's chunk: one 16-byte word load (4 k-tiles of 16
// rows), two 16-byte activation loads (kernels/cuda.py's DECODE_HELPERS: load_weights, load_x, mma, load_group_x).
// Groups gg, gg + WARPS, ... (UNROLL of them, those before `end`): their weights and scale-and-zero entries.
__device__ __forceinline__ void load_group_weights(uint4 (&w)[UNROLL][CPG], unsigned (&sz)[UNROLL][2],
                                                   const uint4* wg, const unsigned* sg, int gg, int end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (gg + u * WARPS < end) {
#pragma unroll
            for (int c = 0; c < CPG; ++c) w[u][c] = load_weights(wg + (u * WARPS * CPG + c) * 32);
            sz[u][0] = __ldg(sg + u * WARPS * 16);
            sz[u][1] = __ldg(sg + u * WARPS * 16 + 8);
        }
    }
}

// One step's math: for each of its groups and n-tiles, the dot of magic + q with x and the all-ones dot (Σ x) in
// 2 mma's a k-tile (the weights' registers made once for all n-tiles), then the group's scale and zero applied in
// fp32 to the lane's four sums of each n-tile.
__device__ __forceinline__ void group_math(float (&acc)[NT][4], const uint4 (&w)[UNROLL][CPG],
                                           const unsigned (&sz)[UNROLL][2], const uint4 (&x)[UNROLL][NT][2 * CPG],
                                           int gg, int end) {
    const unsigned magic = MAGIC_BITS, nibbles = 0x000F000Fu;
    const unsigned ones[4] = {ONES_BITS, ONES_BITS, ONES_BITS, ONES_BITS};
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (gg + u * WARPS < end) {
            float t[NT][4], s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int c = 0; c < 4; ++c) t[nt][c] = s[nt][c] = 0.f;
#pragma unroll
            for (int ch = 0; ch < CPG; ++ch) {
                const unsigned wv[4] = {w[u][ch].x, w[u][ch].y, w[u][ch].z, w[u][ch].w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    unsigned a[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j)  // register j: nibbles j and j + 4 as magic + q in each lane
                        asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(a[j]) : "r"(wv[i] >> (4 * j)), "r"(nibbles), "r"(magic));
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const uint4 xq = x[u][nt][2 * ch + (i >> 1)];  // values 4i..4i+3 of the lane's 16
                        const unsigned b0 = (i & 1) ? xq.z : xq.x, b1 = (i & 1) ? xq.w : xq.y;
                        mma(t[nt], a, b0, b1);
                        mma(s[nt], ones, b0, b1);  // Σ x over the k-tile, per column
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // rows g (h 0: c0 c1) and g + 8 (h 1: c2 c3)
                const unsigned e = sz[u][h];
                const float scale = SCALE_OF(e);
                const float zero = (float)(e >> 16) + MAGIC_F;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[nt][2 * h] += scale * (t[nt][2 * h] - zero * s[nt][2 * h]);
                    acc[nt][2 * h + 1] += scale * (t[nt][2 * h + 1] - zero * s[nt][2 * h + 1]);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) w4_mma(
    const uint4* __restrict__ W, const unsigned* __restrict__ SZ, const unsigned short* X,
    float* __restrict__ Y, int M, int N, int K, int sx, int per_split, long long ys)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int groups = K / GSIZE, chunks = K / 64;
    const int first = split * per_split + warp;
    const int end = min(split * per_split + per_split, groups);
    constexpr int STEP = UNROLL * WARPS;
    // Group gg's chunk c for this lane: wg[(gg * CPG + c) * 32]; its scale-and-zero for rows g, g + 8: sg[gg * 16],
    // [+ 8]; its activations: xg[gg * GSIZE / 8] on. Rows of the batch past M read row M - 1 (never stored).
    const uint4* wg = W + (size_t)tile * chunks * 32 + lane + (size_t)first * CPG * 32;
    const unsigned* sg = SZ + (size_t)tile * groups * 16 + g + first * 16;
    const uint4* xg[NT];
    float acc[NT][4];
    start_rows(xg, acc, X, M, sx, first);
    uint4 wa[UNROLL][CPG], wb[UNROLL][CPG], xa[UNROLL][NT][2 * CPG], xb[UNROLL][NT][2 * CPG];
    unsigned sa[UNROLL][2], sb[UNROLL][2];

    // The first step's weights: constants, loaded before the wait so that they overlap the kernel before. ptxas
    // schedules a wait as early as its block allows, above loads of the same block, so the loads sit in a loop of
    // their own (run once: per_split is never 0, which the compiler cannot know). tests/test_w4_mma.py reads the
    // order in SASS.
#pragma unroll 1
    for (int once = 0; once < 1 + (per_split == 0); ++once) load_group_weights(wa, sa, wg, sg, first, end);
    PDL_WAIT();
    load_group_x(xa, xg, first, end);
    // Two steps a trip, the buffers' roles swapped between them (no register copies): each step loads the next
    // step's weights and activations, then does its own math on what the step before loaded.
    for (int gg0 = first; gg0 < end; gg0 += 2 * STEP) {
        wg += STEP * CPG * 32;
        sg += STEP * 16;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xg[nt] += STEP * GSIZE / 8;
        load_group_weights(wb, sb, wg, sg, gg0 + STEP, end);
        load_group_x(xb, xg, gg0 + STEP, end);
        group_math(acc, wa, sa, xa, gg0, end);
        if (gg0 + STEP >= end) break;
        wg += STEP * CPG * 32;
        sg += STEP * 16;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xg[nt] += STEP * GSIZE / 8;
        load_group_weights(wa, sa, wg, sg, gg0 + 2 * STEP, end);
        load_group_x(xa, xg, gg0 + 2 * STEP, end);
        group_math(acc, wb, sb, xb, gg0 + STEP, end);
    }
    store_parts(acc, Y, M, N, tile, split, ys);
}
"""

_KINDS = {
    torch.bfloat16: {
        "KIND": '"bf16"',
        "MAGIC_BITS": "0x43004300u",
        "ONES_BITS": "0x3F803F80u",
        "MAGIC_F": "128.f",
        "SCALE_OF(e)": "__uint_as_float((e) << 16)",
    },
    torch.float16: {
        "KIND": '"f16"',
        "MAGIC_BITS": "0x64006400u",
        "ONES_BITS": "0x3C003C00u",
        "MAGIC_F": "1024.f",
        "SCALE_OF(e)": "__half_bits_to_float(e)",
    },
}
_HALF = r"""
__device__ __forceinline__ float __half_bits_to_float(unsigned e) {
    float f; unsigned short h = (unsigned short)(e & 0xFFFFu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
"""


def source(dtype: torch.dtype, warps: int, unroll: int, pdl_mode: int, group: int = 128, tiles: int = 1) -> str:
    """The kernel's CUDA C for one variant (macros first): `tiles` n-tiles of 8 batch rows (1, 2 or 4)."""
    defines = {**_KINDS[dtype], "WARPS": str(warps), "UNROLL": str(unroll), "PDL": str(pdl_mode),
               "CPG": str(group // CHUNK), "NT": str(tiles)}  # fmt: skip
    head = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return head + (_HALF if dtype == torch.float16 else "") + cuda.DECODE_HELPERS + SOURCE


@functools.cache
def _function(index: int, dtype: torch.dtype, warps: int, unroll: int, pdl_mode: int, group: int, tiles: int) -> Any:
    return cuda.function(index, source(dtype, warps, unroll, pdl_mode, group, tiles), "w4_mma")


def launch(
    x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, n: int, config: MmaConfig | None = None,
    pdl_mode: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """`x [M <= DECODE_ROWS, K]` (bf16/fp16, rows contiguous, 16-byte aligned) times the repacked weight ᵀ:
    `[split, M, N]` fp32 partial sums on the current stream; more than 32 rows in launches of 32 (config:
    `pick_config` for M's row class where none is given, the same for every launch)."""
    m, k = x.shape
    if m > DECODE_ROWS or x.stride(1) != 1 or x.data_ptr() % 16 or (m > 1 and x.stride(0) % 8):
        raise ValueError(f"w4_mma takes up to {DECODE_ROWS} rows, contiguous and 16-byte aligned; got {tuple(x.shape)}")
    cfg = config or pick_config(n, k, m)
    group = k // table.shape[1]
    split, per = split_of(n, k, group, cfg)
    out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    index = x.get_device()
    pdl_mode = cuda.pdl_mode_for(x, "int4", pdl_mode)
    for start in range(0, m, MAX_ROWS):
        rows = min(MAX_ROWS, m - start)
        values = [
            ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(table.data_ptr()),
            ctypes.c_void_p(x[start].data_ptr()), ctypes.c_void_p(out[0, start].data_ptr()), ctypes.c_int(rows),
            ctypes.c_int(n), ctypes.c_int(k), ctypes.c_int(x.stride(0)), ctypes.c_int(per), ctypes.c_longlong(m * n),
        ]  # fmt: skip
        func = _function(index, x.dtype, cfg.warps, cfg.unroll, pdl_mode, group, n_tiles(rows))
        cuda.launch(func, (n // ROWS_PER_TILE, split), 32 * cfg.warps, values, index, pdl_mode)
    return out


# ------------------------------------------------------------------------------------------------ the weights ---


def wanted(device: Any) -> bool:
    """Whether int4 weights loaded onto `device` take this kernel's layout: not QWEN3VL_INT4_MMA=0, and a GPU where it
    builds (compute capability 8.0+, NVRTC and the driver found, one variant compiled and loaded: `builds`)."""
    dev = torch.device(device)
    return enabled() and dev.type == "cuda" and builds(dev.index if dev.index is not None else 0)


@functools.cache
def builds(index: int) -> bool:
    """The GPU runs the kernel and one variant compiles for it and loads (`cuda.builds`), once a process."""
    return cuda.builds(index, lambda: _function(index, torch.bfloat16, 4, 1, 0, 128, 1), __name__)


def decodes(x: torch.Tensor, scale_dtype: torch.dtype) -> bool:
    """A product this kernel runs: 1..DECODE_ROWS rows of 16-bit activations on a GPU, with scales of their dtype
    (the kernel reads the table's scale bits as x's kind); prefill's dequantizes. Shapes and dtypes only."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.is_cuda and x.dtype in MAGIC and x.dtype == scale_dtype and 0 < rows <= DECODE_ROWS


def parts_count(x: torch.Tensor, n: int, k: int, group: int, scale_dtype: torch.dtype) -> int:
    """How many partial sums `parts` returns for `x` (shapes only: a fake tensor gets the same answer)."""
    return split_of(n, k, group, rows=x.numel() // k)[0] if decodes(x, scale_dtype) else 1


def parts(x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """`x [..., K]` times the weight in this layout ᵀ as `[parts_count(...), ..., N]` partial sums: fp32 from the
    kernel for a decode product, else the product itself in x's dtype (dequantized, then cuBLAS), `[1, ..., N]`."""
    k, n = x.shape[-1], words.shape[0]
    if not decodes(x, scales.dtype):
        return linear(x, words, table, scales, zeros)[None]
    out = launch(cuda.kernel_rows(x), words.view(n // 16, k // CHUNK, 32, 4), table, n)
    return out.reshape(out.shape[0], *x.shape[:-1], n)


def linear(x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """`x [..., K] @ Wᵀ` in x's dtype for a weight in this layout: the kernel's parts summed for a decode product,
    else the weight dequantized to x's dtype and cuBLAS (torch's ops on a CPU)."""
    if decodes(x, scales.dtype):
        return cuda.summed(parts(x, words, table, scales, zeros), x)
    weight = dequantize(words, scales, zeros, x.dtype)
    return torch.nn.functional.linear(x, weight)


def original_words(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `repack`'s words: int32 `[N, K/8]` in kernels/int4.py's layout (torch ops: tests, CPUs)."""
    n, k = words.shape[0], words.shape[1] * 8
    w = words.reshape(n // 16, k // CHUNK, 32, 4).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=words.device)
    q = ((w[..., None] >> shifts) & 0xF).reshape(n // 16, k // CHUNK, 8, 4, 4, 2, 2, 2)  # t, c, g, q, i, e, b, h
    q = q.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(n, k)  # t, h, g, c, q, i, b, e: row 16t + 8h + g, k in order
    return pack(q)


def dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The `[N, K]` weight `(q - zero) * scale` from words in this layout, each value rounded once from fp32: a
    Triton kernel on a GPU (prefill), torch's ops elsewhere."""
    if words.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from qwen3vl_webui.kernels import w4_mma_triton

        return w4_mma_triton.dequantize(words, scales, zeros, dtype)
    return dequantize_weight(original_words(words), scales, zeros, dtype)


load_tuning()
