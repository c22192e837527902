"""int4's CUDA decode product (kernels/w4_mma.py) on a CPU: the repacked layout is what its docstring says, the
kernel's arithmetic fragment by fragment (`emulate`) equals the dequantized weight's product, the kernel compiles
for sm_90 with NVRTC and its machine code keeps the PDL wait between the weights' loads and the activations', and the
engine's decode through it (the arithmetic emulated, the launch stood in for) gives `generate`'s tokens.

The kernel itself runs on a GPU only: `bench.quant_check --formats int4mma` checks every config's output against the
float64 product there, and `bench.matrix` measures the engine (QWEN3VL_INT4_MMA=0: the Triton kernels instead)."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.kernels import cuda, int4, w4_mma


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


def test_configs_and_row_classes() -> None:
    assert w4_mma.supports(6144, 2560, 128) and w4_mma.supports(128, 64, 64)
    assert not w4_mma.supports(6144, 2560, 32) and not w4_mma.supports(6152, 2560, 128)
    assert w4_mma.split_of(2560, 9728, 128, w4_mma.MmaConfig(4, 2, 4)) == (4, 19)
    assert w4_mma.split_of(6144, 2560, 128, w4_mma.MmaConfig(4, 2, 8)) == (7, 3)  # none empty
    assert w4_mma.configs(6144, 2560)[0] == w4_mma.pick_config(6144, 2560)
    assert all(2560 // 128 // c.split >= c.warps for c in w4_mma.configs(6144, 2560))
    assert {c.unroll for c in w4_mma.configs(6144, 2560, rows=32)} == {1}  # four n-tiles: two groups ahead spill
    assert [w4_mma.row_class(r) for r in (1, 8, 9, 16, 17, 32, 64)] == [1, 1, 16, 16, 32, 32, 32]
    x = torch.empty(1, 2560, dtype=torch.bfloat16)
    assert not w4_mma.decodes(x, torch.bfloat16)  # a CPU tensor: not the kernel
    assert w4_mma.parts_count(x, 6144, 2560, 128, torch.bfloat16) == 1
    assert not w4_mma.wanted("cpu")


def test_the_planner_counts_the_kernels_scale_table_unless_it_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui import planner
    from tests.test_planner import SHAPE

    monkeypatch.setenv("QWEN3VL_INT4_MMA", "0")  # off: int4's own layout
    before = planner.weight_bytes(SHAPE, "int4")
    monkeypatch.delenv("QWEN3VL_INT4_MMA")  # on by default
    extra = planner.weight_bytes(SHAPE, "int4") - before
    assert extra == pytest.approx(SHAPE.quantizable_params * 4 / 128, abs=1)
    assert 0.09 < extra / 2**30 < 0.12  # the 4B: ~0.1 GiB of scale-and-zero entries beside its 3.27 GiB


def test_the_pdl_launch_attribute_holds_its_value() -> None:
    """CUlaunchAttribute: a 4-byte id, 4 bytes of padding, a 64-byte value union whose first int is
    `programmaticStreamSerializationAllowed`. (A c_char array field is handed out as a bytes copy: a write to it left
    the value 0, and the launch silently without PDL.)"""
    import ctypes

    attr = cuda.pdl_attribute()
    raw = bytes(attr)
    assert ctypes.sizeof(attr) == 72 and ctypes.sizeof(cuda._Config) == 56
    assert raw[:4] == (6).to_bytes(4, "little") and raw[8:12] == (1).to_bytes(4, "little") and raw[12:] == bytes(60)
    assert cuda._Config.hStream.offset == 32 and cuda._Config.attrs.offset == 40


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
        cubin = cuda.compile_cubin(w4_mma.source(dtype, warps, unroll, mode, group, tiles), "sm_90")
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


def _emulated_kernel(monkeypatch: pytest.MonkeyPatch, scale_dtype: torch.dtype) -> list[tuple[int, int]]:
    """The CUDA kernel stood in for on a CPU: `decodes` as on a GPU for this CPU's tensors, `launch` by `emulate`;
    returns the (rows, N) of every launch."""
    launches: list[tuple[int, int]] = []

    def decodes(x: Any, dtype: torch.dtype) -> bool:  # any activations' dtype: the tiny model computes in fp32
        return 0 < x.numel() // x.shape[-1] <= w4_mma.DECODE_ROWS

    def launch(x: Any, packed: Any, table: Any, n: int, config: Any = None, pdl_mode: Any = None) -> Any:
        launches.append((x.shape[0], n))
        cfg = config or w4_mma.pick_config(n, x.shape[1], x.shape[0])
        return w4_mma.emulate(x, packed, table, scale_dtype, cfg.split)

    monkeypatch.setattr(w4_mma, "decodes", decodes)
    monkeypatch.setattr(w4_mma, "launch", launch)
    return launches


def _int4_layer(seed: int, n: int = 64, k: int = 1024) -> int4.Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    return int4.Int4Linear.from_linear(linear)


def test_a_layer_in_the_kernels_layout_keeps_its_memory_and_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _int4_layer(3)
    want = layer.dequantized(torch.float64)
    words, table = w4_mma.repack(layer.qweight, layer.scales, layer.zeros)
    where = layer.qweight.data_ptr()
    monkeypatch.setattr(w4_mma, "REPACK_ROWS", 32)  # in place a slice of rows at a time: the same as all at once
    layer.use_mma_layout()
    assert layer.qweight.data_ptr() == where and torch.equal(layer.qweight.view(-1), words.view(-1))  # in place
    assert torch.equal(layer.table, table) and "layout=mma" in repr(layer)
    layer.use_mma_layout()  # once
    assert torch.equal(layer.qweight.view(-1), words.view(-1))
    assert torch.equal(layer.dequantized(torch.float64), want)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1024, generator=gen)
    reference = x.double() @ want.T
    assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-5  # CPU: dequantized, then torch
    launches = _emulated_kernel(monkeypatch, layer.scales.dtype)
    assert float((layer(x).double() - reference).norm() / reference.norm()) < 1e-5  # the kernel's arithmetic
    parts = layer.partials(x[:1])
    count = w4_mma.parts_count(x[:1], 64, 1024, 128, layer.scales.dtype)
    assert parts.dtype == torch.float32 and parts.shape == (count, 1, 64)
    assert float((parts.sum(0).double() - reference[:1]).norm() / reference[:1].norm()) < 1e-5
    many = torch.randn(65, 1024, generator=gen)  # past the decode rows: dequantized, then the matmul
    assert float((layer(many).double() - many.double() @ want.T).norm() / (many.double() @ want.T).norm()) < 1e-5
    assert launches == [(3, 64), (1, 64)]


def test_fused_layers_in_the_kernels_layout_keep_each_members_rows() -> None:
    """A 16-row tile's words take the memory of those rows: fusing converted layers concatenates them, and each
    member's rows of the fused buffers are still its own weight."""
    members = [_int4_layer(seed, n) for seed, n in ((5, 32), (6, 48))]
    want = [m.dequantized(torch.float64) for m in members]
    for m in members:
        m.use_mma_layout()
    fused = int4.Int4Linear.fuse(members)
    assert fused is not None and fused.table.shape == (5, 8, 16)
    assert members[1].table.data_ptr() == fused.table[2:].data_ptr()  # the members' buffers are the fused ones'
    assert torch.equal(fused.dequantized(torch.float64), torch.cat(want))
    assert all(torch.equal(m.dequantized(torch.float64), w) for m, w in zip(members, want, strict=True))
    plain = _int4_layer(7, 32)
    assert int4.Int4Linear.fuse([members[0], plain]) is None  # two layouts do not fuse
    from qwen3vl_webui.kernels import fusion

    group = [_int4_layer(8, 32), _int4_layer(9, 32)]
    fusion._fuse_group(group, None, False)  # a fused group: its members' rows are the group's weight's
    with pytest.raises(RuntimeError, match="before fusing"):
        group[0].use_mma_layout()
    fusion.unfuse(torch.nn.ModuleList(group))


def test_the_dequantizing_kernel_for_prefill_under_the_interpreter() -> None:
    from tests.conftest import run_interpreted

    script = """
import json, torch
from qwen3vl_webui.kernels import int4, w4_mma, w4_mma_triton
out = {}
for n, k, group, dtype in ((32, 256, 128, torch.bfloat16), (48, 320, 64, torch.float16)):
    qweight, scales, zeros = int4.quantize_weight(torch.randn(n, k), group, dtype)
    words = w4_mma.repack(qweight, scales, zeros)[0].reshape(n, k // 8)
    got = w4_mma_triton.dequantize(words, scales, zeros, dtype).float()
    want = int4.dequantize_weight(qweight, scales, zeros, torch.float32)
    out[str(dtype)] = [float((got - want).abs().max()), float(want.abs().max())]
print("RESULTS " + json.dumps(out))
"""
    results = run_interpreted(script)
    # fp16 exact; bf16 within a rounding of the value (the interpreter truncates to bf16 where the GPU rounds)
    assert results["torch.float16"][0] <= results["torch.float16"][1] * 2**-11
    assert results["torch.bfloat16"][0] <= results["torch.bfloat16"][1] * 2**-7


def engine_against_generate(
    loaded: Any, launches: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int]:
    """Greedy tokens of two prompts from `generate` and from the batch engine's fused decode route (as on a GPU)
    must be equal; `launches` (the stood-in kernel's) must count every decode product of `generate`'s 23 steps a
    prompt, 7 a layer. Returns (launches by `generate`, the engine's decode steps)."""
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
    from tests.test_fused_layer import fused_route

    fused_route(monkeypatch)  # the engine's decode route on CPU as on a GPU: the fused layers take the parts
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
    prompts = [build_prompt(loaded, ChatRequest(UserMessage(t), sampling=greedy)) for t in ("hello", "Count them")]
    expected = []
    for prompt in prompts:
        with torch.inference_mode():
            out = loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=24, eos_token_id=None)
        expected.append(out[0, prompt.inputs["input_ids"].shape[1] :].tolist())
    layers = loaded.model.config.text_config.num_hidden_layers
    generated = len(launches)
    assert generated >= 7 * layers * 23 * 2  # every decode product of generate's steps (the prompts' prefill: not)
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fused_layers=True)
    with BatchEngine(loaded, options) as engine:
        assert engine.layers_path == "fused kernels"
        streams = [engine.submit_tokens(p, greedy, threading.Event()) for p in prompts]
        got = [list(s) for s in streams]
        steps = engine.snapshot().steps
    assert got == expected
    return generated, steps


def test_the_engine_decodes_int4_through_the_kernel_as_generate(tiny_checkpoint: Path, monkeypatch) -> None:
    from qwen3vl_webui.weights.loading import load_model

    loaded = load_model(str(tiny_checkpoint), "int4", "cpu")
    scale_dtype = next(m for m in loaded.model.modules() if isinstance(m, int4.Int4Linear)).scales.dtype
    layers = loaded.model.config.text_config.num_hidden_layers
    assert int4.use_mma_layout(loaded.model, torch.float32) == 0  # scales not of the activations' dtype: left
    assert int4.use_mma_layout(loaded.model, scale_dtype) == 7 * layers
    launches = _emulated_kernel(monkeypatch, scale_dtype)
    generated, steps = engine_against_generate(loaded, launches, monkeypatch)
    # Every decode step's four products a layer (fused q/k/v and gate/up); a prompt of 64 tokens or fewer is
    # prefilled through the kernel too (as the Triton kernels took every product of up to 64 rows).
    assert len([rows for rows, _ in launches[generated:] if rows <= 2]) >= 4 * layers * steps


def test_the_matrix_counts_what_the_kernels_layout_reads(tiny_checkpoint: Path) -> None:
    """bench.matrix's bytes a decode step reads: in the kernel's layout the words and the table, not the scales and
    zeros (its memory-limit figure divides by them)."""
    from types import SimpleNamespace

    from bench.matrix import decode_bytes
    from qwen3vl_webui.weights.loading import load_model

    loaded = load_model(str(tiny_checkpoint), "int4", "cpu")
    layers = [m for m in loaded.model.modules() if isinstance(m, int4.Int4Linear)]
    before = decode_bytes(SimpleNamespace(model=loaded.model))
    int4.use_mma_layout(loaded.model, layers[0].scales.dtype)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    change = sum(size(m.table) - size(m.scales) - size(m.zeros) for m in layers)
    assert decode_bytes(SimpleNamespace(model=loaded.model)) == before + change
