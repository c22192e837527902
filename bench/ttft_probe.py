"""Time to first token of the 1280x720 image prompt, idle engine, several samples: decode Linears fused + GEMV vs not.

    python bench/ttft_probe.py --out $OUT/ttft_probe.json     # GPU, random 4B at /tmp/qwen3vl-4b-random

Why: the matrix after fuse+GEMV became the default read 0.070 s idle against 0.048 s before, from one sample each
(`engine_ttft` times the second of two submissions of the same prompt, which may hit the prefix kept from the first).
Here each variant gets 5 samples with the prefix pool cleared before each (whole prefill, vision tower included)
and 5 with the kept prefix (what a repeated prompt gets), next to plain `generate`'s TTFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import _free, _greedy, generate_ttft, make_image_prompt, start_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--out", default="ttft_probe.json")
    args = ap.parse_args()
    from qwen3vl_webui.engine.loading import load_model

    if not (Path(args.checkpoint) / "config.json").exists():
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    loaded = load_model(args.checkpoint, "bf16", "cuda")
    loaded.model.generation_config.eos_token_id = None
    prompt = make_image_prompt(loaded, 4)
    report = dict(image_tokens=prompt.tokens, generate_ttft_s=[generate_ttft(loaded, prompt) for _ in range(3)])
    print("generate", report["generate_ttft_s"], flush=True)
    for label, flags in (("fuse_gemv", {}), ("plain", dict(fuse=False, gemv=False))):
        engine, info = start_engine(
            loaded, max_batch=1, token_budget=2048, buckets=(1,), compile_cache_dir="/tmp/qwen3vl-inductor", **flags
        )
        try:

            def ttft(clear: bool, engine=engine) -> float:
                if clear:
                    engine._pool.clear()
                started = time.perf_counter()
                stream = engine.submit_tokens(prompt, _greedy(4), threading.Event())
                next(stream)
                took = time.perf_counter() - started
                list(stream)
                return round(took, 4)

            for _ in range(2):
                ttft(True)  # warm-up: this prompt's shapes
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
