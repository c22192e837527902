"""Where a decode step's time goes: every GPU kernel of the engine's steps at N streams, by kind, per step.

The matrix gives tok/s; this says what a step is made of. It starts the engine as the matrix does (compiled, CUDA
graphs), decodes N greedy streams, and records a window of their steps with torch.profiler (CUPTI also sees the
kernels a CUDA-graph replay launches). Per step: each kernel's time and launches, the sums by kind (the quantized
products, their split-K reductions, cuBLAS, attention, inductor's fused kernels, copies), the GPU's busy time against
the step's wall time (the rest: gaps between kernels, host work), and the bytes the products read against that time.

    python -m bench.step_profile --precision int4 --streams 1 --out $OUT/profile_int4.json         # GPU
    python -m bench.step_profile --model random-weights:tiny --device cpu --precision fp32 --steps 4   # plumbing
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from bench import common

# Kernel kinds, first match wins (Triton kernels are named after their function; ours live in kernels/).
KINDS = (
    ("split-K reduction", r"_reduce_kernel|splitk"),
    ("fused layer (ours)", r"add_rms_norm|qk_norm_rope_kv|silu_mul|add_product"),
    ("our products (Triton)", r"_swap_kernel|_skinny_kernel|_tile_kernel|_atomic_gemv|_gemv_kernel|_dequant"),
    ("our products (CUDA)", r"^(w4|fp8)_mma$"),  # kernels/w4_mma.py, kernels/fp8_mma.py
    ("attention", r"attn|attention|flash|split_kv|combine_splits|_decode_kernel"),
    ("cuBLAS / GEMM", r"gemm|gemv|cublas|cutlass|nvjet|xmma|sm90_"),
    ("inductor fused", r"^triton_"),
    ("copy / fill", r"memcpy|memset|copy|fill|Memcpy|Memset"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def parse_args(argv: list[str] | None = None) -> Any:
    ap = common.model_args(__doc__)
    ap.add_argument("--streams", type=int, default=1, help="streams decoding together (default 1)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps in the recorded window (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=32, help="engine slots: the buckets the app has (default 32)")
    ap.add_argument("--slot-tokens", type=int, default=1280)
    ap.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    ap.add_argument("--cache-dir", default="/tmp/qwen3vl-cache/inductor", help="inductor cache (the matrix's default)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="the engine's torch.compile (off: the eager step in CUDA graphs, as served before the compile)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    args = parse_args(argv)
    loaded = common.load(args.model, args.precision, args.device)
    report: dict[str, Any] = dict(**common.environment(args.device), model=args.model, precision=args.precision,
                                  streams=args.streams, steps=args.steps)  # fmt: skip
    engine, report["engine_startup"] = common.start_engine(
        loaded,
        max_batch=args.max_batch,
        token_budget=args.max_batch * args.slot_tokens,
        compile_cache_dir=args.cache_dir,
        compile={"auto": None, "on": True, "off": False}[args.compile],
    )
    vocab = common.ordinary_vocab(loaded)
    warm, window = 16, args.steps
    total = warm + window + 16
    try:
        prompts = common.make_prompts(args.streams, args.prompt_tokens, vocab, seed=3)
        common.run_engine(engine, prompts, 8)  # warm: every path these streams take has run once
        counts = [0] * args.streams
        started, ended = threading.Event(), threading.Event()
        marks: dict[str, float] = {}

        def read(i: int, stream: Any) -> None:
            for _ in stream:
                counts[i] += 1
                if i == 0 and counts[0] == warm:
                    started.set()
                if i == 0 and counts[0] == warm + window:
                    ended.set()

        streams = [engine.submit_tokens(p, common.greedy(total), threading.Event()) for p in prompts]
        threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        started.wait(120)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        steps0 = engine.snapshot().steps
        with profile(activities=activities) as prof:
            marks["start"] = time.perf_counter()
            ended.wait(120)
            common.sync(args.device)
            marks["end"] = time.perf_counter()
        steps = engine.snapshot().steps - steps0
        for t in threads:
            t.join()
    finally:
        engine.close()
    wall_ms = (marks["end"] - marks["start"]) * 1e3
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us <= 0 or event.key.startswith(("cudaGraphLaunch", "cudaLaunch", "ProfilerStep")):
            continue
        kernels.append(dict(name=event.key, kind=kind_of(event.key), us_per_step=device_us / max(steps, 1),
                            launches_per_step=event.count / max(steps, 1)))  # fmt: skip
    kernels.sort(key=lambda k: -k["us_per_step"])
    kinds: dict[str, dict[str, float]] = {}
    for k in kernels:
        row = kinds.setdefault(k["kind"], dict(us_per_step=0.0, launches_per_step=0.0))
        row["us_per_step"] += k["us_per_step"]
        row["launches_per_step"] += k["launches_per_step"]
    busy = sum(k["us_per_step"] for k in kernels)
    step_us = wall_ms * 1e3 / max(steps, 1)
    report.update(
        recorded_steps=steps, wall_ms=round(wall_ms, 2), step_us=round(step_us, 1), gpu_busy_us_per_step=round(busy, 1),
        gpu_busy_share=round(busy / step_us, 3) if step_us else None,
        launches_per_step=round(sum(k["launches_per_step"] for k in kernels), 1),
        kinds={k: {n: round(v, 2) for n, v in row.items()} for k, row in sorted(kinds.items(), key=lambda kv: -kv[1]["us_per_step"])},
        kernels=[{**k, "us_per_step": round(k["us_per_step"], 2), "launches_per_step": round(k["launches_per_step"], 2)}
                 for k in kernels[: args.top]],
    )  # fmt: skip
    common.write_json(args.out, report)
    print(f"{args.precision}, {args.streams} stream(s): {steps} steps recorded, {step_us:.0f} us a step, GPU busy "
          f"{busy:.0f} us ({report['gpu_busy_share']}), {report['launches_per_step']} kernels a step")  # fmt: skip
    print(f"{'kind':<20} {'us/step':>9} {'kernels/step':>13}")
    for kind, row in report["kinds"].items():
        print(f"{kind:<20} {row['us_per_step']:>9.1f} {row['launches_per_step']:>13.1f}")
    for k in report["kernels"]:
        print(f"  {k['us_per_step']:>8.1f} us {k['launches_per_step']:>6.1f}x  {k['kind']:<18} {k['name'][:90]}")
    del torch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
