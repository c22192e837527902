"""Device check for case 15 of issue 4: a real CUDA out-of-memory during a big image prompt.

    python -m bench.oom_check                                   # tiny demo model, both decoders
    python -m bench.oom_check --checkpoint random-weights:4b --json $OUT/oom_check.json   # the real 4B shape

For each decoder (transformers generate, the batch engine), through the app's own ModelManager and
ChatService on the GPU:
  1. warm up: a text turn and a big-image turn succeed (lazy allocations happen here);
  2. baseline: torch allocated/reserved and NVML used, after the service released cached memory; the batch
     engine's retained prefixes (the warm-up turns' KV, kept for follow-up turns) are forgotten first, because
     the out-of-memory path drops them too: counted in the baseline, they would read as memory the failed request
     gave back (-553.5 MiB on an H200 with the 4B shape);
  3. fill the GPU with a real allocation down to its last MiB, then send the big-image turn again:
     it must fail with the app's out-of-memory message (no crash, no hang);
  4. right after the failure, torch's allocated memory must be the baseline plus the filler, i.e.
     the failed request holds nothing;
  5. free the filler: reserved memory and NVML return to the baseline (within a small slack);
  6. the big-image turn and a text turn succeed again, and memory is back at the baseline (their retained
     prefixes forgotten again first; their bytes are reported).
Prints one JSON object per decoder and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 2**20
# Allowed drift from the baseline: the allocator rounds blocks; NVML also sees driver-side pools.
TORCH_SLACK = 32 * MIB
NVML_SLACK = 128 * MIB


def _fill(device: str) -> list[Any]:
    """Allocates the GPU's free memory in halving chunks, down to 1 MiB; returns the chunks."""
    import torch

    chunks, size = [], 8 * 2**30
    while size >= MIB:
        try:
            chunks.append(torch.empty(size, dtype=torch.uint8, device=device))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    return chunks


def _memory(device: str) -> dict[str, int]:
    import torch

    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "nvml_used": int(total - free),
    }


def check_decoder(args: argparse.Namespace, decoder: str, image: str) -> dict[str, Any]:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import RequestError, SamplingParams
    from qwen3vl_webui.media import MediaBudget
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.service.limits import Limits
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.service.prompt import ChatRequest
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

    scheduler = Scheduler(args.concurrency, 8)
    manager = ModelManager(
        args.checkpoint or "demo", args.precision, args.device, "sdpa", scheduler, demo_dir=args.cache_dir,
        decoder=decoder, limits=Limits(args.max_context, 1024),
    )  # fmt: skip
    manager.load(use_demo=args.checkpoint is None)
    service = ChatService(manager, scheduler, GenerationStats(), GpuProbe())
    sampling = SamplingParams(max_new_tokens=16, temperature=0.0)
    budget = MediaBudget(max_image_pixels=int(args.image_mp * 1e6))
    big = ChatRequest(UserMessage("Describe this image.", (image,)), sampling=sampling, max_context=args.max_context,
                      media=budget)  # fmt: skip
    text = ChatRequest(UserMessage("Say something."), sampling=sampling, max_context=args.max_context)
    out: dict[str, Any] = {"decoder": manager.decoder.describe() if manager.decoder else decoder, "checks": {}}
    checks = out["checks"]
    device = manager.current().device

    def ask(request: ChatRequest) -> tuple[bool, str, float]:
        started = time.perf_counter()
        try:
            list(service.chat(request))
            return True, "", time.perf_counter() - started
        except RequestError as exc:
            return False, str(exc), time.perf_counter() - started
        except Exception as exc:  # not the app's refusal: report it as a failed check, go on
            return False, f"{type(exc).__name__}: {exc}", time.perf_counter() - started

    ok_text, _, _ = ask(text)
    ok_big, message, _ = ask(big)
    checks["warm-up turns succeed"] = ok_text and ok_big
    out["image_tokens"] = service.stats.last.prompt_image_tokens if service.stats.last else None
    if not ok_big:
        out["warm_up_error"] = message
    out["retained_prefixes_forgotten_before_baseline_mib"] = _forget_prefixes(manager)
    service.release_memory()
    base = _memory(device)
    out["baseline_mib"] = {k: round(v / MIB, 1) for k, v in base.items()}

    filler = _fill(device)
    filled = sum(c.numel() for c in filler)
    out["filler_mib"] = round(filled / MIB, 1)
    out["free_after_fill_mib"] = round(_free(device) / MIB, 1)
    engine = _engine(manager)
    dropped_before = engine.snapshot().prefix_dropped if engine is not None else 0
    ok, message, seconds = ask(big)
    out["oom_message"] = message
    out["oom_request_s"] = round(seconds, 2)
    checks["big image fails with the OOM message"] = (not ok) and "ran out of memory" in message
    after = _memory(device)
    leaked = after["allocated"] - base["allocated"] - filled
    out["allocated_beyond_baseline_and_filler_mib"] = round(leaked / MIB, 1)
    checks["failed request holds no memory"] = abs(leaked) <= TORCH_SLACK
    if engine is not None:  # what the OOM path dropped besides the request: none, nothing was retained
        out["prefix_entries_dropped_by_oom"] = engine.snapshot().prefix_dropped - dropped_before
    checks["service counted the OOM"] = service.counters.oom == 1 and service.scheduler.state().running == 0

    del filler
    service.release_memory()
    back = _memory(device)
    out["after_release_mib"] = {k: round(v / MIB, 1) for k, v in back.items()}
    checks["reserved back to baseline"] = back["reserved"] <= base["reserved"] + TORCH_SLACK
    checks["NVML back to baseline"] = back["nvml_used"] <= base["nvml_used"] + NVML_SLACK

    ok_big, message, _ = ask(big)
    ok_text, message2, _ = ask(text)
    checks["next requests succeed"] = ok_big and ok_text
    if not (ok_big and ok_text):
        out["next_errors"] = [message, message2]
    out["retained_prefixes_forgotten_at_end_mib"] = _forget_prefixes(manager)
    service.release_memory()
    final = _memory(device)
    out["final_mib"] = {k: round(v / MIB, 1) for k, v in final.items()}
    checks["memory at baseline at the end"] = final["reserved"] <= base["reserved"] + TORCH_SLACK
    out["pass"] = all(checks.values())
    if manager.decoder is not None:
        manager.decoder.detach()  # the batch engine's KV cache and graphs; the rest goes with this frame
    return out


def _engine(manager: Any) -> Any:
    """The batch engine behind the manager's decoder, or None (the generate decoder retains nothing)."""
    return getattr(manager.decoder, "engine", None)


def _forget_prefixes(manager: Any) -> float | None:
    """Drops the batch engine's retained prefixes (the engine is idle here); returns the MiB their KV held."""
    engine = _engine(manager)
    if engine is None:
        return None
    held = sum(e.kv.numel() * e.kv.element_size() for e in engine.prefix_entries if e.kv is not None)
    engine.forget_prefixes()
    return round(held / MIB, 1)


def _free(device: str) -> int:
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint directory or random-weights:4b (default: the tiny demo model)")
    ap.add_argument("--preset", choices=["tiny", "4b"], default="tiny", help="with --write: what to write")
    ap.add_argument("--write", action="store_true", help="write a random-weight checkpoint of --preset first")
    ap.add_argument("--cache-dir", default=None, help="where the demo checkpoint goes")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decoders", default="generate,batch")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--image-mp", type=float, default=4.0, help="the big image's pixel budget (MP)")
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from PIL import Image

    if args.write:
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        target = args.checkpoint or str(Path(tempfile.gettempdir()) / f"qwen3vl-{args.preset}-random")
        args.checkpoint = str(write_checkpoint(target, preset=args.preset, dtype="bfloat16", device="cuda"))
    image = str(Path(tempfile.mkdtemp()) / "big.png")
    side = int((args.image_mp * 1e6 * 16 / 9) ** 0.5)
    Image.radial_gradient("L").resize((side, side * 9 // 16)).convert("RGB").save(image)
    results = [check_decoder(args, name.strip(), image) for name in args.decoders.split(",") if name.strip()]
    for result in results:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    passed = all(r["pass"] for r in results)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
