"""INT4 (W4A16) and FP8 weights: the layouts, the layers and their custom ops, loading, the engine, switching, the
Triton kernels (in the interpreter), and the refusal of fp8 on a GPU without it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from qwen3vl_webui import planner, precisions
from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.kernels import fp8, int4
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from qwen3vl_webui.weights.loading import load_model
from qwen3vl_webui.weights.model import LoadedModel, LoadRefused

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
LAYERS = {"int4": int4.Int4Linear, "fp8": fp8.Fp8Linear}


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint: Path) -> LoadedModel:
    return load_model(str(tiny_checkpoint), "fp32", "cpu")


@pytest.fixture(scope="module", params=["int4", "fp8"])
def quantized(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> LoadedModel:
    return load_model(str(tiny_checkpoint), request.param, "cpu")


def test_int4_packing_round_trips_and_quantization_is_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (24, 256), generator=gen)
    packed = int4.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (24, 32)
    assert torch.equal(int4.unpack(packed), q.to(torch.uint8))
    # nibble j of word w is column 8w + j, low bits first (the layout the kernels and the checkpoint converters read)
    assert int(packed[0, 0]) & 0xF == int(q[0, 0]) and (int(packed[0, 0]) >> 28) & 0xF == int(q[0, 7])
    w = torch.randn(24, 256, generator=gen)
    qweight, scales, zeros = int4.quantize_weight(w, 64)
    assert scales.shape == zeros.shape == (24, 4) and scales.dtype == torch.bfloat16
    back = int4.dequantize_weight(qweight, scales, zeros)
    step = scales.float().repeat_interleave(64, dim=1)
    err = (back - w).abs()
    # Round to nearest on the grid: half a step inside it; the zero point is rounded too, so a group's extremes may
    # sit up to half a step more off the grid's ends.
    assert bool((err <= step + 1e-6).all()) and float((err <= step / 2 + 1e-6).float().mean()) > 0.95
    assert int4.group_size_for(2560) == 128 and int4.group_size_for(64) == 64 and int4.group_size_for(200) == 8


def test_int4_weights_convert_to_torch_s_own_w4a16_kernel_layout() -> None:
    # tinygemm (aten._weight_int4pack_mm, its CPU twin here) on `to_tinygemm`'s operands computes the product with
    # the dequantized weight: (q - 8) * scale + (8 - zero) * scale, the zero term rounded once to bf16.
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=gen)
    qweight, scales, zeros = int4.quantize_weight(w, 128)
    x = torch.randn(5, 512, generator=gen).to(torch.bfloat16)
    reference = x.double() @ int4.dequantize_weight(qweight, scales, zeros).double().T
    for tiles in (2, 4, 8):
        packed, scales_and_zeros = int4.to_tinygemm(qweight, scales, zeros, tiles)
        assert scales_and_zeros.shape == (4, 64, 2) and scales_and_zeros.dtype == torch.bfloat16
        assert torch.equal(scales_and_zeros[:, :, 0], scales.T)
        got = int4.tinygemm_linear(x.view(1, 5, 512), packed, scales_and_zeros, 128)
        assert got.shape == (1, 5, 64) and got.dtype == torch.bfloat16
        err = float((got[0].double() - reference).norm() / reference.norm())
        assert err < 4e-3, (tiles, err)  # bf16 output and zero term; a wrong nibble order or zero is ~0.1-1
    swapped = int4.to_tinygemm(qweight, scales, 15 - zeros, 8)  # the zero points matter: a wrong one is far off
    wrong = int4.tinygemm_linear(x, *swapped, 128).double()
    assert float((wrong - reference).norm() / reference.norm()) > 0.1
    # the kernels' module is looked up once per process, not on every int4 forward
    assert int4._kernels.cache_info().currsize <= 1 and not hasattr(int4.to_tinygemm, "cache_info")


def test_fp8_block_scales_cover_ragged_edges_and_stay_within_e4m3_rounding() -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    q, scale_inv = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)  # ceil(200/128) x ceil(300/128)
    back = fp8.dequantize_weight(q, scale_inv)
    assert float((back - w).norm() / w.norm()) < 0.04  # e4m3: 3 mantissa bits, ~2-3 % relative
    assert float(scale_inv[1, 2]) == pytest.approx(float(w[128:, 256:].abs().max()) / 448.0)


@pytest.mark.parametrize("name", ["int4", "fp8"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_layer_equals_a_linear_with_the_dequantized_weight(name: str, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = LAYERS[name].from_linear(linear)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    reference = F.linear(x.float(), layer.dequantized(), linear.bias.detach().float())
    got = layer.to(dtype)(x) if name == "fp8" else layer(x)
    assert got.dtype == dtype
    assert float((got.float() - reference).norm() / reference.norm()) < tol


@pytest.mark.parametrize("name", ["int4", "fp8"])
def test_custom_op_passes_opcheck_and_compiles_without_graph_breaks(name: str) -> None:
    layer = LAYERS[name].from_linear(torch.nn.Linear(128, 48, bias=False))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    op = (int4 if name == "int4" else fp8).register_op()
    buffers = [b for _, b in layer.named_buffers()]
    # fake impl vs real, dispatch; the schema check too where it can (it multiplies inputs, which fp8 cannot on a CPU)
    utils = ("test_faketensor", "test_autograd_registration") + (("test_schema",) if name == "int4" else ())
    torch.library.opcheck(op, (x, *buffers), test_utils=utils)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    assert torch.allclose(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["int4", "fp8", "int8wo"])
def test_fused_quantized_groups_share_their_buffers_and_compute_the_same_function(name: str) -> None:
    from qwen3vl_webui.kernels import fusion, int8

    layer_type = {**LAYERS, "int8wo": int8.Int8WeightOnlyLinear}[name]
    gen = torch.Generator().manual_seed(4)
    parts = [layer_type.from_linear(torch.nn.Linear(256, rows, bias=False)) for rows in (256, 128, 128)]
    x = torch.randn(3, 256, generator=gen)
    alone = [p(x) for p in parts]
    held = sum(b.numel() * b.element_size() for p in parts for b in p.buffers())
    fused = layer_type.fuse(parts)
    assert fused is not None and fused.out_features == 512
    assert sum(b.numel() * b.element_size() for b in fused.buffers()) == held
    for p in parts:  # every part's buffers are now views of the fused ones: no second copy
        for (_, mine), (_, whole) in zip(p.named_buffers(), fused.named_buffers(), strict=True):
            assert mine.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    torch.testing.assert_close(fused(x), torch.cat(alone, dim=-1), rtol=1e-5, atol=1e-5)
    # Through fusion's routing, as the engine's decode step calls them (q, then k, then v on the same input).
    group = [layer_type.from_linear(torch.nn.Linear(256, rows, bias=False)) for rows in (256, 128, 128)]
    expected = [g(x) for g in group]
    assert fusion._fuse_group(group, None, gemv=False)
    torch.testing.assert_close([g(x) for g in group], expected, rtol=1e-5, atol=1e-5)
    if name == "fp8":  # a part that is not whole 128-row blocks cannot share the block scales
        ragged = [layer_type.from_linear(torch.nn.Linear(256, rows, bias=False)) for rows in (64, 128)]
        assert layer_type.fuse(ragged) is None and not fusion._fuse_group(ragged, None, gemv=False)


def test_loading_quantizes_only_the_text_linears(fp32: LoadedModel, quantized: LoadedModel) -> None:
    layer_type = LAYERS[quantized.precision]
    model = quantized.model
    text = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.language_model.layers")}
    assert layer_type.__name__ in text and "Linear" not in text
    assert not any(isinstance(m, layer_type) for n, m in model.named_modules() if n.startswith("model.visual"))
    assert type(model.lm_head) is torch.nn.Linear  # kept 16-bit (fp32 on a CPU)
    assert quantized.weights_bytes < fp32.weights_bytes
    assert "fp32 compute on CPU" in quantized.label


def test_logits_stay_close_to_fp32_and_equal_the_dequantized_model(fp32: LoadedModel, quantized: LoadedModel) -> None:
    vocab = len(fp32.processor.tokenizer) - 32
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = fp32.model(input_ids=ids).logits
        got = quantized.model(input_ids=ids).logits
    rel = float((got - reference).norm() / reference.norm())
    cos = float(F.cosine_similarity(got[:, -1].flatten(), reference[:, -1].flatten(), dim=0))
    assert rel < 0.25 and cos > 0.97, (quantized.precision, rel, cos)  # int4 RTN ~7 %, fp8 ~3 % on the tiny model
    # The same function as fp32 with the dequantized weights put back: only the weights were rounded.
    dequantized = load_model(quantized.source, "fp32", "cpu").model
    for name, module in quantized.model.named_modules():
        if isinstance(module, LAYERS[quantized.precision]):
            with torch.no_grad():
                dequantized.get_submodule(name).weight.copy_(module.dequantized())
    with torch.inference_mode():
        same = dequantized(input_ids=ids).logits
    assert float((got - same).norm() / same.norm()) < 1e-5


def test_engine_greedy_tokens_equal_generate(quantized: LoadedModel) -> None:
    prompts = [build_prompt(quantized, ChatRequest(UserMessage(q), sampling=GREEDY)) for q in ("Hello", "Describe it")]
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = quantized.model.generate(**p.inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                                           repetition_penalty=1.0, eos_token_id=None)  # fmt: skip
        expected.append(out[0, p.inputs["input_ids"].shape[1] :].tolist())
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fuse=True)  # fused as on CUDA
    with BatchEngine(quantized, options) as engine:
        # int4 fuses q/k/v and gate/up; fp8 only where every part is whole 128-row blocks (the tiny model's MLP)
        cfg = quantized.model.config.text_config
        whole = [cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim], [cfg.intermediate_size]
        per_layer = 2 if quantized.precision == "int4" else sum(all(r % 128 == 0 for r in g) for g in whole)
        assert engine.fused_groups == per_layer * cfg.num_hidden_layers
        streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in prompts]
        got = [list(s) for s in streams]
        assert engine.snapshot().peak_active == 2  # decoded together
    assert got == expected
    assert not any("forward" in vars(m) for m in quantized.model.modules())  # closing the engine unfuses


def test_switching_among_every_precision_at_runtime(tiny_checkpoint: Path) -> None:
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager

    manager = ModelManager(str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(1, 4), free_memory=lambda _: 10**12)
    manager.load()
    try:
        for target in ("int4", "fp8", "int8wo", "int4-bnb", "int8", "bf16", "int4"):
            report = manager.switch(target)
            loaded = manager.current()
            assert report.new == target == loaded.precision
            if precisions.weight_only_module(target) in LAYERS:
                assert any(isinstance(m, LAYERS[target]) for m in loaded.model.modules())
            ids = torch.tensor([[5, 6, 7]])
            with torch.inference_mode():
                assert bool(loaded.model(input_ids=ids).logits.isfinite().all()), target
    finally:
        manager.close()


def test_fp8_is_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui.weights import quantize

    assert precisions.capability_blocker("fp8", (9, 0)) is None and precisions.capability_blocker("fp8", (8, 9)) is None
    assert precisions.capability_blocker("int4", (7, 5)) is None
    message = precisions.capability_blocker("fp8", (8, 0))
    assert message and "8.9" in message and "8.0" in message and "int8wo or int4" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(LoadRefused, match="compute capability 8.9"):
        quantize.check_device("fp8", "cuda")
    quantize.check_device("int4", "cuda")  # int4 runs there
    with pytest.raises(LoadRefused, match="compute capability 8.9"):
        load_model("random-weights:tiny", "fp8", "cuda")  # refused before anything is built on the GPU


def test_new_precisions_are_offered_everywhere_a_precision_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.engine.batch.compiled import should_compile
    from qwen3vl_webui.weights.loading import quantization_config
    from qwen3vl_webui.weights.model import compute_dtype

    for name in ("int4", "fp8", "int4-bnb"):
        assert parse_settings(["--precision", name]).precision == name
        assert should_compile(None, "cuda", name) and not should_compile(None, "cpu", name)
        assert any(value == name for _, value in precisions.MENU)
    assert quantization_config("int4", "cuda") is None and quantization_config("fp8", "cuda") is None
    assert quantization_config("int4-bnb", "cuda").bnb_4bit_quant_type == "nf4"
    assert compute_dtype("int4", "cuda") == torch.bfloat16 and compute_dtype("fp8", "cpu") == torch.float32
    # The planner's bytes are the layers' own buffers: in their own layout (the CUDA decode kernels off), and in the
    # kernels' (on by default where the GPU builds them: int4 adds its scale-and-zero table, fp8 nothing).
    one = planner.ModelShape(1, 1, 1, 2560, 1, quantizable_params=1024 * 2560, other_params=0, quantizable_rows=1024)
    for name in ("int4", "fp8"):
        layer = LAYERS[name].from_linear(torch.nn.Linear(2560, 1024, bias=False))
        held = sum(b.numel() * b.element_size() for b in layer.buffers())
        monkeypatch.setenv("QWEN3VL_INT4_MMA", "0")
        monkeypatch.setenv("QWEN3VL_FP8_MMA", "0")
        assert planner.weight_bytes(one, name) == pytest.approx(held, rel=1e-3), name
        layer.use_mma_layout() if name == "int4" else layer.use_mma_layout(torch.bfloat16)
        held = sum(b.numel() * b.element_size() for b in layer.buffers())
        monkeypatch.delenv("QWEN3VL_INT4_MMA")
        monkeypatch.delenv("QWEN3VL_FP8_MMA")
        assert planner.weight_bytes(one, name) == pytest.approx(held, rel=1e-3), name
    shape = planner.ModelShape.qwen3vl_4b()
    sizes = {p: planner.weight_bytes(shape, p) for p in ("bf16", "fp8", "int8wo", "int4", "int4-bnb")}
    assert sizes["int4"] < sizes["int8wo"] and sizes["fp8"] < sizes["bf16"] and sizes["int4"] < sizes["fp8"]


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from qwen3vl_webui.kernels import fp8, fp8_triton as fk, int4, w4a16_triton as wk

    gen = torch.Generator().manual_seed(0)
    # K = 384 with 2 groups per GEMV iteration: the last iteration is half masked; N not a multiple of BLOCK_N.
    qweight, scales, zeros = int4.quantize_weight(torch.randn(40, 384, generator=gen), 128)
    w4 = int4.dequantize_weight(qweight, scales, zeros).double()
    q8, s8 = fp8.quantize_weight(torch.randn(200, 300, generator=gen))
    w8 = fp8.dequantize_weight(q8, s8).double()
    # bf16 for the GEMVs; fp16 for tl.dot (the interpreter's bf16 dot is wrong, the GPU's is checked by the bench)
    cases = [("int4", wk.W4Config(1, 16, 2, 4, 1), 3, torch.bfloat16), ("int4", wk.W4Config(1, 8, 1, 4, 1), 1, torch.bfloat16),
             ("int4", wk.W4Config(16, 32, 1, 4, 1), 5, torch.float16), ("int4", wk.W4Config(32, 16, 1, 4, 1), 20, torch.float16),
             ("int4", wk.W4Config(16, 32, 1, 4, 1, 1), 5, torch.float16), ("int4", wk.W4Config(32, 16, 2, 4, 1, 1), 20, torch.float16),
             ("int4", wk.W4Config(16, 32, 1, 4, 1, 2), 5, torch.float16), ("int4", wk.W4Config(32, 16, 2, 4, 1, 2), 20, torch.float16),
             ("fp8", fk.Fp8Config(1, 8, 4, 1), 2, torch.bfloat16), ("fp8", fk.Fp8Config(1, 32, 4, 1), 1, torch.bfloat16),
             ("fp8", fk.Fp8Config(16, 32, 4, 1), 5, torch.float16), ("fp8", fk.Fp8Config(32, 64, 4, 1), 20, torch.float16),
             # the swap kernel: one row (15 of 16 masked), K in 3 blocks split 2 ways (the last split one block, the
             # last block 44 wide), split by default; N = 200 not a multiple of BLOCK_N
             # the atomic GEMV: K = 300 in 3 blocks (the last 44 wide), 2 asked (not a divisor: 1), all 3 in one
             ("fp8", fk.Fp8Config(1, 16, 4, 1, 2, 2), 1, torch.bfloat16), ("fp8", fk.Fp8Config(1, 64, 4, 1, 3, 2), 2, torch.bfloat16),
             ("fp8", fk.Fp8Config(16, 64, 4, 1, 2, 1), 1, torch.float16), ("fp8", fk.Fp8Config(16, 64, 4, 1, 0, 1), 5, torch.float16),
             ("fp8", fk.Fp8Config(32, 64, 4, 1, 1, 1), 20, torch.float16), ("fp8", fk.Fp8Config(32, 128, 4, 1, 4, 1), 33, torch.float16)]
    for name, cfg, rows, dtype in cases:
        reference_w = w4 if name == "int4" else w8
        x = torch.randn(rows, reference_w.shape[1], generator=gen).to(dtype)
        if name == "int4":
            out = wk.w4_matmul(x, qweight, scales, zeros, 128, cfg)
        else:
            out = fk.fp8_matmul(x, q8, s8, 128, cfg)
        ref = x.double() @ reference_w.T
        err = float((out.double() - ref).norm() / ref.norm())
        assert not bool(out.isnan().any()) and err < 1e-2, (name, cfg, rows, err)
        print("ok", name, cfg.block_m, rows, f"{err:.1e}")
    # The default configs: K split in two (8 groups, few tiles), the partial sums added in fp32.
    qw2, s2, z2 = int4.quantize_weight(torch.randn(40, 1024, generator=gen), 128)
    ref_w2 = int4.dequantize_weight(qw2, s2, z2).double()
    for rows, dtype in ((1, torch.bfloat16), (5, torch.float16)):
        x = torch.randn(rows, 1024, generator=gen).to(dtype)
        out = wk.w4_matmul(x, qw2, s2, z2, 128)
        ref = x.double() @ ref_w2.T
        err = float((out.double() - ref).norm() / ref.norm())
        assert out.dtype == dtype and err < 1e-2, (rows, err)
    from qwen3vl_webui.kernels.tuning import default_split, split_k
    g4, b8 = wk.SPLIT_LEAST_GROUPS, fk.SPLIT_LEAST_BLOCKS
    assert default_split(5, 8, g4) == 2 and default_split(1000, 76, g4) == 1 and default_split(80, 76, g4) == 4
    assert default_split(40, 32, b8) == 8 and default_split(304, 20, b8) == 1 and default_split(3, 3, b8) == 1
    assert split_k(16, 10, 20, g4) == (10, 2) and split_k(3, 10, 8, g4) == (3, 3) and split_k(0, 5, 8, g4) == (2, 4)
    print("ok split")
    # The split-K partial sums added by one kernel: in fp32, in the order of the splits, rounded once to the dtype.
    from qwen3vl_webui.kernels import splitk
    parts = torch.randn(3, 5, 40, generator=gen)
    ref_sum = ((parts[0] + parts[1]) + parts[2])
    for dtype in (torch.float16, torch.float32):
        got = splitk.reduce_partials(parts, dtype)
        assert got.dtype == dtype and got.shape == (5, 40) and torch.equal(got, ref_sum.to(dtype)), dtype
    got = splitk.reduce_partials(parts, torch.bfloat16)  # the interpreter truncates to bf16 (the GPU rounds): 1 ulp
    assert got.dtype == torch.bfloat16 and bool(((got.float() - ref_sum).abs() <= ref_sum.abs() * 2**-7).all())
    print("ok reduce")
    # The prefill path's dequantization: exactly the reference's fp32 values.
    assert torch.equal(wk.w4_dequantize(qweight, scales, zeros, 128, torch.float32), w4.float())
    assert torch.equal(fk.fp8_dequantize(q8, s8, 128, torch.float32), w8.float())
    print("ok dequant")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_the_interpreter() -> None:
    """The GPU kernels' unpacking, scaling, indexing and masking on the CPU (TRITON_INTERPRET=1)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 21


_PAIRS_INTERPRETED = textwrap.dedent(
    """
    import torch, triton, triton.language as tl
    from qwen3vl_webui.kernels import int4, w4a16_triton as wk

    @triton.jit
    def pair_values(pairs, neg_zero, scales, ASM: tl.constexpr, DTYPE: tl.constexpr):
        # what the inline PTX computes for the unscaled pairs: each 16-bit lane's nibble minus the zero point
        zero = neg_zero & 0xF
        return (((pairs & 0xF) - zero).to(tl.float32).to(DTYPE), (((pairs >> 16) & 0xF) - zero).to(tl.float32).to(DTYPE))

    wk._swap_kernel.fn.__globals__["_pair_values"] = pair_values
    gen = torch.Generator().manual_seed(0)
    qweight, scales, zeros = int4.quantize_weight(torch.randn(72, 640, generator=gen), 128)  # 5 groups; N = 72
    reference = int4.dequantize_weight(qweight, scales, zeros).double()
    for tile in (3, 6, 8):  # tile 8 hands the pairs over unmasked (its lop3 masks them): the stand-in masks too
        for rows, block_m, split in ((1, 16, 1), (5, 16, 2), (20, 32, 3), (33, 32, 0), (16, 16, 5), (1, 8, 2),
                                     (7, 8, 0), (9, 8, 1)):  # fmt: skip
            x = torch.randn(rows, 640, generator=gen).to(torch.float16)
            cfg = wk.W4Config(block_m, 64, split, 4, 1, tile)
            parts = wk.w4_partials(x, qweight, scales, zeros, 128, cfg)
            assert parts.shape[0] == wk.w4_split(rows, 72, 640, 128, cfg), (tile, rows, parts.shape)
            out = wk.w4_matmul(x, qweight, scales, zeros, 128, cfg)
            ref = x.double() @ reference.T
            err = float((out.double() - ref).norm() / ref.norm())
            assert err < 1e-2, (tile, rows, split, err)
            print("ok", tile, rows, split, f"{err:.1e}")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_pairs_kernels_indexing_in_the_interpreter() -> None:
    """Tiles 3, 6 and 8 (the activations gathered in the pairs' order, or read in k order and permuted) on the CPU, their
    inline PTX stood in for by the same arithmetic in plain Triton: the pairs' column order, K splits (uneven ones
    included), N and row masks, 8, 16 and 32 rows a program. The PTX itself is checked on the GPU by bench.quant_check's sweep."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _PAIRS_INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 24


def test_a_config_naming_no_kernel_is_refused_with_a_sentence() -> None:
    pytest.importorskip("triton")
    from qwen3vl_webui.kernels import w4a16_triton

    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    qweight, scales, zeros = int4.quantize_weight(torch.randn(8, 256), 128)
    with pytest.raises(ValueError, match="tile 5 is not a kernel"):
        w4a16_triton.w4_partials(x, qweight, scales, zeros, 128, w4a16_triton.W4Config(1, 32, 1, 4, 1, 5))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_sweeps_best_configs_are_picked_up_from_its_report(tmp_path: Path) -> None:
    import json

    from qwen3vl_webui.kernels import fp8_triton, w4a16_triton

    report = tmp_path / "quant_check.json"
    report.write_text(json.dumps({"tuned": {"int4": {"1,4096,2560": [1, 32, 2, 8, 1]}, "fp8": {"32,1024,2560": [32, 128, 8, 3]}}}))
    saved = dict(w4a16_triton.TUNED), dict(fp8_triton.TUNED)
    try:
        assert w4a16_triton.load_tuning(str(report)) == 1 and fp8_triton.load_tuning(str(report)) == 1
        assert w4a16_triton.pick_config(1, 4096, 2560) == w4a16_triton.W4Config(1, 32, 2, 8, 1)
        assert fp8_triton.pick_config(20, 1024, 2560) == fp8_triton.Fp8Config(32, 128, 8, 3)  # 17..32 rows share it
        assert w4a16_triton.pick_config(1, 4096, 4096) == w4a16_triton.GEMV_DEFAULT  # other shapes: the defaults
    finally:
        w4a16_triton.TUNED.clear(), w4a16_triton.TUNED.update(saved[0])
        fp8_triton.TUNED.clear(), fp8_triton.TUNED.update(saved[1])


def test_auto_picks_the_fastest_precision_that_fits_and_runs_on_this_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui.service import manager as manager_module
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager

    shape = planner.ModelShape.qwen3vl_4b()
    gib = 2**30

    def pick(free_gib: float, capability: tuple[int, int] | None) -> str:
        monkeypatch.setattr(manager_module, "device_capability", lambda device: capability)
        manager = ModelManager("random-weights:4b", "auto", "cuda", "sdpa", Scheduler(1, 1),
                               free_memory=lambda _: int(free_gib * gib))  # fmt: skip
        return manager.resolve_precision("cuda")

    assert precisions.AUTO_ORDER[0] == "bf16"
    assert pick(80, (9, 0)) == "bf16"  # room for everything: the fastest measured
    between = (planner.weight_bytes(shape, "int8wo") / 0.75 + planner.weight_bytes(shape, "bf16") / 0.75) / 2 / gib
    assert pick(between, (9, 0)) == "int8wo"
    only_4bit = (planner.weight_bytes(shape, "int4") / 0.75 + planner.weight_bytes(shape, "fp8") / 0.75) / 2 / gib
    assert pick(only_4bit, (9, 0)) == "int4"
    assert pick(1, (9, 0)) == "int4"  # nothing fits: the smallest that can run (bitsandbytes builds no random weights)
    # Room for fp8 but not for int8wo (its per-row scales weigh more than fp8's per-block ones): fp8 on an H100,
    # never on an sm_80 card, which gets the next that runs there.
    fp8_only = (planner.weight_bytes(shape, "fp8") / 0.75 + planner.weight_bytes(shape, "int8wo") / 0.75) / 2 / gib
    assert pick(fp8_only, (9, 0)) == "fp8" and pick(fp8_only, (8, 0)) == "int4"


def test_the_numerics_table_covers_every_quantized_precision(tiny_checkpoint: Path) -> None:
    """bench.quant_check's quality section on the CPU (its plumbing; the GPU run uses the same function)."""
    from bench.quant_check import QUALITY, quality_section

    report: dict = {}
    quality_section(report, str(tiny_checkpoint), "cpu")
    rows = {r["precision"]: r for r in report["quality"]["rows"]}
    assert set(rows) == set(QUALITY) == {"int8wo", "fp8", "int4", "int4-bnb", "int8"}
    for name, row in rows.items():
        if "skipped" in row:  # bitsandbytes missing here
            assert precisions.needs_bitsandbytes(name), row
            continue
        assert 0.9 < row["cosine_min"] <= row["cosine_mean"] <= 1.0 and 0.0 <= row["top1_agree"] <= 1.0, row
    # 8-bit rounding moves the logits less than 4-bit rounding
    assert rows["int8wo"]["rel_error"] < rows["int4"]["rel_error"] and rows["fp8"]["rel_error"] < rows["int4"]["rel_error"]


def test_the_sweep_times_each_product_with_the_kernel_that_consumes_its_parts_in_the_engine() -> None:
    """bench.quant_check's sweep (on the GPU) times a config as the engine runs it: its parts, then the fused layer's
    kernel that sums them (no split-K launch of its own). On the CPU those kernels are their torch references: the
    consumer of each shape takes `[split, rows, n]` parts and gives what the layer would."""
    from bench.quant_check import HEAD_DIM, HEADS, HIDDEN, SHAPES, consumer
    from qwen3vl_webui.kernels import layer

    rows = 2
    for name, n, _ in SHAPES:
        eat = consumer(name, rows, "cpu", torch.bfloat16)
        parts = torch.randn(3, rows, n)  # three fp32 partial sums
        out = eat(parts)
        whole = layer.product_reference(parts, torch.bfloat16)
        if name == "qkv":
            assert out.shape == (rows, HEADS, HEAD_DIM)
        elif name == "gate_up":
            gate, up = whole.chunk(2, dim=-1)
            assert torch.equal(out, layer.silu_mul_reference(gate, up))
        else:
            normed, total = out
            assert normed.shape == total.shape == (rows, HIDDEN)
            _, other = eat(torch.zeros(3, rows, n))  # the residual alone: the difference is the product
            assert torch.allclose(total.float() - other.float(), whole.float(), atol=0.1)
    with pytest.raises(ValueError):
        consumer("lm_head", rows, "cpu", torch.bfloat16)


def test_cost_per_million_tokens_comes_from_the_measured_files() -> None:
    """bench.cost: the seed's cost table from the H200 matrix files, at a stated price."""
    import json

    from bench import cost

    files = [ROOT / "bench" / "results" / "h200" / f"matrix_{p}_q.json" for p in ("bf16", "int4")]
    table = cost.rows([str(f) for f in files], hourly=3.5)
    reports = [json.loads(f.read_text()) for f in files]
    measured = {(rep["precision"], int(r["streams"])): float(r["total_tok_s"]) for rep in reports for r in rep["engine"]}
    assert {(r["precision"], r["streams"]) for r in table} == set(measured)
    for r in table:
        assert r["usd_per_million"] == pytest.approx(3.5 / 3600 / measured[(r["precision"], r["streams"])] * 1e6, rel=1e-3)
    assert cost.main([str(files[0]), "--gpu-hourly-cost", "2"]) == 0
