"""How long the engine process's prewarm (`engine/remote/worker.py`) keeps the weights waiting: the modules it imports
before it reads its spec, timed in fresh interpreters, with and without inductor's compile_fx (which it used to import).

    python -m bench.prewarm_check [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROBE = """
import time
t = time.perf_counter()
import qwen3vl_webui.engine.remote.worker as worker
worker.prewarm()
{extra}
print(time.perf_counter() - t)
"""


def timed(extra: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timed("")  # the page cache and .pyc files warm for both
    old = [timed("import torch._inductor.compile_fx") for _ in range(args.repeats)]
    new = [timed("") for _ in range(args.repeats)]
    print(f"prewarm with compile_fx (before): {statistics.median(old):.2f} s (median of {args.repeats})")
    print(f"prewarm without it (now):         {statistics.median(new):.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
