"""Prompt chunks eager, replayed from the first-chunk CUDA graphs, and compiled: `prefill.chunk_forward` as the
engine runs it (fused q/k/v and gate/up, the packed attention route), `prefill.ChunkGraphs` captured like the
engine's start-up, and (with --compile) `torch.compile(chunk_forward, dynamic=True)` warmed like `compile_prefill`.

    python bench/prefill_check.py --out $OUT/prefill_check.json [--compile]  # GPU, random 4B at /tmp/qwen3vl-4b-random

Cases (past tokens + chunk tokens): `text512` (0 + 512), `chunk2048` (0 + 2048, a whole PREFILL_CHUNK), `image`
(0 + 910: the 720p image prompt's text forward, its vision features merged and deepstack dense), `cont34` (901 + 34:
a follow-up turn after a prefix hit), `cont2` (908 + 2: a regenerated answer). Per case: eager, graph (first chunks
only: 910 padded to 960) and compiled ms (synchronized, median of 5) and how far each last hidden state
and KV moved from eager's; the capture's and the compile warm-up's seconds, and the graphs dynamo made over all
cases (the warm-up makes two, and no case may add one).

Prediction (before the run): eager ~30 ms for every case up to 910 tokens (host-bound: ~0.85 ms a layer), ~45 ms
for 2048; graphs: the eager kernels' GPU time, text512 ~10 ms, image (padded to 1024) ~18 ms, chunk2048 ~35 ms;
capture ~2 s. Compiled text512 ~9 ms, image ~14 ms, cont34 ~5 ms, cont2 ~4 ms; warm-up minutes (an earlier run did
not finish two graphs in ~190 s on a slow host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import make_image_prompt, make_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--out", default="prefill_check.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --checkpoint of the tiny model)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling on an H100)")
    args = ap.parse_args()
    import numpy as np
    import torch

    from qwen3vl_webui.engine import compiled, fusion, prefill, vision
    from qwen3vl_webui.engine.loading import load_model

    if not (Path(args.checkpoint) / "config.json").exists():
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    dev = args.device
    loaded = load_model(args.checkpoint, "bf16" if dev == "cuda" else "fp32", dev)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    model = loaded.model.model
    text = loaded.model.config.text_config
    lm = model.language_model
    compiled.use_packed_decode_attention(text)  # as inside the engine
    vision.use_packed_vision_attention(model.visual)
    if dev == "cuda":
        fusion.fuse_projections(lm, gemv=True)
        fusion.route_gemv([lm, loaded.model.lm_head])
    layers = len(model.visual.deepstack_visual_indexes)
    dtype = lm.embed_tokens.weight.dtype
    vocab = len(loaded.processor.tokenizer) - 32

    def positions(length: int, start: int = 0) -> Any:
        return torch.arange(start, start + length, device=dev).view(1, 1, length).repeat(4, 1, 1)  # as the engine

    def past_of(length: int) -> Any:
        return torch.randn(length, text.num_hidden_layers, 2, text.num_key_value_heads, text.head_dim, device=dev).to(dtype)  # fmt: skip

    def text_case(past: int, length: int, seed: int) -> tuple[Any, ...]:
        ids = make_prompts(1, length, vocab, seed=seed)[0].inputs["input_ids"].to(dev)
        embeds, deepstack = prefill.media_inputs(lm.embed_tokens(ids), layers, [])
        return embeds, positions(length, past), past_of(past), deepstack

    with torch.inference_mode():
        cases: dict[str, tuple[Any, ...]] = {
            "text512": text_case(0, 512, 1), "chunk2048": text_case(0, 2048, 2),
            "cont34": text_case(901, 34, 3), "cont2": text_case(908, 2, 4),
        }  # fmt: skip
        prompt = make_image_prompt(loaded, 4)
        inputs = prompt.inputs
        grid = inputs["image_grid_thw"]
        out = model.get_image_features(
            inputs["pixel_values"].to(dev), grid, return_dict=True, **vision.vision_kwargs(model.visual, grid, dev)
        )
        vis, _ = model.get_rope_index(
            inputs["input_ids"].to(dev), mm_token_type_ids=inputs["mm_token_type_ids"].to(dev), image_grid_thw=grid.to(dev)
        )  # fmt: skip
        length = inputs["input_ids"].shape[1]
        where = torch.from_numpy(np.flatnonzero(inputs["input_ids"][0].numpy() == loaded.model.config.image_token_id))
        stacked = torch.stack([torch.cat(f) for f in out.deepstack_features])
        embeds, deepstack = prefill.media_inputs(
            lm.embed_tokens(inputs["input_ids"].to(dev)), layers, [(where.to(dev), torch.cat(out.pooler_output), stacked)]
        )  # fmt: skip
        cases["image"] = (embeds, torch.cat([positions(length)[:1], vis]), past_of(0), deepstack)

    def run(fn: Any, case: str) -> tuple[float, Any, Any]:
        embeds, pos, past, deep = cases[case]
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden, kv = fn(lm, embeds.clone(), pos, past, deep)
        sync()
        return time.perf_counter() - t0, hidden[:, -1].float(), kv

    def timed(fn: Any, case: str, prefix: str) -> None:
        row = report["cases"][case]
        run(fn, case)
        times, hidden, kv = [], None, None
        for _ in range(5):
            t, hidden, kv = run(fn, case)
            times.append(t)
        ref_hidden, ref_kv = eager_out[case]
        row.update({
            f"{prefix}_ms": round(1e3 * statistics.median(times), 2),
            f"{prefix}_speedup": round(row["eager_ms"] / (1e3 * statistics.median(times)), 2),
            f"{prefix}_hidden_max_abs_diff": round(float((hidden - ref_hidden).abs().max()), 4),
            f"{prefix}_kv_max_abs_diff": round(float((kv.float() - ref_kv.float()).abs().max()), 4),
        })  # fmt: skip
        print(case, prefix, json.dumps(row), flush=True)

    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    report: dict[str, Any] = dict(device=name, torch=torch.__version__, cases={})
    eager_out = {}
    for case in cases:
        times = [run(prefill.chunk_forward, case)[0] for _ in range(6)]
        _, hidden, kv = run(prefill.chunk_forward, case)
        eager_out[case] = (hidden, kv)
        report["cases"][case] = dict(eager_ms=round(1e3 * statistics.median(times[1:]), 2), hidden_std=round(float(hidden.std()), 4))  # fmt: skip
        print(case, report["cases"][case], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))

    if dev == "cuda":
        kv_dims = (text.num_hidden_layers, 2, text.num_key_value_heads, text.head_dim)
        graphs = prefill.ChunkGraphs(lm, tuple(range(64, 2049, 64)), layers, kv_dims)
        started = time.perf_counter()
        with torch.inference_mode():
            graphs.capture()
        report["capture_s"] = round(time.perf_counter() - started, 2)
        report["capture_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
        print("capture", report["capture_s"], "s", flush=True)

        def replay(lm: Any, embeds: Any, positions: Any, past: Any, deepstack: Any) -> tuple[Any, Any]:
            return graphs.run(embeds, positions, deepstack)

        for case in ("text512", "chunk2048", "image"):
            timed(replay, case, "graph")
        Path(args.out).write_text(json.dumps(report, indent=1))
    if not args.compile:
        for case, row in report["cases"].items():
            print(f"{case:10s} eager {row['eager_ms']:7.2f} ms  graph {row.get('graph_ms', float('nan')):7.2f} ms")
        return

    compiled.use_cache_dir("/tmp/qwen3vl-inductor")
    fn = torch.compile(prefill.chunk_forward, dynamic=True, fullgraph=True, mode=compiled.COMPILE_MODE)
    started = time.perf_counter()
    with torch.inference_mode():  # the engine's warm-up: an empty past and a 128-token one
        for past in (0, 128):
            embeds, pos, kv, deep = text_case(past, 128, 9)
            fn(lm, embeds, pos, kv, deep)
    sync()
    report["warmup_s"] = round(time.perf_counter() - started, 1)
    graphs_after_warmup = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print("warm-up", report["warmup_s"], "s,", graphs_after_warmup, "graphs", flush=True)
    for case in cases:
        timed(fn, case, "compiled")
        Path(args.out).write_text(json.dumps(report, indent=1))
    report["graphs_after_warmup"] = graphs_after_warmup
    report["graphs_after_cases"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    Path(args.out).write_text(json.dumps(report, indent=1))
    for case, row in report["cases"].items():
        print(f"{case:10s} eager {row['eager_ms']:7.2f} ms  graph {row.get('graph_ms', float('nan')):7.2f} ms  "
              f"compiled {row['compiled_ms']:7.2f} ms")  # fmt: skip
    print("graphs", graphs_after_warmup, "->", report["graphs_after_cases"], "warm-up", report["warmup_s"], "s")


if __name__ == "__main__":
    main()
