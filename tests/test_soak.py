"""Case 23 of issue 4, short: bench.soak drives the --demo app (a child process, loopback) for a minute."""

from __future__ import annotations

from pathlib import Path

from bench import soak


def test_23_a_minute_of_mixed_concurrent_traffic_loses_nothing_and_leaks_nothing(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # 6 clients against 2 slots + 3 waiting: some are refused as busy, by design.
    report = soak.run_soak(
        seconds=60, clients=6, queue_size=3, cache_dir=str(tiny_checkpoint.parent), workdir=str(tmp_path)
    )
    summary = {k: v for k, v in report.items() if k != "rss_samples_mb"}
    assert report["failed"] == 0, summary
    assert report["accepted"] >= 30 and report["refused_bad_input"] >= 1, summary
    assert report["children_left"] == 0 and report["temp_files_left"] == 0, summary
    assert report["exit_code"] == 0 and report["sigterm_to_exit_s"] < 30, summary
    assert report["rss_end_mb"] - report["rss_start_mb"] < 200, summary
