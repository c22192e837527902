"""Pre-quantized checkpoints (weights/checkpoints.py), each built from the tiny model in its own format's code:
compressed-tensors pack-quantized with the compressed-tensors library itself (symmetric and asymmetric), AutoAWQ GEMM
with AutoAWQ's packing reproduced from its source (awq/modules/linear/gemm.py; the package does not install here),
FP8 with transformers' own FineGrainedFP8 quantize op. Each is loaded through the app's `load_model` on the CPU and
checked against the file's own dequantization: every quantized Linear exactly, every 16-bit tensor exactly, the
logits against a plain-nn.Linear model holding those same weights, and greedy tokens."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qwen3vl_webui.weights import checkpoints, loading
from qwen3vl_webui.weights.checkpoints import CheckpointFormat
from qwen3vl_webui.weights.loading import load_model
from qwen3vl_webui.weights.model import LoadRefused

TEXT = "model.language_model."
GROUP = 32  # the tiny model's K is 64 or 128
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # awq/modules/linear/gemm.py's order_map
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # awq/utils/packing_utils.py


# ------------------------------------------------------------------------------------------------ building checkpoints


def _original(tiny: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny, dtype=dtype)


def _text_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith(TEXT) and isinstance(m, nn.Linear)}


def _finish(tiny: Path, out: Path, quant: dict[str, Any] | None = None) -> Path:
    """The processor files of the tiny checkpoint, and `quant` as config.json's quantization_config."""
    skip = {"config.json", "model.safetensors", "DEMO_MODEL", "generation_config.json"}
    for item in tiny.iterdir():
        if item.name not in skip and not (out / item.name).exists():
            shutil.copy(item, out / item.name)
    if not (out / "generation_config.json").exists():
        shutil.copy(tiny / "generation_config.json", out / "generation_config.json")
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    config = config or json.loads((tiny / "config.json").read_text())
    if quant is not None:
        config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config))
    return out


def _save_shards(tensors: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def compressed_tensors_checkpoint(
    tiny: Path, out: Path, symmetric: bool, dtype: torch.dtype, group: int | None = GROUP
) -> Path:
    """llm-compressor's flow (apply the scheme, set each module's qparams, ModelCompressor compress, save, update the
    config) with the scales from compressed-tensors' own calculate_qparams over each group's min/max (`group` None:
    one scale per output channel)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    strategy = {"strategy": "group", "group_size": group} if group else {"strategy": "channel"}
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, **strategy)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head", "re:model.visual.*"],  # as llm-compressor's Qwen3-VL W4A16 example
        format="pack-quantized",
    )
    model = _original(tiny, dtype)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "quantization_scheme"):
                n, k = module.weight.shape
                groups = module.weight.reshape(n, -1, group or k)
                scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
                module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return _finish(tiny, out)


def _legacy_name(key: str) -> str:
    """The tensor names of transformers before 4.52 (what AutoAWQ pinned): `model.layers...`, `visual...`."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key.removeprefix("model.") if key.startswith("model.visual.") else key


def awq_quantize(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> AutoAWQ GEMM's (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]): its
    quantizer's zero-point round-to-nearest (awq/quantize/quantizer.py pseudo_quantize_tensor) and
    WQLinear_GEMM.from_linear's packing (awq/modules/linear/gemm.py), line for line."""
    n, k = w.shape
    g = w.reshape(-1, group)
    max_val, min_val = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    scales, zeros = scales.view(n, -1).t().contiguous(), zeros.view(n, -1).t().contiguous()  # [K/G, N]
    half = scales.half()
    scale_zeros = zeros * half
    intweight = torch.cat(
        [torch.round((w[:, i] + scale_zeros[i // group]) / half[i // group]).to(torch.int)[:, None] for i in range(k)],
        dim=1,
    ).t().contiguous().to(torch.int32)  # fmt: skip
    qweight = torch.zeros((k, n // 8), dtype=torch.int32)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    izeros = zeros.to(torch.int32)
    qzeros = torch.zeros((izeros.shape[0], n // 8), dtype=torch.int32)
    for col in range(n // 8):
        for i in range(8):
            qzeros[:, col] |= izeros[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return qweight, qzeros, half


def awq_checkpoint(tiny: Path, out: Path) -> Path:
    """AutoAWQ's GEMM layout (awq_quantize), fp16 like AutoAWQ's output; two shards with an index and the older
    transformers' tensor names, as AutoAWQ wrote them."""
    model = _original(tiny)
    tensors = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    for name, linear in _text_linears(model).items():
        qweight, qzeros, scales = awq_quantize(linear.weight.detach())
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales})
    _save_shards({_legacy_name(k): v for k, v in tensors.items()}, out, shards=2)
    quant = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": ["visual"]}  # fmt: skip
    return _finish(tiny, out, quant)


def fp8_checkpoint(tiny: Path, out: Path, block: int | None = 128) -> Path:
    """transformers' FineGrainedFP8 quantize op (Fp8Quantize, what from_pretrained runs to quantize on a GPU) on each
    text weight, zero-padded to whole 128x128 blocks (padding leaves each block's absmax alone) and cut back: the
    tiny model's widths are under one block. The rest bf16, as Qwen's -FP8 release. `block` None: one scale per
    tensor (a 0-d weight_scale_inv, as transformers' FP8Linear holds it)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    blocks = (block, block) if block else None
    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=blocks)))
    model = _original(tiny)
    tensors = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for name, linear in _text_linears(model).items():
        w = linear.weight.detach()
        n, k = w.shape
        padded = nn.functional.pad(w, (0, -k % 128, 0, -n % 128)) if block else w
        q = op.convert({f"{name}.weight": padded})
        tensors[f"{name}.weight"] = q[f"{name}.weight"][:n, :k].contiguous()
        scale = q[f"{name}.weight_scale_inv"]
        tensors[f"{name}.weight_scale_inv"] = scale if block else scale.reshape(())
    _save_shards(tensors, out)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": blocks,
             "modules_to_not_convert": ["lm_head", "model.visual"]}  # fmt: skip
    return _finish(tiny, out, quant)


# ------------------------------------------------------------------------------------------------ each format's own
# dequantization (its library's code, or AutoAWQ's reproduced), in fp32


def _read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, under today's names (older ones renamed as transformers 4.5x did)."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            key = "model.language_model." + key.removeprefix("model.")
        renamed[key] = value
    return renamed


def _awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """awq/utils/packing_utils.py dequantize_gemm (unpack_awq, reverse_awq_order, the overflow mask), in fp32."""
    shifts = torch.arange(0, 32, 4)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    order = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iweights, izeros = iweights[:, order] & 0xF, izeros[:, order] & 0xF
    group = qweight.shape[0] // scales.shape[0]
    w = (iweights.float() - izeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return w.t()  # [N, K]


def _compressed_tensors_dequantize(tensors: dict[str, torch.Tensor], name: str, quant: dict) -> torch.Tensor:
    """compressed-tensors' own PackedQuantizationCompressor.decompress, with fp32 scales (its product is exact)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(quant).config_groups["group_0"]
    state = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
    state["weight_scale"] = state["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def _fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """transformers' own FP8 dequantization (integrations/finegrained_fp8.py, its backward pass's)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(weight, scale_inv, block, torch.float32)


def file_weights(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor the model should hold, as the file's format defines it, in fp32; and the quantized Linears."""
    tensors = _read(path)
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    method = quant["quant_method"]
    weights, quantized = {}, set()
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        if method == "awq" and leaf == "qweight":
            weights[f"{name}.weight"] = _awq_dequantize(value, tensors[f"{name}.qzeros"], tensors[f"{name}.scales"])
        elif method == "compressed-tensors" and leaf == "weight_packed":
            weights[f"{name}.weight"] = _compressed_tensors_dequantize(tensors, name, quant)
        elif method == "fp8" and leaf == "weight_scale_inv":
            weights[f"{name}.weight"] = _fp8_dequantize(tensors[f"{name}.weight"], value, quant["weight_block_size"])
        else:
            continue
        quantized.add(name)
    for key, value in tensors.items():
        if key.rpartition(".")[0] not in quantized:
            weights[key] = value.float()
    return weights, quantized


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def made(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prequantized")
    return {
        "ct-sym": compressed_tensors_checkpoint(tiny_checkpoint, root / "ct-sym", True, torch.float32),
        "ct-asym": compressed_tensors_checkpoint(tiny_checkpoint, root / "ct-asym", False, torch.bfloat16),
        "awq": awq_checkpoint(tiny_checkpoint, root / "awq"),
        "ct-channel": compressed_tensors_checkpoint(tiny_checkpoint, root / "ct-channel", False, torch.float16, None),
        "fp8": fp8_checkpoint(tiny_checkpoint, root / "fp8"),
        "fp8-tensor": fp8_checkpoint(tiny_checkpoint, root / "fp8-tensor", block=None),
    }


def _reference(tiny: Path, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The tiny model with plain nn.Linear layers holding the file's dequantized weights (fp32)."""
    model = _original(tiny)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _prompt(processor: Any) -> torch.Tensor:
    return processor.tokenizer("Describe the image: a red circle and a blue square.", return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ loading each format

KINDS = {"ct-sym": ("Int4Linear", "int4"), "ct-asym": ("Int4Linear", "int4"), "ct-channel": ("Int4Linear", "int4"),
         "awq": ("Int4Linear", "int4"), "fp8": ("Fp8Linear", "fp8"), "fp8-tensor": ("Fp8Linear", "fp8")}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_prequantized_checkpoint_loads_exactly_what_its_file_holds(
    kind: str, made: dict[str, Path], tiny_checkpoint: Path
) -> None:
    path = made[kind]
    module_type, precision = KINDS[kind]
    fmt = checkpoints.detect(path)
    assert fmt is not None and fmt.precision == precision
    loaded = load_model(str(path), "auto", "cpu")
    model = loaded.model
    weights, quantized = file_weights(path)
    text = {n: m for n, m in model.named_modules() if n.startswith(TEXT) and hasattr(m, "in_features")}
    assert len(text) == 21 and {type(m).__name__ for m in text.values()} == {module_type}
    assert set(text) == quantized  # the tiny checkpoints quantize every text Linear and nothing else
    for name, module in text.items():  # bit for bit in fp32
        assert torch.equal(module.dequantized(torch.float32), weights[f"{name}.weight"]), name
    state = model.state_dict()
    rest = [k for k in state if k.rpartition(".")[0] not in quantized]
    assert rest and all(torch.equal(state[k], weights[k]) for k in rest)  # 16-bit tensors: the file's, upcast

    reference = _reference(tiny_checkpoint, weights)
    ids = _prompt(loaded.processor)
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    assert tokens.shape[1] == ids.shape[1] + 6


@pytest.mark.parametrize("kind", ["awq", "ct-asym"])
def test_the_batch_engine_decodes_a_prequantized_checkpoint_as_generate_does(kind: str, made: dict[str, Path]) -> None:
    """Its Int4Linears (fp16 scales from AWQ, bf16 from compressed-tensors) fused by the engine as quantize-on-load's."""
    import threading

    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.prompt import ChatRequest, UserMessage, build_prompt

    loaded = load_model(str(made[kind]), "int4", "cpu")
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    prompts = [build_prompt(loaded, ChatRequest(UserMessage(q), sampling=greedy)) for q in ("Hello", "Describe it")]
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = loaded.model.generate(**p.inputs, do_sample=False, max_new_tokens=greedy.max_new_tokens,
                                        repetition_penalty=1.0, eos_token_id=None)  # fmt: skip
        expected.append(out[0, p.inputs["input_ids"].shape[1] :].tolist())
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fuse=True)
    with BatchEngine(loaded, options) as engine:
        assert engine.fused_groups == 2 * loaded.model.config.text_config.num_hidden_layers  # q/k/v and gate/up
        streams = [engine.submit_tokens(p, greedy, threading.Event()) for p in prompts]
        got = [list(s) for s in streams]
    assert got == expected


def test_a_16_bit_precision_dequantizes_and_says_so(made: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    path = made["awq"]
    weights, quantized = file_weights(path)
    with caplog.at_level(logging.INFO, logger="qwen3vl_webui.weights.checkpoints"):
        loaded = load_model(str(path), "bf16", "cpu")
    assert "dequantized to bf16 Linears" in caplog.text
    text = {n: m for n, m in loaded.model.named_modules() if n in quantized}
    assert len(text) == 21 and {type(m) for m in text.values()} == {nn.Linear}
    for name, module in text.items():  # the exact fp32 weight rounded once
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, weights[f"{name}.weight"].to(torch.bfloat16)), name
    assert loaded.model.generate(input_ids=_prompt(loaded.processor), max_new_tokens=3, do_sample=False).shape[1] > 3


def test_groups_longer_than_128_become_kernel_sized_groups_with_the_same_weights() -> None:
    """Per-channel scales (one group of K) repeat over groups of 128: the kernels' tiles, the weights unchanged."""
    from qwen3vl_webui.kernels import int4

    torch.manual_seed(0)
    q = int4.pack(torch.randint(0, 16, (16, 512)))
    scales, zeros = torch.rand(16, 1).to(torch.bfloat16) + 0.1, torch.randint(0, 16, (16, 1), dtype=torch.uint8)
    split_scales, split_zeros = checkpoints._regroup(scales, zeros, 512)
    assert split_scales.shape == split_zeros.shape == (16, 4)
    assert torch.equal(int4.dequantize_weight(q, split_scales, split_zeros), int4.dequantize_weight(q, scales, zeros))
    assert checkpoints._regroup(scales[:2], zeros[:2], 9728)[0].shape == (2, 76)  # the 4B's MLP K: groups of 128
    assert checkpoints._regroup(torch.ones(2, 20), torch.ones(2, 20), 2560)[0].shape == (2, 20)  # 128 already


def test_an_unquantized_checkpoint_is_not_prequantized(tiny_checkpoint: Path) -> None:
    assert checkpoints.detect(tiny_checkpoint) is None


def test_auto_picks_the_checkpoints_own_precision(made: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager

    def auto(path: Path, device: str) -> str:
        return ModelManager(str(path), "auto", device, "sdpa", Scheduler(1, 1)).resolve_precision(device)

    assert auto(made["awq"], "cpu") == "int4" and auto(made["ct-sym"], "cpu") == "int4"
    assert auto(made["fp8"], "cpu") == "fp8"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    assert auto(made["fp8"], "cuda") == "fp8"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))  # an A100: no FP8
    assert auto(made["fp8"], "cuda") == "bf16"  # dequantized, not refused
    assert ModelManager(str(made["fp8"]), "fp16", "cpu", "sdpa", Scheduler(1, 1)).resolve_precision("cpu") == "fp16"


def test_the_precision_switch_moves_between_its_own_precision_and_16_bit(made: dict[str, Path]) -> None:
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager, SwitchRefused

    manager = ModelManager(str(made["awq"]), "auto", "cpu", "sdpa", Scheduler(1, 1))
    first = manager.load()
    assert first.precision == "int4" and "Int4Linear" in {type(m).__name__ for m in first.model.modules()}
    with pytest.raises(SwitchRefused, match="not as int8wo; .* Kept int4"):
        manager.switch("int8wo")  # refused before anything is unloaded
    assert manager.current() is first
    assert manager.switch("fp32").new == "fp32"
    assert "Int4Linear" not in {type(m).__name__ for m in manager.current().model.modules()}
    assert manager.switch("int4").new == "int4"


def test_fp8_is_refused_on_a_gpu_without_it(made: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    monkeypatch.setattr(loading, "avoid_cudnn_attention", lambda: None)
    with pytest.raises(LoadRefused, match=r"needs a GPU of compute capability 8\.9 or newer.*this one is 8\.0"):
        load_model(str(made["fp8"]), "fp8", "cuda")
    fmt = CheckpointFormat("fp8", "fp8", "FP8")
    with pytest.raises(LoadRefused, match="compute capability 8.9"):
        checkpoints.load(made["fp8"], fmt, "auto", "cuda")  # auto resolved inside load: checked there too


def _compressed(fmt: str, **weights: Any) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip


@pytest.mark.parametrize(
    ("quant", "words"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quantized with 'gptq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantized with 'bitsandbytes'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AutoAWQ 'gemv'"),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "FP8 with [64, 64] blocks"),
        (_compressed("float-quantized", num_bits=8, type="float"), "compressed-tensors float-quantized"),
        (
            _compressed("pack-quantized", num_bits=4, strategy="group", group_size=128, actorder="group"),
            "activation-ordered groups",
        ),
    ],
)
def test_other_quantizations_are_refused_naming_what_loads(
    quant: dict, words: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    _finish(tiny_checkpoint, tmp_path / "ckpt", quant)
    with pytest.raises(LoadRefused, match="compressed-tensors pack-quantized W4A16") as refused:
        load_model(str(tmp_path / "ckpt"), "auto", "cpu")
    assert words in str(refused.value)


@pytest.mark.parametrize("precision", ["int8wo", "int4-bnb", "fp8"])
def test_a_precision_the_checkpoint_cannot_take_is_refused(precision: str, made: dict[str, Path]) -> None:
    with pytest.raises(LoadRefused, match=f"it loads as int4 or dequantized to bf16/fp16/fp32, not as {precision}"):
        load_model(str(made["ct-sym"]), precision, "cpu")


_INTERPRETED = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "tests")
    from test_checkpoints import _awq_dequantize, awq_quantize
    from qwen3vl_webui.weights import checkpoints
    from qwen3vl_webui.kernels import w4a16_triton as wk

    gen = torch.Generator().manual_seed(0)
    for group in (32, 128):
        # AutoAWQ's buffers converted: fp16 scales (the activations bf16 or fp16), zeros 0..15, K = 384, N = 40.
        packed = awq_quantize(torch.randn(40, 384, generator=gen), group)
        qweight, scales, zeros = checkpoints._from_awq(*packed)
        reference = _awq_dequantize(*packed).double()
        assert torch.equal(wk.w4_dequantize(qweight, scales, zeros, group, torch.float32), reference.float())
        cases = [(wk.W4Config(1, 16, 2 if group == 32 else 1, 4, 1), 3, torch.bfloat16),
                 (wk.W4Config(16, 32, 1, 4, 1), 5, torch.float16)]
        for cfg, rows, dtype in cases:
            x = torch.randn(rows, 384, generator=gen).to(dtype)
            out = wk.w4_matmul(x, qweight, scales, zeros, group, cfg)
            ref = x.double() @ reference.T
            err = float((out.double() - ref).norm() / ref.norm())
            assert not bool(out.isnan().any()) and err < 1e-2, (group, cfg, err)
            print("ok", group, cfg.block_m, f"{err:.1e}")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_converted_awq_buffers_run_through_the_triton_kernels_in_the_interpreter() -> None:
    """fp16 scales from AutoAWQ with bf16 (GEMV) and fp16 (tensor-core) activations, groups of 32 and 128, on the
    CPU (TRITON_INTERPRET=1): what the GPU runs for such a checkpoint, unpacked and scaled the same."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 4
