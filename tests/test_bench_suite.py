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


def _device_stages(tmp_path: Path, stages: list[str], **extra) -> dict[str, suite.Stage]:
    args = argparse.Namespace(
        out=str(tmp_path), cpu=False, load_seconds=25.0, generate_runs=None, plan="a", stages=stages, **extra
    )
    return {s.name: s for s in suite.plan(args)}


def test_every_device_command_of_plan_a_parses_with_its_scripts_own_options(tmp_path: Path) -> None:
    from qwen3vl_webui.cli import parse_settings

    assert suite.PLANS["a"] == ("matrix", "load", "greedy")
    stages = _device_stages(tmp_path, ["matrix", "load", "greedy", "oom"])
    m = matrix.parse_args(stages["matrix"].command[3:])
    assert m.streams == [1, 8, 32] and m.precision == "bf16" and m.new_tokens == 256 and m.runs == 3
    assert m.generate_runs == 2 and m.sections == {"generate", "engine"} and m.max_batch == 32
    lt, app_flags = load_test.parse_args(stages["load"].command[3:])
    assert lt.chats == [1, 32] and lt.mixed == [] and lt.profile == [] and lt.new_tokens == 256
    assert lt.prompt_tokens == 512 and lt.doors == ["gradio", "openai"] and not lt.url and lt.seconds == 25
    g = greedy.parse_args(stages["greedy"].command[3:])
    assert g.precision == "fp32" and g.tokens >= 32
    assert oom_check.parse_args(stages["oom"].command[3:]).checkpoint == "random-weights:4b"
    # The app the load test starts: valid flags, the engine in its own process, the engine's shape the matrix
    # compiles for (the shared inductor cache), and loopback only, so one address with 32 chats is not held to
    # --max-requests-per-client.
    settings = parse_settings([*app_flags, "--host", "127.0.0.1", "--port", "7860"])
    assert settings.random_weights == "4b" and settings.precision == "bf16" and settings.local_only
    assert settings.engine == "batch" and settings.max_new_tokens == lt.new_tokens
    assert settings.max_concurrency == m.max_batch and settings.max_context == m.slot_tokens
    assert settings.max_requests_per_client >= 1  # the cap exists; the operator's exemption is what lets us through
    assert f"{suite.APP_CACHE}/inductor" == m.cache_dir == str(Path(settings.cache_dir) / "inductor")


def test_every_device_command_of_plan_b_parses_and_fits_64_chats(tmp_path: Path) -> None:
    from qwen3vl_webui.cli import parse_settings

    assert suite.PLANS["b"] == ("load64", "inproc")
    stages = _device_stages(tmp_path, ["load64", "inproc"])
    lt, app_flags = load_test.parse_args(stages["load64"].command[3:])
    assert lt.chats == [64] and lt.mixed == [32] and lt.profile == [32] and lt.image_share == 0.25
    assert lt.doors == ["gradio", "openai"] and lt.image_pool >= 64 and lt.profile_out == str(tmp_path / "profiles.txt")
    settings = parse_settings([*app_flags, "--host", "127.0.0.1", "--port", "7860"])
    assert settings.engine == "batch" and settings.max_concurrency == 64 and settings.queue_size >= 64
    assert settings.max_context >= 512 + 256 + 910  # a 720p picture, the text and the answer fit a slot
    lt, app_flags = load_test.parse_args(stages["inproc"].command[3:])
    assert lt.chats == [] and lt.mixed == [] and lt.profile == [32] and lt.doors == ["gradio"]
    settings = parse_settings([*app_flags, "--host", "127.0.0.1", "--port", "7860"])
    assert settings.engine == "batch-inproc" and settings.max_concurrency == 32
    assert lt.profile_out == str(tmp_path / "profiles.txt")  # both apps' stacks in one file (8 files come back)
    assert "inproc" in suite.OPTIONAL and "load64" not in suite.OPTIONAL  # the A/B runs if time is left


def test_plan_c_runs_the_engine_then_four_doors(tmp_path: Path) -> None:
    # The engine's own figures (no `generate`), then gradio_client (with and without its TLS contexts), gradio's
    # protocol over httpx and /v1 against one app: issue 12's targets for each door from one call, 32 chats first.
    assert suite.PLANS["c"] == ("matrix", "load")
    args = argparse.Namespace(out=str(tmp_path), cpu=False, load_seconds=25.0, generate_runs=None, plan="c",
                              stages=list(suite.PLANS["c"]))  # fmt: skip
    stages = {s.name: s for s in suite.plan(args)}
    m = matrix.parse_args(stages["matrix"].command[3:])
    assert m.streams == [1, 32] and m.sections == {"engine"} and m.max_batch == 32
    lt, app_flags = load_test.parse_args(stages["load"].command[3:])
    assert lt.doors == ["gradio", "gradio-noverify", "gradio-raw", "openai"] and lt.chats == [32, 1]
    assert lt.seconds == 20
    assert app_flags == suite.APP_FLAGS
    assert stages["matrix"].estimate_s + stages["load"].estimate_s <= 540.0  # --deadline-s's default
    # the summary checks the targets for each door
    engine = {1: {"total_tok_s": 300.0, "ttft_p95_s": 0.02}, 32: {"total_tok_s": 5000.0, "ttft_p95_s": 0.4}}
    rows = [dict(engine="batch", door=d, chats=32, image_chats=0, profiled=False, vs_engine=0.9, ttft_p95_s=0.5)
            for d in lt.doors]  # fmt: skip
    checked = {c["check"].split(":")[0] for c in suite.targets(engine, rows)}
    assert checked == {f"{door} 32 chats" for door in lt.doors}, checked


def test_each_plan_s_required_stages_fit_the_default_deadline_on_paper(tmp_path: Path) -> None:
    # Plan a: the matrix fills the inductor cache, so its app starts warm; plan b's app may start cold.
    a = _device_stages(tmp_path, list(suite.PLANS["a"]))
    b = _device_stages(tmp_path, list(suite.PLANS["b"]))
    deadline = 540.0  # --deadline-s's default
    assert a["matrix"].estimate_s + a["load"].estimate_s <= deadline
    assert b["load64"].estimate_s <= deadline
    assert b["load64"].estimate_s >= suite.WARM_STARTUP_S + 6 * 25  # six scenarios of 25 s and the start-up


def test_targets_and_the_split_a_b_from_a_run_s_figures() -> None:
    engine = {1: {"total_tok_s": 300.0, "ttft_p95_s": 0.02}, 32: {"total_tok_s": 5000.0, "ttft_p95_s": 0.4}}

    def row(door: str, chats: int, tok_s: float, p95: float, layout: str = "batch", profiled: bool = False) -> dict:
        return dict(engine=layout, door=door, chats=chats, image_chats=0, profiled=profiled, total_tok_s=tok_s,
                    vs_engine=round(tok_s / engine[chats]["total_tok_s"], 3), ttft_p95_s=p95, cores_frontend=1.0,
                    cores_engine=1.0)  # fmt: skip

    rows = [row("gradio", 1, 280, 0.1), row("openai", 1, 250, 0.05), row("gradio", 32, 4300, 0.7),
            row("openai", 32, 4100, 1.2), row("gradio", 32, 4000, 0.9, profiled=True),
            row("gradio", 32, 1000, 4.0, "batch-inproc", profiled=True)]  # fmt: skip
    checks = {c["check"]: c["passed"] for c in suite.targets(engine, rows)}
    assert checks == {
        "gradio 1 chat: tok/s >= 90% of the engine's 1-stream": True,
        "openai 1 chat: tok/s >= 90% of the engine's 1-stream": False,
        "gradio 32 chats: tok/s >= 85% of the engine's 32-stream": True,
        "gradio 32 chats: TTFT p95 <= 1.0 s": True,
        "gradio 32 chats: TTFT p95 <= 2x the engine's (0.4 s)": True,
        "openai 32 chats: tok/s >= 85% of the engine's 32-stream": False,
        "openai 32 chats: TTFT p95 <= 1.0 s": False,
        "openai 32 chats: TTFT p95 <= 2x the engine's (0.4 s)": False,
    }, checks
    ab = suite.split_ab(rows)
    assert ab["chats"] == 32 and ab["ratio"] == 4.0 and ab["inproc_ttft_p95_s"] == 4.0


def test_the_suite_runs_matrix_and_greedy_on_the_tiny_model_and_summarizes(tmp_path: Path) -> None:
    # In-process, the stages' own mains on the plan's CPU commands (the suite runs each in a child process).
    args = argparse.Namespace(
        out=str(tmp_path), cpu=True, load_seconds=5.0, generate_runs=None, plan="a", stages=["matrix", "greedy"]
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
