"""The VRAM planner against the GPU: peak memory of the batch engine serving its worst case (every slot a prompt of the
whole context with the largest image, as the start-up warm-up runs it) for precisions x contexts x concurrencies,
next to `qwen3vl_webui.plan`'s figure for the same case.

    python -m bench.plan_check --out /tmp/plan_check.json                 # the device: about 3 minutes on an H200
    python -m bench.plan_check --cpu --out /tmp/plan_check.json           # plumbing: the tiny model on a CPU, seconds

Random weights of the real 4B architecture, built in memory (--random-weights 4b), for each precision that can be
built so (precisions.IN_MEMORY); decode steps CUDA-graphed but not compiled (what compiling adds is code, not
memory, and it would take minutes). Measured: torch's peak reserved bytes and peak allocated, against
plan.MemoryPlan.torch_bytes less the retained-prefix entries the run did not keep (every request of a case ends with
the same tokens, so it keeps one entry: all of the pool at concurrency 1, half of it at 8). Reserved bytes never
shrink without `empty_cache`, so the entry kept at the end adds to the reserved peak even though the prompt's staged
KV was freed just before: the entry holds the answer's tokens too, so it is larger than that cached block and takes a
segment of its own (engine/batch/kv.py `retain`, runner.py `prompt_kv`). The check passes when every planner figure is
within 10% of the measured peak.

Where reserved exceeds allocated, each row says why (`reserved_at_start`, `held_at_end`): start-up reserves blocks
that are free again by the time the requests run (the replaced weights of fused projections, the prefill graphs'
eager warm-up on a side stream of its own; each `torch.cuda.graph` capture empties the cache after them, but the
peak statistic keeps them), and at the end reserved = allocated + graph pools (not returnable while their graphs
live) + free blocks inside partly used segments + wholly free cached segments, which the allocator gives back
(`empty_cache`, or by itself before it would report out of memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
TOLERANCE = 0.10
DEVICE_CASES = {"contexts": (4096, 16384), "concurrencies": (1, 8)}
CPU_CASES = {"contexts": (512, 1024), "concurrencies": (1, 2)}


def default_precisions(device: str) -> list[str]:
    """bf16, int8wo and one more of what --random-weights builds (the 4-bit one if it is there), on a GPU."""
    from qwen3vl_webui import precisions

    if device == "cpu":
        return ["fp32"]
    built = [p for p in precisions.IN_MEMORY if p not in ("fp32", "fp16")]
    chosen = [p for p in ("bf16", "int8wo") if p in built]
    chosen += [p for p in ("int4", "fp8", *built) if p in built and p not in chosen][:1]
    return chosen


def measure(loaded: Any, context: int, concurrency: int, new_tokens: int, image_pixels: int) -> dict[str, Any]:
    """Peak memory of one engine serving `concurrency` worst-case prompts of `context` tokens at once."""
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service import warmup
    from qwen3vl_webui.weights.model import release_cached_memory

    cuda = loaded.device.startswith("cuda")
    release_cached_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    options = BatchOptions(max_batch=concurrency, token_budget=context * concurrency, compile=False)
    engine = BatchEngine(loaded, options)
    at_start = int(torch.cuda.max_memory_reserved()) if cuda else None
    try:
        prompt = warmup._prompt(loaded, image_pixels, "Describe this image in detail.",
                                context - new_tokens)  # fmt: skip
        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        errors: list[BaseException] = []

        def one() -> None:
            try:
                for _ in engine.submit(prompt, sampling, threading.Event()):
                    pass
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=one, daemon=True) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        if cuda:
            torch.cuda.synchronize()
        return {
            "prompt_tokens": prompt.tokens,
            "kept_entries": len(engine.prefix_entries),
            "retained_slots": options.retained_slots,
            "peak_reserved": int(torch.cuda.max_memory_reserved()) if cuda else None,
            "peak_allocated": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "reserved_at_start": at_start,  # the reserved peak of the engine's start-up alone
            "held_at_end": _held(torch) if cuda else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        engine.close()
        gc.collect()
        release_cached_memory()


def _held(torch: Any) -> dict[str, int]:
    """Reserved bytes now, by what holds them: tensors, graph pools, free blocks of partly used segments, and
    wholly free segments (the part of reserved `empty_cache` would return), from the allocator's snapshot."""
    out = {"allocated": 0, "graph_pools": 0, "split_free": 0, "free_segments": 0}
    for seg in torch.cuda.memory_snapshot():
        used = sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
        free = seg["total_size"] - used
        out["allocated"] += used
        pool = seg.get("segment_pool_id", (0, 0))
        if tuple(pool) != (0, 0):  # a CUDA graph's private pool: kept while its graphs live
            out["graph_pools"] += free
        elif used:
            out["split_free"] += free
        else:
            out["free_segments"] += free
    return out


def run(device: str, precisions: list[str], contexts: tuple[int, ...], concurrencies: tuple[int, ...],
        new_tokens: int, budget_s: float) -> list[dict[str, Any]]:  # fmt: skip
    from qwen3vl_webui import plan, planner, ranges
    from qwen3vl_webui.weights.random_weights import load_random, source_for

    preset = "tiny" if device == "cpu" else "4b"
    # The slider's largest image on a GPU (what the warm-up tests); a small one for the CPU's plumbing run.
    image_pixels = 128 * 128 if device == "cpu" else ranges.largest_image_pixels()
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for precision in precisions:
        loaded = load_random(source_for(preset), precision, device)
        loaded.model.generation_config.eos_token_id = None
        shape = planner.ModelShape.from_config(loaded.config)
        for context in contexts:
            for concurrency in concurrencies:
                if time.monotonic() - started > budget_s:
                    print(f"budget of {budget_s:g} s spent: skipping {precision} {context} x {concurrency}", flush=True)
                    continue
                estimate = plan.plan_memory(shape, precision, context, concurrency, image_pixels)
                # The pool of retained prefixes the planner reserves, less the entries this run does not fill.
                inflight = estimate.torch_bytes - estimate.retained_kv
                row = {"precision": precision, "context": context, "concurrency": concurrency,
                       "planned_torch": estimate.torch_bytes, "planned_inflight": inflight,
                       "planned_retained": estimate.retained_kv, "planned_total": estimate.total,
                       "planned_weights": estimate.weights, "weights": loaded.weights_bytes}  # fmt: skip
                try:
                    row.update(measure(loaded, context, concurrency, new_tokens, image_pixels))
                except Exception as exc:  # an OOM is a figure too: the planner should have said "does not fit"
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                # The entries the run kept are in its reserved peak (see the module's docstring): planned beside it.
                slots = row.get("retained_slots") or 1
                row["planned_compared"] = inflight + estimate.retained_kv * row.get("kept_entries", 0) // slots
                measured = row.get("peak_reserved")
                row["error_pct"] = None if not measured else round(100 * (row["planned_compared"] / measured - 1), 1)
                row["within"] = None if row["error_pct"] is None else abs(row["error_pct"]) <= 100 * TOLERANCE
                rows.append(row)
                print(_line(row), flush=True)
        del loaded
        gc.collect()
    return rows


def _line(row: dict[str, Any]) -> str:
    def gib(n: Any) -> str:
        return "—" if n is None else f"{n / GIB:.2f} GiB"

    head = f"{row['precision']:<8} {row['context']:>6} x {row['concurrency']:<2}"
    if "error" in row:
        return f"{head} planned {gib(row['planned_inflight'])} · {row['error']}"
    held = row.get("held_at_end") or {}
    why = " · ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in held.items() if k != "allocated")
    return (f"{head} planned {gib(row['planned_compared'])} ({row.get('kept_entries', 0)} of {gib(row['planned_retained'])} kept) · "
            f"measured reserved {gib(row.get('peak_reserved'))} (allocated {gib(row.get('peak_allocated'))}, start-up "
            f"{gib(row.get('reserved_at_start'))}) · error {row['error_pct']}% · {row['seconds']} s"
            + (f"\n{'':19}at the end: {why}" if why else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--cpu", action="store_true", help="plumbing on a CPU with the tiny model (no figures)")
    ap.add_argument("--precisions", help="comma-separated (default: bf16, int8wo and a third built in memory)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this long")
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    cases = CPU_CASES if args.cpu else DEVICE_CASES
    chosen = args.precisions.split(",") if args.precisions else default_precisions(device)
    rows = run(device, chosen, cases["contexts"], cases["concurrencies"], args.new_tokens, args.budget_s)
    Path(args.out).write_text(json.dumps({"device": device, "tolerance": TOLERANCE, "rows": rows}, indent=1))
    checked = [r for r in rows if r["within"] is not None]
    bad = [r for r in checked if not r["within"]]
    print(f"{len(checked)} cases measured, {len(bad)} outside ±{TOLERANCE:.0%}" if checked else "no GPU figures (CPU plumbing)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
