"""The app's own service path on a GPU with the batch engine: N concurrent chats (text and 1280x720 images).

    python -m bench.service_check --streams 32 --out $OUT/service_check.json     # random 4B built in memory

Goes through ChatService.chat exactly as the UI does (prompt building, media, scheduler, decoder), so it
checks the wiring of the batch engine into the app, not only the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from bench.common import RANDOM_4B, environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=RANDOM_4B, help=f"a checkpoint directory or {RANDOM_4B} (default)")
    ap.add_argument("--write", action="store_true", help="write random 4B weights into --checkpoint first")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engine", default="batch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="service_check.json")
    args = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.service.limits import Limits
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.service.prompt import ChatRequest
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

    if args.write and args.checkpoint != RANDOM_4B and not Path(args.checkpoint, "config.json").exists():
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    rng = np.random.default_rng(0)
    image = Path("/tmp/service_720p.png")
    Image.fromarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)).save(image)

    class Collected(GenerationStats):
        """Keeps every request's stats (the panel's class keeps a rolling window)."""

        def __init__(self) -> None:
            super().__init__()
            self.all: list = []

        def record(self, s) -> None:  # type: ignore[no-untyped-def]
            super().record(s)
            self.all.append(s)

    n = args.streams
    collected = Collected()
    scheduler = Scheduler(n, 4 * n)
    manager = ModelManager(
        args.checkpoint,
        "bf16" if args.device != "cpu" else "fp32",
        args.device,
        "sdpa",
        scheduler,
        decoder=args.engine,
        limits=Limits(4096, 1024),
    )
    service = ChatService(manager, scheduler, collected, GpuProbe())
    t = time.perf_counter()
    loaded = manager.load()
    print(f"load + decoder start: {time.perf_counter() - t:.1f} s; {manager.decoder.describe()}", flush=True)
    loaded.model.generation_config.eos_token_id = None  # equal lengths: random weights stop at random
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0)

    def request(i: int) -> ChatRequest:
        files = (str(image),) if i % 2 else ()
        return ChatRequest(UserMessage(f"Request {i}: describe what you see in detail.", files), sampling=sampling)

    def run(i: int) -> None:
        for _text in service.chat(request(i)):
            pass

    for _ in range(2):  # warm-up round (allocator, kernels), then the measured round
        collected.all.clear()
        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - started
    stats = collected.all
    new = n * args.new_tokens
    ttfts = sorted(s.ttft_s for s in stats if s)
    result = dict(
        **environment(args.device), checkpoint=args.checkpoint, engine=args.engine, streams=n, new_tokens=args.new_tokens,
        wall_s=round(wall, 2), total_tok_s=round(new / wall, 1),
        per_stream_tok_s=round(statistics.median(s.tokens_per_s for s in stats if s), 1),
        ttft_p50_s=round(ttfts[len(ttfts) // 2], 3), ttft_max_s=round(ttfts[-1], 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 1024**3, 2) if args.device != "cpu" else 0,
        image_tokens=max(s.prompt_image_tokens for s in stats if s),
    )  # fmt: skip
    print(json.dumps(result), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
