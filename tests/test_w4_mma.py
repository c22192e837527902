"""int4's CUDA decode product (kernels/w4_mma.py) on a CPU: the repacked layout is what its docstring says, the
kernel's arithmetic fragment by fragment (`emulate`) equals the dequantized weight's product, the kernel compiles
for sm_90 with NVRTC and its machine code keeps the PDL wait between the weights' loads and the activations', and the
engine's decode through it (the arithmetic emulated, the launch stood in for) gives `generate`'s tokens.

The kernel itself runs on a GPU only: `bench.quant_check --formats int4mma` checks every config's output against the
float64 product there, and `bench.matrix` with QWEN3VL_INT4_MMA=1 measures the engine."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.kernels import int4, w4_mma


def _quantized(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return int4.quantize_weight(torch.randn(n, k, generator=gen), group, dtype)


def test_a_repacked_word_holds_the_weights_its_docstring_names() -> None:
    n, k = 32, 256
    qweight, scales, zeros = _quantized(n, k, 128, torch.bfloat16)
    q = int4.unpack(qweight).to(torch.int64)
    packed, table = w4_mma.repack(qweight, scales, zeros)
    assert packed.shape == (n // 16, k // 64, 32, 4) and packed.dtype == torch.int32
    assert table.shape == (n // 16, k // 128, 16)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    for t in range(n // 16):
        for c in range(k // 64):
            for lane in range(32):
                g, quad = divmod(lane, 4)
                for i in range(4):
                    for e in range(2):
                        for b in range(2):
                            for h in range(2):
                                nibble = (int(words[t, c, lane, i]) >> (4 * (4 * e + 2 * b + h))) & 0xF
                                assert nibble == q[16 * t + g + 8 * h, 64 * c + 16 * quad + 4 * i + 2 * b + e]
    entry = int(table[1, 1, 3]) & 0xFFFFFFFF
    assert entry >> 16 == int(zeros[16 + 3, 1])
    assert torch.tensor([entry & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16) == scales[19, 1]


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-5), (torch.float16, 2e-4)])
@pytest.mark.parametrize("n, k, group, rows, split", [
    (32, 256, 128, 1, 1), (48, 512, 128, 3, 2), (64, 1024, 128, 8, 3), (128, 64, 64, 1, 1), (64, 192, 64, 5, 2),
    (48, 512, 128, 13, 2), (32, 256, 128, 32, 1),  # two and four n-tiles of 8 rows
])  # fmt: skip
def test_the_kernels_arithmetic_equals_the_dequantized_weights_product(
    dtype: torch.dtype, tol: float, n: int, k: int, group: int, rows: int, split: int
) -> None:
    qweight, scales, zeros = _quantized(n, k, group, dtype, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = x.double() @ int4.dequantize_weight(qweight, scales, zeros, torch.float64).T
    parts = w4_mma.emulate(x, *w4_mma.repack(qweight, scales, zeros), dtype, split)
    count, _ = w4_mma.split_of(n, k, group, w4_mma.MmaConfig(4, 2, split))
    assert parts.shape == (count, rows, n) and parts.dtype == torch.float32
    assert float((parts.sum(0).double() - want).norm() / want.norm()) < tol
    # The zero point after the dot: magic + q summed with x, less (magic + zero) Σ x. A zero taken as 0 is far off.
    wrong_zero = w4_mma.repack(qweight, scales, torch.zeros_like(zeros))
    assert float((w4_mma.emulate(x, *wrong_zero, dtype, split).sum(0).double() - want).norm() / want.norm()) > 0.05


def test_it_serves_only_what_it_was_built_for(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.empty(1, 2560, dtype=torch.bfloat16)
    assert not w4_mma.serves(x, 6144, 2560, 128, torch.bfloat16)  # off unless QWEN3VL_INT4_MMA=1; and a CPU tensor
    monkeypatch.setenv("QWEN3VL_INT4_MMA", "1")
    assert not w4_mma.serves(x, 6144, 2560, 128, torch.bfloat16)  # a CPU tensor
    assert w4_mma.supports(6144, 2560, 128) and w4_mma.supports(128, 64, 64)
    assert not w4_mma.supports(6144, 2560, 32) and not w4_mma.supports(6152, 2560, 128)
    assert w4_mma.split_of(2560, 9728, 128, w4_mma.MmaConfig(4, 2, 4)) == (4, 19)
    assert w4_mma.split_of(6144, 2560, 128, w4_mma.MmaConfig(4, 2, 8)) == (7, 3)  # none empty
    assert w4_mma.configs(6144, 2560)[0] == w4_mma.pick_config(6144, 2560)
    assert all(2560 // 128 // c.split >= c.warps for c in w4_mma.configs(6144, 2560))
    assert {c.unroll for c in w4_mma.configs(6144, 2560, rows=32)} == {1}  # four n-tiles: two groups ahead spill
    assert [w4_mma.row_class(r) for r in (1, 8, 9, 16, 17, 32)] == [1, 1, 16, 16, 32, 32]
    assert w4_mma.max_rows() == 8
    monkeypatch.setenv("QWEN3VL_INT4_MMA_ROWS", "32")
    assert w4_mma.max_rows() == 32


def test_the_planner_counts_the_repacked_weights_while_it_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui import planner
    from tests.test_planner import SHAPE

    before = planner.weight_bytes(SHAPE, "int4")
    monkeypatch.setenv("QWEN3VL_INT4_MMA", "1")
    extra = planner.weight_bytes(SHAPE, "int4") - before
    assert extra == pytest.approx(SHAPE.quantizable_params * (0.5 + 4 / 128), abs=1)
    assert 1.7 < extra / 2**30 < 2.1  # the 4B: ~1.9 GiB beside its 3.27


def test_the_pdl_launch_attribute_holds_its_value() -> None:
    """CUlaunchAttribute: a 4-byte id, 4 bytes of padding, a 64-byte value union whose first int is
    `programmaticStreamSerializationAllowed`. (A c_char array field is handed out as a bytes copy: a write to it left
    the value 0, and the launch silently without PDL.)"""
    import ctypes

    attr = w4_mma.pdl_attribute()
    raw = bytes(attr)
    assert ctypes.sizeof(attr) == 72 and ctypes.sizeof(w4_mma._Config) == 56
    assert raw[:4] == (6).to_bytes(4, "little") and raw[8:12] == (1).to_bytes(4, "little") and raw[12:] == bytes(60)
    assert w4_mma._Config.hStream.offset == 32 and w4_mma._Config.attrs.offset == 40


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_it_compiles_for_sm90_and_loads_weights_before_the_pdl_wait_and_activations_after(
    group: int, dtype: torch.dtype
) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton (its bundled cuobjdump reads the SASS) is not installed")
    from bench.kernel_asm import sass_code, sass_loop

    variants = [(w, u, m, t) for w in (4, 8) for u in (1, 2) for m in (0, 1, 2) for t in (1, 2, 4) if t < 4 or u == 1]
    if dtype != torch.bfloat16 or group != 128:  # the 4B's every variant; the others at 4 warps a program
        variants = [v for v in variants if v[0] == 4]
    for warps, unroll, mode, tiles in variants:
        cubin = w4_mma.compile_cubin(w4_mma.source(dtype, warps, unroll, mode, group, tiles), "sm_90")
        code = [text for _, text in sass_code(cubin)]
        where = (dtype, group, warps, unroll, mode, tiles)
        assert not [t for t in code if "STL" in t or "LDL" in t], where  # no register spills
        waits = [i for i, t in enumerate(code) if t.startswith("ACQBULK")]
        triggers = [i for i, t in enumerate(code) if t.startswith("PREEXIT")]
        weights = [i for i, t in enumerate(code) if "LDG.E.NA.128" in t]  # ld.global.nc.L1::no_allocate
        activations = [i for i, t in enumerate(code) if "LDG.E.128" in t and "CONSTANT" not in t]
        stores = [i for i, t in enumerate(code) if "STG" in t]
        assert weights and activations and stores, where
        if mode == 0:
            assert not waits and not triggers, where
            continue
        assert len(waits) == 1 and len(triggers) == 1, where
        assert weights[0] < waits[0] < activations[0] and waits[0] < stores[0], where
        if mode == 2:  # late: once the program's math is done (after the warps' shared-memory sum)
            assert triggers[0] > max(i for i, t in enumerate(code) if "BAR.SYNC" in t), where
        else:
            assert triggers[0] < activations[0], where
        loop = sass_loop(cubin)  # two steps a trip: 2 x unroll groups, 16 mma's a group of 128 an n-tile
        assert loop.get("HMMA") == 2 * unroll * 2 * 8 * tiles * group // 128, (where, loop)
        if tiles > 1:
            continue
        # Per weight, at groups of 128: 1.66-1.81 instructions (a lop3 and 3/8 of a shift, 2 mma's a 256-weight
        # tile, the group's scale and zero); 2.1-2.2 at 64. The Triton kernel's one-row loop: ~3.5.
        weights_per_trip = 2 * unroll * group * 16 // 32
        assert sum(loop.values()) < (1.9 if group == 128 else 2.3) * weights_per_trip, (where, loop)


def _emulated_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The CUDA kernel stood in for on a CPU: `serves` as on a GPU for this CPU's tensors, `launch` by `emulate`;
    returns the (rows, N) of every launch."""
    monkeypatch.setenv("QWEN3VL_INT4_MMA", "1")
    launches: list[tuple[int, int]] = []

    def serves(x: Any, n: int, k: int, group: int, scale_dtype: torch.dtype) -> bool:
        rows = x.numel() // k
        return 0 < rows <= w4_mma.max_rows() and w4_mma.supports(n, k, group)

    def launch(x: Any, packed: Any, table: Any, n: int, config: Any = None, pdl_mode: Any = None) -> Any:
        launches.append((x.shape[0], n))
        k = x.shape[1]
        cfg = config or w4_mma.pick_config(n, k, x.shape[0])
        return w4_mma.emulate(x, packed, table, _SCALES[0], cfg.split)

    monkeypatch.setattr(w4_mma, "serves", serves)
    monkeypatch.setattr(w4_mma, "launch", launch)
    return launches


_SCALES = [torch.bfloat16]  # the tiny int4 model's scale dtype (an fp32 model's scales are bf16)


def test_an_int4_layer_takes_its_product_and_parts_from_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    launches = _emulated_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(1024, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 1024, generator=gen) * 0.05)
    layer = int4.Int4Linear.from_linear(linear)
    want = lambda x: x.double() @ layer.dequantized(torch.float64).T  # noqa: E731
    x = torch.randn(3, 1024, generator=gen)
    assert float((layer(x).double() - want(x)).norm() / want(x).norm()) < 1e-5
    parts = layer.partials(x[:1])
    assert parts.shape == (int4.parts_split(x[:1], layer.qweight, layer.scales), 1, 64) and parts.shape[0] == 1
    assert parts.dtype == torch.float32 == int4.parts_dtype(x[:1], layer.qweight, layer.scales, parts.shape[0])
    assert launches == [(3, 64), (1, 64)]
    many = torch.randn(9, 1024, generator=gen)  # more than 8 rows: the other kernels' path
    assert float((layer(many).double() - want(many)).norm() / want(many).norm()) < 1e-5
    assert len(launches) == 2
    monkeypatch.setenv("QWEN3VL_INT4_MMA_ROWS", "16")  # two n-tiles
    assert float((layer(many).double() - want(many)).norm() / want(many).norm()) < 1e-5
    assert launches[2:] == [(9, 64)] and int4.parts_split(many, layer.qweight, layer.scales) == 1
    assert getattr(layer.qweight, w4_mma.ATTR)[0].shape == (4, 16, 32, 4)  # repacked once, kept on the weight


def test_the_engine_decodes_int4_through_the_kernel_as_generate(tiny_checkpoint: Path, monkeypatch) -> None:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
    from qwen3vl_webui.weights.loading import load_model
    from tests.test_fused_layer import fused_route

    loaded = load_model(str(tiny_checkpoint), "int4", "cpu")
    _SCALES[0] = next(m for m in loaded.model.modules() if isinstance(m, int4.Int4Linear)).scales.dtype
    launches = _emulated_kernel(monkeypatch)
    fused_route(monkeypatch)  # the engine's decode route on CPU as on a GPU: the fused layers take the parts
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    prompts = [build_prompt(loaded, ChatRequest(UserMessage(t), sampling=greedy)) for t in ("hello", "Count them")]
    expected = []
    for prompt in prompts:
        with torch.inference_mode():
            out = loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=24, eos_token_id=None)
        expected.append(out[0, prompt.inputs["input_ids"].shape[1] :].tolist())
    generated = len(launches)
    layers = loaded.model.config.text_config.num_hidden_layers
    assert generated >= 4 * layers * 23 * 2  # every decode product of generate's steps (the prompts' prefill: not)
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fused_layers=True)
    with BatchEngine(loaded, options) as engine:
        assert engine.layers_path == "fused kernels"
        streams = [engine.submit_tokens(p, greedy, threading.Event()) for p in prompts]
        got = [list(s) for s in streams]
        steps = engine.snapshot().steps
    assert got == expected
    decode = launches[generated:]
    assert len(decode) >= 4 * layers * steps and {rows for rows, _ in decode} <= {1, 2}
