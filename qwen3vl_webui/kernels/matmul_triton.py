"""Triton kernels for decode-sized matmuls: int8 weights with one scale per output row, and the 16-bit GEMV.

`y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]`, x in bf16/fp16, w int8 `[N, K]` (nn.Linear's layout), fp32
accumulation, one rounding at the end. Decode reads every weight once per step and does almost no arithmetic per
byte, so these kernels are about streaming the int8 bytes at the card's bandwidth:

- `_gemv_kernel` (one token row per program column): a `[BLOCK_N, BLOCK_K]` int8 tile per iteration, multiplied
  against the row in fp32 registers (no tensor cores), reduced over K once at the end.
- `_skinny_kernel` (2..32 rows): the int8 tile converted to the activation dtype in registers and fed to `tl.dot`
  with the rows padded to BLOCK_M (>= 16, tl.dot's minimum); the wasted MMA work is free next to the bytes.

`FAST_CVT`: int8 -> fp32 through the float bit pattern of 2^23 + (v + 128) instead of I2F, which issues at a quarter
of the FP32 rate on sm_80/sm_90 and would otherwise bound a kernel that must convert ~3 G weights per ms.

`gemv16` is `_gemv_kernel` on bf16/fp16 weights without scales (kernels/gemv.py makes it a custom op). Nothing
imports this module at package import time: its callers import it inside functions, where Triton runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from qwen3vl_webui.kernels import pdl
from qwen3vl_webui.kernels.tuning import row_class


class KernelConfig(NamedTuple):
    """One launch shape. block_m == 1 selects the GEMV kernel (one program column per row)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    fast_cvt: bool


# Best of bench/int8wo_check.py's sweep per (row class, N, K) on an H100 80GB HBM3 (bench/results/h100/int8wo_check.json:
# 1 row from run 2's wider sweep, 16/32 rows from run 1), for the 4B's q (2560->4096), k/v (2560->1024),
# o (4096->2560), gate/up (2560->9728) and down (9728->2560). Runners-up were within ~3% (the sweep's noise).
TUNED: dict[tuple[int, int, int], KernelConfig] = {
    (1, 1024, 2560): KernelConfig(1, 4, 2048, 8, 1, True),
    (1, 4096, 2560): KernelConfig(1, 4, 1024, 4, 3, True),
    (1, 9728, 2560): KernelConfig(1, 16, 256, 4, 1, True),
    (1, 2560, 4096): KernelConfig(1, 2, 1024, 2, 1, True),
    (1, 2560, 9728): KernelConfig(1, 4, 1024, 4, 1, True),
    (16, 1024, 2560): KernelConfig(16, 32, 256, 4, 4, False),
    (16, 4096, 2560): KernelConfig(16, 32, 256, 4, 4, False),
    (16, 9728, 2560): KernelConfig(16, 32, 256, 4, 4, False),
    (16, 2560, 4096): KernelConfig(16, 32, 256, 4, 4, False),
    (16, 2560, 9728): KernelConfig(16, 32, 256, 4, 4, False),
    (32, 1024, 2560): KernelConfig(32, 16, 256, 4, 4, False),
    (32, 4096, 2560): KernelConfig(32, 32, 512, 4, 3, False),
    (32, 9728, 2560): KernelConfig(32, 32, 128, 4, 5, False),
    (32, 2560, 4096): KernelConfig(32, 32, 512, 4, 3, False),
    (32, 2560, 9728): KernelConfig(32, 32, 512, 4, 3, False),
}


def default_config(rows: int, n: int, k: int) -> KernelConfig:
    """Other shapes: the configs that won most often in the sweep (many programs, long contiguous K tiles)."""
    m = row_class(rows)
    if m == 1:
        return KernelConfig(1, 4, 1024, 4, 1, True)
    if m == 16:
        return KernelConfig(16, 32, 256, 4, 4, False)
    return KernelConfig(32, 32, 512, 4, 3, False)


def pick_config(rows: int, n: int, k: int) -> KernelConfig:
    return TUNED.get((row_class(rows), n, k)) or default_config(rows, n, k)


@triton.jit
def _to_f32(w, FAST_CVT: tl.constexpr):
    if FAST_CVT:
        # 0x4B000000 is the fp32 pattern of 2^23: adding v + 128 to its mantissa gives 2^23 + 128 + v exactly.
        bits = w.to(tl.int32) + 0x4B000080
        return bits.to(tl.float32, bitcast=True) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FAST_CVT: tl.constexpr,
    HAS_SCALE: tl.constexpr = True, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + row * stride_xm + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
            x = tl.load(x_ptrs)
        else:
            k_ok = offs_k < K - k0
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        acc += _to_f32(w, FAST_CVT) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    pdl.finish(PDL)
    tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    FAST_CVT: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
        wx = _to_f32(w, FAST_CVT).to(x_ptr.dtype.element_ty)  # |v| <= 127: exact in bf16 and fp16
        acc = tl.dot(x, tl.trans(wx), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    pdl.finish(PDL)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_matmul(x: Any, weight: Any, scale: Any, config: KernelConfig | None = None, out: Any = None) -> Any:
    """`x [M, K]` (bf16/fp16, rows contiguous) times int8 `weight [N, K]`ᵀ, times fp32 `scale [N]`: `[M, N]` in x's dtype.

    `weight` may also be a 16-bit tensor (with `fast_cvt=False`), and `scale` None (no scaling; GEMV configs only):
    that is `gemv16`, the 16-bit decode GEMV.
    """
    import torch

    rows, k = x.shape
    n = weight.shape[0]
    cfg = config or pick_config(rows, n, k)
    if out is None:
        out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    even_k = k % cfg.block_k == 0
    if cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), rows)
        _gemv_kernel[grid](
            x, weight, weight if scale is None else scale, out, n, k, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k, FAST_CVT=cfg.fast_cvt, HAS_SCALE=scale is not None,
            num_warps=cfg.warps, num_stages=cfg.stages, **pdl.args(x, "gemv"),
        )  # fmt: skip
    else:
        if scale is None:
            raise ValueError("the skinny kernel needs scales (it is int8-only)")
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m))
        _skinny_kernel[grid](
            x, weight, scale, out, rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k, FAST_CVT=cfg.fast_cvt,
            num_warps=cfg.warps, num_stages=cfg.stages, **pdl.args(x, "gemv"),
        )  # fmt: skip
    return out


# 16-bit weights, one row, keyed (N, K): the best of bench/gemv_check.py's 56-config sweep on an H100 80GB HBM3
# (bench/results/h100/gemv_check.json), 36 distinct weights per shape in one CUDA graph as in the decode step. fast_cvt is moot.
TUNED16: dict[tuple[int, int], KernelConfig] = {
    (6144, 2560): KernelConfig(1, 8, 512, 4, 1, False),  # fused q/k/v
    (2560, 4096): KernelConfig(1, 2, 1024, 4, 1, False),  # o
    (19456, 2560): KernelConfig(1, 8, 512, 4, 1, False),  # fused gate/up
    (2560, 9728): KernelConfig(1, 2, 2048, 8, 2, False),  # down
    (151936, 2560): KernelConfig(1, 2, 1024, 4, 2, False),  # lm_head
    (4096, 2560): KernelConfig(1, 4, 512, 4, 1, False),  # q (unfused)
    (1024, 2560): KernelConfig(1, 2, 2048, 8, 2, False),  # k, v (unfused)
    (9728, 2560): KernelConfig(1, 4, 512, 4, 2, False),  # gate, up (unfused)
}
GEMV16_DEFAULT = KernelConfig(1, 8, 1024, 8, 1, False)


def gemv16(x: Any, weight: Any, config: KernelConfig | None = None, out: Any = None) -> Any:
    """`x [M, K]` times a bf16/fp16 `weight [N, K]`ᵀ, one program column per row (for M = 1: decode of one stream)."""
    cfg = config or TUNED16.get(tuple(weight.shape)) or GEMV16_DEFAULT
    return int8_matmul(x, weight, None, cfg, out)
