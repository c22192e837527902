"""INT4 (W4A16) and FP8 weights on the GPU, in ONE run: the kernels' sweep against bf16 cuBLAS, and the whole model's
numerics against bf16.

    python -m bench.quant_check --out $OUT/quant_check.json     # GPU, ~2 min on an H200; no checkpoint needed
    python -m bench.quant_check --sections quality --model Qwen/Qwen3-VL-4B-Instruct --out q.json   # the real model

1. sweep: every text matmul shape of the 4B's decode step (fused q/k/v 2560->6144, o 4096->2560, fused gate/up
   2560->19456, down 9728->2560) at 1, 16 and 32 rows, as 36 distinct weights in one CUDA graph (cold L2, back-to-back launches,
   as inside the decode step): bf16 cuBLAS against each int4 and fp8 kernel config, each followed by the fused
   layer's kernel that takes its output in the engine (`consumer`: a split product's parts are summed there); the
   best per (rows, N, K) is what w4a16_triton.TUNED / fp8_triton.TUNED hold (printed as Python to paste). Bytes per
   weight: bf16 2, fp8 1, int4 0.5 + 3/128 (the GB/s figures divide them by the product and its consumer's time).
2. layout (`--sections layout`): kernels/w4_mma.py's and kernels/fp8_mma.py's whole paths (a layer reordered in
   place, products at 1-64 rows through the CUDA kernel and at 100 through the Triton dequantize) against float64,
   each of the four shapes.
3. quality: random weights of the 4B (bf16), quantized to int8wo, int4 and fp8 in turn from the same bf16 weights;
   last-token logits on 8 prompts of 256 tokens against bf16: cosine similarity and top-1 agreement. Random
   weights are not the real checkpoint (see the README for measuring quality on it), but the rounding each format
   does to the same weights is comparable.

Measured with the v1 kernels (bench/RESULTS.md): 0.2-0.3 TB/s of packed bytes. Prediction for v2 (nibble planes,
split K; H200, before its run): one-row products at >= 1.5 TB/s of packed bytes (INT32 shift/and/or per weight
bounds it near 2 TB/s), i.e. a 2560->19456 gate/up product in ~17 us against ~30 us for bf16 cuBLAS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

from bench.common import graph_ms, write_json

HIDDEN, HEADS_DIM, KV_DIM, INTER, LAYERS = 2560, 4096, 1024, 9728, 36
# The decode step's products as the engine runs them: q/k/v and gate/up fused (kernels/fusion.py), o and down alone.
SHAPES = [("qkv", HEADS_DIM + 2 * KV_DIM, HIDDEN), ("o", HIDDEN, HEADS_DIM), ("gate_up", 2 * INTER, HIDDEN),
          ("down", HIDDEN, INTER)]  # fmt: skip
ROWS = (1, 16, 32)
TINYGEMM_TILES = (8, 4, 2)  # aten._convert_weight_to_int4pack's inner_k_tiles: the "configs" of tinygemm
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def consumer(name: str, rows: int, device: Any, dtype: Any) -> Any:
    """The kernel of the fused decode layer (kernels/layer.py) that takes shape `name`'s product as its parts in the
    engine, as a function of those parts `[split, rows, n]`: q/k norm + RoPE + the KV write after qkv, the residual add
    + RMSNorm after o and after down (which now also computes the next layer's norm), SiLU·up after gate/up. A split
    product's parts are summed there, not by a launch of their own, so the sweep times each config with its consumer:
    `w4_matmul`'s split-K sum (a launch the engine never makes) made K whole look better than it is."""
    import torch

    from qwen3vl_webui.kernels import layer

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, device=device).to(dtype)

    if name == "qkv":
        weights, cos, sin = rand(HEAD_DIM), rand(rows, HEAD_DIM), rand(rows, HEAD_DIM)
        keys, values = rand(2 * rows * KV_HEADS, HEAD_DIM), rand(2 * rows * KV_HEADS, HEAD_DIM)
        index = torch.arange(rows * KV_HEADS, device=device)
        return lambda parts: layer.qk_norm_rope_kv(parts, HEADS, KV_HEADS, weights, weights, cos, sin, 1e-6, keys,
                                                   values, index)  # fmt: skip
    if name in ("o", "down"):
        residual, weight = rand(rows, HIDDEN), rand(HIDDEN)
        return lambda parts: layer.add_rms_norm(parts, residual, weight, 1e-6)
    if name == "gate_up":
        return lambda parts: layer.silu_mul(parts, dtype)
    raise ValueError(f"no consumer for {name!r}")


QUALITY = ("int8wo", "fp8", "int4", "int4-bnb", "int8")
# Real text for the quality section on a real checkpoint (random weights get random ids).
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined " * 6,
    "def quicksort(values):\n    if len(values) <= 1:\n        return values\n    pivot = values[0]\n" * 6,
    "Photosynthesis converts light energy into chemical energy stored in glucose. In the light reactions, " * 6,
    "Le marché de Noël ouvre ses portes le premier samedi de décembre, et les visiteurs y trouvent " * 6,
    "To reset the router, hold the button on the back for ten seconds until the light blinks orange, then " * 6,
    "The train left the station at dawn; by noon the plains had given way to hills covered in pine, and " * 6,
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2026-01-01' GROUP BY " * 6,
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon. Neil Armstrong stepped out first and " * 6,
]


def _as_list(cfg: Any) -> list[Any]:
    """A launch config as JSON: a kernel's config tuple, or tinygemm's inner_k_tiles alone."""
    return list(cfg) if isinstance(cfg, tuple) else [cfg]


def int4_configs(rows: int, n: int = 0, k: int = 0, kernels: tuple[int, ...] = (8, 6, 3, 4, 2, 1, 0)) -> list[Any]:
    """The sweep's int4 launch shapes for `rows`; with the shape, what the kernels pick today comes first, so a
    sweep cut by its time cap has the default's time to compare with. `kernels`: the many-row kernels to sweep, in
    that order (W4Config.tile: 8 tile 6 with one lop3 a pair, 6 tile 3 with the activations read in k order, 4 swap with pairs and scaled weights, 3 swap with nibble pairs, 2 swap, 1 tile,
    0 planes; at one row, 0 is the GEMV)."""
    from qwen3vl_webui.kernels.w4a16_triton import W4Config, pick_config

    if n and k:
        default = pick_config(rows, n, k)
        return [default, *(c for c in int4_configs(rows, kernels=kernels) if c != default)]

    gemv = [
        W4Config(1, bn, split, w, s) for bn in (16, 32, 64) for split in (0, 1, 2, 4) for w in (4, 8) for s in (2, 3)
    ]
    bm = 16 if rows <= 16 else 32
    # Tile 3 at 16 rows and fewer: K split further and a deeper load pipeline (4 stages). There the products are
    # latency-bound, not compute-bound: session 19's H100 read 0.5-1.3 TB/s of packed weights at one row, where the
    # GPU copies at 3.0 TB/s. 8 warps never won tile 3 (sessions 18 and 19), so only 4 there.
    tile3 = (
        [W4Config(bm, bn, split, 4, s, 3) for bn in (64, 128) for split in (0, 2, 4, 8, 16) for s in (2, 3, 4)]
        if rows <= 16
        else [W4Config(bm, bn, split, w, s, 3) for bn in (64, 128) for split in (0, 2) for w in (4, 8) for s in (2, 3)]
    )
    # Tile 6 at 32 rows (session 21's first sweep: 1.2-1.85x tile 3): also 8 warps, 4 stages, K split 4 ways. Tile 8
    # (session 27) is tile 6 with 12% fewer instructions a loop trip (bench/kernel_asm.py): the same shapes.
    tile6 = (
        [(bm, bn, split, 4, s) for bn in (64, 128) for split in (0, 4, 16) for s in (2, 3)]
        if rows <= 16
        else [(bm, bn, split, w, s) for bn in (64, 128) for split in (0, 2, 4) for w in (4, 8) for s in (2, 3, 4)]
    )
    # At 16 rows and fewer tile 8 also takes 256 weight rows a program: 2.65 SASS instructions a weight in its K loop
    # against 2.84 at 128 and 3.55 at 64 (bench/kernel_asm.py, one row; 5 register spills a trip at 256), K split to
    # keep every SM busy.
    wide = [(bm, 256, split, 4, s) for split in (4, 16) for s in (2, 3)] if rows <= 16 else []
    # At one row tile 8 also takes 8 rows a program, the smallest the dot takes (wgmma's N = 8): 209 SASS instructions
    # a K-loop trip against 225 at 16, and 14 KB of shared memory against 20 (bench/kernel_asm.py; session 28).
    narrow = [(8, bn, split, 4, s) for bn in (64, 128) for split in (0, 4, 16) for s in (2, 3)] if rows == 1 else []
    by_kernel = {
        8: [W4Config(*shape, 8) for shape in narrow + tile6 + wide],
        6: [W4Config(*shape, 6) for shape in tile6],
        4: [W4Config(bm, bn, split, w, s, 4) for bn in (64, 128) for split in (0, 2) for w in (4, 8) for s in (2, 3)],
        3: tile3,
        2: [W4Config(bm, bn, split, w, s, 2) for bn in (64, 128) for split in (0, 2) for w in (4, 8) for s in (2, 3)],
        1: [W4Config(bm, bn, split, w, s, 1) for bn in (32, 64, 128) for split in (0, 1, 2, 4) for w in (4, 8)
            for s in (2, 3)],
        0: [W4Config(bm, bn, split, w, 3) for bn in (32, 64, 128) for split in (0, 1, 2, 4) for w in (4, 8)],
    }  # fmt: skip
    many = [cfg for kernel in kernels for cfg in by_kernel[kernel]]
    if rows == 1:  # the swap kernels (15 of their 16 rows masked), and the GEMV where 0 is asked for
        return [cfg for cfg in many if cfg.tile >= 2] + (gemv if 0 in kernels else [])
    return many


def fp8_configs(rows: int) -> list[Any]:
    """The sweep's fp8 launch shapes for `rows`: the swap kernel's first (weights as the dot's first operand, K split
    by default (0), not at all or 4 ways), then the GEMV's (one row) or the skinny tile's."""
    from qwen3vl_webui.kernels.fp8_triton import Fp8Config

    bm = 16 if rows <= 16 else 32
    swap = [Fp8Config(bm, bn, 4, s, split, 1) for bn in (64, 128) for split in (0, 1, 4) for s in (2, 3)]
    if rows == 1:  # and the atomic GEMV (swap 2: split_k blocks of K per program)
        atomic = [Fp8Config(1, bn, w, 1, per, 2) for bn in (8, 16, 32, 64) for w in (2, 4) for per in (1, 2, 4)]
        return swap + atomic + [Fp8Config(1, bn, w, s) for bn in (4, 8, 16, 32) for w in (4, 8) for s in (1, 2)]
    return swap + [Fp8Config(bm, bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (3, 4)]


def sweep_section(
    report: dict[str, Any],
    deadline: float,
    rows_swept: tuple[int, ...] = ROWS,
    formats: tuple[str, ...] = ("int4", "fp8"),
    defaults_only: bool = False,
    int4_kernels: tuple[int, ...] = (8, 6, 3, 4, 2, 1, 0),
    shapes: tuple[str, ...] = (),
) -> None:
    """`defaults_only`: int4 and fp8 at the config their kernels pick today (no tuning: seconds, not minutes)."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_webui.kernels import builds, fp8, fp8_mma, fp8_triton, int4, w4_mma, w4a16_triton

    rows_out = []
    tuned: dict[str, dict[str, list[int]]] = {"int4": {}, "fp8": {}, "int4mma": {}, "fp8mma": {}}
    for name, n, k in [shape for shape in SHAPES if not shapes or shape[0] in shapes]:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        w4 = [int4.quantize_weight(w, 128) for w in ws]
        refw4 = int4.dequantize_weight(*w4[0])
        # torch's own W4A16 kernel (tinygemm) on the same quantized weights, one packing per inner_k_tiles
        tiny = [{t: int4.to_tinygemm(*q, t) for t in TINYGEMM_TILES} for q in w4] if "tinygemm" in formats else []
        w8 = [fp8.quantize_weight(w) for w in ws]
        mma = [w4_mma.repack(*q) for q in w4] if "int4mma" in formats and w4_mma.builds(0) else []
        mma8 = [(fp8_mma.repack(q, torch.bfloat16), s) for q, s in w8] if "fp8mma" in formats and fp8_mma.builds(0) else []  # fmt: skip
        for rows in rows_swept:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            eat = consumer(name, rows, "cuda", torch.bfloat16)
            cublas_us = 1e3 * graph_ms(lambda ws=ws, x=x, eat=eat: [eat(F.linear(x, w)[None]) for w in ws]) / LAYERS
            row: dict[str, Any] = dict(name=name, n=n, k=k, rows=rows, timed="product + its consumer",
                                       bf16_cublas_us=round(cublas_us, 2), bf16_gb_s=round(2 * n * k / cublas_us / 1e3))  # fmt: skip
            # each format: its configs, its product as the engine launches it (the parts its consumer sums), the
            # product summed (checked against the reference), the weights, the reference weight, bytes a weight
            for fmt, cfgs, parts, run, weights, refw, bytes_per in (
                ("tinygemm", TINYGEMM_TILES, lambda x, q, cfg: int4.tinygemm_linear(x, *q[cfg], 128)[None],
                 lambda x, q, cfg: int4.tinygemm_linear(x, *q[cfg], 128), tiny, refw4, 0.5 + 4 / 128),
                ("int4", [w4a16_triton.pick_config(rows, n, k)] if defaults_only else int4_configs(rows, n, k, int4_kernels),
                 lambda x, q, cfg: w4a16_triton.w4_partials(x, *q, 128, cfg),
                 lambda x, q, cfg: w4a16_triton.w4_matmul(x, *q, 128, cfg), w4, refw4, 0.5 + 3 / 128),
                ("int4mma", ([w4_mma.pick_config(n, k, rows)] if defaults_only else w4_mma.configs(n, k, 128, rows)) if mma and rows <= w4_mma.MAX_ROWS else [],
                 lambda x, q, cfg, n=n: w4_mma.launch(x, *q, n, cfg),
                 lambda x, q, cfg, n=n: w4_mma.launch(x, *q, n, cfg).sum(0).to(x.dtype), mma, refw4, 0.5 + 4 / 128),
                ("fp8mma", ([fp8_mma.pick_config(n, k, rows)] if defaults_only else fp8_mma.configs(n, k, 128, rows)) if mma8 and rows <= fp8_mma.MAX_ROWS else [],
                 lambda x, q, cfg, n=n: fp8_mma.launch(x, *q, n, cfg),
                 lambda x, q, cfg, n=n: fp8_mma.launch(x, *q, n, cfg).sum(0).to(x.dtype), mma8,
                 fp8.dequantize_weight(*w8[0]), 1.0),
                ("fp8", [fp8_triton.pick_config(rows, n, k)] if defaults_only else fp8_configs(rows),
                 lambda x, q, cfg: fp8_triton.fp8_partials(x, *q, 128, cfg),
                 lambda x, q, cfg: fp8_triton.fp8_matmul(x, *q, 128, cfg), w8, fp8.dequantize_weight(*w8[0]), 1.0),
            ):  # fmt: skip
                if fmt not in formats:
                    continue
                ref = (x.double() @ refw.double().T).float()
                if builds.available():  # every config's kernel built at once, in parallel threads (kernels/builds.py)
                    with builds.dry_launches():
                        for cfg in cfgs:
                            with contextlib.suppress(Exception):  # one Triton cannot build fails again below
                                run(x, weights[0], cfg)
                tried, worst = [], 0.0
                for cfg in cfgs:
                    if time.monotonic() > deadline:
                        break
                    try:
                        out = run(x, weights[0], cfg)
                        err = float((out.float() - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            print("wrong", fmt, name, rows, _as_list(cfg), err, flush=True)
                            continue
                        us = 1e3 * graph_ms(lambda x=x, cfg=cfg, parts=parts, weights=weights, eat=eat:
                                            [eat(parts(x, q, cfg)) for q in weights]) / LAYERS  # fmt: skip
                    except Exception as exc:  # a config triton cannot build (registers, shared memory)
                        print(
                            "config failed",
                            fmt,
                            name,
                            rows,
                            _as_list(cfg),
                            type(exc).__name__,
                            str(exc)[:120],
                            flush=True,
                        )
                        continue
                    tried.append((us, _as_list(cfg)))
                    worst = max(worst, err)
                tried.sort()
                if fmt == "int4":  # the best of each kernel (W4Config.tile: 0-4; at one row 0 is the GEMV)
                    row["int4_best_by_kernel"] = {str(t): round(min(us for us, c in tried if c[5] == t), 2)
                                                  for t in {c[5] for _, c in tried}}  # fmt: skip
                if tried:
                    us, cfg = tried[0]
                    row[f"{fmt}_us"], row[f"{fmt}_cfg"] = round(us, 2), cfg
                    row[f"{fmt}_gb_s"] = round(bytes_per * n * k / us / 1e3)
                    row[f"{fmt}_vs_cublas"] = round(cublas_us / us, 2)
                    row[f"{fmt}_worst_error"] = float(f"{worst:.2e}")  # relative (norm) against float64, every config
                    if fmt == "tinygemm":
                        continue
                    if fmt in ("int4mma", "fp8mma"):  # row classes by n-tiles: 1 (up to 8 rows), 16, 32
                        default = (w4_mma if fmt == "int4mma" else fp8_mma).pick_config(n, k, rows)
                        row[f"{fmt}_default_us"] = next((round(t, 2) for t, c in tried if c == list(default)), None)
                        key = f"{w4_mma.row_class(rows)},{n},{k}"
                        if rows == 1 or key not in tuned[fmt]:  # the one-stream step's pick first
                            tuned[fmt][key] = cfg
                        continue
                    default = (w4a16_triton if fmt == "int4" else fp8_triton).pick_config(rows, n, k)
                    row[f"{fmt}_default_us"] = next((round(t, 2) for t, c in tried if c == list(default)), None)
                    tuned[fmt][f"{w4a16_triton.row_class(rows)},{n},{k}"] = cfg
            print("sweep", json.dumps(row), flush=True)
            rows_out.append(row)
        del ws, w4, w8, tiny, mma, mma8
        torch.cuda.empty_cache()
    report["sweep"] = rows_out
    report["tuned"] = tuned
    for fmt, cls in (("int4", "W4Config"), ("fp8", "Fp8Config"), ("int4mma", "MmaConfig"), ("fp8mma", "MmaConfig")):
        print(f"{fmt} TUNED = {{")
        for key, cfg in tuned[fmt].items():
            m, n, k = key.split(",")
            print(f"    ({m}, {n}, {k}): {cls}({', '.join(map(str, cfg))}),")
        print("}", flush=True)


def _layout_errors(layer: Any, reference: Any, row: dict[str, Any], scale: float = 1.0) -> None:
    """A converted layer's products at 1-64 rows (the CUDA kernel) and 100 (prefill's dequantize, then cuBLAS) against
    the float64 product of `reference` (its weight, dequantized before the conversion), and its partial sums summed:
    relative errors into `row`."""
    import torch

    k = reference.shape[1]
    for rows in (1, 3, 8, 16, 32, 40, 64, 100):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * scale
        want = x.double() @ reference.T
        parts = layer.partials(x)
        row[f"rows_{rows}"] = float(f"{float((layer(x).double() - want).norm() / want.norm()):.2e}")
        row[f"parts_{rows}"] = float(f"{float((parts.double().sum(0) - want).norm() / want.norm()):.2e}")


def layout_section(report: dict[str, Any]) -> None:
    """The CUDA decode kernels' whole paths on the GPU (kernels/w4_mma.py for int4 into report["layout"],
    kernels/fp8_mma.py for fp8 into report["layout_fp8"]), each of the 4B's shapes: a layer converted to the kernel's
    layout in place, its products at 1-64 rows (the kernel, in launches of 32) and at 100 (prefill: the Triton
    dequantize from that layout, then cuBLAS) against the float64 product of the same weight, and its dequantized
    weight against the original layout's, bit for bit. fp8 also: a weight whose e4m3 values are nearly all
    subnormal (bf16 subnormals in the kernel's registers) and activations of 1e-4 (fp32 sums near the subnormal
    range: the bf16 bit move leaves the values 2^-120 small until the block scale), reported beside, not gated."""
    import torch

    from qwen3vl_webui.kernels import fp8, fp8_mma, int4, w4_mma

    if not w4_mma.builds(0):
        report["layout"] = "the CUDA decode kernels cannot run here (compute capability below 8.0, or no NVRTC)"
        print("layout", report["layout"], flush=True)
        return
    for key, convert in (("layout", lambda lin: int4.Int4Linear.from_linear(lin)),
                         ("layout_fp8", lambda lin: fp8.Fp8Linear.from_linear(lin))):  # fmt: skip
        try:
            report[key] = _layout_rows(key, convert)
        except Exception as exc:  # one kernel's failure leaves the other's rows in the report
            report[key] = f"{type(exc).__name__}: {exc}"[:2000]
            print(key, report[key], flush=True)
        if not fp8_mma.builds(0) or torch.cuda.get_device_capability(0) < (8, 9):
            break  # fp8 weights need compute capability 8.9 (kernels/fp8.py)


def layout_ok(report: dict[str, Any], key: str = "layout") -> bool:
    """The device scripts' gate on `layout_section`'s rows for `key` (int4's "layout", fp8's "layout_fp8"): the four
    shapes, each dequantized bit for bit as before the conversion, the kernel's fp32 partial sums at 1-64 rows within
    1e-3 of the float64 product, and every product in bf16 (the kernel's summed, prefill's) within 1e-2: a bf16 output
    alone is ~1e-3 off (its rounding: 2^-8 / sqrt(12) relative), so 1e-3 would fail a correct kernel there."""
    rows = report.get(key)
    if not isinstance(rows, list) or len(rows) != len(SHAPES):
        return False
    for row in rows:
        errors = {name: value for name, value in row.items() if name.startswith(("rows_", "parts_"))}
        kernel = [v for name, v in errors.items() if name.startswith("parts_") and int(name[6:]) <= 64]
        if not row.get("dequantized_equal") or len(errors) < 16 or not all(v < 1e-3 for v in kernel):
            return False
        if not all(v < 1e-2 for v in errors.values()):
            return False
    return True


def _layout_rows(key: str, convert: Any) -> list[dict[str, Any]]:
    """`layout_section`'s rows for one kernel (`key`: "layout" int4, "layout_fp8" fp8), `convert` making its layer."""
    import torch

    from qwen3vl_webui.kernels import fp8

    rows_out = []
    for name, n, k in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02)
        layer = convert(linear)
        before, reference = layer.dequantized(torch.bfloat16), layer.dequantized(torch.float64)
        if key == "layout":
            layer.use_mma_layout()
        else:
            layer.use_mma_layout(torch.bfloat16)
        row: dict[str, Any] = dict(name=name, n=n, k=k)
        row["dequantized_equal"] = bool(torch.equal(layer.dequantized(torch.bfloat16), before))
        _layout_errors(layer, reference, row)
        if key == "layout_fp8" and name == "o":
            small: dict[str, Any] = {}
            _layout_errors(layer, reference, small, scale=1e-4)
            row["small_x"] = {r: v for r, v in small.items() if r in ("rows_1", "rows_32", "parts_1")}
            with torch.no_grad():  # one value of 1000 a block in column 0 of each block: the rest subnormal
                linear.weight[:, ::128] = 1000.0
            tiny = fp8.Fp8Linear.from_linear(linear)
            values = tiny.weight.float().abs()
            row["subnormal_share"] = round(float(((values < 2**-6) & (values > 0)).float().mean()), 3)
            tiny_reference = tiny.dequantized(torch.float64)
            tiny.use_mma_layout(torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            x[:, ::128] = 0  # the large values' columns out: the product is the subnormal values' alone
            want = x.double() @ tiny_reference.T
            row["subnormal_rows_1"] = float(f"{float((tiny(x).double() - want).norm() / want.norm()):.2e}")
        print(key, json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def quality_section(
    report: dict[str, Any], source: str, device: str = "cuda", names: tuple[str, ...] = QUALITY
) -> None:
    """Each precision loaded from `source` exactly as the app loads it, its last-token logits against bf16's (fp32 on a
    CPU). `source`: random-weights:4b (bitsandbytes precisions need a checkpoint: skipped), a checkpoint directory
    (the tiny one on a CPU, or random 4B weights written by bench.matrix --write), or a real checkpoint (a directory or
    a Hub id): then the prompts are the tokenized PROMPTS below, and the figures say how each precision's rounding
    moves the real model's next token."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from qwen3vl_webui import precisions
    from qwen3vl_webui.weights.loading import load_model
    from qwen3vl_webui.weights.model import release_cached_memory

    reference_precision = "bf16" if device.startswith("cuda") else "fp32"
    loaded = load_model(source, reference_precision, device)
    model = loaded.model
    vocab = model.lm_head.out_features
    if source.startswith("random-weights:"):
        gen = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, min(vocab, 150000), (8, 256 if device.startswith("cuda") else 48), device=device,
                            generator=gen)  # fmt: skip
    else:
        tokenizer = loaded.processor.tokenizer
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][:256] for p in PROMPTS]
        width = min(len(e) for e in encoded)
        ids = torch.tensor([e[:width] for e in encoded], device=device)
    # The random model's output bias masks all but "word" tokens with -1e4 (weights/random_weights.py); compare the
    # logits over the words only, or every precision scores a cosine of 1.0 on the mask. A real model has no bias.
    bias = getattr(model.lm_head, "bias", None)
    words = bias > -1.0 if bias is not None else torch.ones(vocab, dtype=torch.bool, device=device)
    with torch.inference_mode():
        reference = model(input_ids=ids).logits[:, -1].float()[:, words]
    reference_gib = loaded.weights_bytes / 2**30
    del loaded, model
    release_cached_memory()
    rows = []
    for name in names:
        if precisions.needs_bitsandbytes(name) and (
            source.startswith("random-weights:") or importlib.util.find_spec("bitsandbytes") is None
        ):
            rows.append(
                dict(precision=name, skipped="bitsandbytes quantizes while loading a checkpoint, and needs the package")
            )
            continue
        if precisions.capability_blocker(
            name, torch.cuda.get_device_capability() if device.startswith("cuda") else None
        ):
            rows.append(dict(precision=name, skipped="this GPU cannot run it"))
            continue
        other = load_model(source, name, device)
        with torch.inference_mode():
            got = other.model(input_ids=ids).logits[:, -1].float()[:, words]
        cos = F.cosine_similarity(got, reference, dim=-1)
        row = dict(precision=name, cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                   top1_agree=float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
                   rel_error=round(float((got - reference).norm() / reference.norm()), 5),
                   weights_gib=round(other.weights_bytes / 2**30, 3))  # fmt: skip
        print("quality", json.dumps(row), flush=True)
        rows.append(row)
        del other
        release_cached_memory()
    report["quality"] = dict(reference=reference_precision, source=source, device=device, vocabulary=int(words.sum()),
                             reference_weights_gib=round(reference_gib, 3), prompts=int(ids.shape[0]),
                             prompt_tokens=int(ids.shape[1]), rows=rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quant_check.json")
    ap.add_argument(
        "--sections",
        default="sweep,quality",
        help="sweep, layout (the CUDA decode kernels' whole paths against float64), quality",
    )
    ap.add_argument("--sweep-s", type=float, default=200, help="time cap for the sweep")
    ap.add_argument("--rows", default="1,16,32", help="sweep: the row counts (1, 16, 32: the row classes)")
    ap.add_argument("--formats", default="int4,fp8", help="sweep: int4, fp8, tinygemm (torch's own W4A16 kernel on the int4 weights), int4mma (kernels/w4_mma.py: the CUDA kernel, up to 32 rows), fp8mma (kernels/fp8_mma.py), comma list")  # fmt: skip
    ap.add_argument("--defaults-only", action="store_true", help="sweep: int4 and fp8 at their kernels' picks only")
    ap.add_argument("--int4-kernels", default="8,6,3,4,2,1,0", help="sweep: the int4 kernels, in order (8 tile 6 with one lop3 a pair, 6 swap with pairs, the activations read in k order, 4 swap with pairs and scaled weights, 3 swap with nibble pairs, 2 swap, 1 tile, 0 planes)")  # fmt: skip
    ap.add_argument("--shapes", default="", help="sweep: only these shapes (qkv, o, gate_up, down; default all)")
    ap.add_argument("--model", default="random-weights:4b", help="quality: random-weights:4b or a checkpoint")
    ap.add_argument("--device", default="cuda", help="quality: cuda, or cpu (the tiny checkpoint: plumbing)")
    args = ap.parse_args()
    from bench.common import environment

    report: dict[str, Any] = {**environment(args.device), "command": "python -m bench.quant_check"}
    started = time.monotonic()
    if "sweep" in args.sections:
        rows = tuple(int(r) for r in args.rows.split(","))
        kernels = tuple(int(t) for t in args.int4_kernels.split(","))
        shapes = tuple(name for name in args.shapes.split(",") if name)
        sweep_section(report, started + args.sweep_s, rows, tuple(args.formats.split(",")), args.defaults_only, kernels,
                      shapes)  # fmt: skip
    if "layout" in args.sections:
        layout_section(report)
    if "quality" in args.sections:
        quality_section(report, args.model, args.device)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
