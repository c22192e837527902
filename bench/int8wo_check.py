"""INT8 weight-only (int8wo) on the GPU, in ONE run: kernels and quality against bf16.

1. kernels: for the 4B's text Linear shapes (K -> N) at 1, 8 and 32 token rows, each Triton config of a small sweep
   is checked against float64 dequant+matmul (output poisoned with NaN first, fresh random data per shape) and timed
   (triton do_bench, median; it flushes L2 before every call). Beside it: bf16 cuBLAS F.linear on the same shape,
   the eager dequantize + F.linear path, torch's aten._weight_int8pack_mm, and the Triton GEMV on bf16 weights. The
   best config per (row class, N, K) goes into `int8_kernels.TUNED` for the rest of the run and is printed.
2. step_linears: the 252 text matmuls of one decode step (36 layers x q,k,v,o,gate,up,down, distinct weights, so
   nothing stays in L2) captured in one CUDA graph: int8wo kernels against bf16 cuBLAS, at 1 and 32 rows.
3. quality: random 4B checkpoint; logits of a 512-token prompt (relative error and top-1 agreement over all 512
   positions against bf16) and 64 greedy `generate` tokens, for int8wo, bnb LLM.int8 threshold 6 and threshold 0.

    python -m bench.int8wo_check --out $OUT/int8wo_check.json        # on the GPU, ~4 min on an H100

Sections run in that order while `--deadline-s` allows; the JSON is rewritten after every section. Re-run it when
the int8 kernels or the GPU change: the sweep's best configs are what `int8_kernels.TUNED` holds. (The engine rates
this script also measured answered their question in docs/engine.md's int8wo section and were removed: the engine's
figures in every precision come from bench.matrix.)
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import GIB, copy_bandwidth, free, graph_ms, make_prompts

# (K, N) of Qwen3-VL-4B's text Linears: q, k/v, o, gate/up, down.
SHAPES = [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560)]
LAYER = [(2560, 4096), (2560, 1024), (2560, 1024), (4096, 2560), (2560, 9728), (2560, 9728), (9728, 2560)]
ROWS = (1, 8, 32)


def _configs(rows: int, sweep: str = "base") -> list[Any]:
    from qwen3vl_webui.kernels.matmul_triton import KernelConfig as C

    gemv = [(4, 1024, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (16, 256, 4, 1), (16, 512, 4, 1), (32, 256, 4, 1),
            (16, 1024, 8, 1), (32, 512, 8, 1)]  # fmt: skip
    if sweep == "wide":  # run 1's winners were 4 rows x 1024 bytes: narrower and longer tiles, pipelined loads
        gemv += [(2, 2048, 4, 1), (4, 2048, 4, 1), (4, 2048, 8, 1), (8, 2048, 8, 1), (2, 1024, 2, 1),
                 (4, 1024, 2, 1), (4, 1024, 4, 2), (4, 1024, 4, 3), (8, 1024, 8, 1)]  # fmt: skip
    if rows == 1:
        return [C(1, bn, bk, w, st, fast) for bn, bk, w, st in gemv for fast in (True, False)]
    bm = 16 if rows <= 16 else 32
    dots = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4), (16, 512, 4, 3), (32, 512, 4, 3)]
    out = [C(bm, bn, bk, w, s, fast) for bn, bk, w, s in dots for fast in (True, False)]
    if rows <= 8:  # one GEMV program column per row: the weights come from L2 after the first row
        out += [C(1, 8, 512, 4, 1, True), C(1, 16, 512, 4, 1, True)]
    return out


def _bench(fn: Any) -> float:
    """Median microseconds (triton's do_bench zeroes a 256 MB buffer before each call: cold L2)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _rel(out: Any, ref: Any) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def kernels_section(report: dict[str, Any], sweep: str = "base") -> None:
    import torch

    from qwen3vl_webui.kernels import matmul_triton as ik
    from qwen3vl_webui.kernels.int8 import quantize_weight

    rows_out: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in SHAPES:
        w16 = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        q, scale = quantize_weight(w16)
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
            row = kernel_row(x, w16, q, scale, sweep)
            rows_out.append(row)
            print("kernel", json.dumps({k2: v for k2, v in row.items() if k2 not in ("configs", "configs_failed")}),
                  flush=True)  # fmt: skip
    report["kernels"] = rows_out
    report["tuned"] = {f"{m},{n},{k}": list(c) for (m, n, k), c in ik.TUNED.items()}
    print(
        "TUNED = {" + ", ".join(f"({m}, {n}, {k}): KernelConfig{tuple(c)}" for (m, n, k), c in ik.TUNED.items()) + "}"
    )


def kernel_row(x: Any, w16: Any, q: Any, scale: Any, sweep: str = "base") -> dict[str, Any]:
    """Every config of the sweep at one (rows, N, K): checked, timed; the best goes into int8_kernels.TUNED."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import matmul_triton as ik
    from qwen3vl_webui.kernels.int8 import _dequant_matmul

    (rows, k), n = x.shape, q.shape[0]
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    row: dict[str, Any] = dict(k=k, n=n, rows=rows)
    bytes_int8 = n * k + 4 * n + 2 * rows * (k + n)
    bytes_bf16 = 2 * n * k + 2 * rows * (k + n)
    configs = []
    for cfg in _configs(rows, sweep):
        out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        try:
            ik.int8_matmul(x, q, scale, cfg, out=out)
            torch.cuda.synchronize()
        except Exception as exc:  # a config that does not compile (registers, shared memory) is skipped
            configs.append(dict(cfg=list(cfg), error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        err = _rel(out, ref)
        written = not bool(torch.isnan(out).any())
        ok = written and err < 1e-2
        us = _bench(lambda cfg=cfg: ik.int8_matmul(x, q, scale, cfg)) if ok else None
        configs.append(dict(cfg=list(cfg), rel_err=err, all_written=written, us=us))
    good = [c for c in configs if c.get("us") is not None]
    row["configs_ok"] = f"{len(good)}/{len(configs)}"
    row["configs_failed"] = [c for c in configs if c.get("us") is None]
    best = min(good, key=lambda c: c["us"])
    default = ik.default_config(rows, n, k)
    chosen = ik.TUNED[(ik.row_class(rows), n, k)] = ik.KernelConfig(*best["cfg"])
    s16 = scale.to(torch.bfloat16)
    row.update(
        best_cfg=best["cfg"], best_us=best["us"], best_rel_err=best["rel_err"],
        best_gb_s=bytes_int8 / best["us"] / 1e3, best_again_us=_bench(lambda: ik.int8_matmul(x, q, scale, chosen)),
        default_cfg=list(default), default_us=next((c["us"] for c in good if c["cfg"] == list(default)), None),
        bf16_cublas_us=_bench(lambda: F.linear(x, w16)),
        dequant_linear_us=_bench(lambda: _dequant_matmul(x, q, scale)),
    )  # fmt: skip
    row["bf16_cublas_gb_s"] = bytes_bf16 / row["bf16_cublas_us"] / 1e3
    row["speedup_vs_bf16"] = row["bf16_cublas_us"] / row["best_us"]
    try:
        row["aten_int8pack_rel_err"] = _rel(torch.ops.aten._weight_int8pack_mm(x, q, s16), ref)
        row["aten_int8pack_us"] = _bench(lambda: torch.ops.aten._weight_int8pack_mm(x, q, s16))
    except Exception as exc:
        row["aten_int8pack_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if rows == 1:  # the same GEMV kernel on bf16 weights (scale of ones) against cuBLAS
        ones = torch.ones(n, device="cuda")
        ref16 = x.double() @ w16.double().T
        b16 = []
        for bn, bk, warps in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (4, 1024, 4), (8, 1024, 8)):
            cfg = ik.KernelConfig(1, bn, bk, warps, 1, False)
            out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            ik.int8_matmul(x, w16, ones, cfg, out=out)
            if not bool(torch.isnan(out).any()) and _rel(out, ref16) < 1e-2:
                b16.append((_bench(lambda cfg=cfg: ik.int8_matmul(x, w16, ones, cfg)), list(cfg)))
        us, cfg = min(b16)
        row.update(triton_bf16_gemv_us=us, triton_bf16_gemv_cfg=cfg, triton_bf16_gemv_gb_s=bytes_bf16 / us / 1e3)
    row["configs"] = configs
    return row


def step_linears_section(report: dict[str, Any]) -> None:
    """One decode step's 252 text matmuls in one CUDA graph (distinct weights: 3.6 GB int8 / 7.3 GB bf16)."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import matmul_triton as ik

    out: dict[str, Any] = {}
    qs = [(torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8), torch.rand(n, device="cuda") / 1e3)
          for _ in range(36) for k, n in LAYER]  # fmt: skip
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(36) for k, n in LAYER]
    for rows in (1, 32):
        xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in (2560, 4096, 9728)}
        steps = (("int8wo", lambda xs=xs: [ik.int8_matmul(xs[q.shape[1]], q, s) for q, s in qs]),
                 ("bf16_cublas", lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in ws]))  # fmt: skip
        for name, fn in steps:
            ms = graph_ms(fn)
            weight_bytes = sum(q.numel() + 4 * q.shape[0] for q, _ in qs) if name == "int8wo" else 2 * sum(
                w.numel() for w in ws)  # fmt: skip
            out[f"{name}_rows{rows}_ms"] = ms
            out[f"{name}_rows{rows}_gb_s"] = weight_bytes / ms / 1e6
            print("step linears", name, rows, f"{ms:.3f} ms", f"{weight_bytes / ms / 1e6:.0f} GB/s", flush=True)
    report["step_linears"] = out


def load_int8_threshold0(checkpoint: str) -> Any:
    """INT8 with llm_int8_threshold=0.0 (no fp16 outlier path, so the step can be captured): a bench-only load."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from qwen3vl_webui.weights.loading import SKIP_QUANTIZATION
    from qwen3vl_webui.weights.model import LoadedModel

    started = time.perf_counter()
    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=SKIP_QUANTIZATION)
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, quantization_config=cfg, dtype=torch.float16, device_map="cuda", attn_implementation="sdpa"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    return LoadedModel(
        model, processor, "int8", "cuda", checkpoint, time.perf_counter() - started, model.get_memory_footprint(), True
    )


def quality(name: str, loaded: Any, prompt: Any, refs: dict[str, dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Logits of the whole prompt and `tokens` greedy generate tokens, compared with each reference run so far."""
    import torch

    inputs = {k: v.to("cuda") for k, v in prompt.inputs.items()}
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits[0].float()
        out = loaded.model.generate(
            **inputs, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, repetition_penalty=1.0,
            temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    gen = out[0, inputs["input_ids"].shape[1] :].tolist()
    row: dict[str, Any] = dict(tokens=gen)
    for ref_name, ref in refs.items():
        base = ref["logits"]
        same = [a == b for a, b in zip(gen, ref["tokens"])]
        row[f"vs_{ref_name}"] = dict(
            logits_rel_err=float((logits - base).norm() / base.norm()),
            top1_agree=float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
            greedy_prefix_equal=same.index(False) if False in same else len(same), greedy_equal=sum(same),
        )  # fmt: skip
    print("quality", name, {k: v for k, v in row.items() if k != "tokens"}, flush=True)
    if name in ("fp32", "bf16"):
        refs[name] = dict(logits=logits, tokens=gen)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--out", default="int8wo_check.json")
    ap.add_argument("--deadline-s", type=float, default=430.0)
    ap.add_argument("--sections", default="kernels,step_linears,quality")
    ap.add_argument("--gemv-sweep", default="base", choices=("base", "wide"), help="wide: more 1-row configs")
    ap.add_argument("--quality", default="bf16,int8wo,int8_t0,int8", help="in order; fp32 and bf16 become references")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch

    from qwen3vl_webui.weights.loading import load_model

    sections = args.sections.split(",")
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        transformers=__import__("transformers").__version__, triton=__import__("triton").__version__,
        copy_gb_s=copy_bandwidth("cuda"), args=vars(args), skipped=[], errors={},
    )  # fmt: skip
    print(json.dumps(report), flush=True)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    def run(name: str, need_s: float, fn: Any) -> None:
        spent = time.perf_counter() - t0
        if name.split(":")[0] not in sections or spent + need_s > args.deadline_s:
            report["skipped"].append(name)
            print(f"skip {name} ({spent:.0f} s spent)", flush=True)
            return
        started = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report["errors"][name] = traceback.format_exc(limit=4)[-1500:]
        report.setdefault("section_s", {})[name] = round(time.perf_counter() - started, 1)
        save()

    run("kernels", 60, lambda: kernels_section(report, args.gemv_sweep))
    run("step_linears", 20, lambda: step_linears_section(report))

    if "quality" in sections:
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        t = time.perf_counter()
        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
        report["write_checkpoint_s"] = round(time.perf_counter() - t, 1)
        print(f"wrote the checkpoint in {report['write_checkpoint_s']} s", flush=True)
    tok_count = None
    prompts: list[Any] = []
    held: dict[str, Any] = {}
    refs: dict[str, dict[str, Any]] = {}

    def load(precision: str) -> Any:
        nonlocal tok_count, prompts
        if precision in held:
            return held[precision]
        for old in list(held):
            free(held.pop(old))
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        # fp32: the bf16 checkpoint's very weights, computed in fp32 (the reference for rounding alone).
        loaded = load_int8_threshold0(args.checkpoint) if precision == "int8_t0" else load_model(
            args.checkpoint, precision, "cuda")  # fmt: skip
        loaded.model.generation_config.eos_token_id = None  # equal lengths: random weights stop anywhere
        report.setdefault("loads", {})[precision] = dict(
            load_s=round(time.perf_counter() - started, 2), weights_gib=round(loaded.weights_bytes / GIB, 3),
            allocated_gib=round(torch.cuda.memory_allocated() / GIB, 3),
            load_peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
        )  # fmt: skip
        print("load", precision, report["loads"][precision], flush=True)
        if tok_count is None:
            tok_count = len(loaded.processor.tokenizer) - 32
            prompts = make_prompts(1, 512, tok_count)
        held[precision] = loaded
        return loaded

    def q_section(precision: str) -> None:
        loaded = load(precision)
        report.setdefault("quality", {})[precision] = quality(precision, loaded, prompts[0], refs, 64)

    for precision in args.quality.split(",") if args.quality else []:
        run(
            f"quality:{precision}",
            15 if precision in ("bf16", "int8wo", "fp32") else 35,
            lambda p=precision: q_section(p),
        )
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    print(f"\ndevice: {report['device']}, copy {report['copy_gb_s']} GB/s, wall {report.get('wall_s')} s, "
          f"skipped {report['skipped']}, errors {list(report['errors'])}")  # fmt: skip
    if report.get("kernels"):
        print(f"{'K->N':>11} {'M':>3} {'int8wo us':>9} {'GB/s':>6} {'default us':>10} {'bf16 cuBLAS':>11} {'GB/s':>6} "
              f"{'x bf16':>6} {'deq+lin':>8} {'aten':>8} {'tri bf16':>8} {'ok':>6}")  # fmt: skip
        for r in report["kernels"]:
            aten = r.get("aten_int8pack_us")
            print(f"{r['k']:>5}->{r['n']:<5} {r['rows']:3d} {r['best_us']:9.1f} {r['best_gb_s']:6.0f} "
                  f"{r['default_us'] or math.nan:10.1f} {r['bf16_cublas_us']:11.1f} {r['bf16_cublas_gb_s']:6.0f} "
                  f"{r['speedup_vs_bf16']:6.2f} {r['dequant_linear_us']:8.1f} {aten or math.nan:8.1f} "
                  f"{r.get('triton_bf16_gemv_us', math.nan):8.1f} {r['configs_ok']:>6}")  # fmt: skip
    if report.get("step_linears"):
        print("step linears:", json.dumps({k: round(v, 3) for k, v in report["step_linears"].items()}))
    for p, r in report.get("quality", {}).items():
        print("quality", p, {k: v for k, v in r.items() if k != "tokens"})
    for p, r in report.get("loads", {}).items():
        print("load", p, r)


if __name__ == "__main__":
    main()
