"""bench.coldstart's plumbing on CPU: the app launched as a user would (the engine in its own process, the tiny
model), its stages dated from /ready's JSON, streams through /v1 per phase, the report written; and the device
command line's flags are valid app flags, for precompile too."""

from __future__ import annotations

import importlib.util
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


def test_a_launch_profile_is_summed_per_process_and_thread_into_imports_and_our_functions() -> None:
    """`--py-spy`'s summary, on stacks in py-spy's own `record --subprocesses --threads --format raw` shape: each sample
    goes to its innermost process (the engine process is a child of the front end's), its thread, the outermost
    third-party module being imported (not the script's own `<module>`), and our innermost function."""
    front = 'process 10:"/usr/bin/python3 app.py --random-weights 4b"'
    engine = front + ';process 11:"/usr/bin/python3 -m qwen3vl_webui.engine.remote.worker --prewarm"'
    boot = "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982)"
    importing = "_find_and_load (<frozen importlib._bootstrap>:1176);_call_with_frames_removed (<frozen importlib._bootstrap>:241)"  # noqa: E501
    lines = [
        f"{front};thread (10): MainThread;<module> (app.py:6);main (qwen3vl_webui/cli.py:40);"
        f"<module> (qwen3vl_webui/ui/handlers.py:15);{importing};<module> (gradio/__init__.py:3);"
        f"{importing};<module> (gradio/components/base.py:20) 30",
        f"{front};thread (12): model-load;{boot};load_front (qwen3vl_webui/weights/loading.py:41);{importing};"
        f"<module> (transformers/models/auto/processing_auto.py:9);{importing};<module> (torch/_dynamo/__init__.py:1) 50",
        f"{front};thread (12): model-load;{boot};resolve_device (qwen3vl_webui/weights/loading.py:29);{importing};"
        f"<module> (torch/__init__.py:300) 20",
        f"{engine};thread (11): MainThread;_run_module_as_main (<frozen runpy>:198);<module> (worker.py:1);"
        f"_start (qwen3vl_webui/engine/remote/worker.py:104);{importing};"
        f"<module> (transformers/models/qwen3_vl/modeling_qwen3_vl.py:30) 70",
        f"{engine};thread (11): MainThread;<module> (worker.py:1);_start (qwen3vl_webui/engine/remote/worker.py:105);"
        f"build (qwen3vl_webui/weights/random_weights.py:90);normal_ (torch/nn/init.py:200) 5",
        "not a stack line",
    ]
    report = coldstart.summarize_start(lines, rate=100)
    assert set(report) == {"frontend (10)", "engine (11)"}
    main, load = report["frontend (10)"]["MainThread"], report["frontend (10)"]["model-load"]
    assert (main["samples"], main["seconds"]) == (30, 0.3)
    assert main["imports"] == [["gradio/__init__.py", 30, 0.3]]  # the outermost import, not gradio's own modules
    assert main["ours"] == [["<module> (qwen3vl_webui/ui/handlers.py)", 30, 0.3]]
    assert load["samples"] == 70
    assert load["imports"] == [["transformers/models/auto/processing_auto.py", 50, 0.5], ["torch/__init__.py", 20, 0.2]]
    assert load["ours"] == [["load_front (qwen3vl_webui/weights/loading.py)", 50, 0.5],
                            ["resolve_device (qwen3vl_webui/weights/loading.py)", 20, 0.2]]  # fmt: skip
    worker = report["engine (11)"]["MainThread"]
    assert worker["samples"] == 75
    assert worker["imports"] == [["transformers/models/qwen3_vl/modeling_qwen3_vl.py", 70, 0.7]]  # worker.py: the script
    assert worker["ours"][0] == ["_start (qwen3vl_webui/engine/remote/worker.py)", 70, 0.7]
    assert worker["ours"][1] == ["build (qwen3vl_webui/weights/random_weights.py)", 5, 0.05]


def test_the_packages_on_pythonpath_are_compiled_to_bytecode_as_an_install_would(tmp_path: Path, monkeypatch) -> None:
    """A device call's wheels are installed with --no-compile; the first launch must not pay their bytecode."""
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{coldstart.ROOT}{os.pathsep}{tmp_path / 'absent'}")
    result = coldstart.bytecode(coldstart.Log(tmp_path / "log.txt"))
    assert result["dirs"] == [str(site)] and result["seconds"] >= 0  # the tree itself and absent folders are not
    assert list((site / "pkg" / "__pycache__").glob("__init__.*.pyc"))


def test_a_package_installed_without_bytecode_is_compiled_and_one_with_it_is_left(tmp_path: Path, monkeypatch) -> None:
    # Session 27: the device's torch venv holds no .pyc and the device sets PYTHONDONTWRITEBYTECODE, so every launch
    # compiled torch's modules from source (import torch 5.3 s, 2.7 s once compiled), a cost no pip install leaves.
    bare, compiled = tmp_path / "venv" / "site-packages", tmp_path / "other" / "site-packages"
    for folder, name in ((bare, "barepkg"), (compiled, "donepkg")):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text("VALUE = 1\n")
        monkeypatch.syspath_prepend(str(folder))
    (compiled / "donepkg" / "__pycache__").mkdir()
    Path(importlib.util.cache_from_source(str(compiled / "donepkg" / "__init__.py"))).write_bytes(b"")
    (compiled / "donepkg" / "extra.py").write_text("VALUE = 2\n")
    monkeypatch.setenv("PYTHONPATH", "")
    result = coldstart.bytecode(coldstart.Log(tmp_path / "log.txt"), packages=("barepkg", "donepkg", "absentpkg"))
    assert result["dirs"] == [str(bare)]
    assert list((bare / "barepkg" / "__pycache__").glob("__init__.*.pyc"))
    assert not list((compiled / "donepkg" / "__pycache__").glob("extra.*.pyc"))


def test_a_launch_whose_profiler_cannot_start_leaves_no_app_running(tmp_path: Path, monkeypatch) -> None:
    # Session 24: `--py-spy` without py-spy raised after the app had launched, and the app outlived the run (another
    # test then found it). The app just launched is stopped before the error goes up.
    import argparse
    import subprocess
    import sys

    import bench.load_test

    launched: list[subprocess.Popen] = []

    def stand_in(flags, cache, log_path):
        launched.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        return launched[-1], "http://127.0.0.1:9", 0.0

    monkeypatch.setattr(coldstart, "launch", stand_in)
    monkeypatch.setattr(bench.load_test, "find_py_spy", lambda: None)
    monkeypatch.setattr(bench.load_test, "load_tokenizer", lambda name: None)
    args = argparse.Namespace(py_spy=True, tokenizer=None)
    with pytest.raises(RuntimeError, match="py-spy is not installed"):
        coldstart.run_launch("cold", [], tmp_path, tmp_path, args, None, 0.0, measure_compiled=False)
    assert launched and launched[0].poll() is not None  # stopped, not left running


def test_artifacts_carried_from_another_machine_make_the_first_launch(tmp_path: Path) -> None:
    """Issue 14's protocol on a fresh machine: precompile's files, kept by an earlier run (--keep-artifacts), are the
    only cache of the first launch (--artifacts-from): no cold launch, no precompile. The CPU writes no artifacts, so
    a stand-in file travels (a mismatched artifact is ignored by the app with one log line)."""
    carried = tmp_path / "kept"
    carried.mkdir()
    (carried / "kernels-0000000000000000.artifacts").write_bytes(b"not an artifact")
    (carried / "notes.txt").write_text("not carried")
    out = tmp_path / "out"
    assert coldstart.main(["--out", str(out), "--cpu", "--artifacts-from", str(carried), "--deadline-s", "150"]) == 0
    report = json.loads((out / "coldstart.json").read_text())
    assert report["carried"] == ["kernels-0000000000000000.artifacts"] and "cold" not in report, report.keys()
    launch = report["artifacts"]
    assert 0 < launch["page_up_s"] <= launch["ready_s"] <= launch["first_answer_s"], launch
    assert (out / "server_artifacts.log").exists() and not (out / "server_cold.log").exists()
    with pytest.raises(RuntimeError, match="no \\*.artifacts file"):
        coldstart.carry(tmp_path / "out", tmp_path / "elsewhere")
