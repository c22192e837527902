"""Every int4 and fp8 decode kernel variant the sweep can pick compiles for the device's GPUs (sm_90) on this CPU, and
the code of the session-21 variants does what they are for (bench/kernel_asm.py: Triton + its bundled ptxas)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _counts(kernel) -> dict[str, int]:
    from bench.kernel_asm import ptx_counts

    return ptx_counts(kernel.asm["ptx"])


def _count(counts: dict[str, int], prefix: str) -> int:
    return sum(n for name, n in counts.items() if name.startswith(prefix))


def test_the_int4_swap_kernels_compile_for_sm90_and_tile_6_reads_the_activations_16_bytes_at_a_time() -> None:
    from bench.kernel_asm import compile_w4
    from qwen3vl_webui.kernels.w4a16_triton import W4Config

    counts = {}
    for tile in (2, 3, 4, 6, 8):
        kernel = compile_w4(W4Config(32, 64, 1, 4, 2, tile), 32, 19456, 2560)
        assert kernel.asm["cubin"], tile  # ptxas assembled it
        counts[tile] = _counts(kernel)
        assert _count(counts[tile], "wgmma") > 0, (tile, counts[tile])  # Hopper's tensor cores
    # Tile 3 gathers the 32 rows' activations in the pairs' order one 2-byte load at a time; tile 6 reads them in k
    # order as pipelined 16-byte copies (2 scalar loads left: the zero and the scale).
    assert counts[3].get("ld.global.b16", 0) >= 32
    assert counts[6].get("ld.global.b16", 0) <= 2
    assert counts[6].get("cp.async 16 B", 0) > counts[3].get("cp.async 16 B", 0)


@pytest.mark.parametrize("rows", [1, 16, 32])
def test_tile_8_masks_and_merges_each_nibble_pair_in_one_lop3_where_tile_6_issues_two(rows: int) -> None:
    # Session 27: ptxas kept tile 6's `& 0x000F000F` and `| magic` as two LOP3s a pair (one immediate a LOP3), 66 of
    # its K loop's 258 SASS instructions at one row; tile 8 writes them as one lop3 in its inline PTX.
    from bench.kernel_asm import compile_w4, sass_loop
    from qwen3vl_webui.kernels.w4a16_triton import W4Config

    bm = 16 if rows <= 16 else 32
    loops = {
        tile: sass_loop(compile_w4(W4Config(bm, 64, 1, 4, 3, tile), rows, 6144, 2560).asm["cubin"]) for tile in (6, 8)
    }
    pairs = 64 * 128 // 2 // 128  # a trip: BLOCK_N x G weights, two a pair, over 128 threads
    assert loops[6]["LOP3"] >= 2 * pairs, loops[6]
    assert loops[8]["LOP3"] <= loops[6]["LOP3"] - pairs + 2, loops
    assert loops[8]["HGMMA"] == loops[6]["HGMMA"] > 0, loops  # the same dots
    assert sum(loops[8].values()) < sum(loops[6].values()), loops
    if rows <= 16:  # the sweep's widest tile 8 (256 weight rows a program) builds too, with fewer instructions a weight
        wide = sass_loop(compile_w4(W4Config(bm, 256, 4, 4, 3, 8), rows, 6144, 2560).asm["cubin"])
        assert wide["HGMMA"] == 4 * loops[8]["HGMMA"], wide
        assert sum(wide.values()) < 4 * sum(loops[8].values()), (wide, loops[8])


def test_tile_8_at_8_rows_a_program_builds_with_tensor_cores_and_fewer_instructions_than_at_16() -> None:
    # Session 28: at one row, 15 of 16 rows a program are masked; 8 (wgmma's smallest N) keeps the same dots over half
    # the activations' tile: 209 SASS instructions a K-loop trip against 225, 14 KB of shared memory against 20.
    from bench.kernel_asm import compile_w4, sass_loop
    from qwen3vl_webui.kernels.w4a16_triton import W4Config

    kernels = {bm: compile_w4(W4Config(bm, 64, 1, 4, 3, 8), 1, 6144, 2560) for bm in (8, 16)}
    loops = {bm: sass_loop(kernel.asm["cubin"]) for bm, kernel in kernels.items()}
    assert loops[8]["HGMMA"] == loops[16]["HGMMA"] > 0, loops
    assert sum(loops[8].values()) < sum(loops[16].values()), loops
    assert kernels[8].metadata.shared < kernels[16].metadata.shared


def test_the_fp8_atomic_gemv_compiles_for_sm90_and_adds_its_sums_atomically() -> None:
    from bench.kernel_asm import compile_fp8
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    counts = _counts(compile_fp8(Fp8Config(1, 32, 4, 1, 2, 2), 1, 6144, 2560))
    assert _count(counts, "atom.global") + _count(counts, "red.global") > 0, counts
    assert _count(counts, "wgmma") == 0 and _count(counts, "mma") == 0, counts  # fp32 FMAs, no tensor cores


def test_every_fp8_decode_kernel_the_sweep_can_pick_compiles_for_sm90() -> None:
    from bench.kernel_asm import compile_fp8
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    for cfg, rows in (
        (Fp8Config(1, 8, 4, 2), 1),
        (Fp8Config(16, 64, 4, 3, 0, 1), 16),
        (Fp8Config(1, 16, 2, 1, 4, 2), 1),
    ):
        assert compile_fp8(cfg, rows, 2560, 9728).asm["cubin"], cfg


def test_the_split_k_reduction_compiles_for_sm90_with_16_byte_loads() -> None:
    from bench.kernel_asm import compile_offline
    from qwen3vl_webui.kernels import splitk

    kernel = compile_offline(splitk._reduce_kernel, dict(p_ptr="*fp32", y_ptr="*bf16", total=2560),
                             dict(SPLIT=8, BLOCK=splitk.BLOCK), 4, 1)  # fmt: skip
    counts = _counts(kernel)
    assert counts.get("ld.global.v4.b32", 0) >= 8 and _count(counts, "ld.global.b32") == 0, counts


@pytest.mark.parametrize("split", [1, 3])
def test_the_fused_layer_kernels_compile_for_sm90_as_the_4b_launches_them(split: int) -> None:
    """kernels/layer_triton.py at the 4B's shapes (hidden 2560, 32 q / 8 kv heads of 128, intermediate 9728) in bf16,
    products whole (bf16) or as fp32 partial sums, SiLU through libdevice: what the interpreter cannot check (it has no
    libdevice, and it runs Python, not the compiler)."""
    from bench.kernel_asm import compile_offline
    from qwen3vl_webui.kernels import layer_triton as lt

    rows, hidden, heads, kv_heads, dim, inter = 4, 2560, 32, 8, 128, 9728
    width = (heads + 2 * kv_heads) * dim
    part = "*bf16" if split == 1 else "*fp32"
    built = {
        "add_rms_norm": compile_offline(lt.add_rms_norm, dict(
            X=part, R="*bf16", W="*bf16", Out="*bf16", Sum="*bf16", eps=1e-6, n=hidden, inv_n=1 / hidden,
            sx_p=rows * hidden, sx=hidden, sr=hidden, so=hidden, ss=hidden,
        ), dict(HAS_R=True, SPLIT=split, BLOCK=4096), 8, 1),
        "qk_norm_rope_kv": compile_offline(lt.qk_norm_rope_kv, dict(
            QKV=part, QW="*bf16", KW="*bf16", Cos="*bf16", Sin="*bf16", Q="*bf16", Keys="*bf16", Values="*bf16",
            Index="*i64", eps=1e-6, s_part=rows * width, s_row=width, s_cos=dim, s_q=heads * dim,
        ), dict(HEADS=heads, KV_HEADS=kv_heads, DIM=dim, SPLIT=split), 1, 1),
        "silu_mul": compile_offline(lt.silu_mul, dict(
            P=part, Out="*bf16", n=inter, sp=rows * 2 * inter, sr=2 * inter, so=inter,
        ), dict(SPLIT=split, BLOCK=1024, PRECISE=True), 4, 1),
        "add_product": compile_offline(lt.add_product, dict(
            R="*bf16", P=part, Out="*bf16", n=hidden, sr=hidden, sp=rows * hidden, spr=hidden, so=hidden,
        ), dict(SPLIT=split, BLOCK=1024), 4, 1),
    }  # fmt: skip
    for name, kernel in built.items():
        assert kernel.asm["cubin"], name  # ptxas assembled it for sm_90
    # SiLU as torch's CUDA op computes it: an IEEE division (not div.full) and libdevice's expf, whose fma steps refine
    # the hardware ex2 that `tl.exp` alone would use.
    silu = built["silu_mul"].asm["ptx"]
    assert "div.rn.f32" in silu and "div.full" not in silu and "fma.rn.f32" in silu
