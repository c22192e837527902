"""The GPU run in one call: the engine-vs-generate matrix, the whole app under load, and the fp32 greedy check.

    python -m bench.suite --out $OUT                      # H200: ~7-9 min; bench/README.md has the device line
    python -m bench.suite --out /tmp/s --cpu --stages matrix,greedy    # the plumbing on CPU (tiny model), ~20 s

Each stage is its own process (its GPU memory is gone when it exits; one crash does not end the run), started only
if the time left (`--deadline-s`, counted from the suite's start) covers its estimate:
1. matrix   bench.matrix, bf16, 1/8/32 streams, 512-token prompts, 256 new tokens for both paths, the same warm-up
            for both at each count, medians of 3 (`--generate-runs` fewer for `generate` if time is short). The
            engine is built exactly as the app builds it (32 slots of 2,048 tokens, the default graph buckets) and
            compiles into the app's inductor cache, so the app in stage 2 starts warm.
2. load     bench.load_test through gradio_client: the app (`--random-weights 4b --precision bf16`, on 127.0.0.1, so
            no per-client cap) at 1 and 32 chats, then 32 chats of which a quarter send a 1280x720 image.
            `--load-seconds` each, shortened if time is short.
3. greedy   bench.greedy: fp32 engine tokens against `generate` on varied answers.
4. oom      bench.oom_check on the random 4B shape, both decoders, if time is left (its engine compiles its own
            shape, so it usually is not: run `--stages oom` in a call of its own).
Writes into --out: suite.json (environment, stages, the summary), one JSON per stage, suite.log (every stage's
output) and server.log (the app's): at most 7 files. Prints a compact summary with ratios at the end.
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
# What the device image lacks and a stage needs (bench/README.md: carried as wheels).
NEEDS = {"load": ("gradio", "gradio_client"), "matrix": (), "greedy": (), "oom": ()}
MIN_TRANSFORMERS = (5, 23)  # 5.17 (the device image's) breaks image prompts
LOAD_STARTUP_S = 100  # the app to its first answer with the inductor cache the matrix filled, its warm requests


@dataclass
class Stage:
    name: str
    command: list[str]
    estimate_s: float  # what it takes on an H200 with a cold inductor cache (the timeout adds headroom)
    output: str | None = None  # its JSON, under --out
    result: dict[str, Any] = field(default_factory=dict)


def plan(args: argparse.Namespace) -> list[Stage]:
    """The stages' commands for this run (the device's, or the tiny CPU plumbing run with --cpu)."""
    out = Path(args.out)
    py = [sys.executable, "-m"]
    if args.cpu:
        model = ["--model", "random-weights:tiny", "--device", "cpu", "--precision", "fp32"]
        matrix = [*py, "bench.matrix", *model, "--streams", "1,2", "--prompt-tokens", "32", "--new-tokens", "8",
                  "--warmup-tokens", "2", "--runs", "1", "--slot-tokens", "256", "--out", str(out / "matrix_bf16.json")]  # fmt: skip
        greedy = [*py, "bench.greedy", *model, "--tokens", "8", "--prompt-tokens", "32", "--texts", "2", "--no-image",
                  "--out", str(out / "greedy_fp32.json")]  # fmt: skip
        app = ["--random-weights", "tiny", "--max-concurrency", "2", "--max-context", "1024", "--max-new-tokens", "64",
               "--warmup", "quick", "--cache-dir", "/tmp/qwen3vl-cache-cpu"]  # fmt: skip
        load = [*py, "bench.load_test", "--chats", "1,2", "--mixed", "2", "--image-share", "0.5", "--seconds",
                str(args.load_seconds), "--prompt-tokens", "32", "--new-tokens", "16", "--warm-requests", "1",
                "--image-pool", "2", "--workdir", "/tmp/qwen3vl-load-cpu", "--json", str(out / "load_test.json"), "--",
                *app]  # fmt: skip
        oom = [*py, "bench.oom_check", "--help"]
    else:
        matrix = [*py, "bench.matrix", "--precision", "bf16", "--streams", "1,8,32", "--max-batch", "32",
                  "--slot-tokens", "2048", "--cache-dir", f"{APP_CACHE}/inductor", "--out", str(out / "matrix_bf16.json")]  # fmt: skip
        if args.generate_runs:
            matrix += ["--generate-runs", str(args.generate_runs)]
        greedy = [*py, "bench.greedy", "--out", str(out / "greedy_fp32.json")]
        load = [*py, "bench.load_test", "--chats", "1,32", "--mixed", "32", "--seconds", str(args.load_seconds),
                "--workdir", "/tmp/qwen3vl-load", "--json", str(out / "load_test.json"), "--", *APP_FLAGS]  # fmt: skip
        oom = [*py, "bench.oom_check", "--checkpoint", "random-weights:4b", "--json", str(out / "oom_check.json")]
    scale = 0.2 if args.cpu else 1.0  # the tiny model on CPU: seconds, but the app still starts in ~30 s
    stages = {
        "matrix": Stage("matrix", matrix, 240 * scale, "matrix_bf16.json"),
        "load": Stage("load", load, LOAD_STARTUP_S + 3 * (args.load_seconds + 12), "load_test.json"),
        "greedy": Stage("greedy", greedy, 60 * scale, "greedy_fp32.json"),
        "oom": Stage("oom", oom, 150 * scale, "oom_check.json"),
    }
    return [stages[name] for name in args.stages]


def preflight() -> dict[str, Any]:
    """Versions that matter, and what is missing (a stage that needs a missing package is skipped, not crashed)."""
    import transformers

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    found = {name: importlib.util.find_spec(name) is not None for name in ("gradio", "gradio_client", "psutil", "httpx")}
    return dict(
        transformers=transformers.__version__, transformers_ok=version >= MIN_TRANSFORMERS, packages=found,
        python=sys.version.split()[0], gpu=gpu_name(), commit=git_commit(), cpus=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
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


def summarize(out: Path) -> dict[str, Any]:
    """The figures that matter, with ratios: engine vs generate per stream count; the app vs the engine."""
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
    load = _json(out / "load_test.json") or {}
    scenarios = []
    for s in load.get("scenarios", []):
        base = engine.get(s["chats"], {}).get("total_tok_s")
        row = dict(
            chats=s["chats"], image_chats=s.get("image_chats", 0), door=s.get("door"), ok=s["ok"],
            refused=s["refused_busy"] + s.get("refused_per_client", 0) + s["refused"], errors=s["error"],
            total_tok_s=_r(s["total_tok_s"]), vs_engine=_ratio(s["total_tok_s"], base) if not s.get("image_chats") else None,
            ttft_p50_s=_r(s["ttft_s"]["p50"], 3), ttft_p95_s=_r(s["ttft_s"]["p95"], 3), ttft_p99_s=_r(s["ttft_s"]["p99"], 3),
            chat_tok_s_p50=_r(s["chat_tok_s"]["p50"]), cpu_cores=s.get("cpu_cores_busy"),
        )  # fmt: skip
        for kind, k in s.get("by_kind", {}).items():
            row[f"{kind}_ttft_p50_p95_s"] = [_r(k["ttft_s"]["p50"], 3), _r(k["ttft_s"]["p95"], 3)]
        scenarios.append(row)
    summary["load"] = dict(scenarios=scenarios, startup_s=load.get("startup_s"), first_answer_s=load.get("first_answer_s"))
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


def _r(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else value


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def print_summary(report: dict[str, Any]) -> None:
    env, summary = report["environment"], report["summary"]
    print(f"\n===== suite: {env.get('gpu') or 'no GPU'}, transformers {env['transformers']}, commit {env['commit']}, "
          f"{report['wall_s']} s")  # fmt: skip
    for stage in report["stages"]:
        print(f"  {stage['name']:7} {stage.get('exit_code', '-')!s:>4} {stage.get('seconds', '-')!s:>6} s  {stage.get('skipped', '')}")  # fmt: skip
    m = summary.get("matrix", {})
    if m.get("rows"):
        print(f"matrix bf16 ({m['new_tokens']} new tokens both; medians of {m['runs']} engine / {m['generate_runs']} "
              f"generate runs; copy {m['copy_gb_s']} GB/s; engine start-up {m['engine_startup_s']} s)")  # fmt: skip
        print(f"  {'N':>3} {'generate':>9} {'engine':>8} {'ratio':>6} {'decode-only':>11} {'eng TTFT p50/p95':>17} {'gen TTFT':>8}")
        for r in m["rows"]:
            print(f"  {r['streams']:>3} {r['generate_tok_s']!s:>9} {r['engine_tok_s']!s:>8} {r['engine_vs_generate']!s:>6} "
                  f"{r['engine_decode_tok_s']!s:>11} {str(r['engine_ttft_p50_s']) + ' / ' + str(r['engine_ttft_p95_s']):>17} "
                  f"{r['generate_ttft_s']!s:>8}")  # fmt: skip
    load = summary.get("load", {})
    if load.get("scenarios"):
        print(f"whole app through gradio_client (start-up to first answer {load['startup_s']} s)")
        print(f"  {'chats':>8} {'ok':>4} {'ref':>3} {'err':>3} {'total':>7} {'vs engine':>9} {'TTFT p50/p95/p99':>20} {'chat p50':>8} {'cores srv+kids':>14}")  # fmt: skip
        for s in load["scenarios"]:
            cores = s["cpu_cores"] or {}
            label = f"{s['chats']}" + (f" ({s['image_chats']}img)" if s["image_chats"] else "")
            ttft = f"{s['ttft_p50_s']}/{s['ttft_p95_s']}/{s['ttft_p99_s']}"
            print(f"  {label:>8} {s['ok']:>4} {s['refused']:>3} {s['errors']:>3} {s['total_tok_s']!s:>7} "
                  f"{s['vs_engine']!s:>9} {ttft:>20} {s['chat_tok_s_p50']!s:>8} "
                  f"{str(cores.get('server')) + '+' + str(cores.get('server_children')):>14}")  # fmt: skip
            if s["image_chats"]:
                print(f"  {'':>8} TTFT p50/p95 text {s.get('text_ttft_p50_p95_s')} image {s.get('image_ttft_p50_p95_s')}")
    if "greedy" in summary:
        g = summary["greedy"]
        print(f"greedy fp32 ({g['decode_path']}): {'PASS' if g['passed'] else 'FAIL'}, {g['informative']} informative prompts: "
              + "; ".join(f"{p['equal']} equal, {p['distinct']} distinct" for p in g["prompts"]))  # fmt: skip
    for r in summary.get("oom", []):
        print(f"oom check, {r['decoder']}: {'PASS' if r['passed'] else 'FAIL ' + str(r['failed'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON files and logs (the device's $OUT)")
    ap.add_argument("--stages", default="matrix,load,greedy,oom", help="in order, from: matrix, load, greedy, oom")
    ap.add_argument("--deadline-s", type=float, default=520.0, help="the whole suite's seconds (default 520)")
    ap.add_argument("--load-seconds", type=float, default=30.0, help="seconds of traffic per load scenario")
    ap.add_argument("--generate-runs", type=int, help="measured `generate` runs per stream count (default 3)")
    ap.add_argument("--cpu", action="store_true", help="the plumbing on CPU: tiny model, tiny counts")
    ap.add_argument("--commit", help="the commit the tree was sent at (a device's copy has no git history)")
    args = ap.parse_args(argv)
    if args.commit:
        os.environ["BENCH_COMMIT"] = args.commit  # read by every stage's report (common.git_commit)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not args.stages or not set(args.stages) <= set(NEEDS):
        ap.error(f"--stages takes {', '.join(NEEDS)}")
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = preflight()
    print(json.dumps(env), flush=True)
    report: dict[str, Any] = dict(environment=env, args=vars(args), stages=[], summary={})
    if not env["transformers_ok"] and not args.cpu:
        print(f"error: transformers {env['transformers']} here; {'.'.join(map(str, MIN_TRANSFORMERS))} or later is "
              "needed (older ones break image prompts): carry the wheels in .whl (bench/README.md)", flush=True)  # fmt: skip
        return 2
    stages = plan(args)
    with open(out / "suite.log", "a") as log:
        for i, stage in enumerate(stages):
            left = args.deadline_s - (time.monotonic() - t0)
            later = sum(s.estimate_s for s in stages[i + 1 :] if s.name == "load")  # keep room for the app under load
            missing = [p for p in NEEDS[stage.name] if not env["packages"].get(p)]
            if missing:
                stage.result = dict(skipped=f"missing {', '.join(missing)}")
            elif left < stage.estimate_s * (0.6 if stage.name == "load" else 1.0):
                stage.result = dict(skipped=f"needs ~{stage.estimate_s:.0f} s, {left:.0f} s left")
            else:
                if stage.name == "load" and left < stage.estimate_s:  # shorter scenarios rather than none
                    seconds = max(10.0, (left - LOAD_STARTUP_S) / 3 - 12)
                    at = stage.command.index("--seconds") + 1
                    stage.command[at] = str(round(seconds))
                run_stage(stage, max(30.0, min(left - min(later, left / 2), stage.estimate_s * 1.6)), log)
            report["stages"].append(dict(name=stage.name, command=" ".join(stage.command[2:]), **stage.result))
            if stage.name == "load":
                work = Path(stage.command[stage.command.index("--workdir") + 1])
                if (work / "server.log").exists():
                    shutil.copy(work / "server.log", out / "server.log")
            report["summary"] = summarize(out)
            report["wall_s"] = round(time.monotonic() - t0, 1)
            (out / "suite.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_summary(report)
    failed = [s["name"] for s in report["stages"] if s.get("exit_code") not in (0, None)]
    skipped = [s["name"] for s in report["stages"] if "skipped" in s]
    if failed or skipped:
        print(f"failed: {failed or '-'}; skipped: {skipped or '-'} (suite.log has each stage's output)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
