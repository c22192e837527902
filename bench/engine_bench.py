"""Plain `generate` against BatchEngine in ONE run on the real 4B architecture with random weights.

bf16 at 1, 8 and 32 concurrent streams (512-token prompts, 256 new tokens; the engine compiled + CUDA
graphs), a 1280x720 image prompt's TTFT alone and while 31 streams decode, the stall a 1280x720 image
prompt and a 4k-token prompt cause in a running stream, a kernel profile of the decode step, the
engine's start-up with a cold and a warm inductor cache, then nf4 (and int8 if time is left) at 1 stream.
Sections run in priority order and each is skipped when `--deadline-s` would be passed; the JSON is
rewritten after every section, so a run stopped early still returns what it measured.

    python bench/engine_bench.py --write --out $OUT/engine_bench.json          # on the GPU (~5.5 min on an H100)
    python bench/engine_bench.py --preset tiny --device cpu --precision fp32 \
        --prompt-tokens 64 --new-tokens 16 --streams 1,4 --write --sections generate,engine  # smoke, CPU

eos is disabled (random weights would stop at random places) so every stream decodes the same length.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[Any]:
    """Text prompts of `length` random ordinary-token ids, wrapped as the engine's PreparedPrompt."""
    import torch

    from qwen3vl_webui.engine.generation import PreparedPrompt

    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32),
        }
        prompts.append(PreparedPrompt(inputs, length, length, 0, 0, 0))
    return prompts


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 2) if device.startswith("cuda") else None


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy rate in GB/s (bytes read + written), the ceiling for weight streaming."""
    import torch

    if not device.startswith("cuda"):
        return None
    src = torch.randn(256 * 1024**2, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    return round(2 * 4 * 256 * 1024**2 / seconds / 1e9, 1)


def run_generate(loaded: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """Plain transformers: stream_generate (the app's path) for one stream, batched generate for more."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from qwen3vl_webui.engine.generation import SamplingParams, stream_generate

    device = loaded.device
    n = len(prompts)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    _reset_peak(device)
    if n == 1:
        started = time.perf_counter()
        *_, (_text, stats) = stream_generate(loaded, prompts[0], sampling, threading.Event())
        wall = time.perf_counter() - started
        return dict(
            streams=1, new_tokens=stats.new_tokens, wall_s=wall, ttft_p50_s=stats.ttft_s, ttft_p95_s=stats.ttft_s,
            per_stream_tok_s=stats.tokens_per_s, total_tok_s=stats.new_tokens / wall, peak_gib=_peak_gib(device),
        )  # fmt: skip

    class _Times(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    inputs = {k: torch.cat([p.inputs[k] for p in prompts]).to(device) for k in prompts[0].inputs}
    streamer = _Times()
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, do_sample=False, max_new_tokens=new_tokens, repetition_penalty=1.0,
            temperature=None, top_p=None, top_k=None, streamer=streamer,
        )  # fmt: skip
    _sync(device)
    wall = time.perf_counter() - started
    made = out.shape[1] - inputs["input_ids"].shape[1]
    first, last = streamer.times[0], streamer.times[-1]
    return dict(
        streams=n, new_tokens=made, wall_s=wall, ttft_p50_s=first - started, ttft_p95_s=first - started,
        per_stream_tok_s=(made - 1) / (last - first), total_tok_s=n * made / wall, peak_gib=_peak_gib(device),
    )  # fmt: skip


def run_engine(engine: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """All streams submitted at once, each read by its own thread through `submit` (text, like the UI)."""
    from qwen3vl_webui.engine.generation import SamplingParams

    device = engine.loaded.device
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    _reset_peak(device)
    results: list[Any] = [None] * len(prompts)
    errors: list[BaseException] = []
    steps0 = engine.snapshot().steps
    started = time.perf_counter()
    streams = [engine.submit(p, sampling, threading.Event()) for p in prompts]

    def read(i: int) -> None:
        try:
            for _text, stats in streams[i]:
                results[i] = stats
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    ttfts = sorted(s.ttft_s for s in results)
    made = sum(s.new_tokens for s in results)
    return dict(
        streams=len(prompts), new_tokens=results[0].new_tokens, wall_s=wall,
        ttft_p50_s=statistics.median(ttfts), ttft_p95_s=ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        per_stream_tok_s=statistics.median(s.tokens_per_s for s in results), total_tok_s=made / wall,
        peak_gib=_peak_gib(device), steps=engine.snapshot().steps - steps0,
        # Decode-only rate: all streams decode together once the last prefill is done.
        decode_tok_s=len(prompts) * (new_tokens - 1) / (max(s.ttft_s + s.decode_s for s in results) - ttfts[-1]),
    )  # fmt: skip


def greedy_check(loaded: Any, engine: Any, prompt: Any, tokens: int) -> dict[str, Any]:
    """First `tokens` greedy tokens of the engine against plain generate on the same prompt.

    Where they part, the gap between generate's own logits for its token and for the engine's token
    says whether it is a near-tie (rounding of a different kernel) or a real difference.
    """
    import torch

    from qwen3vl_webui.engine.generation import SamplingParams

    inputs = {k: v.to(loaded.device) for k, v in prompt.inputs.items()}
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, do_sample=False, max_new_tokens=tokens, temperature=None, top_p=None, top_k=None,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    ref = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    sampling = SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
    got = list(engine.submit_tokens(prompt, sampling, threading.Event()))
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    result: dict[str, Any] = dict(tokens=tokens, equal_prefix=same, identical=ref == got, engine_tokens=got)
    if same < min(len(ref), len(got)):
        logits = out.logits[same][0].float()
        top2 = logits.topk(2).values
        result.update(
            gap_ref_vs_engine_token=round(float(logits[ref[same]] - logits[got[same]]), 5),
            gap_top1_top2=round(float(top2[0] - top2[1]), 5),
            logits_std=round(float(logits.std()), 5),
            engine_token_rank=int((logits > logits[got[same]]).sum()),
        )
    return result


def run_checks(args: Any) -> None:
    """Correctness on the device only: bf16 graphs vs eager vs generate, then the same model in fp32."""
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.loading import load_model

    report: dict[str, Any] = {}
    for precision in args.check_precisions.split(","):
        loaded = load_model(args.checkpoint, precision, args.device)
        loaded.model.generation_config.eos_token_id = None
        vocab = len(loaded.processor.tokenizer) - 32
        prompts = make_prompts(2, args.prompt_tokens, vocab, seed=1)
        variants = {"compiled": dict(compile=True, compile_cache_dir=args.cache_dir), "graphs": dict(compile=False),
                    "eager": dict(compile=False, cuda_graphs=False)}  # fmt: skip
        for name, kw in variants.items():
            label = f"{precision}_{name}"
            with BatchEngine(loaded, BatchOptions(max_batch=8, token_budget=8 * 1024, buckets=(1, 8), **kw)) as engine:
                report[label] = [greedy_check(loaded, engine, p, args.check_tokens) for p in prompts]
                report[f"{label}_path"] = engine.decode_path
            for r in report[label]:
                print(label, engine.decode_path, json.dumps({k: v for k, v in r.items() if k != "engine_tokens"}), flush=True)  # fmt: skip
        for name in ("compiled", "graphs"):
            pairs = zip(report[f"{precision}_{name}"], report[f"{precision}_eager"])
            report[f"{precision}_{name}_equal_eager"] = same = [
                a["engine_tokens"] == b["engine_tokens"] for a, b in pairs
            ]
            print(precision, f"{name} tokens == eager engine tokens:", same, flush=True)
        del loaded
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


def image_path(seed: int = 0) -> Path:
    """Where `make_image_prompt` writes its PNG for `seed`."""
    return Path(f"/tmp/bench_720p_{seed}.png")


def make_image_prompt(loaded: Any, new_tokens: int, seed: int = 0) -> Any:
    """A 1280x720 photo-like PNG (smooth gradients + noise; `seed` picks the noise) through the app's `build_prompt`."""
    import numpy as np
    from PIL import Image

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.generation import ChatRequest, SamplingParams, build_prompt

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:720, 0:1280]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 32, (720, 1280, 3))
    path = image_path(seed)
    Image.fromarray(img.clip(0, 255).astype("uint8")).save(path)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    return build_prompt(
        loaded, ChatRequest(UserMessage("Describe this image in detail.", (str(path),)), sampling=sampling)
    )


def generate_ttft(loaded: Any, prompt: Any) -> float:
    """TTFT of plain `stream_generate` for one prompt: median of 3 after a warm-up run (the vision path's shapes)."""
    from qwen3vl_webui.engine.generation import SamplingParams, stream_generate

    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=1.0)
    ttfts = []
    for _ in range(4):
        *_, (_text, stats) = stream_generate(loaded, prompt, sampling, threading.Event())
        ttfts.append(stats.ttft_s)
    return round(statistics.median(ttfts[1:]), 4)


def _greedy(tokens: int) -> Any:
    from qwen3vl_webui.engine.generation import SamplingParams

    return SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


def forget_prefixes(engine: Any) -> None:
    """Drops the engine's retained prefixes (call it while the engine is idle): the next prompts prefill whole."""
    engine.forget_prefixes()


def graph_ms(fn: Any) -> float:
    """Median ms of one replay of `fn`'s launches captured in a CUDA graph (10 replays per sample, 5 samples)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    del graph
    return sorted(times)[2]


def first_token_s(engine: Any, prompt: Any, new_tokens: int = 4) -> float:
    """Submit-to-first-token of one greedy request on `engine` (the rest of the answer is read, untimed)."""
    started = time.perf_counter()
    stream = engine.submit_tokens(prompt, _greedy(new_tokens), threading.Event())
    next(stream)
    took = time.perf_counter() - started
    list(stream)
    return took


def engine_ttft(engine: Any, prompt: Any) -> float:
    """Submit-to-first-token of one prompt prefilled whole on an idle engine: median of 3 after a warm-up run.

    Retained prefixes are dropped before each run; otherwise every run after the first reuses the first's KV.
    """
    ttfts = []
    for _ in range(4):
        forget_prefixes(engine)
        ttfts.append(first_token_s(engine, prompt))
    return round(statistics.median(ttfts[1:]), 4)


def _gaps(times: list[float], lo: float, hi: float) -> list[float]:
    """Inter-token gaps of one stream that overlap [lo, hi] (the gap spanning the last prefill ends after hi)."""
    return [b - a for a, b in zip(times, times[1:]) if b > lo and a < hi]


def arrivals_while_decoding(
    engine: Any, running: list[Any], running_tokens: int, arriving: list[Any], arriving_tokens: list[int]
) -> dict[str, Any]:
    """Starts `running` streams, waits until all decode, then submits `arriving` prompts at once.

    Returns each arrival's TTFT (submit to first token) and the running streams' inter-token gaps while the
    arrivals were prefilled (the stall they cause), next to the gaps before they came (the plain step).
    Retained prefixes are dropped first: the arrivals are prefilled whole.
    """
    forget_prefixes(engine)
    times: list[list[float]] = [[] for _ in running]
    streams = [engine.submit_tokens(p, _greedy(running_tokens), threading.Event()) for p in running]

    def read(i: int) -> None:
        for _ in streams[i]:
            times[i].append(time.perf_counter())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(running))]
    for t in threads:
        t.start()
    while min(len(t) for t in times) < 12:
        time.sleep(0.002)
    submitted = time.perf_counter()
    new = [engine.submit_tokens(p, _greedy(n), threading.Event()) for p, n in zip(arriving, arriving_tokens)]
    firsts: list[float] = [0.0] * len(new)

    def first(i: int) -> None:
        next(new[i])
        firsts[i] = time.perf_counter()
        list(new[i])

    waiters = [threading.Thread(target=first, args=(i,)) for i in range(len(new))]
    for t in waiters:
        t.start()
    for t in [*waiters, *threads]:
        t.join()
    done = max(firsts)
    during = [g for t in times for g in _gaps(t, submitted, done)]
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b <= submitted]
    return dict(
        running=len(running), arrivals=[int(p.inputs["input_ids"].shape[1]) for p in arriving],
        ttft_s=[round(f - submitted, 4) for f in firsts],
        max_gap_during_s=round(max(during), 4) if during else None,
        gaps_during=len(during), largest_gaps_during_s=[round(g, 4) for g in sorted(during, reverse=True)[:6]],
        median_gap_before_s=round(statistics.median(before), 4),
        max_gap_before_s=round(max(before), 4),
    )  # fmt: skip


def profile_decode(engine: Any, rows_list: tuple[int, ...], kv_len: int) -> dict[str, Any]:
    """GPU time of one decode step: graph replay (events), and its kernels by kind (torch.profiler, CUPTI).

    Rows sit at position `kv_len` so attention reads as many keys as in the benchmark. The worker is idle,
    so these replays from this thread race with nothing.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    result: dict[str, Any] = {}
    for rows in rows_list:
        graph = engine.core.graphs.graph(rows)
        if graph is None:
            continue
        engine.core.kv.place_rows(rows, kv_len)
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 50
        steps = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
        kinds, kernels = _kernel_kinds(prof)
        source = "graph replay"
        if not kinds:  # CUPTI showed no kernels inside the graph: the same step, launched op by op
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    engine.core.graphs.step(rows)
                torch.cuda.synchronize()
            kinds, kernels = _kernel_kinds(prof)
            source = "compiled step launched op by op"
        engine.core.kv.place_rows(rows, 0)
        total_us = sum(sum(v) for v in kinds.values()) / steps
        result[str(rows)] = dict(
            replay_ms=round(replay_ms, 3), kernel_sum_ms=round(total_us / 1e3, 3),
            kernels_per_step=sum(len(v) for v in kinds.values()) // steps,
            by_kind_ms={k: round(sum(v) / steps / 1e3, 3) for k, v in sorted(kinds.items())},
            count_by_kind={k: len(v) // steps for k, v in sorted(kinds.items())},
            top=[(n[:90], round(t / steps, 1)) for n, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]],
            source=source,
        )  # fmt: skip
    return result


def _kernel_kinds(prof: Any) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Kernel times (us) from a torch.profiler run, by kind and by name."""
    import torch

    kinds: dict[str, list[float]] = {}
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        low = ev.name.lower()
        kind = (
            "attention" if any(k in low for k in ("fmha", "attention", "flash", "efficient")) else
            "gemm" if any(k in low for k in ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas", "splitk")) else
            "triton (fused)" if low.startswith("triton") else
            "memcpy/memset" if "memcpy" in low or "memset" in low else "other"
        )  # fmt: skip
        kinds.setdefault(kind, []).append(us)
        kernels[ev.name] = kernels.get(ev.name, 0.0) + us
    return kinds, kernels


def start_engine(loaded: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """A BatchEngine and its start-up figures (wall time, per-bucket warm-up incl. compile, decode path)."""
    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions

    _reset_peak(loaded.device)
    started = time.perf_counter()
    engine = BatchEngine(loaded, BatchOptions(**kwargs))
    info = dict(
        startup_s=round(time.perf_counter() - started, 2), warmup_s=engine.warmup_s,
        decode_path=engine.decode_path, compile_error=engine.compile_error, graph_error=engine.graph_error,
        buckets=list(engine.buckets), max_len=engine.max_len, startup_peak_gib=_peak_gib(loaded.device),
        fused_groups=engine.fused_groups, gemv_linears=engine.gemv_linears, prefill_path=engine.prefill_path,
        prefill_warmup_s=engine.prefill_warmup_s,
        vision_attention=loaded.model.model.visual.config._attn_implementation,
    )  # fmt: skip
    print("engine", {k: v for k, v in kwargs.items()}, json.dumps(info), flush=True)
    return engine, info


def _free(*objs: Any) -> None:
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_int8_threshold0(checkpoint: str) -> Any:
    """INT8 with llm_int8_threshold=0.0 (no fp16 outlier path, so the step can be captured): a bench-only load."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from qwen3vl_webui.engine.loading import SKIP_QUANTIZATION, LoadedModel

    started = time.perf_counter()
    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=SKIP_QUANTIZATION)
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, quantization_config=cfg, dtype=torch.float16, device_map="cuda", attn_implementation="sdpa"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return LoadedModel(
        model, processor, "int8", "cuda", checkpoint, time.perf_counter() - started, model.get_memory_footprint(), True
    )


def one_stream(loaded: Any, engine_kwargs: dict[str, Any], prompt: Any, new_tokens: int) -> dict[str, Any]:
    engine, info = start_engine(loaded, **engine_kwargs)
    try:
        run_engine(engine, [prompt], 8)  # warm-up
        row = run_engine(engine, [prompt], new_tokens)
    finally:
        engine.close()
        _free(engine)
    print("engine 1-stream", json.dumps(row), flush=True)
    return dict(startup=info, run=row)


def startup_only(args: Any) -> None:
    """Child process of the warm-cache measurement: load, start the engine as the parent did, one short run."""
    from qwen3vl_webui.engine.loading import load_model

    started = time.perf_counter()
    loaded = load_model(args.checkpoint, args.precision, args.device)
    loaded.model.generation_config.eos_token_id = None
    load_s = time.perf_counter() - started
    engine, info = start_engine(loaded, **json.loads(args.startup_only))
    vocab = len(loaded.processor.tokenizer) - 32
    row = run_engine(engine, make_prompts(1, args.prompt_tokens, vocab), 64)
    engine.close()
    print("STARTUP_JSON " + json.dumps(dict(load_s=round(load_s, 2), **info, check_run_tok_s=row["per_stream_tok_s"])))


def common_args(doc: str, generate_new_tokens: int, slot_tokens: int) -> argparse.ArgumentParser:
    """The arguments engine_bench.py and matrix.py share: checkpoint, device, precision, the workload."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--write", action="store_true", help="write the random checkpoint first")
    ap.add_argument("--preset", default="4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument(
        "--generate-new-tokens", type=int, default=generate_new_tokens, help="plain generate's rate is flat in length"
    )
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--slot-tokens", type=int, default=slot_tokens, help="KV tokens per engine slot")
    return ap


def main() -> None:
    ap = common_args(__doc__, generate_new_tokens=128, slot_tokens=1024)
    ap.add_argument("--cache-dir", default="/tmp/qwen3vl-inductor", help="inductor cache (cold on a fresh machine)")
    ap.add_argument("--deadline-s", type=float, default=400.0, help="skip sections that would end past this")
    ap.add_argument(
        "--sections",
        default="generate,engine,warm,stall,nf4,nf4_compile,int8",
        help="comma list, run in this order while time is left",
    )
    ap.add_argument("--out", default="engine_bench.json")
    ap.add_argument("--checks-only", action="store_true", help="only the greedy checks, in --check-precisions")
    ap.add_argument("--check-precisions", default="bf16,fp32")
    ap.add_argument("--startup-only", default="", help=argparse.SUPPRESS)  # JSON engine kwargs (child process)
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch

    from qwen3vl_webui.engine.loading import load_model

    if args.startup_only:
        startup_only(args)
        return
    if args.write:
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        t = time.perf_counter()
        dtype = "bfloat16" if args.preset == "4b" else None
        write_checkpoint(args.checkpoint, preset=args.preset, dtype=dtype, device=args.device)
        print(f"wrote the random {args.preset} checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
    if args.checks_only:
        run_checks(args)
        return
    sections = args.sections.split(",")
    device = args.device
    on_cuda = device.startswith("cuda")
    loaded = load_model(args.checkpoint, args.precision, device)
    loaded.model.generation_config.eos_token_id = None  # equal lengths; random weights stop anywhere
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        precision=args.precision, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        generate_new_tokens=args.generate_new_tokens, slot_tokens=args.slot_tokens,
        weights_gib=round(loaded.weights_bytes / GIB, 2), copy_gb_s=copy_bandwidth(device), skipped=[],
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    streams = [int(s) for s in args.streams.split(",")]
    vocab = len(loaded.processor.tokenizer) - 32  # ordinary tokens only (the specials sit at the end)
    prompts = make_prompts(max(streams), args.prompt_tokens, vocab)
    image = make_image_prompt(loaded, 64)
    report["image_prompt_tokens"] = image.tokens

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    def time_left(section: str, need_s: float) -> bool:
        left = args.deadline_s - (time.perf_counter() - t0)
        if section in sections and left >= need_s:
            print(f"--- {section} ({left:.0f} s left)", flush=True)
            return True
        if section in sections:
            report["skipped"].append(f"{section} (needs ~{need_s:.0f} s, {left:.0f} s left)")
            print(f"--- skip {section}: needs ~{need_s:.0f} s, {left:.0f} s left", flush=True)
        return False

    def guarded(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report.setdefault("errors", {})[name] = traceback.format_exc(limit=3)[-1500:]
        save()

    if time_left("generate", 40):

        def generate() -> None:
            run_generate(loaded, prompts[:1], 8)  # warm-up: kernels, allocator
            report["generate"] = []
            for n in streams:
                row = run_generate(loaded, prompts[:n], args.generate_new_tokens)
                report["generate"].append(row)
                print("generate", json.dumps(row), flush=True)
            report["generate_image_ttft_s"] = generate_ttft(loaded, image)
            print("generate image TTFT", report["generate_image_ttft_s"], flush=True)

        guarded("generate", generate)

    engine_kwargs = dict(
        max_batch=max(streams), token_budget=max(streams) * args.slot_tokens, buckets=tuple(streams),
        compile_cache_dir=args.cache_dir,
    )  # fmt: skip
    if time_left("engine", 60):

        def engine_section() -> None:
            engine, report["engine_startup_cold"] = start_engine(loaded, **engine_kwargs)
            try:
                report["engine_greedy_check"] = check = greedy_check(loaded, engine, prompts[0], args.check_tokens)
                print("greedy check", {k: v for k, v in check.items() if k != "engine_tokens"}, flush=True)
                run_engine(engine, prompts[:1], 8)  # warm-up
                report["engine"] = []
                for n in streams:
                    row = run_engine(engine, prompts[:n], args.new_tokens)
                    report["engine"].append(row)
                    print("engine", json.dumps(row), flush=True)
                    save()
                report["engine_image_ttft_idle_s"] = engine_ttft(engine, image)
                others = max(streams) - 1
                mix = arrivals_while_decoding(engine, prompts[:others], args.new_tokens, [image], [64])
                report["engine_image_while_decoding"] = mix
                print("image while decoding", json.dumps(mix), flush=True)
                if on_cuda:
                    report["profile"] = profile_decode(
                        engine, (1, max(streams)), args.prompt_tokens + args.new_tokens // 2
                    )
                    print("profile", json.dumps(report["profile"]), flush=True)
            finally:
                engine.close()
                _free(engine)

        guarded("engine", engine_section)

    if time_left("profile", 100):  # not in the default list: the engine section profiles too

        def profile_only() -> None:
            kw = dict(engine_kwargs, buckets=(1, max(streams)))
            engine, report["profile_engine_startup"] = start_engine(loaded, **kw)
            try:
                run_engine(engine, prompts[:1], 8)
                report["profile"] = profile_decode(engine, kw["buckets"], args.prompt_tokens + args.new_tokens // 2)
                print("profile", json.dumps(report["profile"]), flush=True)
            finally:
                engine.close()
                _free(engine)

        guarded("profile", profile_only)

    if time_left("warm", 90):

        def warm() -> None:
            # A new process, as after a restart: load the model, start the same engine over the filled cache.
            cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--precision", args.precision,
                   "--device", device, "--prompt-tokens", str(args.prompt_tokens),
                   "--startup-only", json.dumps(dict(engine_kwargs, buckets=list(engine_kwargs["buckets"])))]  # fmt: skip
            left = args.deadline_s - (time.perf_counter() - t0)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left - 5))
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP_JSON ")), None)
            if line is None:
                raise RuntimeError(f"child failed: {proc.stdout[-800:]} {proc.stderr[-1500:]}")
            report["engine_startup_warm"] = json.loads(line.removeprefix("STARTUP_JSON "))
            print("warm start-up", json.dumps(report["engine_startup_warm"]), flush=True)

        guarded("warm", warm)

    if time_left("stall", 30):

        def stall() -> None:
            long_prompt = make_prompts(1, 4096, vocab, seed=2)[0]
            report["stall"] = {}
            for chunk in (2048, 1 << 20):
                engine, info = start_engine(
                    loaded, max_batch=4, token_budget=4 * 4480, buckets=(1, 2, 4), compile=False, prefill_chunk=chunk
                )
                try:
                    run_engine(engine, prompts[:1], 8)
                    for p in (image, long_prompt):  # warm: the allocator refills after empty_cache
                        list(engine.submit_tokens(p, _greedy(2), threading.Event()))
                    res = arrivals_while_decoding(engine, prompts[:1], 400, [image, long_prompt], [16, 16])
                    if chunk == 2048:  # uncompiled graphs: the reference for the compiled engine's tokens
                        report["uncompiled_greedy_check"] = greedy_check(loaded, engine, prompts[0], args.check_tokens)
                finally:
                    engine.close()
                    _free(engine)
                label = "chunk_2048" if chunk == 2048 else "whole_prompts"
                report["stall"][label] = res
                print("stall", label, json.dumps(res), flush=True)

        guarded("stall", stall)

    nf4_prompt = prompts[0]
    if time_left("nf4", 45):
        loaded = _swap(loaded, lambda: load_model(args.checkpoint, "int4", device))

        def nf4() -> None:
            report["nf4_generate"] = run_generate(loaded, [nf4_prompt], args.generate_new_tokens)
            print("nf4 generate", json.dumps(report["nf4_generate"]), flush=True)
            kw = dict(max_batch=1, token_budget=args.slot_tokens, buckets=(1,), compile=False)
            report["nf4_engine_graphs"] = one_stream(loaded, kw, nf4_prompt, args.new_tokens)

        guarded("nf4", nf4)
    if loaded.precision == "int4" and time_left("nf4_compile", 100):

        def nf4_compile() -> None:
            kw = dict(
                max_batch=1, token_budget=args.slot_tokens, buckets=(1,), compile=True, compile_cache_dir=args.cache_dir
            )
            report["nf4_engine_compiled"] = one_stream(loaded, kw, nf4_prompt, args.new_tokens)

        guarded("nf4_compile", nf4_compile)
    if time_left("int8", 50):

        def int8() -> None:
            nonlocal loaded
            loaded = _swap(loaded, lambda: load_model(args.checkpoint, "int8", device))
            report["int8_generate"] = run_generate(loaded, [nf4_prompt], 32)
            print("int8 generate", json.dumps(report["int8_generate"]), flush=True)
            kw = dict(max_batch=1, token_budget=args.slot_tokens, buckets=(1,), compile=False)
            report["int8_engine_t6"] = one_stream(loaded, kw, nf4_prompt, 64)
            loaded = _swap(loaded, lambda: load_int8_threshold0(args.checkpoint))
            report["int8_engine_t0_graphs"] = one_stream(loaded, kw, nf4_prompt, args.new_tokens)

        guarded("int8", int8)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    print_table(report)


def _swap(old: Any, load: Any) -> Any:
    """Frees the loaded model before the next one loads (one model on the GPU at a time)."""
    _free(old)
    new = load()
    new.model.generation_config.eos_token_id = None
    return new


def print_table(report: dict[str, Any]) -> None:
    base = {r["streams"]: r for r in report.get("generate", [])}
    print(f"\n{'path':24} {'N':>3} {'tok/s/stream':>12} {'total tok/s':>11} {'decode tok/s':>12} {'TTFT p50':>9} "
          f"{'TTFT p95':>9} {'peak GiB':>8} {'vs generate':>11}")  # fmt: skip

    def line(label: str, r: dict[str, Any], b: dict[str, Any] | None) -> None:
        ratio = f"{r['total_tok_s'] / b['total_tok_s']:.1f}x" if b and b is not r else "-"
        dec = f"{r['decode_tok_s']:12.0f}" if "decode_tok_s" in r else f"{'-':>12}"
        print(f"{label:24} {r['streams']:3d} {r['per_stream_tok_s']:12.1f} {r['total_tok_s']:11.1f} {dec} "
              f"{r['ttft_p50_s']:9.3f} {r['ttft_p95_s']:9.3f} {r['peak_gib'] or 0:8.2f} {ratio:>11}")  # fmt: skip

    for r in report.get("generate", []):
        line("bf16 generate", r, r)
    path = report.get("engine_startup_cold", {}).get("decode_path", "engine")
    for r in report.get("engine", []):
        line("bf16 engine", r, base.get(r["streams"]))
    nf4_base = report.get("nf4_generate")
    if nf4_base:
        line("nf4 generate", nf4_base, nf4_base)
    for key, label in (("nf4_engine_graphs", "nf4 engine graphs"), ("nf4_engine_compiled", "nf4 engine compiled"),
                       ("int8_engine_t6", "int8 (t=6) engine"), ("int8_engine_t0_graphs", "int8 (t=0) engine")):  # fmt: skip
        if key in report:
            ref = nf4_base if key.startswith("nf4") else report.get("int8_generate")
            line(label, report[key]["run"], ref)
    if "int8_generate" in report:
        line("int8 (t=6) generate", report["int8_generate"], report["int8_generate"])
    print(f"bf16 engine decode path: {path}")
    for key in ("engine_startup_cold", "engine_startup_warm"):
        if key in report:
            s = report[key]
            print(f"{key}: {s['startup_s']} s (per bucket {s['warmup_s']}), {s['decode_path']}")
    for key in ("nf4_engine_graphs", "nf4_engine_compiled", "int8_engine_t6", "int8_engine_t0_graphs"):
        if key in report:
            s = report[key]["startup"]
            print(f"{key}: start-up {s['startup_s']} s, {s['decode_path']}")
    if "generate_image_ttft_s" in report:
        mix = report.get("engine_image_while_decoding", {})
        print(f"image prompt ({report['image_prompt_tokens']} tokens) TTFT: generate {report['generate_image_ttft_s']} s, "
              f"engine idle {report.get('engine_image_ttft_idle_s')} s, engine while {mix.get('running')} streams decode "
              f"{mix.get('ttft_s')} s (their max gap {mix.get('max_gap_during_s')} s, step {mix.get('median_gap_before_s')} s)")  # fmt: skip
    for label, s in report.get("stall", {}).items():
        print(f"stall {label}: image + 4k prompt arrive; running stream max gap {s['max_gap_during_s']} s "
              f"(step {s['median_gap_before_s']} s), their TTFTs {s['ttft_s']}")  # fmt: skip
    for key in ("engine_greedy_check", "uncompiled_greedy_check"):
        if key in report:
            c = report[key]
            print(f"{key}: first {c['tokens']} greedy tokens vs generate: {c['equal_prefix']} equal")
    if "engine_greedy_check" in report and "uncompiled_greedy_check" in report:
        a, b = report["engine_greedy_check"]["engine_tokens"], report["uncompiled_greedy_check"]["engine_tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"compiled vs uncompiled engine: first {same} of {len(a)} greedy tokens equal")
    for rows, p in report.get("profile", {}).items():
        print(f"profile rows={rows}: replay {p['replay_ms']} ms, kernels {p['kernel_sum_ms']} ms "
              f"({p['kernels_per_step']} kernels) {p['by_kind_ms']}")  # fmt: skip
    if report.get("skipped"):
        print("skipped:", report["skipped"])
    print(f"device: {report['device']}, {report['precision']}, copy {report['copy_gb_s']} GB/s, "
          f"prompt {report['prompt_tokens']} + {report['new_tokens']} new tokens (generate {report['generate_new_tokens']}), "
          f"torch {report['torch']}, transformers {report['transformers']}, wall {report.get('wall_s')} s")  # fmt: skip


if __name__ == "__main__":
    main()
