"""fp8's CUDA decode product (kernels/fp8_mma.py) on a CPU: the repacked words hold the weights its docstring names
and give them back bit for bit, the kernel's arithmetic fragment by fragment (`emulate`) equals the dequantized
weight's product, the kernel compiles for sm_90 with NVRTC and its machine code keeps the PDL wait between the weights'
loads and the activations', and the engine's decode through it (the arithmetic emulated, the launch stood in for)
gives `generate`'s tokens.

The kernel itself runs on a GPU only: `bench.quant_check --formats fp8mma` checks every config's output against the
float64 product there, and `bench.matrix` measures the engine (QWEN3VL_FP8_MMA=0: the Triton kernels instead)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.kernels import cuda, fp8, fp8_mma

KINDS = [torch.bfloat16, torch.float16]


def _quantized(n: int, k: int, seed: int = 0, outliers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + torch.arange(n)[:, None] // 128)  # each 128-row block its scale
    if outliers:  # one large value a block: most of the block's e4m3 values are then subnormal (below 2^-6)
        w[::128, ::128] = 1e5
    return fp8.quantize_weight(w)


@pytest.mark.parametrize("kind", KINDS)
def test_a_repacked_word_holds_the_weights_its_docstring_names(kind: torch.dtype) -> None:
    n, k = 32, 256
    q, _ = _quantized(n, k, outliers=True)
    assert ((q.float().abs() < 2**-6) & (q.float() != 0)).any()  # subnormal e4m3 values are among them
    words = fp8_mma.repack(q, kind)
    assert words.shape == (n // 16, k // 64, 2, 32, 4) and words.dtype == torch.int32
    values = fp8_mma.unpack_bits(words, kind) * fp8_mma.BITS[kind].factor  # [t, c, f, lane, word, h, e]
    for t in range(n // 16):
        for c in range(k // 64):
            for f in range(2):
                for lane in range(32):
                    g, quad = divmod(lane, 4)
                    for word in range(4):
                        p, j = divmod(word, 2)
                        for h in range(2):
                            for e in range(2):
                                want = q[16 * t + g + 8 * h, 64 * c + 16 * quad + 4 * (2 * f + p) + 2 * j + e]
                                assert float(values[t, c, f, lane, word, h, e]) == float(want)
    back = fp8_mma.original(words, kind)
    assert torch.equal(back.view(torch.uint8), q.view(torch.uint8))  # every bit, signs of zeros included


@pytest.mark.parametrize("kind, tol", [(torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
@pytest.mark.parametrize("n, k, rows, split", [
    (32, 256, 1, 1), (48, 512, 3, 2), (128, 1024, 8, 3), (64, 192, 5, 2), (272, 384, 13, 2), (32, 256, 32, 1),
])  # fmt: skip
def test_the_kernels_arithmetic_equals_the_dequantized_weights_product(
    kind: torch.dtype, tol: float, n: int, k: int, rows: int, split: int
) -> None:
    q, scale = _quantized(n, k, seed=n + k, outliers=n == 64)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(kind)
    want = x.double() @ fp8.dequantize_weight(q, scale, torch.float64).T
    words = fp8_mma.repack(q, kind)
    parts = fp8_mma.emulate(x, words, scale, kind, split)
    count, _ = fp8_mma.split_of(n, k, fp8_mma.MmaConfig(4, 1, split))
    assert parts.shape == (count, rows, n) and parts.dtype == torch.float32
    assert float((parts.sum(0).double() - want).norm() / want.norm()) < tol
    if n >= 256:  # a tile's scale is its own 128-row block's: another block's is far off
        wrong = torch.cat([scale[1:], scale[:1]])
        assert float((fp8_mma.emulate(x, words, wrong, kind, split).sum(0).double() - want).norm() / want.norm()) > 0.05
    # the words read for the other 16-bit kind are other numbers
    other = next(d for d in KINDS if d != kind)
    assert float((fp8_mma.emulate(x.to(other), words, scale, other).sum(0).double() - want).norm() / want.norm()) > 0.05


def test_configs_and_shapes() -> None:
    assert fp8_mma.supports(6144, 2560) and fp8_mma.supports(32, 64) and not fp8_mma.supports(40, 64)
    assert not fp8_mma.supports(64, 96)
    assert fp8_mma.group_of(2560) == 128 and fp8_mma.group_of(192) == 64
    assert fp8_mma.split_of(2560, 9728, fp8_mma.MmaConfig(4, 1, 4)) == (4, 19)
    assert fp8_mma.split_of(6144, 2560, fp8_mma.MmaConfig(4, 1, 8)) == (7, 3)  # none empty
    assert fp8_mma.configs(6144, 2560)[0] == fp8_mma.pick_config(6144, 2560)
    assert all(2560 // 128 // c.split >= c.warps for c in fp8_mma.configs(6144, 2560))
    assert {c.unroll for c in fp8_mma.configs(6144, 2560, rows=32)} == {1}
    x = torch.empty(1, 2560, dtype=torch.bfloat16)
    assert not fp8_mma.decodes(x, torch.bfloat16)  # a CPU tensor: not the kernel
    assert fp8_mma.parts_count(x, 6144, 2560, torch.bfloat16) == 1
    assert not fp8_mma.wanted("cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_it_compiles_for_sm90_and_loads_weights_before_the_pdl_wait_and_activations_after(kind: torch.dtype) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton (its bundled cuobjdump reads the SASS) is not installed")
    from bench.kernel_asm import sass_code, sass_loop

    variants = [(w, u, m, t) for w in (4, 8) for u in (1, 2) for m in (0, 1, 2) for t in (1, 2, 4) if t < 4 or u == 1]
    if kind != torch.bfloat16:
        variants = [v for v in variants if v[0] == 4 and v[2] != 0]
    for group in (128, 64):
        for warps, unroll, mode, tiles in variants if group == 128 else variants[:3]:
            cubin = cuda.compile_cubin(fp8_mma.source(kind, warps, unroll, mode, group, tiles), "sm_90", "fp8_mma")
            code = [text for _, text in sass_code(cubin)]
            where = (kind, group, warps, unroll, mode, tiles)
            assert not [t for t in code if "STL" in t or "LDL" in t], where  # no register spills
            waits = [i for i, t in enumerate(code) if t.startswith("ACQBULK")]
            triggers = [i for i, t in enumerate(code) if t.startswith("PREEXIT")]
            weights = [i for i, t in enumerate(code) if "LDG.E.NA.128" in t]  # ld.global.nc.L1::no_allocate
            scales = [i for i, t in enumerate(code) if "LDG.E.CONSTANT" in t and ".128" not in t]  # __ldg
            activations = [i for i, t in enumerate(code) if "LDG.E.128" in t and "CONSTANT" not in t]
            stores = [i for i, t in enumerate(code) if "STG" in t]
            assert weights and scales and activations and stores, where
            if mode == 0:
                assert not waits and not triggers, where
                continue
            assert len(waits) == 1 and len(triggers) == 1, where
            assert weights[0] < waits[0] and scales[0] < waits[0] < activations[0] and waits[0] < stores[0], where
            if mode == 2:  # late: once the program's math is done (after the warps' shared-memory sum)
                assert triggers[0] > max(i for i, t in enumerate(code) if "BAR.SYNC" in t), where
            else:
                assert triggers[0] < activations[0], where
            loop = sass_loop(cubin)  # two steps a trip: 2 x unroll groups, 8 mma's a 64-k chunk an n-tile
            assert loop.get("HMMA") == 2 * unroll * 4 * (group // 64) * tiles, (where, loop)
            if tiles == 1 and group == 128:
                # Per weight (a byte): 1.73-1.85 instructions (3 LOP3 and 2 SHF a word of four, an mma a
                # 256-weight tile, the group's scale). The Triton GEMV converts and multiplies each value alone.
                weights_per_trip = 2 * unroll * group * 16 // 32
                assert loop.get("LOP3", 0) + loop.get("SHF", 0) <= 5 * weights_per_trip // 4 + 4, (where, loop)
                assert sum(loop.values()) < 1.9 * weights_per_trip, (where, loop)


def _emulated_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The CUDA kernel stood in for on a CPU: `decodes` as on a GPU for this CPU's tensors, `launch` by `emulate`
    (for the layout's kind: the CPU computes in fp32); returns the (rows, N) of every launch."""
    launches: list[tuple[int, int]] = []
    kinds: dict[int, torch.dtype] = {}
    real_parts = fp8_mma.parts

    def decodes(x: Any, dtype: torch.dtype) -> bool:
        return 0 < x.numel() // x.shape[-1] <= fp8_mma.DECODE_ROWS

    def parts(x: Any, words: Any, scale_inv: Any, dtype: torch.dtype) -> Any:
        kinds[words.data_ptr()] = dtype
        return real_parts(x, words, scale_inv, dtype)

    def launch(x: Any, words: Any, scale_inv: Any, n: int, config: Any = None, pdl_mode: Any = None) -> Any:
        launches.append((x.shape[0], n))
        cfg = config or fp8_mma.pick_config(n, x.shape[1], x.shape[0])
        return fp8_mma.emulate(x, words, scale_inv, kinds[words.data_ptr()], cfg.split)

    monkeypatch.setattr(fp8_mma, "decodes", decodes)
    monkeypatch.setattr(fp8_mma, "parts", parts)
    monkeypatch.setattr(fp8_mma, "launch", launch)
    return launches


def _fp8_layer(seed: int, n: int = 64, k: int = 1024) -> fp8.Fp8Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    return fp8.Fp8Linear.from_linear(linear)


def test_a_layer_in_the_kernels_layout_keeps_its_memory_and_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _fp8_layer(3)
    want = layer.dequantized(torch.float64)
    words = fp8_mma.repack(layer.weight, torch.bfloat16)
    where, scales = layer.weight.data_ptr(), layer.weight_scale_inv.clone()
    sliced = layer.weight.clone()
    fp8_mma.repack_in_place(sliced, torch.bfloat16, rows=16)  # a slice of rows at a time: as all at once
    assert torch.equal(sliced.view(torch.int32).view(-1), words.view(-1))
    layer.use_mma_layout(torch.bfloat16)
    assert layer.weight.data_ptr() == where and layer.weight.dtype == torch.float8_e4m3fn  # in place
    assert torch.equal(layer.weight.view(torch.int32).view(-1), words.view(-1))
    assert torch.equal(layer.weight_scale_inv, scales) and "layout=mma" in repr(layer)  # the scales as they were
    layer.use_mma_layout(torch.bfloat16)  # once
    assert torch.equal(layer.weight.view(torch.int32).view(-1), words.view(-1))
    assert torch.equal(layer.dequantized(torch.float64), want)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1024, generator=gen)
    reference = x.double() @ want.T
    assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-5  # CPU: dequantized, then torch
    launches = _emulated_kernel(monkeypatch)
    assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-5  # the kernel's arithmetic
    parts = layer.partials(x[:1])
    count = fp8_mma.split_of(64, 1024)[0]
    assert parts.dtype == torch.float32 and parts.shape == (count, 1, 64)
    assert float((parts.sum(0).double() - reference[:1]).norm() / reference[:1].norm()) < 1e-5
    many = torch.randn(65, 1024, generator=gen)  # past the decode rows: dequantized, then the matmul
    assert float((layer(many).double() - many.double() @ want.T).norm() / (many.double() @ want.T).norm()) < 1e-5
    assert launches == [(3, 64), (1, 64)]


def test_fused_layers_in_the_kernels_layout_keep_each_members_rows() -> None:
    members = [_fp8_layer(seed, 128, 256) for seed in (5, 6)]
    want = [m.dequantized(torch.float64) for m in members]
    for m in members:
        m.use_mma_layout(torch.bfloat16)
    fused = fp8.Fp8Linear.fuse(members)
    assert fused is not None and fused.mma_kind == torch.bfloat16
    assert members[1].weight.data_ptr() == fused.weight[128:].data_ptr()  # the members' buffers are the fused ones'
    assert torch.equal(fused.dequantized(torch.float64), torch.cat(want))
    assert all(torch.equal(m.dequantized(torch.float64), w) for m, w in zip(members, want, strict=True))
    assert fp8.Fp8Linear.fuse([members[0], _fp8_layer(7, 128, 256)]) is None  # two layouts do not fuse
    from qwen3vl_webui.kernels import fusion

    group = [_fp8_layer(8, 128, 256), _fp8_layer(9, 128, 256)]
    fusion._fuse_group(group, None, False)
    with pytest.raises(RuntimeError, match="before fusing"):
        group[0].use_mma_layout(torch.bfloat16)
    fusion.unfuse(torch.nn.ModuleList(group))


def test_the_dequantizing_kernel_for_prefill_under_the_interpreter() -> None:
    from tests.conftest import run_interpreted

    script = """
import json, torch
from qwen3vl_webui.kernels import fp8, fp8_mma, fp8_mma_triton
out = {}
for n, k, kind in ((32, 256, torch.bfloat16), (272, 320, torch.float16)):
    w = torch.randn(n, k)
    w[::128, ::128] = 1e4
    q, scale = fp8.quantize_weight(w)
    words = fp8_mma.repack(q, kind).reshape(n, k // 4)
    want = fp8.dequantize_weight(q, scale, torch.float32)
    got = fp8_mma_triton.dequantize(words, scale, fp8_mma.BITS[kind], torch.float32)
    out[str(kind)] = float((got - want).abs().max())
print("RESULTS " + json.dumps(out))
"""
    results = run_interpreted(script)
    assert results == {"torch.bfloat16": 0.0, "torch.float16": 0.0}  # value x factor x scale: exact in fp32


def test_the_engine_decodes_fp8_through_the_kernel_as_generate(tiny_checkpoint: Path, monkeypatch) -> None:
    from qwen3vl_webui.weights.loading import load_model
    from tests.test_w4_mma import engine_against_generate

    loaded = load_model(str(tiny_checkpoint), "fp8", "cpu")
    layers = loaded.model.config.text_config.num_hidden_layers
    assert fp8.use_mma_layout(loaded.model, torch.float32) == 0  # no 16-bit kind: left
    assert fp8.use_mma_layout(loaded.model, torch.bfloat16) == 7 * layers
    launches = _emulated_kernel(monkeypatch)
    generated, steps = engine_against_generate(loaded, launches, monkeypatch)
    # the tiny model's fp8 layers are not whole 128-row blocks, so unfused: at least four products a layer a step
    assert len([rows for rows, _ in launches[generated:] if rows <= 2]) >= 4 * layers * steps


def test_the_device_scripts_gate_passes_a_correct_kernels_rounding_and_nothing_worse() -> None:
    """bench.quant_check.layout_ok: the kernel's fp32 parts within 1e-3 of float64 and bf16 products within 1e-2. A
    correct kernel's bf16 output is ~1.1e-3 off by its rounding alone (session 29's first gate, every error under
    1e-3, would have skipped every measurement of a correct kernel)."""
    from bench.quant_check import SHAPES, layout_ok

    def row(**changes: Any) -> dict[str, Any]:
        errors = {f"{kind}_{r}": 1.1e-3 for kind in ("rows", "parts") for r in (1, 3, 8, 16, 32, 40, 64, 100)}
        errors.update({f"parts_{r}": 2e-7 for r in (1, 3, 8, 16, 32, 40, 64)})
        return {"name": "o", "dequantized_equal": True, **errors, **changes}

    good = {"layout_fp8": [row() for _ in SHAPES]}
    assert layout_ok(good, "layout_fp8") and not layout_ok(good, "layout")
    for bad in (row(parts_8=2e-3), row(rows_100=0.02), row(dequantized_equal=False)):
        assert not layout_ok({"layout_fp8": [*[row() for _ in SHAPES[1:]], bad]}, "layout_fp8")
    assert not layout_ok({"layout_fp8": [row() for _ in SHAPES[1:]]}, "layout_fp8")  # a shape missing
    assert not layout_ok({"layout_fp8": "RuntimeError: NVRTC could not compile"}, "layout_fp8")


def test_a_kernel_that_does_not_build_here_leaves_the_weights_to_the_triton_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On by default, so a GPU whose architecture this NVRTC does not know must keep the weights' own layout (the
    loader asks `wanted`, which builds one variant first), not fail at the first product."""
    monkeypatch.setattr(cuda, "available", lambda index: True)

    def refuse() -> None:
        raise RuntimeError("NVRTC could not compile fp8_mma for sm_130")

    assert not cuda.builds(0, refuse, "fp8_mma") and "does not build on this GPU" in caplog.text
    assert cuda.builds(0, lambda: None, "fp8_mma")
    monkeypatch.delenv("QWEN3VL_FP8_MMA", raising=False)
    monkeypatch.setattr(fp8_mma, "builds", lambda index: index == 1)
    assert fp8_mma.wanted("cuda:1") and not fp8_mma.wanted("cuda:0") and not fp8_mma.wanted("cpu")
    monkeypatch.setenv("QWEN3VL_FP8_MMA", "0")  # the operator's switch
    assert not fp8_mma.wanted("cuda:1")
