"""INT4 (W4A16) and FP8 weights on the GPU, in ONE run: the kernels' sweep against bf16 cuBLAS, and the whole model's
numerics against bf16.

    python -m bench.quant_check --out $OUT/quant_check.json     # GPU, ~2 min on an H200; no checkpoint needed

1. sweep: every text matmul shape of the 4B (q 2560->4096, k/v 2560->1024, o 4096->2560, gate/up 2560->9728,
   down 9728->2560) at 1, 16 and 32 rows, as 36 distinct weights in one CUDA graph (cold L2, back-to-back launches,
   as inside the decode step): bf16 cuBLAS against each int4 and fp8 kernel config; the best per (rows, N, K) is
   what w4a16_triton.TUNED / fp8_triton.TUNED hold (printed as Python to paste). Bytes per weight: bf16 2, fp8 1,
   int4 0.5 + 3/128.
2. quality: random weights of the 4B (bf16), quantized to int8wo, int4 and fp8 in turn from the same bf16 weights;
   last-token logits on 8 prompts of 256 tokens against bf16: cosine similarity and top-1 agreement. Random
   weights are not the real checkpoint (see the README for measuring quality on it), but the rounding each format
   does to the same weights is comparable.

Prediction (H200, before the run): one-row products stream int4 at ~2.5-3 TB/s of packed bytes, so a 2560->9728
product takes ~4.7 us against ~17 us for bf16 cuBLAS (~3.5x); at 32 rows the int4 kernel is at ~1.5-2x cuBLAS.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import graph_ms, write_json

HIDDEN, HEADS_DIM, KV_DIM, INTER, LAYERS = 2560, 4096, 1024, 9728, 36
SHAPES = [("q", HEADS_DIM, HIDDEN), ("kv", KV_DIM, HIDDEN), ("o", HIDDEN, HEADS_DIM), ("gate", INTER, HIDDEN),
          ("down", HIDDEN, INTER)]  # fmt: skip
ROWS = (1, 16, 32)


def int4_configs(rows: int) -> list[Any]:
    from qwen3vl_webui.kernels.w4a16_triton import W4Config

    if rows == 1:
        return [W4Config(1, bn, g, w, s) for bn in (8, 16, 32) for g in (1, 2, 4) for w in (4, 8) for s in (1, 2)
                if bn * g <= 64]  # fmt: skip
    bm = 16 if rows <= 16 else 32
    return [W4Config(bm, bn, 1, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (3, 4)]


def fp8_configs(rows: int) -> list[Any]:
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    if rows == 1:
        return [Fp8Config(1, bn, w, s) for bn in (4, 8, 16, 32) for w in (4, 8) for s in (1, 2)]
    bm = 16 if rows <= 16 else 32
    return [Fp8Config(bm, bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (3, 4)]


def sweep_section(report: dict[str, Any], deadline: float) -> None:
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import fp8, fp8_triton, int4, w4a16_triton

    rows_out = []
    tuned: dict[str, dict[str, list[int]]] = {"int4": {}, "fp8": {}}
    for name, n, k in SHAPES:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        w4 = [int4.quantize_weight(w, 128) for w in ws]
        w8 = [fp8.quantize_weight(w) for w in ws]
        for rows in ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            cublas_us = 1e3 * graph_ms(lambda ws=ws, x=x: [F.linear(x, w) for w in ws]) / LAYERS
            row: dict[str, Any] = dict(name=name, n=n, k=k, rows=rows, bf16_cublas_us=round(cublas_us, 2),
                                       bf16_gb_s=round(2 * n * k / cublas_us / 1e3))  # fmt: skip
            for fmt, cfgs, run, weights, refw, bytes_per in (
                ("int4", int4_configs(rows), lambda x, q, cfg: w4a16_triton.w4_matmul(x, *q, 128, cfg), w4,
                 int4.dequantize_weight(*w4[0]), 0.5 + 3 / 128),
                ("fp8", fp8_configs(rows), lambda x, q, cfg: fp8_triton.fp8_matmul(x, *q, 128, cfg), w8,
                 fp8.dequantize_weight(*w8[0]), 1.0),
            ):  # fmt: skip
                ref = (x.double() @ refw.double().T).float()
                tried = []
                for cfg in cfgs:
                    if time.monotonic() > deadline:
                        break
                    try:
                        out = run(x, weights[0], cfg)
                        err = float((out.float() - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            print("wrong", fmt, name, rows, list(cfg), err, flush=True)
                            continue
                        us = 1e3 * graph_ms(lambda x=x, cfg=cfg, run=run, weights=weights: [run(x, q, cfg) for q in weights]) / LAYERS
                    except Exception as exc:  # a config triton cannot build (registers, shared memory)
                        print("config failed", fmt, name, rows, list(cfg), type(exc).__name__, str(exc)[:120], flush=True)
                        continue
                    tried.append((us, list(cfg)))
                tried.sort()
                if tried:
                    us, cfg = tried[0]
                    row[f"{fmt}_us"], row[f"{fmt}_cfg"] = round(us, 2), cfg
                    row[f"{fmt}_gb_s"] = round(bytes_per * n * k / us / 1e3)
                    row[f"{fmt}_vs_cublas"] = round(cublas_us / us, 2)
                    default = (w4a16_triton if fmt == "int4" else fp8_triton).pick_config(rows, n, k)
                    row[f"{fmt}_default_us"] = next((round(t, 2) for t, c in tried if c == list(default)), None)
                    tuned[fmt][f"{w4a16_triton.row_class(rows)},{n},{k}"] = cfg
            print("sweep", json.dumps(row), flush=True)
            rows_out.append(row)
        del ws, w4, w8
        torch.cuda.empty_cache()
    report["sweep"] = rows_out
    report["tuned"] = tuned
    for fmt, cls in (("int4", "W4Config"), ("fp8", "Fp8Config")):
        print(f"{fmt} TUNED = {{")
        for key, cfg in tuned[fmt].items():
            m, n, k = key.split(",")
            print(f"    ({m}, {n}, {k}): {cls}({', '.join(map(str, cfg))}),")
        print("}", flush=True)


def quality_section(report: dict[str, Any]) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.weights import quantize, random_weights

    model, _ = random_weights.build("4b", torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 150000, (8, 256), device="cuda", generator=gen)
    with torch.inference_mode():
        reference = model(input_ids=ids).logits[:, -1].float()
    rows = []
    for precision in ("int8wo", "fp8", "int4"):
        copy_ = copy.deepcopy(model)
        quantize.quantize(copy_, precision, "cuda")
        with torch.inference_mode():
            got = copy_(input_ids=ids).logits[:, -1].float()
        cos = F.cosine_similarity(got, reference, dim=-1)
        row = dict(precision=precision, cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                   top1_agree=float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
                   weights_gib=round(copy_.get_memory_footprint() / 2**30, 3))  # fmt: skip
        print("quality", json.dumps(row), flush=True)
        rows.append(row)
        del copy_
        torch.cuda.empty_cache()
    report["quality"] = dict(reference="bf16", bf16_weights_gib=round(model.get_memory_footprint() / 2**30, 3),
                             prompts=8, prompt_tokens=256, rows=rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quant_check.json")
    ap.add_argument("--sections", default="sweep,quality")
    ap.add_argument("--sweep-s", type=float, default=200, help="time cap for the sweep")
    args = ap.parse_args()
    from bench.common import environment

    report: dict[str, Any] = {**environment("cuda"), "command": "python -m bench.quant_check"}
    started = time.monotonic()
    if "sweep" in args.sections:
        sweep_section(report, started + args.sweep_s)
    if "quality" in args.sections:
        quality_section(report)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
