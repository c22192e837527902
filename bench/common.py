"""What the benchmarks share: the model under test, prompts, timed runs of `generate` and the engine, the app process.

Heavy imports (torch, transformers, the app's modules) stay inside the functions: `import bench.X` is cheap and
never touches a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
RANDOM_4B = "random-weights:4b"  # the real 4B architecture with random weights, built in memory as the app does
WARNING = "⚠️ "  # how the app starts an answer that is a refusal or an error
# Run-to-run figures are medians of this many measured runs, for the engine and for `generate` alike.
RUNS = 3


# ---------------------------------------------------------------------------------------------------- the model


def load(model: str, precision: str, device: str, write_preset: str | None = None) -> Any:
    """The app's loader on `model`: a checkpoint directory or `random-weights:PRESET` (built in memory, as the app's
    --random-weights). `write_preset`: write random weights of that preset into a directory that has none first
    (bitsandbytes' int4/int8 quantize while loading a checkpoint, so they need one). eos is switched off: every
    stream decodes exactly its max new tokens."""
    from qwen3vl_webui.weights.loading import load_model

    if write_preset and not model.startswith("random-weights:") and not (Path(model) / "config.json").exists():
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        started = time.perf_counter()
        dtype = "bfloat16" if write_preset == "4b" else None
        write_checkpoint(model, preset=write_preset, dtype=dtype, device=device)
        print(f"wrote random {write_preset} weights to {model} in {time.perf_counter() - started:.1f} s", flush=True)
    loaded = load_model(model, precision, device)
    loaded.model.generation_config.eos_token_id = None
    return loaded


def ordinary_vocab(loaded: Any) -> int:
    """Ids below this are ordinary tokens (the special ones sit at the end of the tokenizer)."""
    return len(loaded.processor.tokenizer) - 32


def environment(device: str) -> dict[str, Any]:
    """What a result depends on besides the code: the device, library versions, the commit."""
    import torch
    import transformers

    on_cuda = device.startswith("cuda")
    return dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__,
        transformers=transformers.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d"),
        host_cpus=os.cpu_count(), knobs=knobs(),
    )  # fmt: skip


# The engine's switches (never all QWEN3VL_*: the keys and passwords are set that way too).
KNOBS = ("QWEN3VL_PDL", "QWEN3VL_PDL_SKIP", "QWEN3VL_NORM_HANDOFF", "QWEN3VL_KERNEL_TUNING", "QWEN3VL_FUSED_LAYERS",
         "QWEN3VL_PREFER_PREFILL_GRAPHS", "QWEN3VL_INT4_MMA", "QWEN3VL_FP8_MMA")


def knobs() -> dict[str, str]:
    """The engine's A/B switches set in this environment (an A/B's two files then say which side each is)."""
    return {name: os.environ[name] for name in KNOBS if os.environ.get(name)}


def int4_mma_layers(loaded: Any) -> int:
    """Int4Linears in kernels/w4_mma.py's layout (unless QWEN3VL_INT4_MMA=0): an A/B's report says which side it ran."""
    from qwen3vl_webui.kernels.int4 import Int4Linear

    return sum(1 for m in loaded.model.modules() if isinstance(m, Int4Linear) and m.table is not None)


def fp8_mma_layers(loaded: Any) -> int:
    """Fp8Linears in kernels/fp8_mma.py's layout (unless QWEN3VL_FP8_MMA=0), as `int4_mma_layers`."""
    from qwen3vl_webui.kernels.fp8 import Fp8Linear

    return sum(1 for m in loaded.model.modules() if isinstance(m, Fp8Linear) and m.mma_kind is not None)


def git_commit() -> str | None:
    """$BENCH_COMMIT if set (a device's copy of the tree has no git history), else the checkout's commit (with
    '+dirty' when tracked files differ), else None."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- prompts


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[Any]:
    """Text prompts of `length` random ordinary-token ids, as the engine's PreparedPrompt (distinct per seed)."""
    import torch

    from qwen3vl_webui.engine.request import PreparedPrompt

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


def write_image(path: str | Path, seed: int = 0, size: tuple[int, int] = (1280, 720)) -> Path:
    """A photo-like picture (smooth gradients + noise; `seed` picks the noise), saved as PNG or JPEG by suffix."""
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 32, (height, width, 3))
    path = Path(path)
    picture = Image.fromarray(img.clip(0, 255).astype("uint8"))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(path, quality=90)
    else:
        picture.save(path)
    return path


def image_path(seed: int = 0) -> Path:
    """Where `make_image_prompt` writes its PNG for `seed`."""
    return Path(f"/tmp/bench_720p_{seed}.png")


def make_image_prompt(loaded: Any, new_tokens: int, seed: int = 0) -> Any:
    """A 1280x720 image and a question, through the app's own `build_prompt` (about 910 prompt tokens)."""
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

    path = write_image(image_path(seed), seed)
    message = UserMessage("Describe this image in detail.", (str(path),))
    return build_prompt(loaded, ChatRequest(message, sampling=greedy(new_tokens)))


def greedy(tokens: int) -> Any:
    """Greedy sampling without a repetition penalty: the same work for `generate` and the engine."""
    from qwen3vl_webui.engine.request import SamplingParams

    return SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


# ---------------------------------------------------------------------------------------------------- GPU helpers


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 2) if device.startswith("cuda") else None


def free(*objs: Any) -> None:
    """Drops the references the caller hands over and returns cached GPU blocks to the driver."""
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy rate in GB/s (bytes read + written): the ceiling for streaming weights."""
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


# ---------------------------------------------------------------------------------------------------- timed runs


def run_generate(loaded: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """Plain transformers: one greedy `model.generate` over all prompts as one batch (one row for one stream).

    TTFT is the batch's first token; per-stream tok/s counts from it to the last token.
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

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

    device = loaded.device
    n = len(prompts)
    inputs = {k: torch.cat([p.inputs[k] for p in prompts]).to(device) for k in prompts[0].inputs}
    streamer = _Times()
    reset_peak(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, do_sample=False, max_new_tokens=new_tokens, repetition_penalty=1.0,
            temperature=None, top_p=None, top_k=None, streamer=streamer,
        )  # fmt: skip
    sync(device)
    wall = time.perf_counter() - started
    made = out.shape[1] - inputs["input_ids"].shape[1]
    first, last = streamer.times[0], streamer.times[-1]
    return dict(
        streams=n, new_tokens=made, wall_s=wall, ttft_p50_s=first - started, ttft_p95_s=first - started,
        per_stream_tok_s=(made - 1) / max(last - first, 1e-9), total_tok_s=n * made / wall, peak_gib=peak_gib(device),
    )  # fmt: skip


def run_engine(engine: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """All streams submitted at once, each read by its own thread through `submit` (text, as the app reads it).

    "At once" for the engine too: they are submitted while it holds admission (`hold_admission`), so its first
    prefill forward takes them all. Without the hold, whether the worker woke between two submits decided how the
    burst was grouped (session 28, H100: 2 or ~5.5 prefill forwards a 32-stream run, one setting at 4,300 or 5,500
    tok/s; `prefill_forwards` in each row says which)."""
    device = engine.loaded.device
    sampling = greedy(new_tokens)
    reset_peak(device)
    results: list[Any] = [None] * len(prompts)
    errors: list[BaseException] = []
    before = engine.snapshot()
    hold = getattr(engine, "hold_admission", None)
    started = time.perf_counter()
    with hold() if hold is not None else contextlib.nullcontext():
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
    after = engine.snapshot()
    ttfts = sorted(s.ttft_s for s in results)
    made = sum(s.new_tokens for s in results)
    decode_span = max(s.ttft_s + s.decode_s for s in results) - ttfts[-1]
    return dict(
        streams=len(prompts), new_tokens=results[0].new_tokens, wall_s=wall,
        ttft_p50_s=statistics.median(ttfts), ttft_p95_s=ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        per_stream_tok_s=statistics.median(s.tokens_per_s for s in results), total_tok_s=made / wall,
        peak_gib=peak_gib(device), steps=after.steps - before.steps,
        prefill_forwards=getattr(after, "prefill_forwards", 0) - getattr(before, "prefill_forwards", 0),
        # Decode-only rate: all streams decode together once the last prefill is done.
        decode_tok_s=len(prompts) * (new_tokens - 1) / max(decode_span, 1e-9),
    )  # fmt: skip


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of medians over runs: every numeric field is the median of its runs; `runs` keeps each run's
    total tok/s and TTFT p50, so the spread stays visible."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows if r.get(key) is not None]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and values:
            out[key] = statistics.median(values)
        else:
            out[key] = value
    out["runs"] = len(rows)
    out["total_tok_s_runs"] = [round(r["total_tok_s"], 1) for r in rows]
    out["ttft_p50_s_runs"] = [round(r["ttft_p50_s"], 4) for r in rows]
    return out


def start_engine(loaded: Any, **options: Any) -> tuple[Any, dict[str, Any]]:
    """A BatchEngine built from BatchOptions(**options), and its start-up figures (wall, per-bucket warm-up with
    compile, decode path)."""
    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions

    reset_peak(loaded.device)
    started = time.perf_counter()
    options.setdefault("background_compile", False)  # measure the compiled engine, not the eager graphs it starts on
    engine = BatchEngine(loaded, BatchOptions(**options))
    info = dict(
        startup_s=round(time.perf_counter() - started, 2), warmup_s=engine.warmup_s,
        decode_path=engine.decode_path, compile_error=engine.compile_error, graph_error=engine.graph_error,
        buckets=list(engine.buckets), max_batch=engine.max_batch, max_len=engine.max_len,
        startup_peak_gib=peak_gib(loaded.device), fused_groups=engine.fused_groups, gemv_linears=engine.gemv_linears,
        prefill_path=engine.prefill_path, prefill_warmup_s=engine.prefill_warmup_s, layers_path=engine.layers_path,
        pdl_mode=engine.pdl_mode, pdl=engine.pdl_name,
    )  # fmt: skip
    print("engine", {k: str(v) for k, v in options.items()}, json.dumps(info, default=str), flush=True)
    return engine, info


def first_token_s(engine: Any, prompt: Any, new_tokens: int = 4) -> float:
    """Submit-to-first-token of one greedy request on `engine` (the rest of the answer is read, untimed)."""
    started = time.perf_counter()
    stream = engine.submit_tokens(prompt, greedy(new_tokens), threading.Event())
    next(stream)
    took = time.perf_counter() - started
    list(stream)
    return took


def engine_ttft(engine: Any, prompt: Any) -> float:
    """TTFT of one prompt prefilled whole on an idle engine: median of 3 after a warm-up run (retained prefixes
    are dropped before each run, else every run after the first reuses the first's KV)."""
    ttfts = []
    for _ in range(1 + RUNS):
        engine.forget_prefixes()
        ttfts.append(first_token_s(engine, prompt))
    return round(statistics.median(ttfts[1:]), 4)


def generate_ttft(loaded: Any, prompt: Any) -> float:
    """TTFT of plain `stream_generate` (the app's path) for one prompt: median of 3 after a warm-up run."""
    from qwen3vl_webui.engine.generate import stream_generate

    ttfts = []
    for _ in range(1 + RUNS):
        *_, (_text, stats) = stream_generate(loaded, prompt, greedy(4), threading.Event())
        ttfts.append(stats.ttft_s)
    return round(statistics.median(ttfts[1:]), 4)


def arrivals_while_decoding(
    engine: Any, running: list[Any], running_tokens: int, arriving: list[Any], arriving_tokens: list[int]
) -> dict[str, Any]:
    """Starts `running` streams, waits until all decode, then submits `arriving` prompts at once.

    Returns each arrival's TTFT and the running streams' inter-token gaps while the arrivals were prefilled (the
    stall they cause), next to the gaps before they came (the plain step). Retained prefixes are dropped first.
    """
    engine.forget_prefixes()
    times: list[list[float]] = [[] for _ in running]
    streams = [engine.submit_tokens(p, greedy(running_tokens), threading.Event()) for p in running]

    def read(i: int) -> None:
        for _ in streams[i]:
            times[i].append(time.perf_counter())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(running))]
    for t in threads:
        t.start()
    settled = max(1, min(12, running_tokens // 2))  # tokens each running stream shows before the arrivals come
    while min(len(t) for t in times) < settled and all(t.is_alive() for t in threads):
        time.sleep(0.002)
    submitted = time.perf_counter()
    new = [engine.submit_tokens(p, greedy(n), threading.Event()) for p, n in zip(arriving, arriving_tokens)]
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
    during = [b - a for t in times for a, b in zip(t, t[1:]) if b > submitted and a < done]
    before = [b - a for t in times for a, b in zip(t, t[1:]) if b <= submitted]
    return dict(
        running=len(running), arrivals=[int(p.inputs["input_ids"].shape[1]) for p in arriving],
        ttft_s=[round(f - submitted, 4) for f in firsts],
        max_gap_during_s=round(max(during), 4) if during else None,
        gaps_during=len(during), largest_gaps_during_s=[round(g, 4) for g in sorted(during, reverse=True)[:6]],
        median_gap_before_s=round(statistics.median(before), 4), max_gap_before_s=round(max(before), 4),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- greedy checks


def greedy_check(loaded: Any, engine: Any, prompt: Any, tokens: int) -> dict[str, Any]:
    """The engine's first `tokens` greedy tokens against plain `generate`'s on the same prompt, and against the
    model's own logits along the engine's path (one teacher-forced forward over prompt + the engine's tokens).

    - `equal_prefix`: how many tokens agree with `generate`'s; where they part, the gap between `generate`'s logits
      for its token and the engine's says whether it is a near-tie (another kernel's rounding) or a real difference;
    - `ranks`: each engine token's rank in the reference logits of its step (0 = the reference's own argmax), and
      `max_logit_shortfall`: how far below that step's top logit the engine's token was at worst (0 = always top);
    - `distinct_tokens`: random weights easily repeat one token, and equal repeats prove little.
    """
    import torch

    inputs = {k: v.to(loaded.device) for k, v in prompt.inputs.items()}
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, do_sample=False, max_new_tokens=tokens, temperature=None, top_p=None,
            top_k=None, output_logits=True, return_dict_in_generate=True, repetition_penalty=1.0,
        )  # fmt: skip
    ref = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    got = list(engine.submit_tokens(prompt, greedy(tokens), threading.Event()))
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    result: dict[str, Any] = dict(
        tokens=tokens, equal_prefix=same, identical=ref == got, distinct_tokens=len(set(got)), engine_tokens=got
    )
    if same < min(len(ref), len(got)):
        logits = out.logits[same][0].float()
        top2 = logits.topk(2).values
        result.update(
            gap_ref_vs_engine_token=round(float(logits[ref[same]] - logits[got[same]]), 5),
            gap_top1_top2=round(float(top2[0] - top2[1]), 5),
            logits_std=round(float(logits.std()), 5),
            engine_token_rank=int((logits > logits[got[same]]).sum()),
        )
    result.update(teacher_forced(loaded, inputs, got))
    return result


def teacher_forced(loaded: Any, inputs: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """Ranks of `tokens` in the model's logits when fed the prompt + `tokens` in one forward (the reference path)."""
    import torch

    if not tokens:
        return dict(ranks=[], max_logit_shortfall=None, min_top2_gap=None)
    extra = torch.tensor([tokens[:-1]], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra, dtype=inputs["mm_token_type_ids"].dtype)], dim=1)  # fmt: skip
    with torch.inference_mode():
        logits = loaded.model(**full, use_cache=False, logits_to_keep=len(tokens)).logits[0].float()
    chosen = torch.tensor(tokens, device=logits.device)
    picked = logits.gather(1, chosen[:, None])[:, 0]
    top2 = logits.topk(2, dim=-1).values
    ranks = (logits > picked[:, None]).sum(-1)
    return dict(
        ranks=[int(r) for r in ranks.tolist()],
        max_logit_shortfall=round(float((top2[:, 0] - picked).max()), 5),
        min_top2_gap=round(float((top2[:, 0] - top2[:, 1]).min()), 5),
    )


# ---------------------------------------------------------------------------------------------------- arguments, output


def model_args(doc: str) -> argparse.ArgumentParser:
    """The arguments every in-process benchmark shares: which model, where, in what precision."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=RANDOM_4B, help=f"a checkpoint directory or random-weights:4b|tiny (default {RANDOM_4B})")  # fmt: skip
    ap.add_argument("--write", metavar="PRESET", help="write random weights of PRESET (4b, tiny) into --model first if it has none")  # fmt: skip
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", help="write the JSON report here")
    return ap


def write_json(path: str | Path | None, report: Any) -> None:
    """Writes `report` (rewritten after every section, so a run stopped early keeps what it measured)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------------- the app process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(flags: list[str], work: Path, tmpdir: Path | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`python app.py FLAGS` as a child process on 127.0.0.1 and a free port; uploads and temp files under `work`.

    Loopback only, so the app's per-client cap and event rate limit do not apply to us (the operator's exemption).
    Fault injection and logins from the environment are left out, so the app serves plainly. Returns (process,
    url, log path); the caller stops it.
    """
    port = free_port()
    env = {
        **os.environ, "GRADIO_TEMP_DIR": str(work / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1", **({"TMPDIR": str(tmpdir)} if tmpdir else {}),
    }  # fmt: skip
    for name in ("QWEN3VL_FAULTS", "QWEN3VL_AUTH", "QWEN3VL_ADMIN_AUTH"):
        env.pop(name, None)
    command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *flags]
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}/", log_path


def wait_until_serving(url: str, server: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Until the page's API answers (the model may still be loading); raises if the app exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode}; see {log_path}")
        try:
            if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the app did not start within {timeout:.0f} s; see {log_path}")


def gpu_name() -> str | None:
    """The GPU a child process on this machine will see, if nvidia-smi answers."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except OSError:
        return None
