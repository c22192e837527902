"""Split-KV decode attention on the GPU: correctness and kernel time against SDPA.

One device call, sections in order, each skipped when `--deadline-s` would be passed; the JSON is rewritten after
every section.
  kernel    rows 1/8/32 x lengths mixed 100..4096 (max_len 4096) and the engine's shape (lengths 640, max_len 1024):
            ||out - ref|| / ||ref|| against a float64 reference on fresh random data (outputs poisoned with NaN,
            dead KV tails NaN), and time per call (do_bench median over a CUDA graph of 36 calls on rotating KV
            buffers, like 36 layers) for the Triton kernel (split sweep) and SDPA over the whole slot with a mask.
  splits    the split count swept wider (1..64) for long single rows and for 32 rows of equal length.
Re-run it when the kernel, its split heuristic or the GPU changes. (The engine A/B sections this script also ran,
SDPA vs the kernel and dynamic vs static compiles, answered their questions in docs/engine.md (v3) and were removed;
the fp32 greedy check of the whole engine is bench.greedy.)

    python -m bench.attention_check --out $OUT/attention_check.json                 # ~40 s on an H100
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import copy_bandwidth

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

    from qwen3vl_webui.kernels import attention

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

    from qwen3vl_webui.kernels import attention

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="attention_check.json")
    ap.add_argument("--deadline-s", type=float, default=330.0)
    ap.add_argument("--sections", default="kernel,splits")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch
    import triton

    on_cuda = args.device.startswith("cuda")
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__, triton=triton.__version__,
        transformers=__import__("transformers").__version__, copy_gb_s=copy_bandwidth(args.device), skipped=[],
        errors={},
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    sections = args.sections.split(",")

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    def run(name: str, need_s: float, fn: Any) -> None:
        left = args.deadline_s - (time.perf_counter() - t0)
        if name not in sections:
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
    if report.get("skipped"):
        print("skipped:", report["skipped"])
    if report.get("errors"):
        print("errors:", list(report["errors"]))
    print("wall", report.get("wall_s"))


if __name__ == "__main__":
    main()
