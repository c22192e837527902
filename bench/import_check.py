"""What weights/lean.py saves at each start: the engine process's imports and the front end's processor load, timed
in fresh processes with transformers' optional imports trimmed (QWEN3VL_LEAN_IMPORTS=1, the default) and not (0).

Each round starts one process per side and mode, the two modes in alternating order, and times from the child's first
line to the end of the work, and from the parent's spawn to the child's exit (the interpreter's own start included):
- engine: what `python -m qwen3vl_webui.engine.remote.worker --prewarm` does before its spec arrives (lean.skip, then
  torch, transformers and the model's code) and then the tokenizer it loads (`load_model(tokenizer_only=True)` would);
- front: what the front end's load thread does (`resolve_device`, then `load_front`: torch, transformers, the
  processor's modules, the processor).
Run after a warm-up round, so every file is in the page cache (`--drop-caches`, as root, empties it before each
process instead: a fresh machine's disk reads).

    python -m bench.import_check --rounds 5 --out imports.json          # CPU or GPU machine, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINE = """
import time; t0 = time.perf_counter()
from qwen3vl_webui.weights import lean
lean.skip(*lean.ENGINE_PROCESS)
from qwen3vl_webui.engine.remote.worker import prewarm
prewarm(); t1 = time.perf_counter()
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(CHECKPOINT); t2 = time.perf_counter()
import sys
print({"imports_s": t1 - t0, "tokenizer_s": t2 - t1, "work_s": t2 - t0,
       "scipy": "scipy" in sys.modules, "torchvision": "torchvision" in sys.modules})
"""

FRONT = """
import time; t0 = time.perf_counter()
from qwen3vl_webui.weights.loading import load_front, resolve_device
resolve_device("cpu"); t1 = time.perf_counter()
load_front(CHECKPOINT, "fp32", "cpu"); t2 = time.perf_counter()
import sys
print({"torch_s": t1 - t0, "processor_s": t2 - t1, "work_s": t2 - t0,
       "scipy": "scipy" in sys.modules, "torchvision": "torchvision" in sys.modules})
"""


def run_child(code: str, checkpoint: str, lean: str, drop_caches: bool) -> dict:
    if drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    env = {**os.environ, "QWEN3VL_LEAN_IMPORTS": lean, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code.replace("CHECKPOINT", repr(checkpoint))],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    report = eval(done.stdout.strip().splitlines()[-1], {})  # noqa: S307 - our own child's dict of floats and bools
    return {**report, "process_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the tiny demo one)")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each process (root)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

    checkpoint = args.checkpoint or str(ensure_demo_checkpoint())
    sides = {"engine": ENGINE, "front": FRONT}
    for code in sides.values():  # warm-up: bytecode written, files in the page cache
        for lean in ("1", "0"):
            run_child(code, checkpoint, lean, False)
    runs: dict[str, dict[str, list[dict]]] = {side: {"1": [], "0": []} for side in sides}
    for r in range(args.rounds):
        for side, code in sides.items():
            for lean in ("1", "0") if r % 2 == 0 else ("0", "1"):
                runs[side][lean].append(run_child(code, checkpoint, lean, args.drop_caches))
    summary = {}
    for side, modes in runs.items():
        med = {lean: {k: round(statistics.median(x[k] for x in rows), 3) for k in rows[0] if k.endswith("_s")}
               for lean, rows in modes.items()}  # fmt: skip
        imported = {lean: {k: rows[0][k] for k in ("scipy", "torchvision")} for lean, rows in modes.items()}
        summary[side] = {"lean": med["1"], "full": med["0"], "imported": imported,
                         "work_ratio": round(med["1"]["work_s"] / med["0"]["work_s"], 3),
                         "process_ratio": round(med["1"]["process_s"] / med["0"]["process_s"], 3)}  # fmt: skip
        print(f"{side:6s} work {med['0']['work_s']:.2f} s -> {med['1']['work_s']:.2f} s ({summary[side]['work_ratio']}x), "
              f"process {med['0']['process_s']:.2f} -> {med['1']['process_s']:.2f} s; imported (lean / full): "
              f"{imported['1']} / {imported['0']}")  # fmt: skip
    report = {"rounds": args.rounds, "drop_caches": args.drop_caches, "cpus": os.cpu_count(), "python": sys.version,
              "commit": os.environ.get("BENCH_COMMIT"), "summary": summary, "runs": runs}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
