"""bench.jobs' plumbing on CPU: the tiny model through the app's service, every phase measured and reported; and the
device command line's flags are the app's own."""

from __future__ import annotations

import json
from pathlib import Path

from bench import jobs


def test_the_device_flags_are_the_apps_own() -> None:
    from qwen3vl_webui.cli import parse_settings

    settings = parse_settings(jobs.GPU_FLAGS)
    assert settings.random_weights == "4b" and settings.engine == "batch" and settings.max_concurrency == 32


def test_jobs_bench_plumbing_on_cpu(tmp_path: Path) -> None:
    assert jobs.main(["--out", str(tmp_path), "--cpu", "--deadline-s", "200"]) == 0
    report = json.loads((tmp_path / "jobs.json").read_text())
    assert report["engine_streams"]["ok"] == 2 and report["engine_streams"]["total_tok_s"] > 0
    for phase in ("ttft_alone", "ttft_with_job"):
        assert report[phase]["rounds"] == 1 and len(report[phase]["ttft_s"]) == 4
        assert 0 < report[phase]["ttft_p50_s"] <= report[phase]["ttft_p95_s"]
    text = report["text_job"]
    assert (text["items"], text["done"], text["failed"]) == (12, 12, 0) and text["tokens_per_s"] > 0
    assert text["share_of_engine_streams"] > 0
    assert report["image_job"]["done"] == 4 and not report["image_job"]["cut_by_deadline"]
    assert report["background_job"]["items"] == 12  # stopped when the chats were measured; its state is reported
