"""The VRAM planner against the GPU: what the batch engine needs serving its worst case, next to the plan.

    python -m bench.plan_check --out /tmp/plan_check.json                 # the device: about 5 minutes on an H200
    python -m bench.plan_check --cpu --out /tmp/plan_check.json           # plumbing: the tiny model on a CPU, seconds

Each case (precision x context x concurrency) is the app's steady worst case: the retained-prefix pool full (one
text-only prompt of the whole context per pool slot, run first and kept, as finished chats keep theirs), then every
slot at once a prompt of the whole context with an image of the largest size, as the start-up warm-up runs it, but
each image its own (identical ones would let a later prompt reuse an earlier one's prefix KV and skip its prefill);
between the two, at concurrency 2 and more, a burst of short text prompts (one a slot) that one batched forward takes
together, at most the slot's length of padded tokens (its KV and its transient: the planner counts them). Random weights
of the real 4B architecture built in memory (--random-weights 4b) for each precision that can be built so
(precisions.IN_MEMORY); decode steps CUDA-graphed but not compiled (compiling adds code, not memory, and minutes).
On a GPU each case runs in a fresh process (the memory cap below is per process, and an earlier case's cached
blocks would change what the allocator finds free).

Two checks per case, both against the figures the planner shows (plan.plan_memory):
 a. need: the planner's torch figure (MemoryPlan.torch_bytes) against the bytes the app cannot do without at its
    peak: torch's peak allocated bytes, plus what the caching allocator cannot give back: the free part of the CUDA
    graphs' private pools (kept while their graphs live) and the free blocks inside partly used segments (a segment
    returns to the driver only whole), both from torch.cuda.memory_snapshot() at the end of the run (`held_at_end`).
    Within ±10% passes. The peak *reserved* figure stays in the rows for information only: it also holds blocks
    that are free and wholly unused (start-up transients: the prefill graphs' warm-ups at ascending lengths on a
    side stream, the weights that the q/k/v and gate/up fusions replace), which the allocator returns to the driver
    (it frees cached blocks and retries) before it would report out of memory, so it overstates what a GPU must have.
 b. enough: the case runs with torch's allocator capped (torch.cuda.set_per_process_memory_fraction) at the plan's
    total (MemoryPlan.total, what the UI and the CLI show, what a user would buy) less the bytes torch does not
    count in this process (the CUDA context, kernels' code: driver-used less torch-reserved, measured once the
    weights are on the GPU), so torch gets what it would get on a card of exactly the plan's size. It passes when
    the run completes without running out of memory, keeps its retained prefixes (the engine drops them when a
    prefill runs out of memory: no dropped entry), and torch's peak reserved plus the non-torch bytes at the end
    stays within the plan's total; `completed` (every answer given, the graphs captured) is in the row beside it.
    The capped run's own figures serve for (a); one run per case keeps 12 cases near 5 minutes.

On a CPU there is no caching allocator and no cap: the rows say so and carry no figures (plumbing only).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
TOLERANCE = 0.10
DEVICE_CASES = {"contexts": (4096, 16384), "concurrencies": (1, 8)}
CPU_CASES = {"contexts": (512, 1024), "concurrencies": (1, 2)}
CASE_TIMEOUT_S = 120  # one case's fresh process: imports, the 4B build, the engine's start-up, two rounds
NO_ALLOCATOR = "a CPU: no caching allocator, so no peak figures and no cap"
FILLER_NAMES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel")


def default_precisions(device: str) -> list[str]:
    """bf16, int8wo and one more of what --random-weights builds (the 4-bit one if it is there), on a GPU."""
    from qwen3vl_webui import precisions

    if device == "cpu":
        return ["fp32"]
    built = [p for p in precisions.IN_MEMORY if p not in ("fp32", "fp16")]
    chosen = [p for p in ("bf16", "int8wo") if p in built]
    chosen += [p for p in ("int4", "fp8", *built) if p in built and p not in chosen][:1]
    return chosen


def _serve(engine: Any, prompts: list[Any], new_tokens: int) -> None:
    """Runs `prompts` to their end, admitted together (so short ones share a batched forward, as a burst of
    arrivals at an idle engine does); re-raises the first error."""
    from qwen3vl_webui.engine.request import SamplingParams

    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    errors: list[BaseException] = []
    with engine.hold_admission():
        streams = [engine.submit_tokens(p, sampling, threading.Event()) for p in prompts]

    def one(stream: Any) -> None:
        try:
            for _ in stream:
                pass
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _fillers(loaded: Any, count: int, tokens: int, image_pixels: int) -> list[Any]:
    """Text-only prompts of `tokens` that share no reusable prefix with each other or with the image prompt."""
    from qwen3vl_webui.engine.request import PreparedPrompt
    from qwen3vl_webui.service import warmup

    out = []
    for name in FILLER_NAMES[:count]:
        inputs = warmup._fill(loaded, warmup._encode(loaded, None, f"{name}: summarise this memo.", image_pixels),
                              tokens)  # fmt: skip
        n = int(inputs["input_ids"].shape[1])
        out.append(PreparedPrompt(inputs, n, n, 0, 0, 0))
    return out


def _burst(loaded: Any, concurrency: int, context: int, new_tokens: int) -> list[Any]:
    """Short text prompts arriving at once, one per slot, as long as one batched prefill forward may hold them
    together (engine/batch/scheduler.py next_prefill: rows x the widest within the idle budget): the forward's KV
    and transient, which the planner counts (plan.py `burst_tokens`). Empty at concurrency
    1 (nothing to batch). Their own texts: no prefix of theirs is retained or reused by another."""
    from qwen3vl_webui import plan
    from qwen3vl_webui.engine.request import PreparedPrompt
    from qwen3vl_webui.service import warmup

    if concurrency < 2:
        return []
    chunk = plan.PREFILL_CHUNK
    batch = plan.burst_tokens(plan.aligned_context(context), concurrency)
    tokens = min(chunk, batch // concurrency, context - new_tokens)
    out = []
    for name in FILLER_NAMES[:concurrency]:
        text = f"{name.lower()} wants every date listed."  # its own first words: no prefix shared with another
        inputs = warmup._fill(loaded, warmup._encode(loaded, None, text, 0), tokens)
        n = int(inputs["input_ids"].shape[1])
        out.append(PreparedPrompt(inputs, n, n, 0, 0, 0))
    return out


def _worst(loaded: Any, count: int, tokens: int, image_pixels: int) -> list[Any]:
    """`count` prompts of `tokens`, each with an image of `image_pixels` of its own (warm-up's `_prompt` with other
    pixels), so that none reuses another's prefix: identical images would share the image's KV."""
    from PIL import Image

    from qwen3vl_webui.engine.request import PreparedPrompt
    from qwen3vl_webui.service import warmup

    width = max(32, int((image_pixels * 16 / 9) ** 0.5))
    height = max(32, int(width * 9 / 16))
    text = "Describe this image in detail."
    out = []
    for i in range(count):
        image = Image.linear_gradient("L").point(lambda v, i=i: (v + 29 * i) % 256).resize((width, height))
        inputs = warmup._encode(loaded, image.convert("RGB"), text, image_pixels)
        if inputs["input_ids"].shape[1] > tokens // 2:  # as the warm-up: the image alone would leave no room
            inputs = warmup._encode(loaded, None, f"{FILLER_NAMES[-1 - i]}: {text}", image_pixels)
        inputs = warmup._fill(loaded, inputs, tokens)
        ids = inputs["input_ids"][0]
        images = int((ids == loaded.config.image_token_id).sum())
        out.append(PreparedPrompt(inputs, int(ids.shape[0]), int(ids.shape[0]) - images, images, 0, 0))
    return out


def measure(loaded: Any, context: int, concurrency: int, new_tokens: int, image_pixels: int) -> dict[str, Any]:
    """Memory of one engine serving `concurrency` worst-case prompts of `context` tokens with its prefix pool full."""
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.weights.model import release_cached_memory

    cuda = loaded.device.startswith("cuda")
    release_cached_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    options = BatchOptions(max_batch=concurrency, token_budget=context * concurrency, compile=False)
    engine = BatchEngine(loaded, options)
    at_start = (int(torch.cuda.max_memory_reserved()), int(torch.cuda.max_memory_allocated())) if cuda else (None, None)
    try:
        prompts = _worst(loaded, concurrency, context - new_tokens, image_pixels)
        # First fill the retained-prefix pool, as finished chats do in a running app, then the worst case on top.
        _serve(engine, _fillers(loaded, options.retained_slots, context - new_tokens, image_pixels), new_tokens)
        kept_before = len(engine.prefix_entries)
        burst = _burst(loaded, concurrency, context, new_tokens)
        _serve(engine, burst, new_tokens)  # a burst of short prompts: one batched forward's KV and transient
        forwards = engine.snapshot().prefill_forwards if burst else None
        _serve(engine, prompts, new_tokens)
        if cuda:
            torch.cuda.synchronize()
        snap = engine.snapshot()
        row: dict[str, Any] = {
            "prompt_tokens": prompts[0].tokens,
            "image_tokens": prompts[0].image_tokens,
            "burst": [len(burst), burst[0].tokens if burst else 0],  # short prompts served at once, tokens each
            "burst_forwards": forwards,  # prefill forwards up to the burst's end (fillers' included)
            "retained_slots": options.retained_slots,
            "kept_before": kept_before,  # entries held while the worst case ran (the pool full: retained_slots)
            "kept_entries": len(engine.prefix_entries),
            "prefix_hits": snap.prefix_hits,
            "prefix_dropped": snap.prefix_dropped,
            "decode_path": snap.decode_path,  # "... failed ...": a graph capture ran out of memory, say
            "prefill_path": snap.prefill_path,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if not cuda:
            return {**row, "allocator": NO_ALLOCATOR}
        held = _held(torch)
        peak_allocated = int(torch.cuda.max_memory_allocated())
        free, total = torch.cuda.mem_get_info()
        return {
            **row,
            "peak_allocated": peak_allocated,
            "needed": peak_allocated + held["graph_pools"] + held["split_free"],
            "held_at_end": held,
            "non_torch": int(total - free) - int(torch.cuda.memory_reserved()),  # CUDA context, kernels' code
            "peak_reserved": int(torch.cuda.max_memory_reserved()),  # information: see the module's docstring
            "reserved_at_start": at_start[0],  # the reserved peak of the engine's start-up alone
            "allocated_at_start": at_start[1],
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


def run_case(device: str, precision: str, context: int, concurrency: int, new_tokens: int,
             loaded: Any = None, cap: bool = True) -> dict[str, Any]:  # fmt: skip
    """One case, the plan's figures beside what it measured; on a GPU with torch capped at the plan's total unless
    `cap` is off (then the need is measured whole: under the cap a prefill that runs out of memory drops retained
    prefixes and goes on, so the capped run's need leaves out what it dropped)."""
    from qwen3vl_webui import plan, planner, ranges
    from qwen3vl_webui.weights.random_weights import load_random, source_for

    # The slider's largest image on a GPU (what the warm-up tests); a small one for the CPU's plumbing run.
    image_pixels = 128 * 128 if device == "cpu" else ranges.largest_image_pixels()
    if loaded is None:
        loaded = load_random(source_for("tiny" if device == "cpu" else "4b"), precision, device)
        loaded.model.generation_config.eos_token_id = None
    shape = planner.ModelShape.from_config(loaded.config)
    estimate = plan.plan_memory(shape, precision, context, concurrency, image_pixels)
    row: dict[str, Any] = {"precision": precision, "context": context, "concurrency": concurrency,
                           "planned_torch": estimate.torch_bytes, "planned_retained": estimate.retained_kv,
                           "planned_total": estimate.total, "planned_weights": estimate.weights,
                           "weights": loaded.weights_bytes}  # fmt: skip
    if device != "cpu" and cap:
        row.update(_cap(estimate.total))
    try:
        row.update(measure(loaded, context, concurrency, new_tokens, image_pixels))
    except Exception as exc:  # an OOM under the cap is a figure too: the plan's total was not enough
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _judge(row)


def _cap(planned_total: int) -> dict[str, Any]:
    """Caps this process's torch allocator at the plan's total less what torch does not count (measured now)."""
    import torch

    for dtype in (torch.bfloat16, torch.float32):  # cuBLAS's handle and kernels: non-torch bytes the run adds
        ones = torch.ones(256, 256, device="cuda", dtype=dtype)
        (ones @ ones).sum().item()
    del ones
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    non_torch = int(total - free) - int(torch.cuda.memory_reserved())
    cap = planned_total - non_torch
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, cap / total)))
    return {"cap": cap, "non_torch_at_cap": non_torch, "gpu_memory": int(total)}


def _judge(row: dict[str, Any]) -> dict[str, Any]:
    """(a) the plan's torch figure against the need; (b) whether the capped run got through."""
    needed = row.get("needed")
    row["error_pct"] = None if not needed else round(100 * (row["planned_torch"] / needed - 1), 1)
    row["within"] = None if row["error_pct"] is None else abs(row["error_pct"]) <= 100 * TOLERANCE
    if "cap" not in row:
        row["completed"] = row["sufficient"] = None
        return row
    # Completed: every request answered, the graphs captured (the engine catches a prefill's OOM, drops the retained
    # prefixes and retries, so this alone is not enough). Sufficient: besides, the plan's retained pool was really
    # there (nothing dropped or left unkept) and the driver's bytes (torch's + the rest) stayed within the total.
    row["completed"] = "error" not in row and not any("failed" in row[k] for k in ("decode_path", "prefill_path"))
    row["sufficient"] = (
        row["completed"] and row["prefix_dropped"] == 0 and row["kept_entries"] == row["retained_slots"]
        and row["peak_reserved"] + row["non_torch"] <= row["planned_total"]
    )  # fmt: skip
    return row


def _in_fresh_process(precision: str, context: int, concurrency: int, new_tokens: int, cap: bool = True) -> dict[str, Any]:
    """One GPU case in a process of its own (the cap is per process; no earlier case's cache in it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "bench.plan_check", "--case", f"{precision}:{context}:{concurrency}",
               "--new-tokens", str(new_tokens), "--out", str(out), *([] if cap else ["--no-cap"])]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                                  cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"precision": precision, "context": context, "concurrency": concurrency, "within": None,
                    "error": f"the case's process ran past {CASE_TIMEOUT_S} s", "completed": False, "sufficient": False}
        if out.exists():
            return json.loads(out.read_text())["rows"][0]
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:] or [f"exit {done.returncode}"]
        return {"precision": precision, "context": context, "concurrency": concurrency,
                "error": f"the case's process died: {' | '.join(tail)}", "within": None, "completed": False,
                "sufficient": False}


def run(device: str, precisions: list[str], contexts: tuple[int, ...], concurrencies: tuple[int, ...],
        new_tokens: int, budget_s: float, cap: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Every case; on a GPU each in a fresh process (this one never touches CUDA), on a CPU here."""
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for precision in precisions:
        loaded = None
        if device == "cpu":  # no allocator to cap: one process, one model per precision
            from qwen3vl_webui.weights.random_weights import load_random, source_for

            loaded = load_random(source_for("tiny"), precision, device)
            loaded.model.generation_config.eos_token_id = None
        for context in contexts:
            for concurrency in concurrencies:
                if time.monotonic() - started > budget_s:
                    print(f"budget of {budget_s:g} s spent: skipping {precision} {context} x {concurrency}", flush=True)
                    continue
                if device == "cpu":
                    row = run_case(device, precision, context, concurrency, new_tokens, loaded)
                else:
                    row = _in_fresh_process(precision, context, concurrency, new_tokens, cap)
                row["case_s"] = round(time.monotonic() - started, 1)
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
        return f"{head} planned {gib(row.get('planned_torch'))} (total {gib(row.get('planned_total'))}) · {row['error']}"
    if "allocator" in row:
        return f"{head} planned {gib(row['planned_torch'])} · {row['kept_before']} kept · {row['allocator']}"
    held = row["held_at_end"]
    capped = (
        f"(b) capped at {gib(row['cap'])} of total {gib(row['planned_total'])}: "
        f"{'enough' if row['sufficient'] else 'NOT enough'} (completed: {row['completed']}, "
        if "cap" in row else f"no cap, total {gib(row['planned_total'])} ("
    )  # fmt: skip
    return (f"{head} (a) planned {gib(row['planned_torch'])} · needed {gib(row['needed'])} = allocated "
            f"{gib(row['peak_allocated'])} + graph pools {gib(held['graph_pools'])} + split free "
            f"{gib(held['split_free'])} · error {row['error_pct']}% · {capped}reserved "
            f"{gib(row['peak_reserved'])} + non-torch {gib(row['non_torch'])}, {row['kept_before']} of "
            f"{row['retained_slots']} kept, {row['prefix_dropped']} dropped) · start-up reserved "
            f"{gib(row['reserved_at_start'])}, allocated {gib(row['allocated_at_start'])} · {row['seconds']} s")


def rejudge(path: str) -> list[dict[str, Any]]:
    """The planner of this tree against the needs a GPU run measured (`path`, rows of `--no-cap`: without a cap the
    need does not depend on the plan, so a changed planner is judged on (a) without the GPU). Also whether the plan's
    total covers the run's peak reserved bytes plus the non-torch ones (check (b)'s sum; the capped run is what
    decides (b)). Each case is planned for the burst of short prompts it served (the engine's largest burst grew
    after session 11, when bursts were bounded by the slot's length)."""
    from qwen3vl_webui import plan, planner, ranges

    shape = planner.ModelShape.qwen3vl_4b()
    rows = json.loads(Path(path).read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    out = []
    for row in rows:
        if "needed" not in row or "cap" in row:
            continue
        rows_, tokens = row.get("burst") or (0, 0)  # the burst this run served (none before session 11)
        estimate = plan.plan_memory(shape, row["precision"], row["context"], row["concurrency"],
                                    ranges.largest_image_pixels(), burst=rows_ * tokens)  # fmt: skip
        peak = row["peak_reserved"] + row["non_torch"]
        out.append({
            "precision": row["precision"], "context": row["context"], "concurrency": row["concurrency"],
            "needed": row["needed"], "measured_planned_torch": row["planned_torch"],
            "planned_torch": estimate.torch_bytes, "planned_total": estimate.total,
            "error_pct": round(100 * (estimate.torch_bytes / row["needed"] - 1), 1),
            "peak_reserved_plus_non_torch": peak, "total_margin": estimate.total - peak,
        })  # fmt: skip
        r = out[-1]
        r["within"] = abs(r["error_pct"]) <= 100 * TOLERANCE
        print(f"{r['precision']:<8} {r['context']:>6} x {r['concurrency']:<2} planned {r['planned_torch'] / GIB:6.2f} GiB "
              f"(was {r['measured_planned_torch'] / GIB:6.2f}) · needed {r['needed'] / GIB:6.2f} · error "
              f"{r['error_pct']:+.1f}% · total {r['planned_total'] / GIB:6.2f} against peak reserved + non-torch "
              f"{peak / GIB:6.2f} ({r['total_margin'] / GIB:+.2f})", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the rows")
    ap.add_argument("--cpu", action="store_true", help="plumbing on a CPU with the tiny model (no figures)")
    ap.add_argument("--precisions", help="comma-separated (default: bf16, int8wo and a third built in memory)")
    ap.add_argument("--case", help="PRECISION:CONTEXT:CONCURRENCY: this one case in this process (what each GPU "
                                   "case's fresh process runs)")  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new cases after this long")
    ap.add_argument("--no-cap", action="store_true", help="measure each case's whole need: no cap, check (a) only")
    ap.add_argument("--rejudge", metavar="FILE", help="this tree's planner against a --no-cap run's file (no GPU)")
    args = ap.parse_args(argv)
    if args.rejudge:
        rows = rejudge(args.rejudge)
        Path(args.out).write_text(json.dumps({"measured": args.rejudge, "tolerance": TOLERANCE, "rows": rows}, indent=1))
        bad = [r for r in rows if not r["within"] or r["total_margin"] < 0]
        print(f"{len(rows)} cases, {len(bad)} outside ±{TOLERANCE:.0%} or with a total under the peak")
        return 1 if bad or not rows else 0
    device = "cpu" if args.cpu else "cuda"
    if args.case:
        precision, context, concurrency = args.case.split(":")
        rows = [run_case(device, precision, int(context), int(concurrency), args.new_tokens, cap=not args.no_cap)]
    else:
        cases = CPU_CASES if args.cpu else DEVICE_CASES
        chosen = args.precisions.split(",") if args.precisions else default_precisions(device)
        rows = run(device, chosen, cases["contexts"], cases["concurrencies"], args.new_tokens, args.budget_s,
                   cap=not args.no_cap)  # fmt: skip
    Path(args.out).write_text(json.dumps({"device": device, "tolerance": TOLERANCE, "rows": rows}, indent=1))
    if args.case:
        return 0
    checked = [r for r in rows if r["within"] is not None or r["sufficient"] is not None or "error" in r]
    bad = [r for r in checked if r["within"] is False or r["sufficient"] is False or "error" in r]
    print(f"{len(checked)} cases measured, {len(bad)} outside ±{TOLERANCE:.0%} or not enough under the plan's total"
          if checked else "no GPU figures (CPU plumbing)")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
