"""Split-KV decode attention on the GPU: correctness and kernel time against SDPA, then the engine with it.

One device call, sections in priority order, each skipped when `--deadline-s` would be passed; the JSON is
rewritten after every section.
  kernel    rows 1/8/32 x lengths mixed 100..4096 (max_len 4096) and the engine's shape (lengths 640, max_len 1024):
            ||out - ref|| / ||ref|| against a float64 reference on fresh random data (outputs poisoned with NaN,
            dead KV tails NaN), and time per call (do_bench median over a CUDA graph of 36 calls on rotating KV
            buffers, like 36 layers) for the Triton kernel (split sweep) and SDPA over the whole slot with a mask.
  splits    the split count swept wider (1..64) for long single rows and for 32 rows of equal length.
  fp32      the 4B model in fp32 (the kernel's dot in IEEE fp32): engine greedy tokens with the kernel and with
            SDPA against `generate` (bf16 near-ties cannot hide a wrong function there).
  graphs    the engine uncompiled (CUDA graphs only) on the random 4B bf16 model: SDPA vs the kernel, same run.
  dynamic   compiled + kernel, batch buckets (1, 8, 32) with one dynamic compile for 8 and 32 (cold cache).
  static    compiled + kernel, one static compile per bucket (same cache dir: bucket 1 is warm from `dynamic`).
  old       compiled + SDPA (the v2 engine), buckets (1, 32) static, if time is left.
Per engine: start-up (compile) time, graph replay ms per step at position 640, decode-only tok/s of 1 / 8 / 32
streams (512-token prompts, `--new-tokens`), greedy tokens vs `generate` (bf16 near-ties expected, see notes).

    python bench/attention_check.py --out $OUT/attention_check.json                 # ~340 s on an H100
    python bench/attention_check.py --sections splits,fp32 --out $OUT/attention_check_2.json   # ~35 s
    python bench/attention_check.py --preset tiny --device cpu --sections graphs --new-tokens 16 \
        --prompt-tokens 32 --slot-tokens 128                                        # dry run of the plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import _free, copy_bandwidth, greedy_check, make_prompts  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 36


# ---------------------------------------------------------------------------------------------- kernel level


def kv_case(rows: int, max_len: int, lengths: list[int], seed: int, slots: int = 32) -> dict[str, Any]:
    """q [rows, heads, 1, dim] as the layer makes it; K/V as views [rows] of flat [slots x kv_heads x max_len, dim]."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    slots = max(slots, rows)

    def flat() -> Any:
        return torch.randn(slots * KV_HEADS * max_len, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    k, v = (flat().view(slots, KV_HEADS, max_len, DIM)[:rows] for _ in range(2))
    q = torch.randn(rows, 1, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    lens = torch.tensor(lengths, device="cuda")
    mask = (torch.arange(max_len, device="cuda").view(1, -1) < lens.view(-1, 1)).view(rows, 1, 1, max_len)
    return dict(q=q, k=k, v=v, lengths=lens, mask=mask)


def sdpa_old(c: dict[str, Any], backend: Any = None) -> Any:
    """The engine's old decode attention: packed GQA query, SDPA over the whole slot behind the boolean mask."""
    import contextlib

    import torch
    from torch.nn.attention import sdpa_kernel

    rows = c["q"].shape[0]
    packed = c["q"].reshape(rows, KV_HEADS, HEADS // KV_HEADS, DIM)
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, c["k"], c["v"], attn_mask=c["mask"], scale=DIM**-0.5
        )
    return out.reshape(rows, HEADS, 1, DIM)


def rel_err(out: Any, ref: Any) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def graph_time_us(calls: list[Any]) -> float:
    """do_bench median of one CUDA graph replaying `calls` in order, per call (like the layers of one step)."""
    import torch
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms * 1e3 / len(calls)


def kernel_section(report: dict[str, Any], copy_gb_s: float) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    from qwen3vl_webui.engine import attention

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = torch.Generator().manual_seed(0)
    configs = []
    for rows in (1, 8, 32):
        configs.append(("mixed", rows, 4096, lambda n: torch.randint(100, 4097, (n,), generator=rng).tolist()))
    for rows in (1, 32):
        configs.append(("engine", rows, 1024, lambda n: [640] * n))
    results = []
    for label, rows, max_len, draw in configs:
        row: dict[str, Any] = dict(
            case=label, rows=rows, max_len=max_len, heuristic_splits=attention.num_splits(rows, KV_HEADS, max_len, sms)
        )
        # Correctness: three fresh draws; poisoned output, NaN past every row's length (never read).
        errs, sdpa_errs, nans, op_equal = [], [], [], []
        for seed in range(3):
            lengths = draw(rows)
            c = kv_case(rows, max_len, lengths, seed=100 + seed)
            ref = attention.decode_attention_reference(
                c["q"].double(), c["k"].double(), c["v"].double(), c["lengths"], DIM**-0.5
            )
            sdpa_errs.append(rel_err(sdpa_old(c), ref))
            for r, n in enumerate(lengths):
                c["k"][r, :, n:] = float("nan")
                c["v"][r, :, n:] = float("nan")
            for splits in (None, 1, 3, 16):
                out = torch.full((rows, HEADS, 1, DIM), float("nan"), device="cuda", dtype=torch.bfloat16)
                attention.decode_attention_triton(
                    c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5, splits=splits, out=out
                )
                torch.cuda.synchronize()
                nans.append(bool(out.isnan().any()))
                errs.append(rel_err(out, ref))
            via_op = attention.decode_attention(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5)
            direct = attention.decode_attention_triton(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5)
            op_equal.append(bool(torch.equal(via_op, direct)))
        row.update(
            max_rel_err=max(errs), any_nan=any(nans), op_equals_direct=all(op_equal), sdpa_max_rel_err=max(sdpa_errs)
        )
        # Time: 36 calls per graph on rotating buffers (more than L2 holds), one set of lengths.
        lengths = draw(rows)
        per_set = rows * KV_HEADS * max_len * DIM * 2 * 2
        sets = [
            kv_case(rows, max_len, lengths, seed=200 + i, slots=rows)
            for i in range(max(2, min(LAYERS, math.ceil(400e6 / per_set))))
        ]
        live = sum(lengths) * KV_HEADS * DIM * 2 * 2
        row.update(sets=len(sets), live_kv_mb=round(live / 1e6, 2), slot_kv_mb=round(per_set / 1e6, 2),
                   floor_us=round(live / (copy_gb_s * 1e9) * 1e6, 2))  # fmt: skip

        def calls(fn: Any, sets: list[dict[str, Any]] = sets) -> list[Any]:
            return [lambda c=c: fn(c) for c in (sets * LAYERS)[:LAYERS]]

        timing = {}
        for splits in (None, 1, 2, 4, 8, 16):
            key = "triton" if splits is None else f"triton_s{splits}"
            timing[key] = graph_time_us(calls(lambda c, s=splits: attention.decode_attention_triton(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5, splits=s)))  # fmt: skip
        timing["op"] = graph_time_us(calls(lambda c: attention.decode_attention(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5)))  # fmt: skip
        for name, backend in (("sdpa_default", None), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
            try:
                timing[name] = graph_time_us(calls(lambda c, b=backend: sdpa_old(c, b)))
            except Exception as exc:
                timing[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        row["us_per_call"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()}
        best = min((v, k) for k, v in timing.items() if k.startswith("triton_s") and isinstance(v, float))
        row["best_splits"] = best[1]
        results.append(row)
        print("kernel", json.dumps(row), flush=True)
        sets.clear()
        torch.cuda.empty_cache()
    report["kernel"] = results


def splits_section(report: dict[str, Any]) -> None:
    """More splits than the heuristic's cap (16) for one long row, and 1 vs 2 at 32 short rows."""
    import torch

    from qwen3vl_webui.engine import attention

    rng = torch.Generator().manual_seed(1)
    cases = [
        (1, 4096, [4096]), (1, 4096, [2048]), (1, 1024, [640]), (8, 4096, torch.randint(100, 4097, (8,), generator=rng).tolist()),
        (32, 1024, [640] * 32), (32, 4096, [3000] * 32),
    ]  # fmt: skip
    rows_out = []
    for rows, max_len, lengths in cases:
        c = kv_case(rows, max_len, lengths, seed=7, slots=rows)
        ref = attention.decode_attention_reference(
            c["q"].double(), c["k"].double(), c["v"].double(), c["lengths"], DIM**-0.5
        )
        errs = {}
        for splits in (32, 64):
            out = torch.full((rows, HEADS, 1, DIM), float("nan"), device="cuda", dtype=torch.bfloat16)
            attention.decode_attention_triton(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5, splits=splits, out=out)
            errs[splits] = rel_err(out, ref)
        per_set = rows * KV_HEADS * max_len * DIM * 4
        sets = [kv_case(rows, max_len, lengths, seed=300 + i, slots=rows) for i in range(max(2, min(LAYERS, math.ceil(400e6 / per_set))))]  # fmt: skip
        timing = {}
        for splits in (None, 1, 2, 8, 16, 32, 64):
            calls = [lambda c=c, s=splits: attention.decode_attention_triton(c["q"], c["k"], c["v"], c["lengths"], DIM**-0.5, splits=s) for c in (sets * LAYERS)[:LAYERS]]  # fmt: skip
            timing["heuristic" if splits is None else f"s{splits}"] = round(graph_time_us(calls), 2)
        live = sum(lengths) * KV_HEADS * DIM * 4
        row = dict(rows=rows, max_len=max_len, mean_length=sum(lengths) / rows, us_per_call=timing,
                   floor_us=round(live / (report["copy_gb_s"] * 1e9) * 1e6, 2), err_32=errs[32], err_64=errs[64])  # fmt: skip
        rows_out.append(row)
        print("splits", json.dumps(row), flush=True)
        sets.clear()
    report["splits"] = rows_out


def fp32_section(report: dict[str, Any], args: Any) -> None:
    """fp32 (IEEE dot in the kernel): the engine's greedy tokens with the kernel and with SDPA against `generate`."""
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions

    loaded = build_loaded("4b", "cuda", dtype=torch.float32)
    prompts = make_prompts(2, args.prompt_tokens, loaded.model.config.text_config.vocab_size - 64, seed=1)
    out: dict[str, Any] = {}
    try:
        for kernel in (True, False):
            options = BatchOptions(max_batch=2, token_budget=2 * 1024, buckets=(1, 2), eos_token_ids=(), compile=False, decode_kernel=kernel)  # fmt: skip
            with BatchEngine(loaded, options) as engine:
                label = "kernel" if kernel else "sdpa"
                checks = [greedy_check(loaded, engine, p, 32) for p in prompts]
                out[label] = dict(decode_attention=engine.decode_attention, checks=checks)
                print("fp32", label, engine.decode_attention, [c["equal_prefix"] for c in checks], flush=True)
    finally:
        _free(loaded)
    out["kernel_tokens_equal_sdpa_tokens"] = [
        a["engine_tokens"] == b["engine_tokens"] for a, b in zip(out["kernel"]["checks"], out["sdpa"]["checks"])
    ]
    report["fp32_greedy"] = out


# ---------------------------------------------------------------------------------------------- engine level


def build_loaded(preset: str = "4b", device: str = "cuda", dtype: Any = None) -> Any:
    """The real 4B architecture with random bf16 weights, built in memory (no checkpoint on disk)."""
    import torch

    from qwen3vl_webui.engine.loading import LoadedModel
    from qwen3vl_webui.testing import tiny_model

    started = time.perf_counter()
    tokenizer = tiny_model.build_tokenizer()
    config = tiny_model.build_config(preset, tokenizer)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = tiny_model.build_model(config, dtype=dtype, device=device)
    model.generation_config.eos_token_id = None
    assert model.config.text_config._attn_implementation == "sdpa", model.config.text_config._attn_implementation
    return LoadedModel(
        model, tiny_model.build_processor(tokenizer), "bf16" if dtype == torch.bfloat16 else "fp32", device,
        f"random {preset}", time.perf_counter() - started,
        model.get_memory_footprint(), True,
    )  # fmt: skip


def run_streams(engine: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """All prompts submitted at once, read through `submit_tokens`; decode-only rate once the last one decodes."""
    from qwen3vl_webui.engine.generation import SamplingParams

    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    times: list[list[float]] = [[] for _ in prompts]
    started = time.perf_counter()
    streams = [engine.submit_tokens(p, sampling, threading.Event()) for p in prompts]

    def read(i: int) -> None:
        for _ in streams[i]:
            times[i].append(time.perf_counter())

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    n = len(prompts)
    made = sum(len(t) for t in times)
    last_first = max(t[0] for t in times)
    return dict(
        streams=n, new_tokens=len(times[0]), wall_s=round(wall, 3), total_tok_s=round(made / wall, 1),
        decode_tok_s=round(n * (new_tokens - 1) / (max(t[-1] for t in times) - last_first), 1),
        ttft_p50_s=round(statistics.median(t[0] - started for t in times), 3),
    )  # fmt: skip


def replay_ms(engine: Any, rows: int, position: int) -> float | None:
    """Median time of one graph replay of bucket `rows` with every row at `position` (engine idle)."""
    import torch

    graph = engine.core.graphs.graph(rows)
    if graph is None:
        return None
    engine.core.kv.place_rows(rows, position)
    for _ in range(5):
        graph.replay()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 20)
    engine.core.kv.place_rows(rows, 0)
    return round(statistics.median(samples), 3)


def engine_section(
    loaded: Any, prompts: list[Any], args: Any, *, compile: bool, kernel: bool, dynamic: bool, buckets: tuple[int, ...]
) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions

    graphs_before = counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    engine = BatchEngine(loaded, BatchOptions(
        max_batch=max(buckets), token_budget=max(buckets) * args.slot_tokens, buckets=buckets,
        eos_token_ids=(), compile=compile, compile_cache_dir=args.cache_dir, decode_kernel=kernel, dynamic_batch=dynamic,
    ))  # fmt: skip
    result: dict[str, Any] = dict(
        startup_s=round(time.perf_counter() - started, 2), warmup_s=engine.warmup_s, decode_path=engine.decode_path,
        decode_attention=engine.decode_attention, compile_error=engine.compile_error, graph_error=engine.graph_error,
        dynamo_graphs=counters["stats"]["unique_graphs"] - graphs_before, buckets=list(engine.buckets),
    )  # fmt: skip
    print("engine start", json.dumps(result), flush=True)
    try:
        result["replay_ms_at_640"] = {str(b): replay_ms(engine, b, 640) for b in engine.buckets}
        run_streams(engine, prompts[:1], 8)  # warm-up
        result["runs"] = []
        for n in (b for b in (1, 8, 32) if b in engine.buckets):
            row = run_streams(engine, prompts[:n], args.new_tokens)
            result["runs"].append(row)
            print("engine run", json.dumps(row), flush=True)
        check = greedy_check(loaded, engine, prompts[0], 32)
        result["greedy_vs_generate"] = {k: v for k, v in check.items() if k != "engine_tokens"}
        result["greedy_tokens"] = check["engine_tokens"]
    finally:
        engine.close()
        _free(engine)
        torch._dynamo.reset()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="attention_check.json")
    ap.add_argument("--deadline-s", type=float, default=330.0)
    ap.add_argument("--sections", default="kernel,graphs,dynamic,static,old", help="also: splits, fp32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--slot-tokens", type=int, default=1024)
    ap.add_argument("--preset", default="4b", help="tiny + --device cpu: a dry run of the script's plumbing")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", default="/tmp/attention-check-inductor", help="fresh on a new machine: cold")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch
    import triton

    on_cuda = args.device.startswith("cuda")
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__, triton=triton.__version__,
        transformers=__import__("transformers").__version__, copy_gb_s=copy_bandwidth(args.device), skipped=[],
        errors={}, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, slot_tokens=args.slot_tokens,
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    sections = args.sections.split(",")

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    def run(name: str, need_s: float, fn: Any) -> None:
        left = args.deadline_s - (time.perf_counter() - t0)
        if name not in sections and name != "load":
            return
        if left < need_s:
            report["skipped"].append(f"{name} (needs ~{need_s:.0f} s, {left:.0f} s left)")
            print(f"--- skip {name}", flush=True)
            return
        print(f"--- {name} ({left:.0f} s left)", flush=True)
        t = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report["errors"][name] = traceback.format_exc(limit=4)[-2000:]
        report.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        save()

    if on_cuda:
        run("kernel", 20, lambda: kernel_section(report, report["copy_gb_s"]))
        run("splits", 20, lambda: splits_section(report))
        run("fp32", 40, lambda: fp32_section(report, args))
    if not {"graphs", "dynamic", "static", "old"} & set(sections):
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        save()
        print_table(report)
        return
    state: dict[str, Any] = {}

    def load() -> None:
        state["loaded"] = build_loaded(args.preset, args.device)
        state["prompts"] = make_prompts(
            32, args.prompt_tokens, state["loaded"].model.config.text_config.vocab_size - 64
        )

    run("load", 10, load)
    if "loaded" not in state:
        print_table(report)
        return
    loaded, prompts = state["loaded"], state["prompts"]
    setups = {
        "graphs": (40, {"graphs_sdpa": dict(compile=False, kernel=False, dynamic=False, buckets=(1, 8, 32)),
                        "graphs_kernel": dict(compile=False, kernel=True, dynamic=False, buckets=(1, 8, 32))}),
        "dynamic": (90, {"compiled_kernel_dynamic": dict(compile=True, kernel=True, dynamic=True, buckets=(1, 8, 32))}),
        "static": (90, {"compiled_kernel_static": dict(compile=True, kernel=True, dynamic=False, buckets=(1, 8, 32))}),
        "old": (85, {"compiled_sdpa_static": dict(compile=True, kernel=False, dynamic=False, buckets=(1, 32))}),
    }  # fmt: skip
    for section, (need, engines) in setups.items():

        def one(engines: dict[str, dict[str, Any]] = engines) -> None:
            for key, kw in engines.items():
                report[key] = engine_section(loaded, prompts, args, **kw)
                save()

        run(section, need, one)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\ndevice {report['device']}, torch {report['torch']}, triton {report['triton']}, copy {report['copy_gb_s']} GB/s"
    )
    print(f"{'case':7} {'rows':>4} {'max_len':>7} {'err':>9} {'nan':>4} {'floor us':>8} {'triton us':>9} {'splits':>6} "
          f"{'best':>12} {'sdpa us':>8} {'cudnn':>8} {'effic.':>8}")  # fmt: skip
    for r in report.get("kernel", []):
        t = r["us_per_call"]

        def f(v: Any) -> str:
            return f"{v:8.1f}" if isinstance(v, float) else f"{'err':>8}"

        print(f"{r['case']:7} {r['rows']:4d} {r['max_len']:7d} {r['max_rel_err']:9.2e} {str(r['any_nan'])[0]:>4} "
              f"{r['floor_us']:8.1f} {t['triton']:9.1f} {r['heuristic_splits']:6d} {r['best_splits'] + '=' + str(t[r['best_splits']]):>12} "
              f"{f(t['sdpa_default'])} {f(t['sdpa_cudnn'])} {f(t['sdpa_efficient'])}")  # fmt: skip
    for r in report.get("splits", []):
        print(f"splits rows {r['rows']} max_len {r['max_len']} mean length {r['mean_length']:.0f}: floor {r['floor_us']} us, "
              f"{r['us_per_call']}, err 32/64 splits {r['err_32']:.2e}/{r['err_64']:.2e}")  # fmt: skip
    if "fp32_greedy" in report:
        f = report["fp32_greedy"]
        for label in ("kernel", "sdpa"):
            eq = [c["equal_prefix"] for c in f[label]["checks"]]
            print(f"fp32 engine ({f[label]['decode_attention']}) vs generate: equal prefix {eq} of 32")
        print(f"fp32 kernel tokens == sdpa tokens: {f['kernel_tokens_equal_sdpa_tokens']}")
    print(
        f"\n{'engine':26} {'start s':>8} {'graphs':>6} {'replay ms 1/8/32':>20} {'decode tok/s 1/8/32':>24} {'total 32':>8} {'greedy':>6}"
    )
    for key in (
        "graphs_sdpa",
        "graphs_kernel",
        "compiled_kernel_dynamic",
        "compiled_kernel_static",
        "compiled_sdpa_static",
    ):
        if key not in report:
            continue
        e = report[key]
        rep = "/".join(str(e["replay_ms_at_640"].get(b)) for b in ("1", "8", "32"))
        runs = {r["streams"]: r for r in e.get("runs", [])}
        dec = "/".join(str(runs[n]["decode_tok_s"]) if n in runs else "-" for n in (1, 8, 32))
        tot = runs[32]["total_tok_s"] if 32 in runs else "-"
        greedy = e.get("greedy_vs_generate", {}).get("equal_prefix", "-")
        print(f"{key:26} {e['startup_s']:8.1f} {e['dynamo_graphs']:6d} {rep:>20} {dec:>24} {tot:>8} {greedy:>6}")
        print(f"{'':26} warm-up per bucket {e['warmup_s']} {e['decode_attention']} {e['compile_error'] or ''}")
    if report.get("skipped"):
        print("skipped:", report["skipped"])
    if report.get("errors"):
        print("errors:", list(report["errors"]))
    print("wall", report.get("wall_s"))


if __name__ == "__main__":
    main()
