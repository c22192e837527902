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
    for tile in (2, 3, 4, 6):
        kernel = compile_w4(W4Config(32, 64, 1, 4, 2, tile), 32, 19456, 2560)
        assert kernel.asm["cubin"], tile  # ptxas assembled it
        counts[tile] = _counts(kernel)
        assert _count(counts[tile], "wgmma") > 0, (tile, counts[tile])  # Hopper's tensor cores
    # Tile 3 gathers the 32 rows' activations in the pairs' order one 2-byte load at a time; tile 6 reads them in k
    # order as pipelined 16-byte copies (2 scalar loads left: the zero and the scale).
    assert counts[3].get("ld.global.b16", 0) >= 32
    assert counts[6].get("ld.global.b16", 0) <= 2
    assert counts[6].get("cp.async 16 B", 0) > counts[3].get("cp.async 16 B", 0)


def test_the_fp8_atomic_gemv_compiles_for_sm90_and_adds_its_sums_atomically() -> None:
    from bench.kernel_asm import compile_fp8
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    counts = _counts(compile_fp8(Fp8Config(1, 32, 4, 1, 2, 2), 1, 6144, 2560))
    assert _count(counts, "atom.global") + _count(counts, "red.global") > 0, counts
    assert _count(counts, "wgmma") == 0 and _count(counts, "mma") == 0, counts  # fp32 FMAs, no tensor cores


def test_every_fp8_decode_kernel_the_sweep_can_pick_compiles_for_sm90() -> None:
    from bench.kernel_asm import compile_fp8
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    for cfg, rows in ((Fp8Config(1, 8, 4, 2), 1), (Fp8Config(16, 64, 4, 3, 0, 1), 16), (Fp8Config(1, 16, 2, 1, 4, 2), 1)):
        assert compile_fp8(cfg, rows, 2560, 9728).asm["cubin"], cfg


def test_the_split_k_reduction_compiles_for_sm90_with_16_byte_loads() -> None:
    from bench.kernel_asm import compile_offline
    from qwen3vl_webui.kernels import splitk

    kernel = compile_offline(splitk._reduce_kernel, dict(p_ptr="*fp32", y_ptr="*bf16", total=2560),
                             dict(SPLIT=8, BLOCK=splitk.BLOCK), 4, 1)  # fmt: skip
    counts = _counts(kernel)
    assert counts.get("ld.global.v4.b32", 0) >= 8 and _count(counts, "ld.global.b32") == 0, counts
