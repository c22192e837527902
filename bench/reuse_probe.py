"""Why is a prefix-reuse hit slow on the GPU? Times the worker's prefill pieces (synchronised) per request.

python bench/reuse_probe.py [--compile]     # GPU, random 4B bf16 at /tmp/qwen3vl-4b-random
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import first_token_s, make_image_prompt, make_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False)")
    args = ap.parse_args()
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.loading import load_model

    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    loaded = load_model(args.checkpoint, "bf16", "cuda")
    loaded.model.generation_config.eos_token_id = None
    times: dict[str, list[float]] = {}

    def timed(obj, name):
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            times.setdefault(name, []).append(round((time.perf_counter() - t) * 1e3, 2))
            return out

        setattr(obj, name, wrapper)

    engine = BatchEngine(loaded, BatchOptions(max_batch=8, token_budget=8 * 1280, buckets=(1, 8), compile=args.compile))
    core = engine.core  # the engine's pieces (engine/batch/): the prefix match ("_admit" before) is kv.reuse_prefix
    for obj, name in ((core.kv, "reuse_prefix"), (core.runner, "prefill"), (core, "_activate"), (core.kv, "retain"),
                      (core.runner, "_encode_media"), (core.runner, "_prefill_chunk"), (core.runner, "_prefill_texts")):  # fmt: skip
        timed(obj, name)
    vocab = len(loaded.processor.tokenizer) - 32
    prompt = make_prompts(1, 512, vocab)[0]
    image = make_image_prompt(loaded, 64)
    others = make_prompts(3, 300, vocab, seed=5)  # new lengths: new shapes
    runs = [("text", prompt), ("text", prompt), ("text", prompt), ("image", image), ("image", image)]
    runs += [("text300", p) for p in others] + [("text300 again", others[0])]
    for label, p in runs:
        times.clear()
        ttft = first_token_s(engine, p, 8)
        snap = engine.snapshot()
        print(f"{label}: TTFT {ttft * 1e3:.1f} ms, hits {snap.prefix_hits}, pieces (ms) {times}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
