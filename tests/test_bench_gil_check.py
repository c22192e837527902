"""bench.gil_check's plumbing on CPU, without a compile: the engine-like thread's rate, the cooperative hook's pause
and its starvation guard, the report's ratios, and the refusal of an unknown mode."""

from __future__ import annotations

import threading
import time

import pytest

from bench import gil_check


def test_the_engine_like_thread_counts_steps_in_a_window() -> None:
    engine = gil_check.EngineLike(ops=4, python_us=50, waits=2, wait_ms=0.5)
    thread = engine.start()
    start = time.perf_counter()
    time.sleep(0.2)
    rate = engine.rate(start, time.perf_counter())
    engine.stop(thread)
    assert rate["steps"] > 10 and rate["steps_per_s"] > 0 and rate["mean_step_ms"] >= 1.0, rate


def test_the_coop_hook_waits_for_the_step_end_and_then_runs_a_slice() -> None:
    engine = gil_check.EngineLike(ops=1, python_us=1, waits=1, wait_ms=0.1)
    hook = gil_check.coop_hook(engine, pause_s=0.05, slice_s=10.0)
    engine.busy = False
    started = time.perf_counter()
    hook(None, "call", None)  # idle engine: no pause
    assert time.perf_counter() - started < 0.02
    engine.busy = True
    engine.idle.clear()
    threading.Timer(0.02, engine.idle.set).start()
    started = time.perf_counter()
    hook(None, "call", None)  # paused until the step ends
    assert 0.015 <= time.perf_counter() - started < 0.045
    engine.idle.clear()
    started = time.perf_counter()
    hook(None, "call", None)  # the step outlasts the pause: the guard lets the compile run its slice
    hook(None, "call", None)
    assert 0.045 <= time.perf_counter() - started < 0.09


def test_ratios_are_against_alone_and_unknown_modes_are_refused() -> None:
    results = {
        "alone": {"engine": {"steps_per_s": 200.0}},
        "child": {"engine_child_phase": {"steps_per_s": 190.0}, "engine_warm_phase": {"steps_per_s": 100.0}},
    }
    gil_check._ratios(results)
    assert results["alone"]["engine"]["vs_alone"] == 1.0
    assert results["child"]["engine_child_phase"]["vs_alone"] == 0.95
    assert results["child"]["engine_warm_phase"]["vs_alone"] == 0.5
    with pytest.raises(SystemExit, match="valid"):
        gil_check.main(["--modes", "alone,nonsense"])


def test_the_yielding_hook_sleeps_only_after_a_run_while_the_engine_steps() -> None:
    from qwen3vl_webui.engine.batch import compiled

    last = [0.0]  # the engine's latest step: long ago
    hook = compiled.yielding_hook(lambda: last[0], run_s=0.0, pause_s=0.03)
    started = time.perf_counter()
    hook(None, "call", None)  # an idle engine: the compile runs on
    assert time.perf_counter() - started < 0.02
    last[0] = time.perf_counter()
    started = time.perf_counter()
    hook(None, "c_call", None)  # only Python calls count
    assert time.perf_counter() - started < 0.02
    hook(None, "call", None)  # a decoding engine: the compile sleeps
    assert time.perf_counter() - started >= 0.03
    hook = compiled.yielding_hook(lambda: time.perf_counter(), run_s=10.0, pause_s=0.03)
    started = time.perf_counter()
    hook(None, "call", None)  # within its run: no sleep
    assert time.perf_counter() - started < 0.02


def test_yielding_compile_sets_the_profile_of_this_thread_only_and_restores_it() -> None:
    import sys

    from qwen3vl_webui.engine.batch import compiled

    seen: list[object] = []
    before = sys.getprofile()
    with compiled.yielding_compile(lambda: 0.0, 0.002, 0.004):
        assert sys.getprofile() is not None
        other = threading.Thread(target=lambda: seen.append(sys.getprofile()))
        other.start()
        other.join()
    assert sys.getprofile() is before and seen == [None]
    with compiled.yielding_compile(lambda: 0.0, 0.0, 0.0):
        assert sys.getprofile() is before
