"""The bf16 decode step at one stream: fused q/k/v + gate/up and a Triton GEMV against cuBLAS, in one process.

    python -m bench.gemv_check --out $OUT/gemv_check.json     # GPU, ~3 min; no model needed

Re-run it when the GEMV kernel or the GPU changes: the sweep's best configs are what `TUNED16` holds.

1. sweep: each one-row product of the step (fused qkv 2560->6144, o 4096->2560, fused gate/up 2560->19456, down
   9728->2560, lm_head 2560->151936, and the unfused q, k/v, gate/up shapes) as 36 distinct weights in one CUDA
   graph (cold L2 and back-to-back launches, as inside the step): cuBLAS against every Triton GEMV config.
2. step: all of one step's matmuls in one graph: cuBLAS unfused (7 a layer), cuBLAS fused (4), Triton fused.

Prediction (H100, before the run): step matmuls 3.45 ms cuBLAS unfused (measured in int8wo_check), ~2.95 ms fused
(k and v are latency-bound ~10 us each for ~2 us of bytes), ~2.75 ms Triton fused (3-22% per shape in isolation).
(The engine A/B this script also ran, base / fuse / fuse+GEMV, answered its question in RESULTS v5 and was removed:
the engine's figures come from bench.matrix.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import graph_ms

HIDDEN, HEADS_DIM, KV_DIM, INTER, VOCAB, LAYERS = 2560, 4096, 1024, 9728, 151936, 36
# (name, out N, in K)
SHAPES = [
    ("qkv", HEADS_DIM + 2 * KV_DIM, HIDDEN), ("o", HIDDEN, HEADS_DIM), ("gate_up", 2 * INTER, HIDDEN),
    ("down", HIDDEN, INTER), ("lm_head", VOCAB, HIDDEN), ("q", HEADS_DIM, HIDDEN), ("kv", KV_DIM, HIDDEN),
    ("gate", INTER, HIDDEN),
]  # fmt: skip


def configs() -> list[Any]:
    from qwen3vl_webui.kernels.matmul_triton import KernelConfig

    out = []
    for bn in (2, 4, 8, 16, 32):
        for bk in (256, 512, 1024, 2048):
            if 2048 <= bn * bk <= 16384:
                for warps in (4, 8):
                    for stages in (1, 2):
                        out.append(KernelConfig(1, bn, bk, warps, stages, False))
    return out


def sweep_section(report: dict[str, Any], deadline: float) -> dict[tuple[int, int], Any]:
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import matmul_triton as ik

    best: dict[tuple[int, int], Any] = {}
    rows = []
    for name, n, k in SHAPES:
        copies = 4 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ ws[0].double().T).float()
        nbytes = 2 * n * k
        cublas_us = 1e3 * graph_ms(lambda ws=ws, x=x: [F.linear(x, w) for w in ws]) / copies
        tried = []
        for cfg in configs():
            if time.monotonic() > deadline:
                break
            try:
                out = ik.gemv16(x, ws[0], cfg)
                err = float((out.float() - ref).norm() / ref.norm())
                if not err < 1e-2:
                    continue
                us = 1e3 * graph_ms(lambda ws=ws, x=x, cfg=cfg: [ik.gemv16(x, w, cfg) for w in ws]) / copies
            except Exception as exc:  # a config triton cannot build (registers, shared memory)
                print("config failed", name, list(cfg), type(exc).__name__, flush=True)
                continue
            tried.append((us, list(cfg)))
        tried.sort()
        row = dict(
            name=name, n=n, k=k, cublas_us=round(cublas_us, 2), cublas_gb_s=round(nbytes / cublas_us / 1e3),
            triton_us=round(tried[0][0], 2) if tried else None, triton_cfg=tried[0][1] if tried else None,
            triton_gb_s=round(nbytes / tried[0][0] / 1e3) if tried else None, runners_up=tried[1:4], configs=len(tried),
        )  # fmt: skip
        if tried:
            best[(n, k)] = ik.KernelConfig(*tried[0][1])
        print("sweep", json.dumps({k: v for k, v in row.items() if k != "runners_up"}), flush=True)
        rows.append(row)
        del ws
        torch.cuda.empty_cache()
    report["sweep"] = rows
    report["tuned16"] = {f"{n},{k}": list(cfg) for (n, k), cfg in best.items()}
    return best


def step_section(report: dict[str, Any]) -> None:
    """One step's matmuls (36 layers + lm_head) at 1 row in one graph, three ways."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import matmul_triton as ik

    qkv_n, gu_n = HEADS_DIM + 2 * KV_DIM, 2 * INTER
    layers = [
        (torch.randn(qkv_n, HIDDEN, device="cuda", dtype=torch.bfloat16), torch.randn(HIDDEN, HEADS_DIM, device="cuda", dtype=torch.bfloat16),
         torch.randn(gu_n, HIDDEN, device="cuda", dtype=torch.bfloat16), torch.randn(HIDDEN, INTER, device="cuda", dtype=torch.bfloat16))
        for _ in range(LAYERS)
    ]  # fmt: skip
    head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, HEADS_DIM, INTER)}

    def unfused() -> None:
        for qkv, o, gu, down in layers:
            for w in (qkv[:HEADS_DIM], qkv[HEADS_DIM : HEADS_DIM + KV_DIM], qkv[HEADS_DIM + KV_DIM :]):
                F.linear(xs[HIDDEN], w)
            F.linear(xs[HEADS_DIM], o)
            F.linear(xs[HIDDEN], gu[:INTER])
            F.linear(xs[HIDDEN], gu[INTER:])
            F.linear(xs[INTER], down)
        F.linear(xs[HIDDEN], head)

    def fused(mm: Any) -> Any:
        def run() -> None:
            for qkv, o, gu, down in layers:
                mm(xs[HIDDEN], qkv)
                mm(xs[HEADS_DIM], o)
                mm(xs[HIDDEN], gu)
                mm(xs[INTER], down)
            mm(xs[HIDDEN], head)

        return run

    nbytes = 2 * (sum(sum(w.numel() for w in layer) for layer in layers) + head.numel())
    out = {}
    for name, fn in (
        ("cublas_unfused", unfused),
        ("cublas_fused", fused(F.linear)),
        ("triton_fused", fused(ik.gemv16)),
    ):
        ms = graph_ms(fn)
        out[name] = dict(ms=round(ms, 3), gb_s=round(nbytes / ms / 1e6))
        print("step", name, out[name], flush=True)
    report["step"] = out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemv_check.json")
    ap.add_argument("--sections", default="sweep,step")
    ap.add_argument("--sweep-s", type=float, default=150.0, help="time cap of the sweep")
    args = ap.parse_args()
    import torch

    from qwen3vl_webui.kernels import matmul_triton as ik

    started = time.monotonic()
    report: dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    sections = args.sections.split(",")
    try:
        if "sweep" in sections:
            ik.TUNED16.update(sweep_section(report, time.monotonic() + args.sweep_s))
        if "step" in sections:
            step_section(report)
            torch.cuda.empty_cache()
    finally:
        report["wall_s"] = round(time.monotonic() - started, 1)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
