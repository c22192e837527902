"""Int4Linear and Fp8Linear under torch.compile (CPU, inductor): for one row (the one-stream decode step) the product's
split-K partial sums come back from the `*_linear_parts` op and the compiled graph adds and casts them (fused into
what consumes the product on a GPU); for more rows, a symbolic count included, the whole product comes from the
`*_linear` op. The GPU kernels' split is stood in for by the same partial sums computed in torch (the GPU path is the
bench's: bench.quant_check, bench.matrix)."""

from __future__ import annotations

import pytest
import torch

from qwen3vl_webui.kernels import fp8, int4


class _SplitKernels:
    """Stands in for w4a16_triton / fp8_triton: K split in `split` equal parts, each part's product in fp32."""

    def __init__(self, split: int, dequantize) -> None:
        self.split = split
        self.dequantize = dequantize
        self.calls = 0

    def partials(self, x, *weights):
        self.calls += 1
        weight = self.dequantize(*weights)
        xs, ws = x.float().chunk(self.split, dim=1), weight.chunk(self.split, dim=1)
        return torch.stack([a @ w.T for a, w in zip(xs, ws, strict=True)])

    def w4_partials(self, x, qweight, scales, zeros, group):
        return self.partials(x, qweight, scales, zeros)

    def fp8_partials(self, x, weight, scale_inv, block):
        return self.partials(x, weight, scale_inv)


def _linear(seed: int = 0) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(256, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 256, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(48, generator=gen))
    return linear


def _layer(kind: str) -> torch.nn.Module:
    if kind == "int4":
        return int4.Int4Linear.from_linear(_linear(), group=64)
    return fp8.Fp8Linear.from_linear(_linear())


@pytest.fixture(params=["int4", "fp8"])
def split(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, _SplitKernels]:
    """K split two ways for `kind`'s one-row products (fp8: also its fp32 accumulator with no split, below)."""
    kind = request.param
    if kind == "int4":
        kernels = _SplitKernels(2, lambda *w: int4.dequantize_weight(*w, torch.float32))
        monkeypatch.setattr(int4, "_kernels", lambda: kernels)
        monkeypatch.setattr(int4, "parts_split", lambda x, qweight, scales: kernels.split)
    else:
        kernels = _SplitKernels(2, lambda *w: fp8.dequantize_weight(*w, torch.float32))
        monkeypatch.setattr(fp8, "_kernels", lambda: kernels)
        monkeypatch.setattr(fp8, "parts_layout", lambda x, weight: (kernels.split, True))
    return kind, kernels


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256)])
def test_one_row_compiles_to_the_partial_sums_added_in_the_graph(split, shape) -> None:
    kind, kernels = split
    layer = _layer(kind)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    eager = layer(x)  # eager: the whole product (dequantized weight, F.linear)
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert kernels.calls == 1  # the parts op ran once at run time (its fake does not call the kernels)
    assert out.shape == (*shape[:-1], 48) and out.dtype == x.dtype
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_one_unsplit_fp32_product_is_cast_in_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8's atomic GEMV: one fp32 accumulator, no split; the graph casts it to the activations' dtype."""
    kernels = _SplitKernels(1, lambda *w: fp8.dequantize_weight(*w, torch.float32))
    monkeypatch.setattr(fp8, "_kernels", lambda: kernels)
    monkeypatch.setattr(fp8, "parts_layout", lambda x, weight: (1, True))
    layer = _layer("fp8")  # fp8 weights, fp32 block scales and bias
    assert layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert kernels.calls == 1 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, layer(x), rtol=2e-2, atol=2e-2)


def test_more_rows_compile_to_the_whole_product(split) -> None:
    kind, kernels = split
    layer = _layer(kind)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert kernels.calls == 0
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_a_symbolic_row_count_compiles_to_the_whole_product(split) -> None:
    kind, kernels = split
    layer = _layer(kind)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    eager = layer(x)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    out = compiled(x)
    assert kernels.calls == 0  # symbolic rows: the whole-product op, not the parts
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    x7 = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(compiled(x7), layer(x7), rtol=1e-5, atol=1e-5)  # another row count, same graph


def test_the_parts_ops_fall_back_to_one_whole_product_off_the_gpu() -> None:
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    q = _layer("int4")
    assert int4.parts_split(x, q.qweight, q.scales) == 1  # a CPU tensor: no Triton split
    parts = int4.int4_parts_impl(x, q.qweight, q.scales, q.zeros)
    assert parts.shape == (1, 2, 48) and parts.dtype == torch.bfloat16
    assert torch.equal(parts[0], int4.int4_linear_impl(x, q.qweight, q.scales, q.zeros))
    f = _layer("fp8")
    assert fp8.parts_layout(x, f.weight) == (1, False)
    parts = fp8.fp8_parts_impl(x, f.weight, f.weight_scale_inv)
    assert parts.shape == (1, 2, 48) and torch.equal(parts[0], fp8.fp8_linear_impl(x, f.weight, f.weight_scale_inv))
