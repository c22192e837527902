"""bench.coldstart's plumbing on CPU: the app launched as a user would (the engine in its own process, the tiny
model), its stages dated from /ready's JSON, streams through /v1 per phase, the report written; and the device
command line's flags are valid app flags, for precompile too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import coldstart


def test_the_device_flags_are_the_apps_own_and_precompile_takes_them() -> None:
    from qwen3vl_webui.cli import parse_settings

    flags = [*coldstart.GPU_FLAGS, "--precision", "bf16"]
    settings = parse_settings(flags)
    assert settings.random_weights == "4b" and settings.engine == "batch" and settings.max_concurrency == 32
    assert parse_settings([*coldstart.CPU_FLAGS, "--precision", "auto"]).device == "cpu"


def test_cold_launch_plumbing_on_cpu(tmp_path: Path) -> None:
    # --greedy-first changes nothing where the first answer is already at full speed (a CPU: nothing compiles).
    assert coldstart.main(["--out", str(tmp_path), "--cpu", "--cold-only", "--greedy-first", "--deadline-s", "150"]) == 0
    report = json.loads((tmp_path / "coldstart.json").read_text())
    cold = report["cold"]
    assert 0 < cold["page_up_s"] <= cold["ready_s"] <= cold["first_answer_s"], cold
    # On a CPU nothing compiles: ready is full speed at once, decoded by the batch engine's eager path.
    assert cold["full_speed_at_first_answer"] and cold["last_ready"]["decode"] == "eager"
    assert [c["state"] for c in cold["ready_changes"]][-1] == "serving"
    streams = cold["phases"]["at start"]
    assert set(streams) == {"1", "2"} and all(s["ok"] >= 1 and s["total_tok_s"] > 0 for s in streams.values())
    assert any("start-up: first-serving path ready" in line for line in cold["app_stages"]), cold["app_stages"]
    assert report["checks"]["measured"]["cold_first_answer_s"] == cold["first_answer_s"]
    # Greedy answers: nothing compiles on a CPU, so no round crosses a swap; the full-speed repeat equals its reference.
    greedy = cold["greedy_swap"]
    assert greedy["reference_repeat_equal"] and greedy["reference_errors"] == [] and greedy["across_swap_rounds"] == 0
    assert report["checks"]["met"]["greedy_equal_across_swap"] is None
    assert (tmp_path / "server_cold.log").exists() and (tmp_path / "coldstart.log").exists()


def test_greedy_rounds_across_a_swap_are_judged_against_the_full_speed_reference() -> None:
    def round_(before: int, after: int, *answers: str | None) -> dict[str, object]:
        return {"compiled_before": before, "compiled_after": after, "answers": list(answers), "errors": []}

    reference = round_(3, 3, "one two three", "a lighthouse")
    rounds = [round_(0, 0, "one two thr33", "a lighthouse"), round_(0, 1, "one two three", "a lighthouse"),
              round_(1, 3, "one two three", "a lightship"), round_(3, 3, "one two three", None)]  # fmt: skip
    summary = coldstart.greedy_summary(rounds, reference, round_(3, 3, "one two three", "a lighthouse"), own=2)
    assert [r["kind"] for r in summary["rounds"]] == ["eager", "across a swap", "across a swap", "compiled"]
    assert [r["parted_at"] for r in summary["rounds"]] == [[11, None], [None, None], [None, 7], [None, -1]]
    assert (summary["across_swap_rounds"], summary["across_swap_equal"]) == (2, False)
    assert summary["eager_rounds_equal"] is False and summary["reference_repeat_equal"]
    assert (summary["across_own_swap_rounds"], summary["across_own_swap_equal"]) == (1, False)  # the 1->3 round
    assert coldstart.own_bucket([*coldstart.GPU_FLAGS, "--precision", "bf16"], 4) == 3  # buckets 1, 2, 4, ... 32
    report = {"cold": {"greedy_swap": summary}}
    assert coldstart.checks(report)["met"]["greedy_equal_across_swap"] is False
    assert coldstart.greedy_summary(rounds, None, None)["skipped"]


@pytest.mark.skipif(not os.environ.get("QWEN3VL_SLOW_TESTS"), reason="three process starts on CPU (~2 min)")
def test_whole_plan_on_cpu(tmp_path: Path) -> None:
    assert coldstart.main(["--out", str(tmp_path), "--cpu"]) == 0
    report = json.loads((tmp_path / "coldstart.json").read_text())
    assert report["precompile"]["exit_code"] == 0 and report["artifacts"]["first_answer_s"] > 0
