"""bench/matrix.py's engine section on the CPU (the tiny model): its plumbing, and streams that arrive at once for the
engine too (one prefill forward for a burst of short prompts, every run)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import matrix


def test_a_burst_of_streams_is_admitted_together_and_prefilled_in_one_forward(tmp_path: Path, monkeypatch) -> None:
    """Each submit is slowed here (50 ms after it is queued), so an engine admitting as they come would start on the
    first prompt before the others arrive (session 28's H100 runs: 2 or ~5.5 forwards a burst of 32, by chance)."""
    import time

    from qwen3vl_webui.engine.batch import BatchEngine

    enqueue = BatchEngine._enqueue

    def slowly(self, *args, **kwargs):
        queued = enqueue(self, *args, **kwargs)
        time.sleep(0.05)
        return queued

    monkeypatch.setattr(BatchEngine, "_enqueue", slowly)
    out = tmp_path / "m.json"
    argv = ["--model", "random-weights:tiny", "--device", "cpu", "--precision", "fp32", "--streams", "1,6",
            "--sections", "engine", "--prompt-tokens", "32", "--new-tokens", "6", "--warmup-tokens", "2", "--runs", "2",
            "--out", str(out)]  # fmt: skip
    assert matrix.main(argv) in (0, None)
    report = json.loads(out.read_text())
    rows = {row["streams"]: row for row in report["engine"]}
    assert set(rows) == {1, 6}
    for row in rows.values():  # a median over the runs: every run took one forward for its prompts
        assert row["prefill_forwards"] == 1, row
        assert row["new_tokens"] == 6 and row["total_tok_s"] > 0
