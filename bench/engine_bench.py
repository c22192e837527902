"""Plain `generate` against BatchEngine (continuous batching + CUDA-graph decode) in one run, on the real
4B architecture with random weights: 1, 8 and 32 concurrent streams, 512-token prompts, 256 new tokens.

    python bench/engine_bench.py --write --out $OUT/engine_bench.json          # on the GPU
    python bench/engine_bench.py --preset tiny --device cpu --precision fp32 \
        --prompt-tokens 64 --new-tokens 16 --streams 1,4 --write                 # smoke test, CPU

eos is disabled (random weights would stop at random places) so every stream decodes the same length.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

    from qwen3vl_webui.engine.batching import BatchEngine
    from qwen3vl_webui.engine.loading import load_model

    report: dict[str, Any] = {}
    for precision in args.check_precisions.split(","):
        loaded = load_model(args.checkpoint, precision, args.device)
        loaded.model.generation_config.eos_token_id = None
        vocab = len(loaded.processor.tokenizer) - 32
        prompts = make_prompts(2, args.prompt_tokens, vocab, seed=1)
        for graphs in (True, False):
            label = f"{precision}_{'graphs' if graphs else 'eager'}"
            with BatchEngine(loaded, max_batch=8, token_budget=8 * 1024, cuda_graphs=graphs) as engine:
                report[label] = [greedy_check(loaded, engine, p, args.check_tokens) for p in prompts]
            for r in report[label]:
                print(label, json.dumps({k: v for k, v in r.items() if k != "engine_tokens"}), flush=True)
        pairs = zip(report[f"{precision}_graphs"], report[f"{precision}_eager"])
        report[f"{precision}_graphs_equal_eager"] = [a["engine_tokens"] == b["engine_tokens"] for a, b in pairs]
        print(precision, "graph tokens == eager engine tokens:", report[f"{precision}_graphs_equal_eager"], flush=True)
        del loaded
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--write", action="store_true", help="write the random checkpoint first")
    ap.add_argument("--preset", default="4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--skip-generate", action="store_true", help="engine only (the baseline is the point: rarely)")
    ap.add_argument("--out", default="engine_bench.json")
    ap.add_argument("--checks-only", action="store_true", help="only the greedy checks, in --check-precisions")
    ap.add_argument("--check-precisions", default="bf16,fp32")
    args = ap.parse_args()

    import torch

    from qwen3vl_webui.engine.batching import BatchEngine
    from qwen3vl_webui.engine.loading import load_model

    if args.write:
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        t = time.perf_counter()
        dtype = "bfloat16" if args.preset == "4b" else None
        write_checkpoint(args.checkpoint, preset=args.preset, dtype=dtype, device=args.device)
        print(f"wrote the random {args.preset} checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
    if args.checks_only:
        run_checks(args)
        return
    loaded = load_model(args.checkpoint, args.precision, args.device)
    loaded.model.generation_config.eos_token_id = None  # equal lengths; random weights stop anywhere
    device = args.device
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        precision=args.precision, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        weights_gib=round(loaded.weights_bytes / GIB, 2), copy_gb_s=copy_bandwidth(device),
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    streams = [int(s) for s in args.streams.split(",")]
    vocab = len(loaded.processor.tokenizer) - 32  # ordinary tokens only (the specials sit at the end)
    prompts = make_prompts(max(streams), args.prompt_tokens, vocab)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    if not args.skip_generate:
        run_generate(loaded, prompts[:1], 8)  # warm-up: kernels, allocator
        report["generate"] = []
        for n in streams:
            row = run_generate(loaded, prompts[:n], args.new_tokens)
            report["generate"].append(row)
            print("generate", json.dumps(row), flush=True)
            save()

    slot = -(-(args.prompt_tokens + args.new_tokens) // 64) * 64
    for graphs in (True, False) if device.startswith("cuda") else (False,):
        label = "engine_graphs" if graphs else "engine_eager"
        try:
            _reset_peak(device)
            t = time.perf_counter()
            engine = BatchEngine(loaded, max_batch=max(streams), token_budget=max(streams) * slot, cuda_graphs=graphs)
        except Exception:
            traceback.print_exc()
            print(f"{label}: start-up failed", flush=True)
            continue
        report[f"{label}_startup_s"] = round(time.perf_counter() - t, 2)
        report[f"{label}_startup_peak_gib"] = _peak_gib(device)
        print(
            f"{label}: start-up {report[f'{label}_startup_s']} s, buckets {engine.snapshot().graph_buckets}", flush=True
        )
        try:
            report[f"{label}_greedy_check"] = check = greedy_check(loaded, engine, prompts[0], args.check_tokens)
            print(label, "greedy check", {k: v for k, v in check.items() if k != "engine_tokens"}, flush=True)
            run_engine(engine, prompts[:1], 8)  # warm-up
            report[label] = []
            for n in streams:
                row = run_engine(engine, prompts[:n], args.new_tokens)
                report[label].append(row)
                print(label, json.dumps(row), flush=True)
                save()
        except Exception:
            traceback.print_exc()
        finally:
            engine.close()
            del engine
            torch.cuda.empty_cache() if device.startswith("cuda") else None
        if graphs and report.get(label):
            break  # graphs worked: the eager engine is only the fallback measurement
    save()
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    base = {r["streams"]: r for r in report.get("generate", [])}
    print(f"\n{'path':14} {'N':>3} {'tok/s/stream':>12} {'total tok/s':>11} {'decode tok/s':>12} {'TTFT p50':>9} "
          f"{'TTFT p95':>9} {'peak GiB':>8} {'vs generate':>11}")  # fmt: skip
    for label in ("generate", "engine_graphs", "engine_eager"):
        for r in report.get(label, []):
            b = base.get(r["streams"])
            ratio = f"{r['total_tok_s'] / b['total_tok_s']:.1f}x" if b and label != "generate" else "-"
            dec = f"{r['decode_tok_s']:12.0f}" if "decode_tok_s" in r else f"{'-':>12}"
            print(f"{label:14} {r['streams']:3d} {r['per_stream_tok_s']:12.1f} {r['total_tok_s']:11.1f} {dec} "
                  f"{r['ttft_p50_s']:9.3f} {r['ttft_p95_s']:9.3f} {r['peak_gib'] or 0:8.2f} {ratio:>11}")  # fmt: skip
    for label in ("engine_graphs", "engine_eager"):
        if f"{label}_greedy_check" in report:
            print(f"{label}: greedy first {report[f'{label}_greedy_check']['tokens']} tokens vs generate: "
                  f"{report[f'{label}_greedy_check']['equal_prefix']} equal; start-up {report[f'{label}_startup_s']} s")  # fmt: skip
    print(f"device: {report['device']}, {report['precision']}, copy {report['copy_gb_s']} GB/s, "
          f"prompt {report['prompt_tokens']} + {report['new_tokens']} new tokens, torch {report['torch']}, "
          f"transformers {report['transformers']}")  # fmt: skip


if __name__ == "__main__":
    main()
