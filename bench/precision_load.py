"""Loads the real 4B architecture (random weights) through the app's loader in each precision and
measures load time, VRAM after load and after one image chat turn, TTFT and tokens/s.

    python -m bench.precision_load --checkpoint /tmp/qwen3vl-4b-random [--write] --out results.json

Each precision runs in its own child process so one precision's cached memory cannot inflate the next.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT

GIB = 1024**3


def measure(checkpoint: str, precision: str, new_tokens: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.generate import stream_generate
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
    from qwen3vl_webui.telemetry import GpuProbe
    from qwen3vl_webui.weights.loading import load_model

    probe = GpuProbe()
    base_nvml = probe.read().memory_used
    loaded = load_model(checkpoint, precision, "cuda")
    after_load = dict(
        torch_allocated=torch.cuda.memory_allocated(),
        nvml_used=probe.read().memory_used - base_nvml,
        footprint=loaded.weights_bytes,
    )
    # A 1280x720 photo-like image (smooth gradients + noise), saved as a real PNG the app would receive.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:720, 0:1280]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 32, (720, 1280, 3))
    path = Path("/tmp/bench_720p.png")
    Image.fromarray(img.clip(0, 255).astype("uint8")).save(path)
    # Greedy, no early stop: eos is out of reach of random weights only by chance, so force the length.
    loaded.model.generation_config.eos_token_id = None
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    request = ChatRequest(UserMessage("Describe this image in detail.", (str(path),)), sampling=sampling)
    import threading

    runs = []
    for _ in range(2):  # the first turn warms up kernels and the allocator; report the second
        torch.cuda.reset_peak_memory_stats()
        prompt = build_prompt(loaded, request)
        runs.append(list(stream_generate(loaded, prompt, sampling, threading.Event()))[-1][1])
    stats = runs[-1]
    return dict(
        precision=precision,
        device=torch.cuda.get_device_name(),
        load_s=round(loaded.load_seconds, 2),
        after_load_gib={k: round(v / GIB, 3) for k, v in after_load.items()},
        after_turn_gib=dict(
            torch_allocated=round(torch.cuda.memory_allocated() / GIB, 3),
            torch_peak=round(torch.cuda.max_memory_allocated() / GIB, 3),
            nvml_used=round((probe.read().memory_used - base_nvml) / GIB, 3),
        ),
        prompt_tokens=stats.prompt_tokens,
        image_tokens=stats.prompt_image_tokens,
        new_tokens=stats.new_tokens,
        ttft_s=round(stats.ttft_s, 3),
        tokens_per_s=round(stats.tokens_per_s, 1),
        first_turn_tokens_per_s=round(runs[0].tokens_per_s, 1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--write", action="store_true", help="write the random 4B checkpoint first")
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="precision_load.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one precision, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.checkpoint, args.one, args.new_tokens)), flush=True)
        return
    if args.write:
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        t = time.perf_counter()
        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
        print(f"wrote the random 4B checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for precision in args.precisions.split(","):
        cmd = [sys.executable, "-m", "bench.precision_load", "--checkpoint", args.checkpoint, "--one", precision,
               "--new-tokens", str(args.new_tokens)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{precision} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    bf16 = next((r for r in results if r["precision"] == "bf16"), None)
    print(f"\n{'precision':9} {'load s':>7} {'weights GiB':>11} {'NVML after load':>15} {'peak turn':>9} "
          f"{'NVML after turn':>15} {'TTFT s':>7} {'tok/s':>7} {'vs bf16':>8}")  # fmt: skip
    for r in results:
        ratio = f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-"
        print(
            f"{r['precision']:9} {r['load_s']:7.1f} {r['after_load_gib']['torch_allocated']:11.2f} "
            f"{r['after_load_gib']['nvml_used']:15.2f} {r['after_turn_gib']['torch_peak']:9.2f} "
            f"{r['after_turn_gib']['nvml_used']:15.2f} {r['ttft_s']:7.3f} {r['tokens_per_s']:7.1f} {ratio:>8}"
        )
    if results:
        print(f"device: {results[0]['device']}; prompt {results[0]['prompt_tokens']} tokens "
              f"({results[0]['image_tokens']} image), {results[0]['new_tokens']} new tokens")  # fmt: skip


if __name__ == "__main__":
    main()
