"""bench.schedule_sim drives the engine's real Scheduler on a clock of costs: its plumbing on a small case."""

from __future__ import annotations

import json
from pathlib import Path

from bench import schedule_sim


def test_one_wave_and_a_closed_loop_on_the_engines_scheduler(tmp_path: Path) -> None:
    """A single wave of 4 chats decodes 255 steps of 4 rows after its prefill (the burst: one batched forward), and
    the closed loop answers requests back to back; every policy runs."""
    out = tmp_path / "sim.json"
    assert schedule_sim.main(["--chats", "4", "--seconds", "20", "--warmup-s", "2", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    matrix = runs[0]
    assert (matrix["scenario"], matrix["decode_steps"], matrix["rows_per_step"], matrix["answers"]) == ("matrix", 255, 4.0, 4)
    assert matrix["prefill_forwards"] == 1  # 4 x 512 tokens fit one idle forward (4 chunks of 2,048)
    closed = [r for r in runs if r["scenario"] == "closed"]
    assert [r["policy"] for r in closed] == list(schedule_sim.POLICIES)
    assert all(r["answers"] > 4 and 0 < r["rows_per_step"] <= 4 and r["total_tok_s"] > 0 for r in closed)
    assert closed[0]["vs_now"] == 1.0
