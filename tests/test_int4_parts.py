"""Int4Linear under torch.compile (CPU, inductor): for one row (the one-stream decode step) the split-K partial sums
come back from the `int4_linear_parts` op and the compiled graph adds them (fused into what consumes the product on a
GPU); for more rows, a symbolic count included, the whole product comes from `int4_linear`. The GPU kernels' split is stood in for by the same
partial sums computed in torch (the GPU path is the bench's: bench.quant_check, bench.matrix)."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_webui.kernels import int4


class _SplitKernels:
    """Stands in for w4a16_triton: K split in `split` equal parts, each part's product in fp32."""

    def __init__(self, split: int) -> None:
        self.split = split
        self.calls = 0

    def w4_split(self, rows: int, n: int, k: int, group: int) -> int:
        return self.split

    def w4_partials(self, x, qweight, scales, zeros, group):
        self.calls += 1
        weight = int4.dequantize_weight(qweight, scales, zeros, torch.float32)
        xs, ws = x.float().chunk(self.split, dim=1), weight.chunk(self.split, dim=1)
        return torch.stack([a @ w.T for a, w in zip(xs, ws, strict=True)])


def _layer() -> int4.Int4Linear:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 256, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=gen))
    return int4.Int4Linear.from_linear(linear, group=64)


@pytest.fixture
def split_two(monkeypatch: pytest.MonkeyPatch) -> _SplitKernels:
    kernels = _SplitKernels(2)
    monkeypatch.setattr(int4, "_kernels", lambda: kernels)
    monkeypatch.setattr(int4, "parts_split", lambda x, qweight, scales: kernels.split)
    return kernels


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256)])
def test_one_row_compiles_to_the_partial_sums_added_in_the_graph(split_two: _SplitKernels, shape) -> None:
    layer = _layer()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    eager = layer(x)  # eager: the whole product (dequantized weight, F.linear)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    out = compiled(x)
    assert split_two.calls == 1  # the parts op ran once at run time (its fake does not call the kernels)
    assert out.shape == (*shape[:-1], 48) and out.dtype == x.dtype
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_more_rows_compile_to_the_whole_product(split_two: _SplitKernels) -> None:
    layer = _layer()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert split_two.calls == 0
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_a_symbolic_shape_compiles_to_the_whole_product(split_two: _SplitKernels) -> None:
    layer = _layer()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    eager = layer(x)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    out = compiled(x)
    assert split_two.calls == 0  # symbolic rows: int4_linear, not the parts
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    x7 = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(compiled(x7), layer(x7), rtol=1e-5, atol=1e-5)  # another row count, same graph


def test_the_parts_op_falls_back_to_one_whole_product_off_the_gpu() -> None:
    layer = _layer()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert int4.parts_split(x, layer.qweight, layer.scales) == 1  # a CPU tensor: no Triton split
    parts = int4.int4_parts_impl(x, layer.qweight, layer.scales, layer.zeros)
    assert parts.shape == (1, 2, 48) and parts.dtype == torch.bfloat16
    assert torch.equal(parts[0], int4.int4_linear_impl(x, layer.qweight, layer.scales, layer.zeros))
