"""The lead's GPU runs, each in one device call: issue 12's figures in two plans.

    python -m bench.suite --out $OUT --commit C --plan a    # H200: ~9 min; bench/README.md has the device lines
    python -m bench.suite --out $OUT --commit C --plan b    # H200: ~9 min, a cold start included
    python -m bench.suite --out $OUT --commit C --plan c    # ~8 min: the engine, then four doors
    python -m bench.suite --out /tmp/s --cpu --plan a --load-seconds 5    # the plumbing on CPU (tiny model)

Plan a (the baseline and the two doors at 1 and 32 chats):
1. matrix   bench.matrix, bf16, 1/8/32 streams, 512-token prompts, 256 new tokens for both paths, the same warm-up
            for both at each count, medians of 3 engine runs (`--generate-runs`, default 2 here, for `generate`).
            The engine is built exactly as the app builds it (32 slots of 2,048 tokens, the default graph buckets) and
            compiles into the app's inductor cache, so the app in stage 2 starts warm. Its 1- and 32-stream engine
            figures are what the app is held to.
2. load     bench.load_test: the whole app (`--random-weights 4b --precision bf16 --engine batch`: the engine in its
            own process; on 127.0.0.1, so no per-client cap) at 1 and 32 chats through gradio_client and through
            the OpenAI API, `--load-seconds` each (shortened to fit the time left).
3. greedy   bench.greedy: fp32 engine tokens against `generate` on varied answers, if the time left covers it.
Plan b (assumes a fresh machine: the app's first start compiles, ~3-4 min; warm if plan a ran just before on the
same machine):
1. load64   the app with 64 slots (`--max-concurrency 64 --queue-size 128`): 64 chats through both doors; 32 chats
            of which a quarter send a 1280x720 picture, through both doors (text and image TTFT apart); then 32 text
            chats through each door while py-spy samples the front end and the engine process (collapsed stacks in
            profiles.txt, their top functions in the JSON).
2. inproc   if time is left: the old layout (`--engine batch-inproc`, the engine on a thread of the web server)
            at 32 chats through gradio_client, py-spy on as in load64's profiled run: what the process split bought.
Plan c (the gradio door's cost, client or server): the matrix's engine section only (1 and 32 streams, no
`generate`), then the load stage at 32 and then 1 chat (20 s of traffic each at most) through gradio_client,
gradio_client with `ssl_verify=False` (no TLS context per request), `gradio-raw` (gradio's queue protocol over
httpx, as the page speaks it) and the OpenAI API: issue 12's targets checked for each of the four.
`oom` (bench.oom_check on the random 4B shape) runs only when named: `--stages oom`.

Each stage is its own process (its GPU memory is gone when it exits; one crash does not end the run), started only
if the time left (`--deadline-s`, counted from the suite's start) covers it; a load stage gets `--budget-s` (its
scenarios shorten, then the last ones drop, so it ends on its own before its timeout). Writes into --out: suite.json
(environment, stages, the summary with issue 12's targets checked), one JSON per stage, suite.log (every stage's
output), the app's log per load stage, and profiles.txt (plan b): at most 7 files. Prints a compact summary last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, git_commit, gpu_name

APP_CACHE = "/tmp/qwen3vl-cache"  # the app's --cache-dir; its inductor cache is APP_CACHE/inductor
APP_FLAGS = [
    "--random-weights", "4b", "--precision", "bf16", "--engine", "batch", "--max-concurrency", "32",
    "--queue-size", "64", "--max-context", "2048", "--max-new-tokens", "256", "--warmup", "quick",
    "--cache-dir", APP_CACHE,
]  # fmt: skip
PLANS = {"a": ("matrix", "load", "greedy"), "b": ("load64", "inproc"), "c": ("matrix", "load")}
# Plan c: which of gradio_client (and its TLS contexts) and the server's gradio path costs the door.
DOORS_C = "gradio,gradio-noverify,gradio-raw,openai"
PLAN_C_SECONDS = 20.0  # traffic per scenario at most: eight scenarios and the engine's figures in one call
STAGES = ("matrix", "load", "greedy", "oom", "load64", "inproc")
LOAD_STAGES = ("load", "load64", "inproc")
OPTIONAL = {"greedy", "inproc", "oom"}  # run if time is left; no time is kept for them
# What the device image lacks and a stage needs (bench/README.md: carried as wheels).
NEEDS = {
    "load": ("gradio", "gradio_client"),
    "load64": ("gradio", "gradio_client"),
    "inproc": ("gradio", "gradio_client"),
}
MIN_TRANSFORMERS = (5, 23)  # 5.17 (the device image's) breaks image prompts
# Seconds of the app's start to its first answer on an H200 (guesses until a run says better; the load test's budget
# absorbs the error): the inductor cache warm (the matrix or an earlier app filled it) or cold.
WARM_STARTUP_S, COLD_STARTUP_S = 100, 220
SCENARIO_OVERHEAD_S = 10  # beyond each scenario's traffic: connecting, the last answers, client processes
LOAD_FIXED_S = 30  # warm requests and SIGTERM to exit
TARGETS = dict(chats32_share=0.85, chats1_share=0.90, ttft_p95_s=1.0, ttft_p95_vs_engine=2.0)  # issue 12


@dataclass
class Stage:
    name: str
    command: list[str]
    estimate_s: float  # what it takes on an H200 (the timeout adds headroom)
    output: str | None = None  # its JSON, under --out
    result: dict[str, Any] = field(default_factory=dict)


def _with(flags: list[str], **values: str) -> list[str]:
    """`flags` with each `--name value` replaced (names with _ for -)."""
    out = list(flags)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        out[out.index(flag) + 1] = value
    return out


def inductor_cache_warm(cache: str = APP_CACHE) -> bool:
    folder = Path(cache) / "inductor"
    return folder.is_dir() and any(folder.iterdir())


def _warm_before(stages: list[str], name: str) -> bool:
    """Whether the app of stage `name` finds a warm inductor cache: one was there at the start, or a stage before
    it compiled into it (the matrix, an app)."""
    earlier = stages[: stages.index(name)] if name in stages else stages
    return inductor_cache_warm() or any(s in ("matrix", *LOAD_STAGES) for s in earlier)


def plan(args: argparse.Namespace) -> list[Stage]:
    """The stages' commands for this run (the device's, or the tiny CPU plumbing run with --cpu)."""
    out = Path(args.out)
    py = [sys.executable, "-m"]
    load_seconds = min(args.load_seconds, PLAN_C_SECONDS) if args.plan == "c" else args.load_seconds
    seconds = str(load_seconds)
    generate_runs = args.generate_runs or (2 if args.plan == "a" else None)
    doors = getattr(args, "doors", None) or (DOORS_C if args.plan == "c" else "gradio,openai")
    if args.cpu:
        model = ["--model", "random-weights:tiny", "--device", "cpu", "--precision", "fp32"]
        matrix = [*py, "bench.matrix", *model, "--streams", "1,2", "--prompt-tokens", "32", "--new-tokens", "8",
                  "--warmup-tokens", "2", "--runs", "1", "--slot-tokens", "256", "--out", str(out / "matrix_bf16.json")]  # fmt: skip
        greedy = [*py, "bench.greedy", *model, "--tokens", "8", "--prompt-tokens", "32", "--texts", "2", "--no-image",
                  "--out", str(out / "greedy_fp32.json")]  # fmt: skip
        app = ["--random-weights", "tiny", "--engine", "batch", "--max-concurrency", "2", "--queue-size", "8",
               "--max-context", "1024", "--max-new-tokens", "64", "--warmup", "quick", "--cache-dir", "/tmp/qwen3vl-cache-cpu"]  # fmt: skip
        small = ["--prompt-tokens", "32", "--new-tokens", "16", "--warm-requests", "1", "--image-pool", "4",
                 "--chats-per-process", "1", "--scenario-overhead-s", "6", "--min-seconds", "3"]  # fmt: skip
        profile = ["--profile-seconds", "3", "--profile-lead-s", "1"]
        load = [*py, "bench.load_test", "--doors", doors, "--chats", "1,2", *small]
        load64 = [*py, "bench.load_test", "--doors", "gradio,openai", "--chats", "4", "--mixed", "2", "--image-share",
                  "0.5", "--profile", "2", *small, *profile]  # fmt: skip
        load64_app = _with(app, max_concurrency="4")
        inproc = [*py, "bench.load_test", "--doors", "gradio", "--chats", "", "--profile", "2", *small, *profile]
        inproc_app = _with(app, engine="batch-inproc")
        oom = [*py, "bench.oom_check", "--help"]
        startup = {"load": 40, "load64": 40, "inproc": 30}
    else:
        matrix = [*py, "bench.matrix", "--precision", "bf16", "--streams", "1,8,32", "--max-batch", "32",
                  "--slot-tokens", "2048", "--cache-dir", f"{APP_CACHE}/inductor", "--out", str(out / "matrix_bf16.json")]  # fmt: skip
        if generate_runs:
            matrix += ["--generate-runs", str(generate_runs)]
        if args.plan == "c":
            matrix[matrix.index("--streams") + 1] = "1,32"
            matrix += ["--sections", "engine"]
        greedy = [*py, "bench.greedy", "--out", str(out / "greedy_fp32.json")]
        # Plan c: 32 chats first (the target the doors miss); --budget-s drops the last scenarios first.
        load = [*py, "bench.load_test", "--doors", doors, "--chats", "32,1" if args.plan == "c" else "1,32"]
        load64 = [*py, "bench.load_test", "--doors", "gradio,openai", "--chats", "64", "--mixed", "32", "--profile",
                  "32", "--image-pool", "256"]  # fmt: skip
        load64_app = _with(APP_FLAGS, max_concurrency="64", queue_size="128")
        inproc = [*py, "bench.load_test", "--doors", "gradio", "--chats", "", "--profile", "32"]
        inproc_app = _with(APP_FLAGS, engine="batch-inproc")
        app = APP_FLAGS
        oom = [*py, "bench.oom_check", "--checkpoint", "random-weights:4b", "--json", str(out / "oom_check.json")]
        startup = {name: WARM_STARTUP_S if _warm_before(args.stages, name) else COLD_STARTUP_S for name in LOAD_STAGES}
    load += ["--seconds", seconds, "--workdir", "/tmp/qwen3vl-load", "--json", str(out / "load_test.json"), "--", *app]
    load64 += ["--seconds", seconds, "--workdir", "/tmp/qwen3vl-load64", "--json", str(out / "load_test_64.json"),
               "--profile-out", str(out / "profiles.txt"), "--", *load64_app]  # fmt: skip
    inproc += ["--seconds", seconds, "--workdir", "/tmp/qwen3vl-load-inproc", "--json", str(out / "load_test_inproc.json"),
               "--profile-out", str(out / "profiles.txt"), "--", *inproc_app]  # fmt: skip
    overhead = 6 if args.cpu else SCENARIO_OVERHEAD_S
    profiled = max(load_seconds, 6 if args.cpu else 15)  # a profiled scenario's traffic at least

    def load_estimate(name: str, plain: int, profiles: int) -> float:
        return startup[name] + LOAD_FIXED_S + plain * (load_seconds + overhead) + profiles * (profiled + overhead)

    scale = 0.2 if args.cpu else 1.0
    stages = {
        "matrix": Stage("matrix", matrix, (150 if args.plan == "c" else 240) * scale, "matrix_bf16.json"),
        "load": Stage("load", load, load_estimate("load", 2 * len(doors.split(",")), 0), "load_test.json"),
        "greedy": Stage("greedy", greedy, 60 * scale, "greedy_fp32.json"),
        "oom": Stage("oom", oom, 150 * scale, "oom_check.json"),
        "load64": Stage("load64", load64, load_estimate("load64", 4, 2), "load_test_64.json"),
        "inproc": Stage("inproc", inproc, load_estimate("inproc", 0, 1), "load_test_inproc.json"),
    }
    return [stages[name] for name in args.stages]


def preflight() -> dict[str, Any]:
    """Versions that matter, and what is missing (a stage that needs a missing package is skipped, not crashed)."""
    import transformers

    from bench.load_test import find_py_spy

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    found = {
        name: importlib.util.find_spec(name) is not None for name in ("gradio", "gradio_client", "psutil", "httpx")
    }
    return dict(
        transformers=transformers.__version__, transformers_ok=version >= MIN_TRANSFORMERS, packages=found,
        py_spy=find_py_spy(), python=sys.version.split()[0], gpu=gpu_name(), commit=git_commit(), cpus=os.cpu_count(),
        inductor_cache_warm=inductor_cache_warm(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )  # fmt: skip


def run_stage(stage: Stage, timeout: float, log: Any) -> None:
    """Runs `stage` with its output appended to `log`; records exit code and seconds (124: stopped at `timeout`)."""
    started = time.monotonic()
    log.write(f"\n===== {stage.name}: {' '.join(stage.command)}\n")
    log.flush()
    print(f"--- {stage.name} (timeout {timeout:.0f} s): {' '.join(stage.command[2:])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(stage.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)  # the stage and what it started (the app): SIGTERM, then SIGKILL
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        code = 124
    stage.result = dict(exit_code=code, seconds=round(time.monotonic() - started, 1), timeout_s=round(timeout))
    log.write(f"===== {stage.name}: exit {code} after {stage.result['seconds']} s\n")
    log.flush()
    print(f"    {stage.name}: exit {code} after {stage.result['seconds']} s", flush=True)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags and flags.index(name) + 1 < len(flags) else None


def summarize(out: Path) -> dict[str, Any]:
    """The figures that matter, with ratios: engine vs generate per stream count; the app vs the engine; issue 12's
    targets where the run has both sides of them."""
    summary: dict[str, Any] = {}
    matrix = _json(out / "matrix_bf16.json") or {}
    engine = {r["streams"]: r for r in matrix.get("engine", [])}
    generate = {r["streams"]: r for r in matrix.get("generate", [])}
    rows = []
    for n in sorted(set(engine) | set(generate)):
        e, g = engine.get(n, {}), generate.get(n, {})
        rows.append(dict(
            streams=n, generate_tok_s=_r(g.get("total_tok_s")), engine_tok_s=_r(e.get("total_tok_s")),
            engine_vs_generate=_ratio(e.get("total_tok_s"), g.get("total_tok_s")),
            engine_decode_tok_s=_r(e.get("decode_tok_s")), engine_ttft_p50_s=_r(e.get("ttft_p50_s"), 3),
            engine_ttft_p95_s=_r(e.get("ttft_p95_s"), 3), generate_ttft_s=_r(g.get("ttft_p50_s"), 3),
            engine_runs=e.get("total_tok_s_runs"), generate_runs=g.get("total_tok_s_runs"),
        ))  # fmt: skip
    summary["matrix"] = dict(
        rows=rows, device=matrix.get("device"), copy_gb_s=matrix.get("copy_gb_s"), errors=list(matrix.get("errors", {})),
        new_tokens=matrix.get("new_tokens"), runs=matrix.get("runs"), generate_runs=matrix.get("generate_runs"),
        engine_startup_s=(matrix.get("engine_startup") or {}).get("startup_s"),
    )  # fmt: skip
    scenarios, apps, profiles = [], [], []
    for name in ("load_test.json", "load_test_64.json", "load_test_inproc.json"):
        load = _json(out / name)
        if not load:
            continue
        flags = load.get("app_flags", [])
        layout = _flag(flags, "--engine") or "auto"
        apps.append(dict(
            file=name, engine=layout, slots=_flag(flags, "--max-concurrency"), page_up_s=load.get("page_up_s"),
            startup_s=load.get("startup_s"), first_answer_s=load.get("first_answer_s"), shutdown_s=load.get("shutdown_s"),
            exit_code=load.get("exit_code"), processes=load.get("app_processes"), skipped=load.get("skipped", []),
        ))  # fmt: skip
        for s in load.get("scenarios", []):
            base = engine.get(s["chats"], {})
            cores = s.get("cpu_cores_busy") or {}
            row = dict(
                file=name, engine=layout, door=s.get("door", "gradio"), chats=s["chats"], image_chats=s.get("image_chats", 0),
                profiled=bool(s.get("profiled")), seconds=s.get("seconds"), ok=s["ok"],
                refused=s["refused_busy"] + s.get("refused_per_client", 0) + s["refused"], errors=s["error"],
                short_answers=s.get("short_answers"), total_tok_s=_r(s["total_tok_s"]),
                vs_engine=_ratio(s["total_tok_s"], base.get("total_tok_s")) if not s.get("image_chats") else None,
                ttft_p50_s=_r(s["ttft_s"]["p50"], 3), ttft_p95_s=_r(s["ttft_s"]["p95"], 3), ttft_p99_s=_r(s["ttft_s"]["p99"], 3),
                chat_tok_s_p50=_r(s["chat_tok_s"]["p50"]), cores_frontend=cores.get("server"), cores_engine=cores.get("engine"),
                cores_other=cores.get("other_children"), cores_client=cores.get("client"),
                cores_client_process_max=cores.get("client_process_max"), client_processes=s.get("client_processes"),
            )  # fmt: skip
            server = s.get("server") or {}
            if server:  # the app's own TTFT (from its handler's start) and slot wait, beside the client's
                row["server_ttft_p50_p90_s"] = [_r(server.get("ttft_p50_s"), 3), _r(server.get("ttft_p90_s"), 3)]
                # (its slot wait, vllm:request_queue_time_seconds, is not shown: vLLM's first bucket is 0.3 s wide)
                row["server_door_start_first_text_p50_s"] = [_r(server.get("door_start_p50_s"), 3),
                                                             _r(server.get("door_first_text_p50_s"), 3)]  # fmt: skip
                row["server_loop_lag_p50_p90_s"] = [_r(server.get("loop_lag_p50_s"), 4), _r(server.get("loop_lag_p90_s"), 4)]
                row["server_steps_per_s"] = (server.get("engine") or {}).get("steps_per_s")
                row["server_rows_per_step"] = (server.get("engine") or {}).get("rows_per_step")
            if s.get("stages_s"):
                row["client_stages_p50_s"] = {k: _r(v["p50"], 3) for k, v in s["stages_s"].items()}
            for kind, k in s.get("by_kind", {}).items():
                row[f"{kind}_ttft_p50_p95_s"] = [_r(k["ttft_s"]["p50"], 3), _r(k["ttft_s"]["p95"], 3)]
                row[f"{kind}_ok"] = k["ok"]
            scenarios.append(row)
            if s.get("profile"):
                profiles.append(_profile_brief(name, s["profile"]))
    summary["load"] = dict(scenarios=scenarios, apps=apps)
    if profiles:
        summary["profiles"] = profiles
    summary["targets"] = targets(engine, scenarios)
    summary["split_ab"] = split_ab(scenarios)
    greedy = _json(out / "greedy_fp32.json")
    if greedy:
        summary["greedy"] = dict(
            passed=greedy.get("pass"), informative=greedy.get("informative_prompts"), decode_path=greedy.get("decode_path"),
            prompts=[dict(prompt=p["prompt"], equal=f"{p['equal_prefix']}/{p['tokens']}", distinct=p["distinct_tokens"],
                          top1_every_step=p["top1_every_step"], passed=p["passed"]) for p in greedy.get("prompts", [])],
        )  # fmt: skip
    oom = _json(out / "oom_check.json")
    if oom:
        summary["oom"] = [dict(decoder=r["decoder"], passed=r["pass"], failed=[k for k, v in r["checks"].items() if not v])
                          for r in oom]  # fmt: skip
    return summary


def _profile_brief(file: str, profile: dict[str, Any]) -> dict[str, Any]:
    """Per profiled process: samples, the busiest threads, the top functions (self) of all busy threads and of the
    GIL holder."""
    brief: dict[str, Any] = dict(file=file, label=profile.get("label"), processes=profile.get("processes"))
    for key, p in (profile.get("profiles") or {}).items():
        brief[key] = dict(
            exit_code=p.get("exit_code"), samples=p.get("samples"), threads=(p.get("threads") or [])[:4],
            self=(p.get("self") or [])[:8], error=None if p.get("samples") else (p.get("output") or "")[-300:],
        )  # fmt: skip
    return brief


def targets(engine: dict[int, Any], scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's targets for each door, from this run's in-process engine (matrix) and the app with its engine in
    its own process (`--engine batch`), text chats, not profiled."""
    checks: list[dict[str, Any]] = []
    many = max(engine, default=0)  # 32 on the device (the CPU plumbing: 2)
    for s in scenarios:
        if s["engine"] != "batch" or s["image_chats"] or s["profiled"] or s["chats"] not in (1, many):
            continue
        base = engine.get(s["chats"])
        if not base:
            continue
        name = f"{s['door']} {s['chats']} chat{'s' if s['chats'] > 1 else ''}"
        if s["chats"] == 1:
            share = TARGETS["chats1_share"]
            checks.append(dict(check=f"{name}: tok/s >= {share:.0%} of the engine's 1-stream", value=s["vs_engine"],
                               passed=_ge(s["vs_engine"], share)))  # fmt: skip
            continue
        share = TARGETS["chats32_share"]
        checks.append(dict(check=f"{name}: tok/s >= {share:.0%} of the engine's {many}-stream", value=s["vs_engine"],
                           passed=_ge(s["vs_engine"], share)))  # fmt: skip
        p95, limit = s["ttft_p95_s"], TARGETS["ttft_p95_s"]
        checks.append(dict(check=f"{name}: TTFT p95 <= {limit} s", value=p95, passed=_ge(limit, p95)))
        engine_p95 = base.get("ttft_p95_s")
        bound = TARGETS["ttft_p95_vs_engine"] * engine_p95 if isinstance(engine_p95, (int, float)) else None
        checks.append(dict(check=f"{name}: TTFT p95 <= 2x the engine's ({_r(engine_p95, 3)} s)", value=p95,
                           passed=_ge(bound, p95)))  # fmt: skip
    return checks


def split_ab(scenarios: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The same run's profiled gradio text scenario (32 chats on the device) with the engine in its own process and
    on a thread of the web server (both under py-spy, so alike)."""
    pick: dict[tuple[str, int], dict[str, Any]] = {}
    for s in scenarios:
        if s["door"] == "gradio" and s["profiled"] and not s["image_chats"]:
            pick[(s["engine"], s["chats"])] = s
    both = sorted(n for layout, n in pick if layout == "batch" and ("batch-inproc", n) in pick)
    if not both:
        return None
    a, b = pick[("batch", both[-1])], pick[("batch-inproc", both[-1])]
    return dict(
        chats=both[-1], process_tok_s=a["total_tok_s"], inproc_tok_s=b["total_tok_s"],
        ratio=_ratio(a["total_tok_s"], b["total_tok_s"]), process_ttft_p95_s=a["ttft_p95_s"],
        inproc_ttft_p95_s=b["ttft_p95_s"], process_cores=[a["cores_frontend"], a["cores_engine"]],
        inproc_cores=b["cores_frontend"], note="the engine-process app has load64's slots, the in-process one 32",
    )  # fmt: skip


def _ge(a: Any, b: Any) -> bool | None:
    return a >= b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _r(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else value


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def print_summary(report: dict[str, Any]) -> None:
    env, summary = report["environment"], report["summary"]
    print(f"\n===== suite plan {report.get('plan', '-')}: {env.get('gpu') or 'no GPU'}, transformers {env['transformers']}, "
          f"commit {env['commit']}, {report['wall_s']} s (inductor cache warm at start: {env.get('inductor_cache_warm')})")  # fmt: skip
    for stage in report["stages"]:
        print(f"  {stage['name']:7} {stage.get('exit_code', '-')!s:>4} {stage.get('seconds', '-')!s:>6} s  {stage.get('skipped', '')}")  # fmt: skip
    m = summary.get("matrix", {})
    if m.get("rows"):
        print(f"matrix bf16 ({m['new_tokens']} new tokens both; medians of {m['runs']} engine / {m['generate_runs']} "
              f"generate runs; copy {m['copy_gb_s']} GB/s; engine start-up {m['engine_startup_s']} s)")  # fmt: skip
        print(
            f"  {'N':>3} {'generate':>9} {'engine':>8} {'ratio':>6} {'decode-only':>11} {'eng TTFT p50/p95':>17} {'gen TTFT':>8}"
        )
        for r in m["rows"]:
            print(f"  {r['streams']:>3} {r['generate_tok_s']!s:>9} {r['engine_tok_s']!s:>8} {r['engine_vs_generate']!s:>6} "
                  f"{r['engine_decode_tok_s']!s:>11} {str(r['engine_ttft_p50_s']) + ' / ' + str(r['engine_ttft_p95_s']):>17} "
                  f"{r['generate_ttft_s']!s:>8}")  # fmt: skip
    load = summary.get("load", {})
    for app in load.get("apps", []):
        print(f"app --engine {app['engine']} ({app['slots']} slots, {app['file']}): page up {app['page_up_s']} s, first "
              f"answer {app['startup_s']} s after launch, SIGTERM to exit {app['shutdown_s']} s (code {app['exit_code']}); "
              f"processes {app['processes']}" + (f"; skipped {app['skipped']}" if app["skipped"] else ""))  # fmt: skip
    if load.get("scenarios"):
        print(f"  {'engine':>12} {'door':>10} {'chats':>9} {'ok':>4} {'ref':>3} {'err':>3} {'short':>5} {'tok/s':>7} {'vs eng':>6} "
              f"{'TTFT p50/p95/p99':>18} {'chat p50':>8} {'cores fe/eng/cli(max)':>22}")  # fmt: skip
        for s in load["scenarios"]:
            label = (
                f"{s['chats']}"
                + (f" ({s['image_chats']}img)" if s["image_chats"] else "")
                + ("*" if s["profiled"] else "")
            )
            ttft = f"{s['ttft_p50_s']}/{s['ttft_p95_s']}/{s['ttft_p99_s']}"
            cores = f"{s['cores_frontend']}/{s['cores_engine']}/{s['cores_client']}({s['cores_client_process_max']})"
            print(f"  {s['engine']:>12} {s['door']:>10} {label:>9} {s['ok']:>4} {s['refused']:>3} {s['errors']:>3} "
                  f"{s['short_answers']!s:>5} {s['total_tok_s']!s:>7} {s['vs_engine']!s:>6} {ttft:>18} "
                  f"{s['chat_tok_s_p50']!s:>8} {cores:>22}")  # fmt: skip
            if s.get("server_ttft_p50_p90_s") or s.get("client_stages_p50_s"):
                print(f"  {'':>12} {'':>10} first token: client stages p50 {s.get('client_stages_p50_s')}; server TTFT "
                      f"p50/p90 {s.get('server_ttft_p50_p90_s')}; door: handler start / first text p50 "
                      f"{s.get('server_door_start_first_text_p50_s')}; loop lag p50/p90 "
                      f"{s.get('server_loop_lag_p50_p90_s')}; "
                      f"{s.get('server_steps_per_s')} steps/s x {s.get('server_rows_per_step')} rows")  # fmt: skip
            if s["image_chats"]:
                print(f"  {'':>12} {'':>10} TTFT p50/p95 text {s.get('text_ttft_p50_p95_s')} image {s.get('image_ttft_p50_p95_s')}")  # fmt: skip
        print(
            "  (* profiled with py-spy, non-blocking; cores: front end / engine process / client processes (busiest))"
        )
    for p in summary.get("profiles", []):
        for key in ("frontend_gil", "engine_gil", "frontend", "engine"):
            if key in p:
                q = p[key]
                top = ", ".join(f"{name.split(' (')[0]} {share:.0%}" for name, _n, share in q["self"][:4]) or q.get(
                    "error"
                )
                print(f"  py-spy {p['label']} {key}: {q['samples']} samples; {top}")
    if summary.get("split_ab"):
        ab = summary["split_ab"]
        print(f"split A/B, gradio {ab['chats']} chats (profiled): engine process {ab['process_tok_s']} tok/s, TTFT p95 "
              f"{ab['process_ttft_p95_s']} s; in-process {ab['inproc_tok_s']} tok/s, p95 {ab['inproc_ttft_p95_s']} s; "
              f"ratio {ab['ratio']}")  # fmt: skip
    for t in summary.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        print(f"  target {mark} {t['check']}: {t['value']}")
    if "greedy" in summary:
        g = summary["greedy"]
        print(f"greedy fp32 ({g['decode_path']}): {'PASS' if g['passed'] else 'FAIL'}, {g['informative']} informative prompts: "
              + "; ".join(f"{p['equal']} equal, {p['distinct']} distinct" for p in g["prompts"]))  # fmt: skip
    for r in summary.get("oom", []):
        print(f"oom check, {r['decoder']}: {'PASS' if r['passed'] else 'FAIL ' + str(r['failed'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON files and logs (the device's $OUT)")
    ap.add_argument("--plan", choices=sorted(PLANS), default="a", help="a: matrix, load (1, 32 chats), greedy; b: load64, inproc; c: the engine, then four doors")  # fmt: skip
    ap.add_argument("--doors", help=f"the load stage's doors (plan c: {DOORS_C}; else gradio,openai)")
    ap.add_argument("--stages", help=f"instead of the plan's, in order, from: {', '.join(STAGES)}")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="the whole suite's seconds (default 540)")
    ap.add_argument("--load-seconds", type=float, default=25.0, help="seconds of traffic per load scenario, at most (default 25)")  # fmt: skip
    ap.add_argument("--generate-runs", type=int, help="measured `generate` runs per stream count (plan a: 2)")
    ap.add_argument("--cpu", action="store_true", help="the plumbing on CPU: tiny model, tiny counts")
    ap.add_argument("--commit", help="the commit the tree was sent at (a device's copy has no git history)")
    args = ap.parse_args(argv)
    if args.commit:
        os.environ["BENCH_COMMIT"] = args.commit  # read by every stage's report (common.git_commit)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(PLANS[args.plan])
    if not args.stages or not set(args.stages) <= set(STAGES):
        ap.error(f"--stages takes {', '.join(STAGES)}")
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = preflight()
    print(json.dumps(env), flush=True)
    report: dict[str, Any] = dict(environment=env, plan=args.plan, args=vars(args), stages=[], summary={})
    if not env["transformers_ok"] and not args.cpu:
        print(f"error: transformers {env['transformers']} here; {'.'.join(map(str, MIN_TRANSFORMERS))} or later is "
              "needed (older ones break image prompts): carry the wheels in .whl (bench/README.md)", flush=True)  # fmt: skip
        return 2
    stages = plan(args)
    with open(out / "suite.log", "a") as log:
        for i, stage in enumerate(stages):
            left = args.deadline_s - (time.monotonic() - t0)
            later = sum(s.estimate_s for s in stages[i + 1 :] if s.name not in OPTIONAL)  # kept for what must run
            missing = [p for p in NEEDS.get(stage.name, ()) if not env["packages"].get(p)]
            load_stage = stage.name in LOAD_STAGES
            if missing:
                stage.result = dict(skipped=f"missing {', '.join(missing)}")
            elif left - min(later, left / 2) < stage.estimate_s * (0.6 if load_stage else 1.0):
                stage.result = dict(skipped=f"needs ~{stage.estimate_s:.0f} s, {left:.0f} s left")
            else:
                timeout = max(30.0, min(left - min(later, left / 2), stage.estimate_s * 1.6))
                if load_stage:  # its scenarios shorten to end on its own, 15 s before it would be stopped
                    at = stage.command.index("--")
                    stage.command[at:at] = ["--budget-s", str(round(timeout - 15))]
                run_stage(stage, timeout, log)
            report["stages"].append(dict(name=stage.name, command=" ".join(stage.command[2:]), **stage.result))
            if load_stage:
                work = Path(stage.command[stage.command.index("--workdir") + 1])
                if (work / "server.log").exists():
                    suffix = {"load": "", "load64": "_64", "inproc": "_inproc"}[stage.name]
                    shutil.copy(work / "server.log", out / f"server{suffix}.log")
            report["summary"] = summarize(out)
            report["wall_s"] = round(time.monotonic() - t0, 1)
            (out / "suite.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_summary(report)
    # 3: a load stage whose budget fitted no scenario (its JSON says so).
    failed = [s["name"] for s in report["stages"] if s.get("exit_code") not in (0, 3, None)]
    skipped = [s["name"] for s in report["stages"] if "skipped" in s]
    if failed or skipped:
        print(f"failed: {failed or '-'}; skipped: {skipped or '-'} (suite.log has each stage's output)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
