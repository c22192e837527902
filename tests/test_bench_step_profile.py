"""bench/step_profile.py: its kernel kinds, and its plumbing on the CPU (the tiny model; no CUDA kernels there)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import step_profile


def test_kernels_are_put_in_their_kind_by_name() -> None:
    names = {
        "_swap_kernel": "our products (Triton)", "_atomic_gemv_kernel": "our products (Triton)",
        "w4_mma": "our products (CUDA)", "fp8_mma": "our products (CUDA)",
        "_reduce_kernel": "split-K reduction", "split_kv_partials": "attention",
        "triton_per_fused_add_mean_mul_pow_rsqrt_0": "inductor fused", "nvjet_hsh_64x8_64x16_2x1_v_bz_TNT": "cuBLAS / GEMM",
        "Memcpy DtoD (Device -> Device)": "copy / fill", "void at::native::vectorized_elementwise_kernel": "other",
    }  # fmt: skip
    assert {name: step_profile.kind_of(name) for name in names} == names


def test_plumbing_on_cpu(tmp_path: Path, monkeypatch) -> None:
    from bench.common import KNOBS

    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN3VL_NORM_HANDOFF", "0")  # an A/B switch: the report says which side it ran
    out = tmp_path / "profile.json"
    argv = ["--model", "random-weights:tiny", "--device", "cpu", "--precision", "fp32", "--steps", "4",
            "--max-batch", "2", "--prompt-tokens", "32", "--out", str(out)]  # fmt: skip
    assert step_profile.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["recorded_steps"] >= 4 and report["step_us"] > 0 and report["precision"] == "fp32"
    assert report["knobs"] == {"QWEN3VL_NORM_HANDOFF": "0"}
