"""GIL contention between the engine thread and a background torch.compile, reproduced on CPU with a stand-in.

    python -m bench.gil_check --out bench/results/cpu/gil_check.json       # every mode, ~2-4 minutes on 2 cores
    python -m bench.gil_check --modes alone,interval_1ms --seconds 2       # a subset

An "engine-like" thread runs steps of: `--ops` tiny torch ops (each one releases and re-acquires the GIL, as every
ATen call from Python does: the sampler, the KV bookkeeping, `.float()`, `.tolist()`), `--python-us` of pure Python
(scheduling, emitting tokens), and `--waits` GIL-free waits of `--wait-ms` (a CUDA graph replay, the host sync of
`.tolist()`, zmq I/O), and counts steps/s. Each mode runs in a fresh process of its own (a fresh inductor cache dir,
TORCHINDUCTOR_CACHE_DIR in a temp dir, and a fresh dynamo), with the same warm-up, while another thread compiles a
small transformer-like model with inductor on CPU for two batch sizes (buckets, `dynamic=False`):

- `alone`: no compile (the baseline; the window is `--seconds` long);
- `interval_5ms`, `interval_1ms`, `interval_0.2ms`, `interval_0.05ms`: the compile in a thread, `sys.setswitchinterval`
  at that value while it runs (5 ms is Python's default, 1 ms what graphs.py sets since issue 14);
- `coop`: the compile thread pauses (a per-thread `sys.setprofile` hook, set on the compile thread only) while the
  engine thread runs Python (between two of its GIL-free waits), for at most `--coop-pause-ms`, then runs for
  `--coop-slice-ms` unpaused (so it still progresses whatever the engine does); interval 0.2 ms, so that the engine
  gets the GIL back soon after each wait;
- `throttle`: what graphs.py does (`compiled.yielding_compile`): the same kind of hook, blind to the engine's
  mid-step state, makes the compile thread sleep `--throttle-pause-ms` after each `--throttle-run-ms` it ran while
  the engine stepped within the last 0.1 s (its last step's end time: one float per step); interval 1 ms
  (`throttle_0.05ms`: at 0.05 ms, graphs.py's interval);
- `child`: the compile in a child process (multiprocessing spawn) that writes `torch.compiler.save_cache_artifacts`,
  then the parent loads them (`load_cache_artifacts`) and compiles "from them" in a thread at 1 ms: two windows, the
  child's compile (cold) and the parent's warm compile.

Each mode reports engine steps/s over the compile window and its ratio to `alone`, the compile's duration, and the
engine thread's mean step time. Writes one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODES = (
    "alone", "interval_5ms", "interval_1ms", "interval_0.2ms", "interval_0.05ms", "coop", "throttle", "throttle_0.05ms",
    "child",
)  # fmt: skip
INTERVALS = {"interval_5ms": 0.005, "interval_1ms": 0.001, "interval_0.2ms": 0.0002, "interval_0.05ms": 0.00005}
BUCKETS = (1, 8)


# ------------------------------------------------------------------ the two workloads


def build_model(blocks: int = 2) -> Any:
    """A small transformer-like stack: enough Python for dynamo and inductor to chew on for seconds."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)
            self.qkv = torch.nn.Linear(width, 3 * width)
            self.out = torch.nn.Linear(width, width)
            self.up = torch.nn.Linear(width, 2 * width)
            self.down = torch.nn.Linear(2 * width, width)

        def forward(self, x: Any) -> Any:
            q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
            x = x + self.out(att)
            return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))))

    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(64) for _ in range(blocks)]).eval()


def compile_buckets(model: Any, backend: str = "inductor") -> dict[int, float]:
    """Compiles `model` for every bucket (the first call of each compiles); seconds per bucket."""
    import torch

    fn = torch.compile(model, dynamic=False, backend=backend)
    times = {}
    with torch.inference_mode():
        for rows in BUCKETS:
            started = time.perf_counter()
            fn(torch.randn(rows, 16, 64))
            times[rows] = round(time.perf_counter() - started, 2)
    return times


class EngineLike:
    """The engine thread's stand-in: steps of tiny torch ops, pure Python and GIL-free waits; step end times kept."""

    def __init__(self, ops: int, python_us: float, waits: int, wait_ms: float) -> None:
        import torch

        self.ops, self.python_us, self.waits, self.wait_s = ops, python_us, waits, wait_ms / 1000
        self.x = torch.zeros(8)
        self.busy = False  # running Python between two GIL-free waits (the coop mode's compile pauses meanwhile)
        self.idle = threading.Event()
        self.ends: list[float] = []
        self._stop = threading.Event()
        self._loops = self._calibrate()

    def _python(self, loops: int) -> int:
        total = 0
        for i in range(loops):
            total += i * i % 7
        return total

    def _calibrate(self) -> int:
        loops = 10_000
        started = time.perf_counter()
        self._python(loops)
        per_loop = (time.perf_counter() - started) / loops
        return max(1, int(self.python_us / 1e6 / per_loop))

    def step(self) -> None:
        per_wait = max(1, self.ops // max(1, self.waits))
        for _ in range(self.waits):
            self.busy = True  # the engine needs the GIL from here
            self.idle.clear()
            for _ in range(per_wait):
                self.x.add_(1.0)  # an ATen call: releases the GIL and takes it back
            self._python(self._loops // max(1, self.waits))
            self.busy = False  # a GIL-free wait: the compile may run meanwhile
            self.idle.set()
            time.sleep(self.wait_s)  # the GPU's share: a graph replay, a host sync

    def run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self.ends.append(time.perf_counter())

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="engine-like", daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join()

    def rate(self, start: float, end: float) -> dict[str, float]:
        steps = sum(1 for t in self.ends if start <= t < end)
        seconds = max(end - start, 1e-9)
        return {
            "window_s": round(seconds, 2),
            "steps": steps,
            "steps_per_s": round(steps / seconds, 1),
            "mean_step_ms": round(1000 * seconds / max(steps, 1), 2),
        }


# ------------------------------------------------------------------ the cooperative hook


def coop_hook(engine: EngineLike, pause_s: float, slice_s: float) -> Any:
    """A profile function for the compile thread: while the engine is mid-step, wait (GIL released) until the step
    ends, at most `pause_s`; after a pause that timed out, run `slice_s` unpaused so the compile still progresses."""
    state = {"run_until": 0.0}
    clock = time.perf_counter

    def hook(frame: Any, event: str, arg: Any) -> None:
        if engine.busy and event == "call" and clock() >= state["run_until"]:
            if not engine.idle.wait(pause_s):
                state["run_until"] = clock() + slice_s

    return hook


def throttle_hook(engine: EngineLike, run_s: float, pause_s: float) -> Any:
    """`compiled.yielding_compile`'s rule as a profile function (kept the same; the test checks both agree)."""
    from qwen3vl_webui.engine.batch import compiled

    return compiled.yielding_hook(lambda: engine.ends[-1] if engine.ends else 0.0, run_s, pause_s)


# ------------------------------------------------------------------ one mode, in a fresh process


def _run_thread(target: Any) -> float:
    """Runs `target` on a thread of its own (beside the engine-like thread) to its end; the time it ended."""
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join()
    return time.perf_counter()


def _child_compile(cache_dir: str, artifacts: str, blocks: int, backend: str) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import torch

    compile_buckets(build_model(blocks), backend)
    saved = torch.compiler.save_cache_artifacts()
    Path(artifacts).write_bytes(saved[0] if saved else b"")


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this (fresh) process: warm-up, then the engine-like thread measured over the compile window."""
    tmp = tempfile.mkdtemp(prefix="gil-check-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp, "inductor"))
    import torch

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    model = build_model(args.blocks)
    engine = EngineLike(args.ops, args.python_us, args.waits, args.wait_ms)
    for _ in range(50):  # the same warm-up in every mode
        engine.step()
    thread = engine.start()
    time.sleep(0.5)
    result: dict[str, Any] = {"mode": mode}
    default = sys.getswitchinterval()
    try:
        if mode == "alone":
            start = time.perf_counter()
            time.sleep(args.seconds)
            result["engine"] = engine.rate(start, time.perf_counter())
        elif mode in INTERVALS or mode in ("coop", "throttle", "throttle_0.05ms"):
            others = {"coop": 0.0002, "throttle": 0.001, "throttle_0.05ms": 0.00005}  # coop: the GIL back soon
            sys.setswitchinterval(INTERVALS.get(mode) or others[mode])
            times: dict[int, float] = {}

            def compile_thread() -> None:
                if mode == "coop":
                    sys.setprofile(coop_hook(engine, args.coop_pause_ms / 1000, args.coop_slice_ms / 1000))
                elif mode.startswith("throttle"):
                    sys.setprofile(throttle_hook(engine, args.throttle_run_ms / 1000, args.throttle_pause_ms / 1000))
                cpu = time.thread_time()
                try:
                    times.update(compile_buckets(model, args.backend))
                finally:
                    sys.setprofile(None)
                    result["compile_thread_cpu_s"] = round(time.thread_time() - cpu, 2)  # its Python (GIL) share

            start = time.perf_counter()
            end = _run_thread(compile_thread)
            result["engine"] = engine.rate(start, end)
            result["compile_s"] = round(end - start, 2)
            result["bucket_s"] = times
        elif mode == "child":
            import multiprocessing

            artifacts = str(Path(tmp, "artifacts.bin"))
            ctx = multiprocessing.get_context("spawn")
            start = time.perf_counter()
            child = ctx.Process(
                target=_child_compile,
                args=(str(Path(tmp, "child-inductor")), artifacts, args.blocks, args.backend),
            )
            child.start()
            child.join()
            mid = time.perf_counter()
            result["engine_child_phase"] = engine.rate(start, mid)
            result["child_compile_s"] = round(mid - start, 2)
            sys.setswitchinterval(0.001)
            times = {}

            def warm_thread() -> None:
                cpu = time.thread_time()
                blob = Path(artifacts).read_bytes()
                if blob:
                    torch.compiler.load_cache_artifacts(blob)
                times.update(compile_buckets(model, args.backend))
                result["compile_thread_cpu_s"] = round(time.thread_time() - cpu, 2)

            end = _run_thread(warm_thread)
            result["engine_warm_phase"] = engine.rate(mid, end)
            result["warm_compile_s"] = round(end - mid, 2)
            result["bucket_s"] = times
            result["engine"] = engine.rate(start, end)
            result["artifacts_bytes"] = Path(artifacts).stat().st_size
        else:
            raise SystemExit(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    finally:
        sys.setswitchinterval(default)
        engine.stop(thread)
    return result


# ------------------------------------------------------------------ the driver


def _ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results.get("alone", {}).get("engine", {}).get("steps_per_s")
    if not base:
        return
    for result in results.values():
        for key in ("engine", "engine_child_phase", "engine_warm_phase"):
            if key in result:
                result[key]["vs_alone"] = round(result[key]["steps_per_s"] / base, 3)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gil_check", description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default: print only)")
    parser.add_argument("--seconds", type=float, default=5.0, help="the alone window")
    parser.add_argument("--ops", type=int, default=50, help="GIL-releasing torch ops per engine step")
    parser.add_argument("--python-us", type=float, default=1000.0, help="pure Python per engine step (µs)")
    parser.add_argument("--waits", type=int, default=3, help="GIL-free waits per engine step")
    parser.add_argument("--wait-ms", type=float, default=1.0, help="each GIL-free wait (ms)")
    parser.add_argument("--coop-pause-ms", type=float, default=20.0, help="coop: the longest pause of the compile")
    parser.add_argument("--coop-slice-ms", type=float, default=2.0, help="coop: the compile's turn after a pause")
    parser.add_argument("--throttle-run-ms", type=float, default=2.0, help="throttle: the compile's run between sleeps")
    parser.add_argument("--throttle-pause-ms", type=float, default=4.0, help="throttle: each sleep of the compile")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the compiled model")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend: inductor (its C++ builds free the GIL for"
        " most of the compile on CPU), aot_eager (dynamo + AOTAutograd: all Python, as a GPU compile mostly is)",
    )  # fmt: skip
    parser.add_argument("--key", default=None, help="write this run under results_by_key[KEY] of an existing --out")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one, args)), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "bench.gil_check", *passed, "--one", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[mode] = {"mode": mode, "error": (proc.stderr or proc.stdout)[-1500:]}
        else:
            results[mode] = json.loads(lines[-1][len("RESULT ") :])
        _ratios(results)
        print(json.dumps(results[mode]), flush=True)
    import platform

    import torch

    report = {
        "what": "engine-like thread steps/s while a background torch.compile (inductor, CPU) runs, per mitigation",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "step": {"ops": args.ops, "python_us": args.python_us, "waits": args.waits, "wait_ms": args.wait_ms},
        "compile": {"backend": args.backend, "blocks": args.blocks},
        "buckets": list(BUCKETS),
        "results": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.key:  # a second run beside the first (e.g. another backend), in the same file
            whole = json.loads(args.out.read_text()) if args.out.exists() else {}
            whole.setdefault("results_by_key", {})[args.key] = report
            report = whole
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
