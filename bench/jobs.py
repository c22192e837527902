"""Batch jobs on the device: throughput of a job against the engine's own 32-stream figure, and what a running job
does to interactive time to first token.

    python -m bench.jobs --out /tmp/jobs                  # the device: random 4B weights, batch engine, 32 slots
    python -m bench.jobs --out /tmp/jobs --cpu            # CPU plumbing: the tiny model, small counts (seconds)

In one process, through the app's own ChatService (wiring.build_service, the app's flags), after the engine is at
full speed:
1. the engine's 32-stream figure here: 32 chats at once, `--new-tokens` each (eos off), total tokens/s;
2. TTFT of 4 chats at once, `--rounds` rounds, no job running (p50 / p95);
3. a job of `--text-items` text items through JobRunner (SQLite, cold requests): items/s, tokens/s, share of (1);
4. the same 4-chat rounds while a second copy of that job runs (cold: the chats preempt it);
5. a job of `--image-items` generated 640x480 images: items/s, tokens/s.
Each phase is cut off by the deadline (one device call: 540 s); jobs.json holds what was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GPU_FLAGS = ["--random-weights", "4b", "--engine", "batch", "--max-concurrency", "32", "--max-context", "2048",
             "--max-new-tokens", "512", "--queue-size", "64", "--warmup", "quick"]  # fmt: skip
CPU_FLAGS = ["--demo", "--engine", "generate", "--device", "cpu", "--max-concurrency", "2", "--max-context", "1024",
             "--max-new-tokens", "64", "--warmup", "off"]  # fmt: skip
ENGINE_32_RECORDED = 5438.0  # tok/s, bench/RESULTS.md: the engine at 32 streams on the H200 (bf16, random 4B)


def _service(flags: list[str], cache: Path) -> Any:
    from qwen3vl_webui import ranges
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_service

    # a --cache-dir among the flags wins (a warm one: its compile artifacts and inductor cache); else a fresh one
    settings = parse_settings(flags if "--cache-dir" in flags else [*flags, "--cache-dir", str(cache)])
    service = build_service(settings)
    service.start_in_background(settings.demo, settings.warmup, ranges.largest_image_pixels())
    service.manager.wait_ready(400)
    service.warmed.wait(400)
    return service


def _wait_full_speed(service: Any, deadline: float) -> bool:
    from qwen3vl_webui.service.readiness import readiness

    while time.monotonic() < deadline:
        if readiness(service).full_speed:
            return True
        time.sleep(1.0)
    return False


def _request(text: str, new_tokens: int, files: tuple[str, ...] = ()) -> Any:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.prompt import ChatRequest

    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return ChatRequest(UserMessage(text, files), sampling=sampling, max_context=2048 if new_tokens > 64 else 1024)


def _chats(service: Any, count: int, new_tokens: int, prompt: str) -> dict[str, Any]:
    """`count` chats at once; their TTFTs and the total tokens/s."""
    from qwen3vl_webui.service.chat import Finished

    stats: list[Any] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        for event in service.chat(_request(f"{prompt} ({n})", new_tokens), report_end=True):
            if isinstance(event, Finished):
                with lock:
                    stats.append(event.stats)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    tokens = sum(s.new_tokens for s in stats)
    return {"chats": count, "ok": len(stats), "seconds": round(seconds, 3), "total_tok_s": round(tokens / seconds, 1),
            "ttft_s": [round(s.ttft_s, 4) for s in stats]}  # fmt: skip


def _ttft_rounds(service: Any, rounds: int, new_tokens: int, deadline: float) -> dict[str, Any]:
    ttfts: list[float] = []
    done = 0
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        ttfts += _chats(service, 4, new_tokens, "Describe a harbour at dawn in detail.")["ttft_s"]
        done += 1
    return {"rounds": done, "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95), "ttft_s": ttfts}


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 4)


def _job(service: Any, items: list[Any], new_tokens: int, workers: int, db: Path, deadline: float,
         stop: threading.Event | None = None) -> dict[str, Any]:  # fmt: skip
    from qwen3vl_webui.service.jobs import JobDefaults, JobRunner
    from qwen3vl_webui.service.jobstore import JobStore

    store = JobStore(db)
    store.add(items)
    defaults = JobDefaults(max_context=2048 if new_tokens > 64 else 1024, max_new_tokens=new_tokens, ignore_eos=True)
    runner = JobRunner(service, store, defaults, workers)
    timer = threading.Timer(max(1.0, deadline - time.monotonic()), runner.stop)
    timer.daemon = True
    timer.start()
    watcher = None
    if stop is not None:
        watcher = threading.Thread(target=lambda: (stop.wait(), runner.stop()), daemon=True)
        watcher.start()
    progress = runner.run()
    timer.cancel()
    c = progress.counts
    store.close()
    return {"items": c.total, "done": c.done, "failed": c.failed, "seconds": round(progress.elapsed_s, 2),
            "items_per_s": round(progress.items_per_s, 2), "tokens_per_s": round(progress.tokens_per_s, 1),
            "preempted": progress.preempted, "cut_by_deadline": bool(c.pending or c.running)}  # fmt: skip


def _images(folder: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(count):
        path = folder / f"img{n:04d}.png"
        pixels = (rng.random((480, 640, 3)) * 255).astype("uint8")
        pixels[:, : 40 + n % 600] //= 2  # each image differs (no prefix reuse between them)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for jobs.json")
    ap.add_argument("--cpu", action="store_true", help="plumbing on a CPU with the tiny model (seconds, not figures)")
    ap.add_argument("--deadline-s", type=float, default=540.0)
    ap.add_argument("--text-items", type=int, help="default 1000 (--cpu: 12)")
    ap.add_argument("--image-items", type=int, help="default 200 (--cpu: 4)")
    ap.add_argument("--new-tokens", type=int, help="per text item and per 32-stream chat (default 128; --cpu: 8)")
    ap.add_argument("--rounds", type=int, help="4-chat TTFT rounds, with and without the job (default 5; --cpu: 1)")
    ap.add_argument("--commit", default="")
    ap.add_argument("app_flags", nargs="*", help="extra app flags after --")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cpu = args.cpu
    text_items = args.text_items or (12 if cpu else 1000)
    image_items = args.image_items or (4 if cpu else 200)
    new_tokens = args.new_tokens or (8 if cpu else 128)
    rounds = args.rounds or (1 if cpu else 5)
    end = time.monotonic() + args.deadline_s - 15
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-jobs-"))
    flags = [*(CPU_FLAGS if cpu else GPU_FLAGS), *args.app_flags]
    report: dict[str, Any] = {"commit": args.commit, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_plumbing": cpu,
                              "flags": flags, "engine_32_recorded_tok_s": ENGINE_32_RECORDED}  # fmt: skip

    def save() -> None:
        (out / "jobs.json").write_text(json.dumps(report, indent=2))

    started = time.monotonic()
    service = _service(flags, work / "cache")
    report["load_s"] = round(time.monotonic() - started, 1)
    report["full_speed"] = _wait_full_speed(service, min(end, time.monotonic() + 240))
    report["ready_s"] = round(time.monotonic() - started, 1)
    save()
    from qwen3vl_webui.service.jobstore import JobItem

    try:
        streams = 2 if cpu else 32
        report["engine_streams"] = _chats(service, streams, new_tokens, "Write a long story about a lighthouse.")
        report["engine_streams"].pop("ttft_s")
        save()
        report["ttft_alone"] = _ttft_rounds(service, rounds, 16, end)
        save()
        texts = [JobItem(f"t{n}", f"Item {n}: write a short paragraph about the number {n}.") for n in range(text_items)]
        workers = 2 * (2 if cpu else 32)
        report["text_job"] = _job(service, texts, new_tokens, workers, work / "text.sqlite", end)
        ref = report["engine_streams"]["total_tok_s"]
        report["text_job"]["share_of_engine_streams"] = round(report["text_job"]["tokens_per_s"] / ref, 3) if ref else None
        save()
        stop = threading.Event()
        background: dict[str, Any] = {}
        copy = [JobItem(f"b{n}", it.prompt) for n, it in enumerate(texts)]
        thread = threading.Thread(target=lambda: background.update(
            _job(service, copy, new_tokens, workers, work / "background.sqlite", end, stop)), daemon=True)  # fmt: skip
        thread.start()
        time.sleep(2.0 if not cpu else 0.5)  # the job fills the slots
        report["ttft_with_job"] = _ttft_rounds(service, rounds, 16, end)
        report["ttft_with_job"]["cold_running_at_end"] = service.scheduler.state().cold_running
        stop.set()
        thread.join(120)
        report["background_job"] = background
        save()
        images = _images(work / "images", image_items)
        items = [JobItem(p.name, "Describe this image.", (str(p),)) for p in images]
        report["image_job"] = _job(service, items, min(new_tokens, 64), workers, work / "images.sqlite", end)
        save()
    finally:
        service.close()
        service.manager.close()
    report["total_s"] = round(time.monotonic() - started, 1)
    save()
    print(json.dumps({k: v for k, v in report.items() if k not in ("flags",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
