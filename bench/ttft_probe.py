"""Time to first token of the 1280x720 image prompt, idle engine, several samples: decode Linears fused + GEMV vs not.

    python bench/ttft_probe.py --out $OUT/ttft_probe.json     # GPU, random 4B at /tmp/qwen3vl-4b-random

Why: the matrix after fuse+GEMV became the default read 0.070 s idle against 0.048 s before, from one sample each
(`engine_ttft` times the second of two submissions of the same prompt, which may hit the prefix kept from the first).
Here each variant gets 5 samples with the prefix pool cleared before each (whole prefill, vision tower included)
and 5 with the kept prefix (what a repeated prompt gets), next to plain `generate`'s TTFT.

`--under-load --under-load-variants under_load,eager_prefill`: the 32-slot engine idle and while 31 streams decode,
with the first-chunk prefill graphs (the default) and without them, `generate` sampled before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import (  # noqa: E402
    _free,
    _greedy,
    first_token_s,
    forget_prefixes,
    generate_ttft,
    make_image_prompt,
    start_engine,
)

STAGES = ("_admit", "_encode_media", "_prompt_positions", "_prefill_chunk", "_activate", "_emit")
# Where each stage lives in the engine's pieces (engine/batch/): (piece, method); "_admit" is the prefix match.
STAGE_METHODS = {
    "_admit": ("kv", "reuse_prefix"), "_encode_media": ("runner", "_encode_media"),
    "_prompt_positions": ("runner", "_prompt_positions"), "_prefill_chunk": ("runner", "_prefill_chunk"),
    "_activate": ("core", "_activate"), "_emit": ("core", "_emit"), "_next_work": ("scheduler", "admit"),
}  # fmt: skip


def stage_timeline(engine: Any, prompt: Any, sync: bool, forget: bool = True) -> list[tuple[str, float, float]]:
    """(stage, start ms, end ms) after submit, for one cold prompt: the engine's prefill methods wrapped in place.

    `sync`: each stage ends with torch.cuda.synchronize(), so its span includes its GPU work.
    """
    import torch

    events: list[tuple[str, float, float]] = []
    started = 0.0

    def target(name: str) -> Any:
        piece, method = STAGE_METHODS[name]
        return (engine.core if piece == "core" else getattr(engine.core, piece)), method

    def wrap(name: str) -> None:
        obj, method = target(name)
        real = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if sync:
                    torch.cuda.synchronize()
                events.append((name, round(1e3 * (t0 - started), 2), round(1e3 * (time.perf_counter() - started), 2)))

        setattr(obj, method, timed)

    from qwen3vl_webui.engine import prefix

    real_find = prefix.find_media

    def stamp(name: str, t0: float | None = None) -> None:
        now = round(1e3 * (time.perf_counter() - started), 2)
        events.append((name, round(1e3 * (t0 - started), 2), now) if t0 is not None else (name, now, 0.0))

    def find_media(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            media = real_find(*args)
            for m in media:
                m.hashing.add_done_callback(lambda _f: stamp("digest ready"))
            return media
        finally:
            stamp("find_media", t0)

    pool = engine.core.kv.pool
    real_match = pool.match

    def match(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_match(*args)
        finally:
            stamp("pool.match", t0)

    pool.match = match

    for name in (*STAGES, "_next_work"):
        wrap(name)
    prefix.find_media = find_media
    try:
        if forget:
            forget_prefixes(engine)
        started = time.perf_counter()
        stream = engine.submit_tokens(prompt, _greedy(4), threading.Event())
        events.append(("submit returned", round(1e3 * (time.perf_counter() - started), 2), 0.0))
        next(stream)
        events.append(("first token read", round(1e3 * (time.perf_counter() - started), 2), 0.0))
        list(stream)
    finally:
        del pool.match
        prefix.find_media = real_find
        for name in (*STAGES, "_next_work"):
            delattr(*target(name))
    return [e for e in events if e[0] != "_next_work" or e[2] > 0]


def generate_timeline(loaded: Any, prompt: Any) -> list[tuple[str, float, float]]:
    """The same for plain `stream_generate`: the vision tower's and the text model's forwards, synchronized."""
    import torch

    from qwen3vl_webui.engine.generation import SamplingParams, stream_generate

    events: list[tuple[str, float, float]] = []
    t: dict[str, float] = {}
    started = 0.0
    model = loaded.model.model
    hooks = []
    for name, module in (("visual", model.visual), ("language_model", model.language_model)):
        hooks.append(module.register_forward_pre_hook(lambda *_a, name=name: t.__setitem__(name, time.perf_counter())))

        def post(*_a: Any, name: str = name) -> None:
            torch.cuda.synchronize()
            if len(events) < 4:
                events.append(
                    (name, round(1e3 * (t[name] - started), 2), round(1e3 * (time.perf_counter() - started), 2))
                )

        hooks.append(module.register_forward_hook(post))
    try:
        sampling = SamplingParams(max_new_tokens=2, temperature=0.0, repetition_penalty=1.0)
        started = time.perf_counter()
        *_, (_text, stats) = stream_generate(loaded, prompt, sampling, threading.Event())
        events.append(("ttft", round(1e3 * stats.ttft_s, 2), 0.0))
    finally:
        for h in hooks:
            h.remove()
    return events


def profiled(fn: Any, label: str) -> dict[str, Any]:
    """torch.profiler (CPU + CUDA) around `fn`: wall, GPU busy time (kernels' union), top ops by CPU and GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, 0.0
    for a, b in kernels:
        if b > end:
            busy += b - max(a, end)
            end = b
    averages = prof.key_averages()
    by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=18)
    by_gpu = averages.table(sort_by="self_device_time_total", row_limit=18)
    print(f"--- {label}: wall {wall * 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, {len(kernels)} kernels")
    print(by_cpu)
    print(by_gpu)
    return dict(
        wall_ms=round(wall * 1e3, 2),
        gpu_busy_ms=round(busy / 1e3, 2),
        kernels=len(kernels),
        by_cpu=by_cpu,
        by_gpu=by_gpu,
    )


def sync_sites(fn: Any) -> list[tuple[str, int]]:
    """Where `fn` makes the host wait for the GPU: torch's sync debug mode, each warning's innermost frame in
    transformers or this project, counted."""
    import collections
    import traceback
    import warnings

    import torch

    sites: collections.Counter[str] = collections.Counter()
    real = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if ("transformers" in f.filename or "qwen3vl_webui" in f.filename)]
        frame = ours[-1] if ours else stack[-1]
        sites[f"{Path(frame.filename).name}:{frame.lineno} {frame.name}: {str(message)[:60]}"] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = real
    return sites.most_common(40)


def under_load(loaded: Any, report: dict[str, Any], label: str = "under_load", **flags: Any) -> None:
    """The default engine (32 slots): image TTFTs idle and while 31 text streams decode, 5 distinct images each."""
    from engine_bench import arrivals_while_decoding, engine_ttft, make_prompts

    engine, info = start_engine(
        loaded, max_batch=32, token_budget=32 * 1280, compile_cache_dir="/tmp/qwen3vl-inductor", **flags
    )
    try:
        vocab = len(loaded.processor.tokenizer) - 32
        images = [make_image_prompt(loaded, 16, seed=s) for s in range(1, 7)]
        engine_ttft(engine, images[0])  # warm-up of the shapes
        idle = [engine_ttft(engine, img) for img in images[1:]]
        loaded_runs = [
            arrivals_while_decoding(engine, make_prompts(31, 512, vocab, seed=50 + i), 300, [img], [16])
            for i, img in enumerate(images[1:])
        ]
        ttfts = [r["ttft_s"][0] for r in loaded_runs]
        report[label] = dict(
            startup_s=info["startup_s"], prefill_path=info["prefill_path"], prefill_warmup_s=info["prefill_warmup_s"],
            idle_ttft_s=idle, idle_median_s=statistics.median(idle),
            while_31_decode_ttft_s=ttfts, while_31_decode_median_s=statistics.median(ttfts),
            max_gap_during_s=[r["max_gap_during_s"] for r in loaded_runs],
            median_gap_before_s=[r["median_gap_before_s"] for r in loaded_runs],
        )  # fmt: skip
        print(label, json.dumps(report[label]), flush=True)
    finally:
        engine.close()
        _free(engine)


def vision_check(loaded: Any, prompt: Any) -> dict[str, Any]:
    """The vision tower as shipped (SDPA, GPU-side grid inputs) against engine/vision.py's route: features and time."""
    import torch

    from qwen3vl_webui.engine import vision

    model = loaded.model.model
    grid, pixels = prompt.inputs["image_grid_thw"], prompt.inputs["pixel_values"].cuda()

    def shipped() -> Any:
        return model.get_image_features(pixels, grid.cuda(), return_dict=True)

    def packed() -> Any:
        return model.get_image_features(
            pixels, grid, return_dict=True, **vision.vision_kwargs(model.visual, grid, "cuda")
        )

    def timed(fn: Any) -> tuple[Any, float]:
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return out, round(1e3 * statistics.median(times[1:]), 2)

    with torch.inference_mode():
        ref, ref_ms = timed(shipped)
        restore = vision.use_packed_vision_attention(model.visual)
        routed = model.visual.config._attn_implementation
        try:
            out, out_ms = timed(packed)
        finally:
            restore()
    a, b = torch.cat(ref.pooler_output).float(), torch.cat(out.pooler_output).float()
    result = dict(
        routed=routed, shipped_ms=ref_ms, packed_ms=out_ms, rel_diff=float((a - b).norm() / a.norm()),
        max_abs_diff=float((a - b).abs().max()), feature_std=float(a.std()),
    )  # fmt: skip
    print("vision", json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--out", default="ttft_probe.json")
    ap.add_argument("--variants", default="fuse_gemv,plain")
    ap.add_argument("--timeline", action="store_true", help="per-stage timelines (engine and generate)")
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler tables of one cold TTFT, engine and generate"
    )
    ap.add_argument("--diagnose", action="store_true", help="sync sites; timelines without hashing, short GIL switch")
    ap.add_argument("--under-load", action="store_true", help="32-slot engine: idle and while 31 streams decode")
    ap.add_argument("--generate-samples", type=int, default=3, help="plain generate TTFT samples (median reported)")
    ap.add_argument(
        "--under-load-variants", default="under_load", help="with --under-load: under_load (default engine), eager_prefill (no prefill graphs)"
    )
    args = ap.parse_args()
    from qwen3vl_webui.engine.loading import load_model

    if not (Path(args.checkpoint) / "config.json").exists():
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    loaded = load_model(args.checkpoint, "bf16", "cuda")
    loaded.model.generation_config.eos_token_id = None
    prompt = make_image_prompt(loaded, 4)
    report: dict[str, Any] = dict(image_tokens=prompt.tokens)
    report["vision"] = vision_check(loaded, prompt)
    report["generate_ttft_s"] = [generate_ttft(loaded, prompt) for _ in range(args.generate_samples)]
    print("generate", report["generate_ttft_s"], statistics.median(report["generate_ttft_s"]), flush=True)
    if args.diagnose:
        report["sync_sites_generate"] = sync_sites(lambda: generate_ttft(loaded, prompt))
        print("sync sites generate (4 runs)", json.dumps(report["sync_sites_generate"], indent=0), flush=True)
    if args.profile:
        report["generate_profile"] = profiled(lambda: generate_ttft(loaded, prompt), "generate (4 runs)")
    if args.timeline:
        report["generate_timeline"] = [generate_timeline(loaded, prompt) for _ in range(3)][1:]
        print("generate timeline", json.dumps(report["generate_timeline"]), flush=True)
    known = dict(fuse_gemv={}, plain=dict(fuse=False, gemv=False), eager_prefill=dict(prefill_graphs=False), under_load={})
    if args.under_load:
        for label in [v for v in args.under_load_variants.split(",") if v]:
            under_load(loaded, report, label, **known[label])
            Path(args.out).write_text(json.dumps(report, indent=1))
        # generate again once the engines are closed (their fused projections undone): the host may drift
        report["generate_ttft_after_s"] = [generate_ttft(loaded, prompt) for _ in range(args.generate_samples)]
        print("generate after", report["generate_ttft_after_s"], statistics.median(report["generate_ttft_after_s"]))
    for label in [v for v in args.variants.split(",") if v]:
        flags = known[label]
        engine, info = start_engine(
            loaded, max_batch=1, token_budget=2048, buckets=(1,), compile_cache_dir="/tmp/qwen3vl-inductor", **flags
        )
        try:

            def ttft(clear: bool, engine=engine) -> float:
                if clear:
                    forget_prefixes(engine)
                return round(first_token_s(engine, prompt), 4)

            for _ in range(2):
                ttft(True)  # warm-up: this prompt's shapes
            if args.timeline:
                report[f"{label}_timeline_reuse"] = [
                    stage_timeline(engine, prompt, False, forget=False) for _ in range(3)
                ]
                print(label, "timeline reuse", json.dumps(report[f"{label}_timeline_reuse"][-1]), flush=True)
                for sync in (False, True):
                    lines = [stage_timeline(engine, prompt, sync) for _ in range(2)]
                    report[f"{label}_timeline_sync_{sync}"] = lines
                    print(label, "timeline sync", sync, json.dumps(lines[-1]), flush=True)
            if args.diagnose:
                import sys as _sys

                from qwen3vl_webui.engine.prefix import PrefixPool

                report["sync_sites_engine"] = sync_sites(lambda: ttft(True))
                print("sync sites engine", json.dumps(report["sync_sites_engine"], indent=0), flush=True)
                pool = engine.core.kv.pool
                engine.core.kv.pool = PrefixPool(())  # falsy: no media hashing, no reuse
                report["timeline_no_pool"] = [stage_timeline(engine, prompt, False) for _ in range(3)][1:]
                print("timeline no pool", json.dumps(report["timeline_no_pool"]), flush=True)
                engine.core.kv.pool = pool
                interval = _sys.getswitchinterval()
                _sys.setswitchinterval(0.0002)
                report["timeline_switch_0.2ms"] = [stage_timeline(engine, prompt, False) for _ in range(3)][1:]
                print("timeline switch 0.2 ms", json.dumps(report["timeline_switch_0.2ms"]), flush=True)
                _sys.setswitchinterval(interval)
            if args.profile:
                report[f"{label}_profile"] = profiled(lambda: ttft(True), f"engine {label}")
            before = engine.snapshot()
            cold = [ttft(True) for _ in range(5)]
            warm = [ttft(False) for _ in range(5)]
            after = engine.snapshot()
            report[label] = dict(
                cold_s=cold, cold_median_s=statistics.median(cold), reuse_s=warm, reuse_median_s=statistics.median(warm),
                prefix_hits=after.prefix_hits - before.prefix_hits, startup_s=info["startup_s"],
            )  # fmt: skip
            print(label, json.dumps(report[label]), flush=True)
        finally:
            engine.close()
            _free(engine)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
