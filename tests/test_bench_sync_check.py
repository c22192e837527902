"""bench.sync_check's plumbing on a CPU (no CUDA: nothing to flag): the staggered run ends every stream at its own
length while the others decode, and a sync is attributed to the engine's innermost frame."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from bench import sync_check


def test_the_sync_check_runs_its_staggered_streams_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "sync.json"
    argv = ["--model", "random-weights:tiny", "--device", "cpu", "--precision", "fp32", "--streams", "6",
            "--prompt-tokens", "64", "--new-tokens", "30", "--out", str(out)]  # fmt: skip
    assert sync_check.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["sync_total"] == 0 and report["syncs"] == {}
    assert report["run"]["tokens"] == report["run"]["asked"] == [30, 25, 20, 15, 10, 5]
    assert report["steps"] >= 29


def test_a_sync_is_named_by_the_engines_innermost_frame() -> None:
    engine_file = str(Path(sync_check.ENGINE) / "engine" / "batch" / "core.py")
    stack = [
        traceback.FrameSummary("/x/threading.py", 1, "run"),
        traceback.FrameSummary(engine_file, 320, "_collect"),
        traceback.FrameSummary("/x/torch/_tensor.py", 9, "tolist"),
    ]
    assert sync_check._engine_frame(stack) == "qwen3vl_webui/engine/batch/core.py:320 _collect"
    assert sync_check._engine_frame(stack[:1]) == "outside qwen3vl_webui"
