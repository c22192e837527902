"""Triton kernels for FP8 (e4m3) weights with 128x128 block scales and 16-bit activations (kernels/fp8.py's layout).

`weight` float8_e4m3fn `[N, K]`; `scale_inv` fp32 `[ceil(N / B), ceil(K / B)]` (the name and meaning of Qwen's FP8
checkpoint and transformers' fine-grained FP8: the weight is `weight * scale_inv[n // B, k // B]`), B = 128.

- `_gemv_kernel` (decode, one row per program column): one `[BLOCK_N, B]` tile per iteration converted to fp32 in
  registers and multiplied against the row; each block's partial sum is scaled once (BLOCK_N divides B, so a tile's
  rows share one block row).
- `_skinny_kernel` (2..SKINNY_MAX_ROWS rows): fp8 -> 16-bit (exact: e4m3's 3 mantissa bits fit bf16 and fp16's
  range holds every e4m3 value) in registers and `tl.dot`, one weight block of K per iteration, its scale applied to
  the fp32 partial product.
- `_swap_kernel` (any rows, chosen by a sweep: `Fp8Config.swap`): Yᵀ = W Xᵀ, the weights the dot's first operand
  (BLOCK_N >= 64 rows, what Hopper's wgmma takes from registers) and the rows its second (BLOCK_M = 16 or 32 columns,
  at one row 15 of 16 masked), K split over `split_k` programs whose fp32 partial products are summed after; the
  int4 swap kernel's layout (w4a16_triton.py), which was 1.5-3.7x the skinny tile at 16 and 32 rows there.
- `_atomic_gemv_kernel` (`swap` 2, session 21; meant for one row): no loop, `split_k` blocks of K per program, fp32
  partial sums added atomically into a zeroed output (w4a16_triton.py's, with fp8 bytes).
- `_dequant_kernel` (prefill): the 16-bit weight once per call, then cuBLAS (kernels/fp8.py).

The weights are read as 1 byte each (int8wo's rate) with no activation quantization: at decode's few rows the
step is a weight stream, where FP8 tensor cores would not help; prefill dequantizes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from qwen3vl_webui.kernels import pdl, splitk, tuning
from qwen3vl_webui.kernels.tuning import row_class


class Fp8Config(NamedTuple):
    block_m: int  # 1: the GEMV kernel
    block_n: int
    warps: int
    stages: int
    split_k: int = 1  # the swap kernel: programs that share K (0: as many as `tuning.default_split` says)
    swap: int = 0  # 1: `_swap_kernel` (block_m 16 or 32, also for one row); 2 (ATOMIC): `_atomic_gemv_kernel`


ATOMIC = 2  # Fp8Config.swap of the atomic GEMV (one row per program column; split_k: K's blocks per program)


GEMV_DEFAULT = Fp8Config(1, 8, 4, 2)
SKINNY_DEFAULT = Fp8Config(16, 64, 4, 4)
SKINNY32_DEFAULT = Fp8Config(32, 64, 4, 4)
SPLIT_LEAST_BLOCKS = 2  # the swap kernel's default split keeps this many 128-wide blocks of K at least
# Session 20's sweep on one H100 (bench/results/h100/s20_quant_fp8.json, b9da3b5): the swap kernel (swap=1) won the
# down projection at every row count (20 us against 51-56 at 16 and 32 rows) and the 32-row o and qkv shapes.
# Session 21's (bench/results/h100/s21_quant_{a,b}.json; the 32-row o shape was not reached and keeps session 20's):
# the atomic GEMV (swap=2) won o, gate/up and down at one row (8.3 us against 10.4 for o, 13.0 against 19.9 for down).
TUNED: dict[tuple[int, int, int], Fp8Config] = {
    (1, 6144, 2560): Fp8Config(1, 8, 8, 1, 1, 0),
    (16, 6144, 2560): Fp8Config(16, 32, 4, 4, 1, 0),
    (32, 6144, 2560): Fp8Config(32, 64, 4, 3, 4, 1),
    (1, 2560, 4096): Fp8Config(1, 32, 2, 1, 1, 2),
    (16, 2560, 4096): Fp8Config(16, 64, 4, 3, 0, 1),
    (32, 2560, 4096): Fp8Config(32, 64, 4, 3, 0, 1),
    (1, 19456, 2560): Fp8Config(1, 32, 2, 1, 1, 2),
    (16, 19456, 2560): Fp8Config(16, 32, 4, 4, 1, 0),
    (32, 19456, 2560): Fp8Config(32, 64, 4, 3, 1, 0),
    (1, 2560, 9728): Fp8Config(1, 16, 2, 1, 1, 2),
    (16, 2560, 9728): Fp8Config(16, 64, 4, 3, 0, 1),
    (32, 2560, 9728): Fp8Config(32, 64, 4, 3, 0, 1),
}


def load_tuning(path: str | None = None) -> int:
    """A sweep's best fp8 configs into TUNED (kernels/tuning.py); read at import from $QWEN3VL_KERNEL_TUNING."""
    return tuning.load("fp8", Fp8Config, TUNED, path)


def pick_config(rows: int, n: int, k: int) -> Fp8Config:
    m = row_class(rows)
    return TUNED.get((m, n, k)) or (GEMV_DEFAULT if m == 1 else SKINNY_DEFAULT if m == 16 else SKINNY32_DEFAULT)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_N: tl.constexpr, B: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, B)
    n_ok = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    s_ptrs = s_ptr + (offs_n // B) * stride_sn
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, B)):
        k_ok = offs_k < K - kb * B
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_xm + kb * B + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        scale = tl.load(s_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.sum(w * x[None, :], axis=1) * scale
        w_ptrs += B
    pdl.finish(PDL)
    tl.store(y_ptr + row * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, B: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, B)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    s_ptrs = s_ptr + (offs_n // B) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, B)):
        k_ok = offs_k < K - kb * B
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        scale = tl.load(s_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w)) * scale[None, :]
        x_ptrs += B
        w_ptrs += B
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    pdl.finish(PDL)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _swap_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, B: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, B)
    m_ok = offs_m < M
    n_ok = offs_n < N
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, tl.cdiv(K, B))
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (kb_start * B + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (kb_start * B + offs_k)[:, None]
    s_ptrs = s_ptr + (offs_n // B) * stride_sn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k_ok = offs_k < K - kb * B
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        scale = tl.load(s_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(w, xt) * scale[:, None]
        w_ptrs += B
        x_ptrs += B
    y_ptrs = y_ptr + split * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
    pdl.finish(PDL)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _atomic_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_N: tl.constexpr, B: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr = 0,
):  # fmt: skip
    """One row times BLOCKS blocks of K for BLOCK_N outputs, added atomically into fp32 `y` (zeroed by the caller):
    no loop, thousands of programs (w4a16_triton's `_atomic_gemv_kernel`, with fp8 bytes)."""
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, B)
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(BLOCKS):
        kb = pid_k * BLOCKS + i
        k_ok = offs_k < K - kb * B
        w = tl.load(w_ptr + rows_n[:, None] * stride_wn + (kb * B + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        x = tl.load(x_ptr + row * stride_xm + kb * B + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + (offs_n // B) * stride_sn + kb, mask=n_ok, other=0.0)
        out += tl.sum(w * x[None, :], axis=1) * scale
    pdl.finish(PDL)
    tl.atomic_add(y_ptr + row * stride_ym + offs_n, out, mask=n_ok, sem="relaxed")


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, B: tl.constexpr):
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = nb * B + tl.arange(0, B)
    offs_k = kb * B + tl.arange(0, B)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    w = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
    w = w * tl.load(s_ptr + nb * stride_sn + kb)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def _swap_split(rows: int, n: int, k: int, block: int, cfg: Fp8Config) -> tuple[int, int]:
    """(K's splits, blocks per split) of a swap-kernel launch."""
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(rows, cfg.block_m)
    return tuning.split_k(cfg.split_k, tiles, triton.cdiv(k, block), SPLIT_LEAST_BLOCKS)


def fp8_parts(rows: int, n: int, k: int, block: int, config: Fp8Config | None = None) -> tuple[int, bool]:
    """What `fp8_partials` returns for this product: (how many partial sums, whether in fp32 rather than x's dtype)."""
    cfg = config or pick_config(rows, n, k)
    if cfg.swap == ATOMIC:
        return 1, True
    split = _swap_split(rows, n, k, block, cfg)[0] if cfg.swap else 1
    return split, split > 1


def fp8_matmul(x: Any, weight: Any, scale_inv: Any, block: int, config: Fp8Config | None = None) -> Any:
    """`x [M, K]` (bf16/fp16, rows contiguous) times the block-scaled fp8 weight ᵀ: `[M, N]` in x's dtype."""
    out = fp8_partials(x, weight, scale_inv, block, config)
    if out.shape[0] > 1:
        return splitk.reduce_partials(out, x.dtype)
    return out[0] if out.dtype == x.dtype else out[0].to(x.dtype)


def fp8_partials(x: Any, weight: Any, scale_inv: Any, block: int, config: Fp8Config | None = None) -> Any:
    """The product as `fp8_parts(...)` partial sums, `[split, M, N]`: fp32 where K is split (or added atomically),
    else the product itself in x's dtype. Left unsummed and uncast, a compiled caller finishes them in the kernel that
    consumes the product (Fp8Linear under torch.compile, kernels/parts.py)."""
    import torch

    rows, k = x.shape
    n = weight.shape[0]
    cfg = config or pick_config(rows, n, k)
    if cfg.swap == ATOMIC:
        blocks = triton.cdiv(k, block)
        per = max(1, min(cfg.split_k or 1, blocks))
        while blocks % per:  # the programs' blocks tile K exactly
            per -= 1
        launch = pdl.args(x, "fp8")
        acc = splitk.zeros((1, rows, n), x.device, launch)  # PDL on: cleared by a kernel of ours, launched alike
        _atomic_gemv_kernel[(triton.cdiv(n, cfg.block_n), blocks // per, rows)](
            x, weight, scale_inv, acc, n, k, x.stride(0), weight.stride(0), scale_inv.stride(0), acc.stride(1),
            BLOCK_N=cfg.block_n, B=block, BLOCKS=per, num_warps=cfg.warps, num_stages=cfg.stages, **launch,
        )  # fmt: skip
        return acc
    if cfg.swap:
        split, per_split = _swap_split(rows, n, k, block, cfg)
        out = torch.empty((split, rows, n), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m), split)
        _swap_kernel[grid](
            x, weight, scale_inv, out, rows, n, k, x.stride(0), weight.stride(0), scale_inv.stride(0), out.stride(0),
            out.stride(1), per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, B=block, num_warps=cfg.warps,
            num_stages=cfg.stages, **pdl.args(x, "fp8"),
        )  # fmt: skip
        return out
    out = torch.empty((1, rows, n), device=x.device, dtype=x.dtype)
    if cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), rows)
        _gemv_kernel[grid](
            x, weight, scale_inv, out, n, k, x.stride(0), weight.stride(0), scale_inv.stride(0), out.stride(1),
            BLOCK_N=cfg.block_n, B=block, num_warps=cfg.warps, num_stages=cfg.stages, **pdl.args(x, "fp8"),
        )  # fmt: skip
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m))
        _skinny_kernel[grid](
            x, weight, scale_inv, out, rows, n, k, x.stride(0), weight.stride(0), scale_inv.stride(0), out.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, B=block, num_warps=cfg.warps, num_stages=cfg.stages,
            **pdl.args(x, "fp8"),
        )  # fmt: skip
    return out


def fp8_dequantize(weight: Any, scale_inv: Any, block: int, dtype: Any) -> Any:
    import torch

    n, k = weight.shape
    out = torch.empty((n, k), device=weight.device, dtype=dtype)
    grid = (triton.cdiv(n, block), triton.cdiv(k, block))
    _dequant_kernel[grid](weight, scale_inv, out, n, k, weight.stride(0), scale_inv.stride(0), out.stride(0), B=block)
    return out


load_tuning()
