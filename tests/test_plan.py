"""The VRAM planner's command line and arithmetic (python -m qwen3vl_webui.plan), and the device check's CPU plumbing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_webui import plan, planner, precisions

ROOT = Path(__file__).resolve().parents[1]
SHAPE = planner.ModelShape.qwen3vl_4b()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen3vl_webui.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_the_issue_case_prints_every_part_and_does_not_fit_an_l4() -> None:
    out = _cli("--gpu", "L4", "--precision", "int4", "--max-context", "32768", "--max-concurrency", "8")
    assert out.returncode == 1, out.stderr  # 8 chats of 32K tokens need 36 GiB of KV alone
    text = out.stdout
    for part in ("weights", "KV cache (8 slots x 32,768 tokens)", "kept for follow-up turns", "activations",
                 "CUDA context", "does NOT fit", "The most that fits on L4"):  # fmt: skip
        assert part in text, text
    assert "36.00 GiB" in text  # 144 KiB a token x 32,768 x 8
    for name in plan.gpu_precisions():  # every precision of the table, none hard-coded
        assert f"\n  {name} " in text
    assert "fp8" in text and "needs compute capability" not in text  # an L4 is 8.9


def test_a_case_that_fits_exits_0_and_a_t4_cannot_run_fp8() -> None:
    out = _cli("--gpu", "h200", "--precision", "bf16", "--max-context", "16384", "--max-concurrency", "8")
    assert out.returncode == 0 and ": fits" in out.stdout, out.stdout
    t4 = _cli("--gpu", "T4", "--precision", "int4", "--max-context", "4096")
    assert "fp8" in t4.stdout and "needs compute capability 8.9 (this GPU: 7.5)" in t4.stdout
    own = _cli("--gpu-memory", "24", "--max-context", "8192")
    assert "a 24 GiB GPU" in own.stdout


@pytest.mark.parametrize("args", [("--gpu", "V100"), ("--gpu", "L4", "--max-context", "100"),
                                  ("--gpu", "L4", "--max-concurrency", "0"), ("--precision", "bf16")])  # fmt: skip
def test_bad_arguments_exit_2_with_one_line(args: tuple[str, ...]) -> None:
    out = _cli(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("usage:") is False


def test_gpu_names_are_loose() -> None:
    assert plan.find_gpu("a100-40").name == "A100 40GB"
    assert plan.find_gpu("A100 80GB").name == "A100 80GB"
    assert plan.find_gpu("4090").name == plan.find_gpu("rtx4090").name == "RTX 4090"
    with pytest.raises(ValueError, match="known: T4, L4"):
        plan.find_gpu("K80")


def test_the_plan_follows_the_engine_layout() -> None:
    p = plan.plan_memory(SHAPE, "bf16", 16384, 8)
    per_token = 36 * 8 * 128 * 2 * 2  # FACTS: 144 KiB a token in bf16
    assert p.kv == per_token * 16384 * 8
    assert p.retained_kv == per_token * 16384 * 2  # a quarter of 8 entries kept for follow-up turns
    assert p.staging_kv == per_token * 16384
    assert p.weights == planner.weight_bytes(SHAPE, "bf16")
    assert p.total == p.torch_bytes + p.cuda_context + p.headroom
    assert p.headroom == p.activations  # one more prefill transient's room beyond what torch must hold
    assert p.cuda_context == 1088 * 1024**2  # H200: 1.01-1.04 GiB outside torch at the end of every case
    assert plan.plan_memory(SHAPE, "bf16", 16400, 8).max_context == 16384  # slots align to 64 tokens
    # The prefill graphs' static buffers, one 2,048-token chunk's KV, embeddings, 3 deepstack and hidden states,
    # whatever the context: 338 MiB in bf16, beside the graphs' pools and the allocator's split segments.
    for q in (p, plan.plan_memory(SHAPE, "bf16", 1024, 1)):
        graphs = q.overhead - plan.ALLOCATOR_SPLIT
        assert graphs == plan.GRAPH_POOLS + 2048 * (per_token + 5 * 2560 * 2) == plan.GRAPH_POOLS + 338 * 1024**2
    # A weight-only precision's prefill dequantizes the fused gate/up weight (int8wo: twice), in the graphs' pool too.
    gate_up = 2 * 9728 * 2560 * 2
    q = plan.plan_memory(SHAPE, "int8wo", 16384, 8)
    assert q.overhead - p.overhead == 2 * gate_up


def test_activations_follow_the_last_chunk() -> None:
    """H200 (bench/results/h200/plan_check_uncapped.json: the cases without the cap): 0.23 GiB of prefill transient at 4,096
    tokens (one prompt's chunk, its MLP), 0.57 at 16,384 (SDPA's K/V repeated to every head over the whole prompt).
    The plan covers those and a batch of short prompts padded to the slot's length (not measured: the MLP of up to
    4 chunks, 4,096 tokens at this context)."""
    gib = 1024**3
    text = plan.plan_memory(SHAPE, "bf16", 4096, 1, image_pixels=0).activations
    long = plan.plan_memory(SHAPE, "bf16", 16384, 1, image_pixels=0).activations
    one_chunk_mlp = 2048 * 4 * 9728 * 2
    assert 0.3 * gib < text < 0.5 * gib and text > 2 * one_chunk_mlp  # the batch of short prompts: 2 chunks here
    assert 0.57 * gib < long < 0.9 * gib
    # the attention grows with the context: 32 heads' K and V plus the concatenated 8, 20 KiB a token in bf16
    longer = plan.plan_memory(SHAPE, "bf16", 65536, 1, image_pixels=0).activations
    assert longer - long > (65536 - 16384) * 20 * 1024


def test_largest_figures_are_the_edge_of_fitting() -> None:
    memory = plan.find_gpu("L4").memory
    for name in ("bf16", "int4"):
        n = plan.largest_concurrency(SHAPE, name, 8192, memory)
        assert plan.fits(plan.plan_memory(SHAPE, name, 8192, n), memory)
        assert not plan.fits(plan.plan_memory(SHAPE, name, 8192, n + 1), memory)
        context = plan.largest_context(SHAPE, name, 4, memory)
        assert plan.fits(plan.plan_memory(SHAPE, name, context, 4), memory)
        assert not plan.fits(plan.plan_memory(SHAPE, name, context + 256, 4), memory)
    # fewer bits, more room
    assert plan.largest_context(SHAPE, "int4", 4, memory) > plan.largest_context(SHAPE, "bf16", 4, memory)
    assert set(plan.gpu_precisions()) == {p.name for p in precisions.TABLE} - {"fp32"}


def test_the_device_check_runs_on_a_cpu(tmp_path: Path) -> None:
    from bench import plan_check

    out = tmp_path / "check.json"
    code = plan_check.main(["--cpu", "--out", str(out), "--new-tokens", "2"])
    rows = json.loads(out.read_text())["rows"]
    assert code == 0
    assert [(r["context"], r["concurrency"]) for r in rows] == [(512, 1), (512, 2), (1024, 1), (1024, 2)]
    assert all("error" not in r and r["prompt_tokens"] > 400 for r in rows), rows
    # The worst case ran with the retained-prefix pool full, and a CPU has no allocator to measure or cap.
    assert all(r["kept_before"] == r["retained_slots"] == 1 for r in rows), rows
    assert all(r["allocator"] == plan_check.NO_ALLOCATOR and r["within"] is None and r["sufficient"] is None
               for r in rows), rows  # fmt: skip
    assert all(r["prefix_dropped"] == 0 and r["prefix_hits"] == 0 for r in rows), rows  # no prompt reused another's
    # At 2 slots a burst of 2 short prompts ran between, in one batched forward (after the filler's one).
    assert [(r["concurrency"], r["burst"][0], r["burst_forwards"]) for r in rows] == [(1, 0, None), (2, 2, 2)] * 2
    # Each as long as a slot allows (its answer's 2 tokens after it): the burst stages more KV than one slot holds.
    assert all(r["burst"][1] == min(2048, r["context"] - 2) for r in rows if r["burst"][0])
    assert plan.burst_tokens(512, 2) == 1024 > 512 and plan.burst_tokens(4096, 8) == 8192
    one = tmp_path / "one.json"
    assert plan_check.main(["--cpu", "--case", "fp32:512:2", "--out", str(one), "--new-tokens", "2"]) == 0
    (row,) = json.loads(one.read_text())["rows"]
    assert (row["context"], row["concurrency"], row["planned_torch"] > 0) == (512, 2, True)
    assert plan_check.default_precisions("cuda")[:2] == ["bf16", "int8wo"]
    assert len(plan_check.default_precisions("cuda")) == 3


def test_the_slider_line_says_what_fits_on_this_gpu() -> None:
    line = plan.summary(SHAPE, "int4", 32768, 8, "NVIDIA L4", plan.find_gpu("L4").memory)
    assert line.startswith("VRAM plan on NVIDIA L4: ") and "does NOT fit" in line
    chats = plan.largest_concurrency(SHAPE, "int4", 32768, plan.find_gpu("L4").memory)
    assert f"at most {chats} chat" in line
    assert ": fits" not in line
    assert "(fits" in plan.summary(SHAPE, "bf16", 4096, 1, "H200", plan.find_gpu("H200").memory)


def test_the_planner_against_the_needs_an_h200_measured(tmp_path: Path) -> None:
    """This tree's planner against bench/results/h200/plan_check_uncapped.json (12 cases run without a cap, so each
    need is whole and does not depend on the plan): within ±10% in every case, and the total a user would buy at
    least the run's peak reserved bytes plus the driver's own. A planner change that parts from the GPU fails here."""
    from bench import plan_check

    out = tmp_path / "rejudged.json"
    measured = ROOT / "bench" / "results" / "h200" / "plan_check_uncapped.json"
    code = plan_check.main(["--rejudge", str(measured), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and {r["precision"] for r in rows} == {"bf16", "int8wo", "int4"}
    assert all(r["within"] and r["total_margin"] >= 0 for r in rows), rows
    assert code == 0
