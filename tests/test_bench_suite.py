"""The GPU suite's plumbing on CPU: its device command lines parse, the app flags are valid and loopback-only, the
matrix and greedy stages run on the tiny model, and the summary reads their JSON; every bench import resolves."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
from pathlib import Path

import pytest

from bench import greedy, load_test, matrix, oom_check, suite

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_device_command_of_the_suite_parses_with_its_scripts_own_options(tmp_path: Path) -> None:
    from qwen3vl_webui.cli import parse_settings

    args = argparse.Namespace(
        out=str(tmp_path), cpu=False, load_seconds=30.0, generate_runs=2, stages=["matrix", "load", "greedy", "oom"]
    )
    stages = {s.name: s for s in suite.plan(args)}
    m = matrix.parse_args(stages["matrix"].command[3:])
    assert m.streams == [1, 8, 32] and m.precision == "bf16" and m.new_tokens == 256 and m.runs == 3
    assert m.generate_runs == 2 and m.sections == {"generate", "engine"} and m.max_batch == 32
    lt, app_flags = load_test.parse_args(stages["load"].command[3:])
    assert lt.chats == [1, 32] and lt.mixed == [32] and lt.image_share == 0.25 and lt.new_tokens == 256
    assert lt.prompt_tokens == 512 and lt.doors == ["gradio"] and not lt.url
    g = greedy.parse_args(stages["greedy"].command[3:])
    assert g.precision == "fp32" and g.tokens >= 32
    assert oom_check.parse_args(stages["oom"].command[3:]).checkpoint == "random-weights:4b"
    # The app the load test starts: valid flags, the engine's shape the matrix compiles for (the shared inductor
    # cache), and loopback only, so one address with 32 chats is not held to --max-requests-per-client.
    settings = parse_settings([*app_flags, "--host", "127.0.0.1", "--port", "7860"])
    assert settings.random_weights == "4b" and settings.precision == "bf16" and settings.local_only
    assert settings.max_concurrency == m.max_batch and settings.max_context == m.slot_tokens
    assert settings.max_requests_per_client >= 1  # the cap exists; the operator's exemption is what lets us through
    assert f"{suite.APP_CACHE}/inductor" == m.cache_dir == str(Path(settings.cache_dir) / "inductor")


def test_the_suite_runs_matrix_and_greedy_on_the_tiny_model_and_summarizes(tmp_path: Path) -> None:
    # In-process, the stages' own mains on the plan's CPU commands (the suite runs each in a child process).
    args = argparse.Namespace(
        out=str(tmp_path), cpu=True, load_seconds=5.0, generate_runs=None, stages=["matrix", "greedy"]
    )
    stages = {s.name: s for s in suite.plan(args)}
    assert matrix.main(stages["matrix"].command[3:]) == 0
    assert greedy.main(stages["greedy"].command[3:]) == 0
    summary = suite.summarize(tmp_path)
    rows = summary["matrix"]["rows"]
    assert [r["streams"] for r in rows] == [1, 2] and all(r["engine_vs_generate"] > 0 for r in rows), rows
    assert summary["matrix"]["errors"] == [] and summary["load"]["scenarios"] == []
    assert summary["greedy"]["passed"] and summary["greedy"]["informative"] == 2, summary["greedy"]
    report = json.loads((tmp_path / "matrix_bf16.json").read_text())
    assert report["generate"][0]["new_tokens"] == report["engine"][0]["new_tokens"] == 8  # the same work
    suite.print_summary(dict(environment=suite.preflight(), summary=summary, stages=[], wall_s=0.0))


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_every_import_of_the_app_in_bench_resolves(path: Path) -> None:
    # bench imports the app's modules inside functions: a module moved under qwen3vl_webui/ fails here, not on the GPU.
    importlib.import_module(f"bench.{path.stem}")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("qwen3vl_webui", "bench")):
            try:
                module = importlib.import_module(node.module)
            except ModuleNotFoundError as exc:
                if exc.name and not exc.name.startswith(("qwen3vl_webui", "bench")):
                    continue  # a third-party package this machine lacks (triton, bitsandbytes): not our path
                raise AssertionError(f"{path.name}:{node.lineno}: from {node.module} import ...: {exc}") from exc
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule: `from package import module`
                    importlib.import_module(f"{node.module}.{alias.name}")
