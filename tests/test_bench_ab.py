"""bench/ab.py's arithmetic: medians over rounds per side and scenario, and b over a."""

from __future__ import annotations

import pytest

from bench import ab


def _report(tok_s: float, p50: float, p95: float, chats: int = 16, door: str = "gradio") -> dict:
    scenario = {"chats": chats, "door": door, "image_chats": 0, "profiled": False, "total_tok_s": tok_s,
                "ttft_s": {"p50": p50, "p95": p95}}  # fmt: skip
    return {"scenarios": [scenario]}


def test_medians_per_side_and_the_ratio_of_b_to_a() -> None:
    runs = {"a": [_report(100, 2.0, 4.0), _report(140, 1.0, 3.0), _report(120, 3.0, 5.0)],
            "b": [_report(200, 0.5, 1.0), _report(180, 1.5, 2.0), _report(250, 1.0, 1.5)]}  # fmt: skip
    summary = ab.summarize(runs)["16 chats, gradio"]
    assert summary["a"]["total_tok_s"] == 120 and summary["b"]["total_tok_s"] == 200
    assert summary["a"]["ttft_p95_s"] == 4.0 and summary["b"]["ttft_p50_s"] == 1.0
    assert summary["b_over_a"] == {"total_tok_s": pytest.approx(1.667, abs=1e-3), "ttft_p50_s": 0.5,
                                   "ttft_p95_s": pytest.approx(0.375)}  # fmt: skip
    assert summary["a"]["runs"]["total_tok_s"] == [100, 140, 120]


def test_a_side_without_runs_has_no_ratio_and_bad_env_is_refused() -> None:
    summary = ab.summarize({"a": [], "b": [_report(200, 0.5, 1.0)]})["16 chats, gradio"]
    assert "b_over_a" not in summary and summary["b"]["total_tok_s"] == 200
    assert ab.parse_env(["X=1", "Y="]) == {"X": "1", "Y": ""}
    with pytest.raises(SystemExit, match="not NAME=VALUE"):
        ab.parse_env(["X"])


def test_a_third_side_gets_its_own_ratio_to_a_and_the_table_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"a": [_report(100, 2.0, 4.0)], "b": [_report(150, 1.0, 2.0)], "c": [_report(90, 4.0, 8.0)]}
    summary = ab.summarize(runs)
    entry = summary["16 chats, gradio"]
    assert entry["b_over_a"]["total_tok_s"] == 1.5 and entry["c_over_a"]["total_tok_s"] == 0.9
    assert entry["c_over_a"]["ttft_p95_s"] == 2.0
    ab.print_table(summary, {"a": "base", "b": "more", "c": "less"})
    out = capsys.readouterr().out
    assert "c / a" in out and "less" in out
    tok_row = next(line for line in out.splitlines() if "tok/s" in line)
    assert tok_row.split()[-2:] == ["1.5", "0.9"]
