"""A/B of the whole app: the same load test against the app started two ways (environment variables), alternated.

    python -m bench.ab --a QWEN3VL_GRADIO_STOCK_SESSIONS=1 --b QWEN3VL_GRADIO_STOCK_SESSIONS=0 \\
        --label-a "gradio's sessions" --label-b "lazy sessions" --rounds 2 --out bench/results/cpu/lazy_sessions.json \\
        -- --chats 16 --doors gradio --seconds 25 --prompt-tokens 128 --new-tokens 64 \\
        -- --demo --engine batch --max-concurrency 16 --queue-size 64 --max-context 2048 --max-new-tokens 256
    python -m bench.ab --b QWEN3VL_STREAM_UPDATES_PER_S=250 --c QWEN3VL_GRADIO_INLINE=0 --rounds 1 --out ab.json -- ...

Everything after the first `--` goes to `bench.load_test` as is (its own `--` and the app's flags included); each run
starts a fresh app (`python app.py ...`) with the side's variables set, so both sides get the same work, the same
start-up and warm-up. The sides alternate a, b, a, b, ... (--rounds pairs), so a drift of the machine (another
process, thermal state) falls on both. A third side (--c, a second change against the same baseline) joins each
round: a, b, c, a, b, c, ... Per scenario (chats x door) it prints and writes the median over rounds of total tok/s
and TTFT p50 / p95 of each side, and b's (and c's) over a's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import gpu_name

FIGURES = (("total_tok_s", "tok/s"), ("ttft_p50_s", "TTFT p50 s"), ("ttft_p95_s", "TTFT p95 s"),
           ("door_start_p50_s", "door start p50 s"), ("loop_lag_p90_s", "loop lag p90 s"))  # the last two: /metrics


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: {pair!r} is not NAME=VALUE")
        env[name] = value
    return env


def scenario_figures(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"16 chats, gradio": {"total_tok_s": ..., "ttft_p50_s": ..., "ttft_p95_s": ...}} from a load_test report."""
    out = {}
    for s in report.get("scenarios", []):
        kind = f", {s['image_chats']} with images" if s.get("image_chats") else ""
        key = f"{s['chats']} chats, {s['door']}{kind}" + (" (py-spy)" if s.get("profiled") else "")
        ttft = s.get("ttft_s") or {}
        server = s.get("server") or {}
        out[key] = {"total_tok_s": s["total_tok_s"], "ttft_p50_s": ttft.get("p50"), "ttft_p95_s": ttft.get("p95"),
                    "door_start_p50_s": server.get("door_start_p50_s"), "loop_lag_p90_s": server.get("loop_lag_p90_s")}
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median of each figure per side and scenario over the rounds, and b / a."""
    table: dict[str, Any] = {}
    for side, reports in runs.items():
        for report in reports:
            for key, figures in scenario_figures(report).items():
                row = table.setdefault(key, {}).setdefault(side, {})
                for name, value in figures.items():
                    if value is not None:
                        row.setdefault(name, []).append(value)
    summary = {}
    for key, sides in table.items():
        entry: dict[str, Any] = {}
        for side, figures in sides.items():
            entry[side] = {name: round(statistics.median(values), 4) for name, values in figures.items()}
            entry[side]["runs"] = {name: values for name, values in figures.items()}
        for side in ("b", "c"):
            if "a" in entry and side in entry:
                entry[f"{side}_over_a"] = {
                    name: round(entry[side][name] / entry["a"][name], 3)
                    for name, _ in FIGURES
                    if entry["a"].get(name) and entry[side].get(name) is not None
                }
        summary[key] = entry
    return summary


def print_table(summary: dict[str, Any], labels: dict[str, str]) -> None:
    sides = [s for s in ("a", "b", "c") if s in labels]
    changes = [s for s in sides if s != "a"]
    head = " ".join(f"{labels[s][:22]:>22}" for s in sides) + " " + " ".join(f"{s + ' / a':>7}" for s in changes)
    print(f"{'scenario':28} {'figure':11} {head}")
    for key, entry in summary.items():
        for name, title in FIGURES:
            values = [entry.get(s, {}).get(name) for s in sides]
            ratios = [entry.get(f"{s}_over_a", {}).get(name) for s in changes]
            cells = " ".join(f"{v:22.4f}" if v is not None else f"{'-':>22}" for v in values)
            print(f"{key:28} {title:11} {cells} " + " ".join(f"{r if r is not None else '-':>7}" for r in ratios))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("error: give bench.load_test's arguments after --")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", nargs="*", default=[], help="NAME=VALUE environment of side a (the baseline)")
    parser.add_argument("--b", nargs="*", default=[], help="NAME=VALUE environment of side b (the change)")
    parser.add_argument("--c", nargs="*", default=None, help="NAME=VALUE environment of an optional side c (a second change)")  # fmt: skip
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    parser.add_argument("--label-c", default="c")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (a then b), default 2")
    parser.add_argument("--out", required=True, help="the report (JSON)")
    parser.add_argument("--commit", default="", help="the commit measured (for the report)")
    args = parser.parse_args(argv[:cut])
    load_args = argv[cut + 1 :]
    if args.rounds < 1:
        parser.error("--rounds >= 1")
    envs = {"a": parse_env(args.a), "b": parse_env(args.b)}
    labels = {"a": args.label_a, "b": args.label_b}
    if args.c is not None:
        envs["c"], labels["c"] = parse_env(args.c), args.label_c
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in envs}
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-ab-"))
    started = time.monotonic()
    for r in range(args.rounds):
        for side in envs:
            path = work / f"{side}{r}.json"
            command = [sys.executable, "-m", "bench.load_test", "--json", str(path), *load_args]
            print(f"--- round {r + 1}, {side} ({labels[side]}): {' '.join(f'{k}={v}' for k, v in envs[side].items())}", flush=True)  # fmt: skip
            done = subprocess.run(command, env={**os.environ, **envs[side]}, check=False)
            if done.returncode != 0 or not path.exists():
                print(f"--- the load test failed (exit {done.returncode}); the report keeps what ran", flush=True)
                continue
            runs[side].append(json.loads(path.read_text()))
    summary = summarize(runs)
    report = {
        "what": "bench.ab: the same load test against the app started two ways, alternated",
        "labels": labels, "env": envs, "rounds": args.rounds, "load_test_args": load_args, "commit": args.commit,
        "gpu": gpu_name(), "host_cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.monotonic() - started, 1), "summary": summary,
        "runs": {side: [{"app_flags": r.get("app_flags"), "scenarios": [
            {k: v for k, v in s.items() if k != "requests"} for s in r.get("scenarios", [])]} for r in reports]
            for side, reports in runs.items()},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_table(summary, labels)
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
