"""The CUDA decode kernels' launch glue (`w4_mma.launch`, `fp8_mma.launch`) on a CPU: the real functions run, and the
driver's launch is stood in for by a "kernel" that reads its arguments as the CUDA C does (pointers into host memory,
strides, the rows of each launch, the K split's `per`, the parts' stride `ys`) and writes each program's partial sums
where the CUDA C writes them. The arithmetic is `emulate`'s, one part a group, summed over the split's groups.

So a wrong pointer, stride or offset in the glue (the second launch past 32 rows, strided activations or scales,
uneven splits) fails here, where the tests that stand in for `launch` itself cannot see it. The CUDA C's own
indexing is checked on a GPU (`bench.quant_check --sections layout`)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

from qwen3vl_webui.kernels import cuda, fp8, fp8_mma, int4, w4_mma


def _floats(address: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values of `dtype` at host `address`, as a tensor on that memory (writes go through)."""
    size = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * (count * size)).from_address(address), dtype=dtype)


def _rows(address: int, rows: int, width: int, stride: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_strided(_floats(address, (rows - 1) * stride + width, dtype), (rows, width), (stride, 1))


def _write_parts(per_group: torch.Tensor, yp: int, splits: int, per: int, rows: int, n: int, ys: int) -> None:
    """Each split's programs: the sum of its groups' parts, at Y + split * ys + row * N (the CUDA C's stores)."""
    groups = per_group.shape[0]
    assert (splits - 1) * per < groups <= splits * per, (per, splits, groups)  # no split without a group
    y = _floats(yp, (splits - 1) * ys + rows * n, torch.float32)
    for s in range(splits):
        part = per_group[s * per : min((s + 1) * per, groups)].sum(0)  # [rows, n]
        torch.as_strided(y, (rows, n), (n, 1), s * ys).copy_(part)


def _stand_in(monkeypatch: pytest.MonkeyPatch, module: Any, kernel: Any) -> list[tuple[int, int]]:
    """`module`'s variants become descriptors, and the driver's launch `kernel(descriptor, grid, values)`."""
    launches: list[tuple[int, int]] = []
    monkeypatch.setattr(module, "_function", lambda index, dtype, warps, unroll, mode, group, tiles: (dtype, group))

    def launch(func: Any, grid: tuple[int, int], threads: int, values: list[Any], index: int, mode: int) -> None:
        launches.append(grid)
        kernel(func, grid, [v.value for v in values])

    monkeypatch.setattr(cuda, "launch", launch)
    monkeypatch.setattr(cuda, "pdl_mode_for", lambda x, name, mode: 0)
    return launches


def _int4_kernel(func: Any, grid: tuple[int, int], values: list[int]) -> None:
    dtype, group = func
    wp, tp, xp, yp, rows, n, k, sx, per, ys = values
    groups = k // group
    words = _floats(wp, n * k // 8, torch.int32).view(n // 16, k // 64, 32, 4)
    table = _floats(tp, n // 16 * groups * 16, torch.int32).view(n // 16, groups, 16)
    x = _rows(xp, rows, k, sx, torch.int16).view(dtype)
    _write_parts(w4_mma.emulate(x, words, table, dtype, groups), yp, grid[1], per, rows, n, ys)


def _fp8_kernel(func: Any, grid: tuple[int, int], values: list[int]) -> None:
    dtype, group = func
    wp, sp, xp, yp, rows, n, k, sx, ss, per, ys = values
    groups = k // group
    words = _floats(wp, n * k // 4, torch.int32).view(n // 16, k // 64, 2, 32, 4)
    scale = _rows(sp, -(-n // 128), -(-k // 128), ss, torch.float32)
    x = _rows(xp, rows, k, sx, torch.int16).view(dtype)
    _write_parts(fp8_mma.emulate(x, words, scale, dtype, groups), yp, grid[1], per, rows, n, ys)


CASES = [(1, 1), (5, 3), (40, 2), (64, 4)]  # (rows, K split asked): two launches past 32 rows, uneven splits


@pytest.mark.parametrize("rows, split", CASES)
def test_int4_launch_reads_and_writes_where_the_kernel_does(monkeypatch: pytest.MonkeyPatch, rows: int, split: int):
    n, k, group = 48, 640, 64  # 10 groups: a split of 3 or 4 leaves the last one short
    gen = torch.Generator().manual_seed(rows)
    qweight, scales, zeros = int4.quantize_weight(torch.randn(n, k, generator=gen), group, torch.bfloat16)
    want_w = int4.dequantize_weight(qweight, scales, zeros, torch.float64)
    words, table = w4_mma.repack(qweight, scales, zeros)
    launches = _stand_in(monkeypatch, w4_mma, _int4_kernel)
    wide = torch.randn(rows, k + 24, generator=gen).to(torch.bfloat16)  # rows 16-byte aligned, not contiguous
    x = wide[:, :k]
    cfg = w4_mma.MmaConfig(4, 1, split)
    out = w4_mma.launch(x, words, table, n, cfg)
    count, _ = w4_mma.split_of(n, k, group, cfg)
    assert out.shape == (count, rows, n) and len(launches) == -(-rows // 32)
    want = x.double() @ want_w.T
    assert float((out.sum(0).double() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("rows, split", CASES)
def test_fp8_launch_reads_and_writes_where_the_kernel_does(monkeypatch: pytest.MonkeyPatch, rows: int, split: int):
    n, k = 144, 640  # N past one 128-row block, K not whole blocks: groups of 64, 10 of them
    gen = torch.Generator().manual_seed(rows)
    q, scale = fp8.quantize_weight(torch.randn(n, k, generator=gen) * (1 + torch.arange(n)[:, None] // 128))
    want_w = fp8.dequantize_weight(q, scale, torch.float64)
    words = fp8_mma.repack(q, torch.bfloat16)
    launches = _stand_in(monkeypatch, fp8_mma, _fp8_kernel)
    wide = torch.zeros(scale.shape[0], scale.shape[1] + 3)
    wide[:, : scale.shape[1]] = scale
    strided_scale = wide[:, : scale.shape[1]]  # rows of the scale table not contiguous
    x = torch.randn(rows, k + 8, generator=gen).to(torch.bfloat16)[:, :k]
    cfg = fp8_mma.MmaConfig(4, 1, split)
    out = fp8_mma.launch(x, words, strided_scale, n, cfg)
    count, _ = fp8_mma.split_of(n, k, cfg)
    assert out.shape == (count, rows, n) and len(launches) == -(-rows // 32)
    want = x.double() @ want_w.T
    assert float((out.sum(0).double() - want).norm() / want.norm()) < 1e-5
