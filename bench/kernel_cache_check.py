"""How much of the engine's start-up before its first answer is our own Triton kernels' JIT builds (issue 14).

    python -m bench.kernel_cache_check --out $OUT/kernel_cache.json [--runs 2]

The engine serves first from eager decode steps captured in CUDA graphs (no inductor compile); before that it builds
our Triton kernels (split-KV attention, the GEMV, ...) on first use, warms each batch bucket up and captures the
graphs. Each run here is a fresh interpreter that builds random weights of the 4B architecture (bf16) and a
`BatchEngine` with the compile off, as the app's first-serving path does, and reports the engine's own figures
("decode steps ready in X s, prefill in Y s") and its wall time: first with an empty Triton cache, then `--runs`
times with the cache the first run filled. The difference is what carrying the kernels' builds with the compile
artifacts would save a fresh machine. Also: the engine process's imports (`worker.prewarm`) timed in a fresh
interpreter, with the slowest modules by `-X importtime`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import logging, time, json, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import torch
from bench.common import load
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
torch.set_grad_enabled(False)
t = time.perf_counter()
loaded = load(sys.argv[2], sys.argv[3], sys.argv[4])
weights_s = time.perf_counter() - t
t = time.perf_counter()
engine = BatchEngine(loaded, BatchOptions(max_batch=32, token_budget=32 * 2048, compile=False,
                                          kernel_cache_dir=sys.argv[1], **json.loads(sys.argv[5])))
engine_s = time.perf_counter() - t
deadline = time.monotonic() + 60
while "capturing" in engine.prefill_path and time.monotonic() < deadline:
    time.sleep(0.02)
print("RESULT " + json.dumps({"weights_s": round(weights_s, 2), "engine_s": round(engine_s, 2),
                              "prefill_graphs_done_s": round(time.perf_counter() - t, 2),
                              "decode_path": engine.decode_path, "prefill_path": engine.prefill_path}), flush=True)
engine.close()
"""
BUILDS = re.compile(r"kernel builds: (\d+) Triton kernels built in ([\d.]+) s on (\d+) threads")

READY = re.compile(r"decode steps ready in ([\d.]+) s \((\w[\w ]*)(?:; .*?)?\), prefill in ([\d.]+) s")


def engine_run(
    cache: Path, label: str, model: tuple[str, str, str], options: dict | None = None, env: dict | None = None
) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.perf_counter()
    argv = [sys.executable, "-c", CHILD, str(cache), *model, json.dumps(options or {})]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    out = {"label": label, "wall_s": round(time.perf_counter() - started, 2), "exit_code": proc.returncode}
    text = proc.stdout + proc.stderr
    for line in text.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[7:]))
        if m := READY.search(line):
            out.update(decode_ready_s=float(m.group(1)), decode_mode=m.group(2), prefill_ready_s=float(m.group(3)))
        if "decode start-up:" in line:
            out["decode_startup"] = line.split("decode start-up:", 1)[1].strip()
        if m := BUILDS.search(line):
            out.update(builds=int(m.group(1)), builds_s=float(m.group(2)), build_threads=int(m.group(3)))
    out["triton_entries"] = sum(1 for p in cache.iterdir() if p.is_dir()) if cache.exists() else 0
    if proc.returncode:
        out["tail"] = text[-1500:]
    print(json.dumps(out), flush=True)
    return out


def imports() -> dict:
    probe = "import time; t = time.perf_counter(); import qwen3vl_webui.engine.remote.worker as w; w.prewarm(); " \
            "print('TOOK', time.perf_counter() - t)"  # fmt: skip
    runs = []
    slowest: list[tuple[int, str]] = []
    for k in range(2):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        took = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("TOOK")]
        runs.append(round(took[0], 2) if took else None)
        if k == 1:  # the second run: .pyc files and the page cache warm, as at a real launch
            for line in proc.stderr.splitlines():
                parts = line.split("|")
                if len(parts) == 3 and parts[0].startswith("import time:") and parts[1].strip().isdigit():
                    slowest.append((int(parts[0].split(":")[1]), parts[2].rstrip()))
    slowest.sort(reverse=True)
    out = {"prewarm_s": runs, "slowest_self_us": [[us, name] for us, name in slowest[:15]]}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON report")
    ap.add_argument("--runs", type=int, default=2, help="runs with the warm Triton cache (default 2)")
    ap.add_argument("--cpu", action="store_true", help="plumbing: the tiny random model on a CPU (no Triton)")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="instead: ROUNDS x (a: kernels built one by one at first launch and prefill graphs captured "
                         "before serving, as before session 18; b: both as now), each with an empty Triton cache")  # fmt: skip
    ap.add_argument("--precision", default="bf16", help="with --ab (default bf16)")
    args = ap.parse_args()
    model = ("random-weights:tiny", "fp32", "cpu") if args.cpu else ("random-weights:4b", "bf16", "cuda")
    if args.ab:
        return start_ab(args, (model[0], "fp32" if args.cpu else args.precision, model[2]))
    report: dict = {"imports": imports()}
    cache = Path(tempfile.mkdtemp(prefix="qwen3vl-triton-"))
    report["cold"] = engine_run(cache, "empty Triton cache", model)
    report["warm"] = [engine_run(cache, f"warm Triton cache, run {k + 1}", model) for k in range(args.runs)]
    warm = [r["engine_s"] for r in report["warm"] if "engine_s" in r]
    if "engine_s" in report["cold"] and warm:
        report["saved_s"] = round(report["cold"]["engine_s"] - min(warm), 2)
        print(f"engine start (graphs, no compile): cold Triton cache {report['cold']['engine_s']} s, warm {warm} s: "
              f"the kernels' builds cost {report['saved_s']} s", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def start_ab(args: argparse.Namespace, model: tuple[str, str, str]) -> int:
    """The engine's start with an empty Triton cache, the two ways alternated: engine_s is until it serves."""
    sides = {
        "a": ({"defer_prefill_graphs": False}, {"QWEN3VL_PARALLEL_BUILDS": "0"}),
        "b": ({}, {"QWEN3VL_PARALLEL_BUILDS": "1"}),
    }
    report: dict = {"model": list(model), "a": [], "b": []}
    for k in range(args.ab):
        for side, (options, env) in sides.items():
            cache = Path(tempfile.mkdtemp(prefix=f"qwen3vl-triton-{side}-"))
            report[side].append(engine_run(cache, f"{side}, round {k + 1}", model, options, env))
    for side in sides:
        runs = [r["engine_s"] for r in report[side] if "engine_s" in r]
        report[f"{side}_engine_s_median"] = sorted(runs)[len(runs) // 2] if runs else None
    a, b = report["a_engine_s_median"], report["b_engine_s_median"]
    if a and b:
        print(f"engine start, empty Triton cache: a {a} s, b {b} s (b / a {b / a:.2f})", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
