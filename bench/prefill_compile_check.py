"""Would compiling the prefill pay? The engine's prefill call (Qwen3VLModel.forward into a DynamicCache) with the text
model eager against `torch.compile(text_model.forward, dynamic=True)`, in one process.

    python bench/prefill_compile_check.py --out $OUT/prefill_compile_check.json   # GPU, random 4B at /tmp/qwen3vl-4b-random

Cases: `text512` (a 512-token text prompt, empty cache), `cont1` (1 token after 909 cached: a repeated prompt's
prefix hit), `cont34` (34 tokens after 901: the follow-up turn), `image` (the 720p image prompt's text forward,
910 tokens, vision features computed beforehand), `image_dense` (the same through the text model directly, the
deepstack features as dense tensors added in place of the shipped boolean-mask injection; on CPU, tiny model:
one graph instead of 7, hidden states bitwise equal). Per case: eager ms and compiled ms (synchronized, median of 5),
the first compiled call's seconds (the compile), and how far the last hidden state moved.

Prediction (before the run): eager ~28-32 ms in every case (the host-bound ~0.85 ms a layer the engine's timelines
showed); compiled text512 ~8 ms, cont1 ~4 ms (it must still read 7.5 GB of weights, 2.5 ms), cont34 ~5 ms, image
~15 ms (the deepstack injection breaks the graph); ~40 s to compile each.
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
    ap.add_argument("--out", default="prefill_compile_check.json")
    ap.add_argument("--cases", default="text512,cont1,cont34,image,image_dense")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --checkpoint of the tiny model)")
    args = ap.parse_args()
    import torch
    from transformers import DynamicCache

    from qwen3vl_webui.engine import compiled, vision
    from qwen3vl_webui.engine.batching import _VisualFeatures
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
    text_config = loaded.model.config.text_config
    compiled.use_packed_decode_attention(text_config)  # as inside the engine
    vision.use_packed_vision_attention(model.visual)
    lm = model.language_model
    config = loaded.model.config.get_text_config(decoder=True)
    vocab = len(loaded.processor.tokenizer) - 32

    def positions(length: int, start: int = 0) -> Any:
        p = torch.arange(start, start + length, device=dev).view(1, 1, length)
        return torch.cat([p, p.expand(3, 1, length)])

    def cache_of(ids: Any) -> tuple[list[tuple[Any, Any]], int]:
        cache = DynamicCache(config=config)
        with torch.inference_mode():
            model(input_ids=ids, position_ids=positions(ids.shape[1]), past_key_values=cache, use_cache=True)
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers], ids.shape[1]

    def fresh(kv: list[tuple[Any, Any]] | None) -> Any:
        cache = DynamicCache(config=config)
        for i, (k, v) in enumerate(kv or []):
            cache.update(k.clone(), v.clone(), i)
        return cache

    cases: dict[str, Any] = {}
    text = make_prompts(1, 960, vocab, seed=5)[0].inputs["input_ids"].to(dev)
    if "text512" in args.cases:
        cases["text512"] = lambda: dict(input_ids=text[:, :512], position_ids=positions(512)), None
    if "cont1" in args.cases:
        kv1, n1 = cache_of(text[:, :909])
        cases["cont1"] = lambda: dict(input_ids=text[:, n1 : n1 + 1], position_ids=positions(1, n1)), kv1
    if "cont34" in args.cases:
        kv34, n34 = cache_of(text[:, :901])
        cases["cont34"] = lambda: dict(input_ids=text[:, n34 : n34 + 34], position_ids=positions(34, n34)), kv34
    if "image" in args.cases:
        prompt = make_image_prompt(loaded, 4)
        inputs = {k: v.to(dev) if hasattr(v, "to") else v for k, v in prompt.inputs.items()}
        with torch.inference_mode():
            grid = prompt.inputs["image_grid_thw"]
            out = model.get_image_features(
                inputs["pixel_values"], grid, return_dict=True, **vision.vision_kwargs(model.visual, grid, dev)
            )
            vis, _delta = model.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
            )
        length = inputs["input_ids"].shape[1]
        image_positions = torch.cat([positions(length)[:1], vis])
        feats = _VisualFeatures(tuple(out.pooler_output), [tuple(f) for f in out.deepstack_features])
        cases["image"] = (
            lambda: dict(
                input_ids=inputs["input_ids"], position_ids=image_positions, mm_encoder_outputs={"image": feats}
            ),
            None,
        )
        # The text model called directly, the image's embeddings merged beforehand and its deepstack features as
        # dense tensors of the hidden states' shape (zeros off the image): the injection becomes an add that dynamo
        # traces (shipped, it indexes with a boolean mask: nonzero, a graph break in each deepstack layer).
        with torch.inference_mode():
            is_image = inputs["input_ids"] == loaded.model.config.image_token_id
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), torch.cat(out.pooler_output).to(embeds.dtype))
            dense = []
            for f in out.deepstack_features:
                d = torch.zeros_like(embeds)
                d[is_image] = torch.cat(f).to(d.dtype)
                dense.append(d)
        cases["image_dense"] = (
            lambda: dict(
                inputs_embeds=embeds,
                position_ids=image_positions,
                visual_pos_masks=is_image,
                deepstack_visual_embeds=dense,
            ),  # fmt: skip
            None,
        )

    def dense_add(hidden_states: Any, visual_pos_masks: Any, visual_embeds: Any) -> Any:
        return hidden_states + visual_embeds

    def run(case: str) -> tuple[float, Any]:
        make, kv = cases[case]
        kwargs = make()
        cache = fresh(kv)
        sync()
        t0 = time.perf_counter()
        target = lm if case == "image_dense" else model
        if case == "image_dense":
            lm._deepstack_process = dense_add
        try:
            with torch.inference_mode():
                hidden = target(past_key_values=cache, use_cache=True, **kwargs).last_hidden_state
        finally:
            lm.__dict__.pop("_deepstack_process", None)
        sync()
        return time.perf_counter() - t0, hidden[:, -1].float()

    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    report: dict[str, Any] = dict(device=name, torch=torch.__version__, cases={})
    for case in cases:
        times, ref = [], None
        for _ in range(6):
            t, ref = run(case)
            times.append(t)
        report["cases"][case] = dict(eager_ms=round(1e3 * statistics.median(times[1:]), 2))
    compiled_forward = torch.compile(lm.forward, dynamic=True, mode=compiled.COMPILE_MODE)
    lm.forward = compiled_forward
    try:
        for case in cases:
            row = report["cases"][case]
            try:
                first, _ = run(case)
                times = []
                for _ in range(5):
                    t, hidden = run(case)
                    times.append(t)
                del lm.forward
                _, ref = run(case)  # eager again, for the difference
                lm.forward = compiled_forward
                row.update(
                    compile_s=round(first, 1), compiled_ms=round(1e3 * statistics.median(times), 2),
                    speedup=round(row["eager_ms"] / (1e3 * statistics.median(times)), 2),
                    max_abs_diff=round(float((hidden - ref).abs().max()), 4), ref_std=round(float(ref.std()), 4),
                )  # fmt: skip
            except Exception as exc:
                lm.forward = compiled_forward
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(case, json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        lm.__dict__.pop("forward", None)
    report["recompiles"] = str(torch._dynamo.utils.counters.get("stats", {}))[:500]
    Path(args.out).write_text(json.dumps(report, indent=1))
    for case, row in report["cases"].items():
        print(f"{case:8s} eager {row['eager_ms']:7.2f} ms  compiled {row.get('compiled_ms', float('nan')):7.2f} ms  "
              f"compile {row.get('compile_s', float('nan'))} s  {row.get('error', '')}")  # fmt: skip


if __name__ == "__main__":
    main()
