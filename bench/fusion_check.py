"""A/B in one process: the bf16 BatchEngine at 1 stream without and with fused q/k/v and gate/up (engine/fusion.py).

    python bench/fusion_check.py --out $OUT/fusion_check.json     # GPU, random 4B at /tmp/qwen3vl-4b-random

Prediction (H100, written before the run): the 4.41 ms step spends ~3.5 ms in 252 GEMVs + lm_head; k and v (5 MB
each) take ~10 us for ~2 us of bytes, q ~9 us. One 31 MB q/k/v GEMV ~12 us instead of ~30, one 100 MB gate/up
~50 us instead of ~57: ~25 us a layer, ~0.9 ms a step at best, more likely half of that -> 4.41 -> ~4.0 ms,
~245-250 tok/s (from 218-224).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import _free, greedy_check, make_prompts, run_engine, start_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--out", default="fusion_check.json")
    args = ap.parse_args()
    from qwen3vl_webui.engine.loading import load_model

    if not (Path(args.checkpoint) / "config.json").exists():
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    loaded = load_model(args.checkpoint, "bf16", "cuda")
    loaded.model.generation_config.eos_token_id = None
    vocab = len(loaded.processor.tokenizer) - 32
    report = {}
    for fuse in (False, True, False):  # off twice: the spread of the baseline
        engine, info = start_engine(
            loaded, max_batch=1, token_budget=1280, buckets=(1,), fuse=fuse, prefix_slots=0,
            compile_cache_dir="/tmp/qwen3vl-inductor",
        )  # fmt: skip
        try:
            run_engine(engine, make_prompts(1, 512, vocab, seed=3), 16)
            rows = [run_engine(engine, make_prompts(1, 512, vocab, seed=10 + i), 256) for i in range(3)]
            check = greedy_check(loaded, engine, make_prompts(1, 512, vocab, seed=1)[0], 32)
        finally:
            engine.close()
            _free(engine)
        label = f"fuse_{fuse}" + ("_again" if f"fuse_{fuse}" in report else "")
        report[label] = dict(
            tok_s=[round(r["decode_tok_s"], 1) for r in rows], startup_s=info["startup_s"],
            greedy_equal=check["equal_prefix"], greedy_gap=check.get("gap_top1_top2"), fused=engine.fused_groups,
        )  # fmt: skip
        print(label, json.dumps(report[label]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    base = max(max(report["fuse_False"]["tok_s"]), max(report["fuse_False_again"]["tok_s"]))
    print(f"fused {max(report['fuse_True']['tok_s'])} tok/s vs {base} unfused: "
          f"{max(report['fuse_True']['tok_s']) / base:.3f}x  ({time.strftime('%H:%M:%S')})")  # fmt: skip


if __name__ == "__main__":
    main()
