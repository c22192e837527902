"""Triton kernels for 4-bit group-quantized weights with 16-bit activations (W4A16, kernels/int4.py's layout).

Layout (nn.Linear's `[N, K]` orientation): `qweight` int32 `[N, K // 8]`, weight `(n, k)` is the unsigned nibble
`(qweight[n, k // 8] >> 4 * (k % 8)) & 0xF`; `scales` 16-bit `[N, K // G]`; `zeros` uint8 `[N, K // G]`; the weight is
`(q - zero) * scale`, `G` the group size (a multiple of 8 dividing K).

- `_gemv_kernel` (decode, one token row per program column): a `[BLOCK_N, BLOCK_K // 8]` tile of packed words per
  iteration, unpacked in registers to `[BLOCK_N, groups, G]`, multiplied against the row in fp32 (no tensor cores),
  summed per group, times the group's scale. Each packed byte is read once per row: at one row decode is a stream
  of 0.5 byte per weight.
- `_skinny_kernel` (2..SKINNY_MAX_ROWS rows): one group per iteration, the tile unpacked to `q - zero` (integers in
  [-15, 15], exact in bf16/fp16) and fed to `tl.dot` against the rows padded to BLOCK_M; the group's scale multiplies
  the fp32 partial product, so no weight is ever rounded to 16 bits.
- `_dequant_kernel` (prefill): the weight written out in 16 bits once per call, then cuBLAS (kernels/int4.py).

Nibble to float: `q | 0x4B000000` read as fp32 is 2^23 + q exactly, so one OR and one subtract replace the
int-to-float conversion, which issues at a quarter of the fp32 rate on sm_80/sm_90 (kernels/matmul_triton.py).
Nothing imports this module at package import time: callers import it inside functions, where Triton runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl


class W4Config(NamedTuple):
    """One launch shape. block_m == 1 selects the GEMV kernel (one program column per row); `groups` is how many
    quantization groups one GEMV iteration covers (its BLOCK_K = groups * G)."""

    block_m: int
    block_n: int
    groups: int
    warps: int
    stages: int


# Chosen for the 4B's shapes (K in 2560 / 4096 / 9728, G 128) by bench/int4_check.py's sweep on an H200; other shapes
# take the defaults below.
TUNED: dict[tuple[int, int, int], W4Config] = {}
GEMV_DEFAULT = W4Config(1, 16, 2, 4, 2)
SKINNY_DEFAULT = W4Config(16, 64, 1, 4, 4)
SKINNY32_DEFAULT = W4Config(32, 64, 1, 4, 4)


def row_class(rows: int) -> int:
    return 1 if rows == 1 else 16 if rows <= 16 else 32


def load_tuning(path: str | None = None) -> int:
    """Adds the best configs of a `bench.quant_check` report (its "tuned" section) to TUNED: how many. Read at import
    from $QWEN3VL_KERNEL_TUNING, so a run can use the sweep it just made (the tuned tables here are the kept copy)."""
    import json
    import os

    path = path or os.environ.get("QWEN3VL_KERNEL_TUNING")
    if not path or not os.path.isfile(path):  # none named, or the sweep that was to write it did not
        return 0
    with open(path) as f:
        found = json.load(f).get("tuned", {}).get("int4", {})
    for shape, cfg in found.items():
        m, n, k = (int(v) for v in shape.split(","))
        TUNED[(m, n, k)] = W4Config(*cfg)
    return len(found)


def pick_config(rows: int, n: int, k: int) -> W4Config:
    m = row_class(rows)
    found = TUNED.get((m, n, k))
    if found is not None:
        return found
    return GEMV_DEFAULT if m == 1 else SKINNY_DEFAULT if m == 16 else SKINNY32_DEFAULT


@triton.jit
def _nibbles(words, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """int32 `[BLOCK_N, WORDS]` -> fp32 2^23 + nibble, `[BLOCK_N, WORDS * 8]` in k order."""
    shifts = tl.arange(0, 8) * 4
    q = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    q = tl.reshape(q, (BLOCK_N, WORDS * 8))
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    WORDS: tl.constexpr = GROUPS * G // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, WORDS)
    offs_g = tl.arange(0, GROUPS)
    offs_k = tl.arange(0, GROUPS * G)
    rows_w = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    rows_s = offs_n[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    n_groups = K // G
    for g0 in range(0, n_groups, GROUPS):
        g_ok = (g0 + offs_g) < n_groups
        w_ok = (g0 * (G // 8) + offs_w) < K // 8
        words = tl.load(rows_w + (g0 * (G // 8) + offs_w)[None, :], mask=n_ok[:, None] & w_ok[None, :], other=0)
        zero = tl.load(z_ptr + rows_s + (g0 + offs_g)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0)
        scale = tl.load(s_ptr + rows_s + (g0 + offs_g)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0.0)
        x = tl.load(x_ptr + row * stride_xm + g0 * G + offs_k, mask=(g0 * G + offs_k) < K, other=0.0)
        w = _nibbles(words, BLOCK_N, WORDS) - 8388608.0  # q, exactly
        w = tl.reshape(w, (BLOCK_N, GROUPS, G)) - zero.to(tl.float32)[:, :, None]
        part = tl.sum(w * tl.reshape(x.to(tl.float32), (GROUPS, G))[None, :, :], axis=2)
        acc += part * scale.to(tl.float32)
    out = tl.sum(acc, axis=1)
    tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    WORDS: tl.constexpr = G // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, G)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + tl.arange(0, WORDS)[None, :]
    sz = offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, K // G):
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        words = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        zero = tl.load(z_ptr + sz + g, mask=n_ok, other=0)
        scale = tl.load(s_ptr + sz + g, mask=n_ok, other=0.0)
        w = _nibbles(words, BLOCK_N, WORDS) - (8388608.0 + zero.to(tl.float32)[:, None])  # q - zero, exactly
        part = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        acc += part * scale.to(tl.float32)[None, :]
        x_ptrs += G
        w_ptrs += WORDS
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, BLOCK_N: tl.constexpr, G: tl.constexpr
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    WORDS: tl.constexpr = G // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    words = tl.load(w_ptr + rows[:, None] * stride_wn + g * WORDS + tl.arange(0, WORDS)[None, :], mask=n_ok[:, None])
    zero = tl.load(z_ptr + rows * stride_sn + g, mask=n_ok, other=0)
    scale = tl.load(s_ptr + rows * stride_sn + g, mask=n_ok, other=0.0)
    w = (_nibbles(words, BLOCK_N, WORDS) - (8388608.0 + zero.to(tl.float32)[:, None])) * scale.to(tl.float32)[:, None]
    out = out_ptr + rows[:, None] * stride_on + g * G + tl.arange(0, G)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def w4_matmul(x: Any, qweight: Any, scales: Any, zeros: Any, group: int, config: W4Config | None = None) -> Any:
    """`x [M, K]` (bf16/fp16, rows contiguous) times the W4 weight ᵀ: `[M, N]` in x's dtype."""
    import torch

    rows, k = x.shape
    n = qweight.shape[0]
    cfg = config or pick_config(rows, n, k)
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), rows)
        _gemv_kernel[grid](
            x, qweight, scales, zeros, out, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            BLOCK_N=cfg.block_n, GROUPS=cfg.groups, G=group, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m))
        _skinny_kernel[grid](
            x, qweight, scales, zeros, out, rows, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, G=group, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
    return out


def w4_dequantize(qweight: Any, scales: Any, zeros: Any, group: int, dtype: Any) -> Any:
    """The 16-bit `[N, K]` weight (each value rounded once from fp32's exact `(q - zero) * scale`)."""
    import torch

    n = qweight.shape[0]
    k = qweight.shape[1] * 8
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    block_n = 32
    grid = (triton.cdiv(n, block_n), k // group)
    _dequant_kernel[grid](
        qweight, scales, zeros, out, n, k, qweight.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=block_n, G=group, num_warps=4,
    )  # fmt: skip
    return out


load_tuning()
