"""The loader: precision -> which modules bitsandbytes quantizes; 4/8-bit really generate on CPU; switching."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.manager import ModelManager, SwitchRefused
from qwen3vl_webui.weights.loading import load_model, quantization_config


def _linear_types(model: torch.nn.Module, prefix: str) -> set[str]:
    return {type(m).__name__ for n, m in model.named_modules() if n.startswith(prefix) and "Linear" in type(m).__name__}


def _generate(loaded, text: str = "Hello there") -> torch.Tensor:
    inputs = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": text}]}],
        tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True,
    )  # fmt: skip
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


def test_int4_config_is_nf4_double_quant_bf16_and_skips_vision_and_head() -> None:
    cfg = quantization_config("int4-bnb", "cuda")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.llm_int8_skip_modules == ["model.visual", "lm_head"]
    int8 = quantization_config("int8", "cuda")
    assert int8.load_in_8bit and int8.llm_int8_skip_modules == ["model.visual", "lm_head"]
    assert quantization_config("bf16", "cuda") is None


@pytest.mark.parametrize(
    "precision, text_linear, dtype",
    [
        ("int4-bnb", "Linear4bit", torch.bfloat16),
        ("int8", "Linear8bitLt", torch.float16),
        ("bf16", "Linear", torch.bfloat16),
    ],
)
def test_precision_decides_which_modules_are_quantized(
    tiny_checkpoint: Path, precision: str, text_linear: str, dtype: torch.dtype
) -> None:
    loaded = load_model(str(tiny_checkpoint), precision, "cpu")
    model = loaded.model
    assert _linear_types(model, "model.language_model.layers") == {text_linear}
    assert _linear_types(model, "model.visual") == {"Linear"}  # the vision tower stays 16-bit
    assert type(model.lm_head).__name__ == "Linear" and model.lm_head.weight.dtype == dtype
    assert next(model.model.visual.parameters()).dtype == dtype
    new = _generate(loaded)
    assert new.shape == (6,) and int(new.max()) < model.config.text_config.vocab_size
    assert loaded.is_demo and loaded.precision == precision


def test_quantized_weights_are_smaller(tiny_checkpoint: Path) -> None:
    sizes = {p: load_model(str(tiny_checkpoint), p, "cpu").weights_bytes for p in ("fp32", "bf16", "int8", "int4-bnb")}
    assert sizes["int4-bnb"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]


def test_missing_model_offline_falls_back_to_the_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    manager = ModelManager("Qwen/Qwen3-VL-4B-Instruct", "auto", "cpu", "sdpa", Scheduler(1, 4), str(tmp_path))
    loaded = manager.load()
    assert loaded.is_demo and loaded.device == "cpu" and loaded.precision == "fp32"
    assert manager.notice.startswith("Could not download Qwen/Qwen3-VL-4B-Instruct")
    assert manager.notice.count(".") == 1  # one plain sentence
    assert manager.status.startswith("Ready:")


def test_switching_precision_at_runtime_reloads_and_reports(tiny_checkpoint: Path) -> None:
    manager = ModelManager(str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(1, 4))
    before = manager.load()
    report = manager.switch("int4-bnb")
    after = manager.current()
    assert (report.old, report.new) == ("fp32", "int4-bnb") and "Switched fp32 → int4-bnb" in report.describe()
    assert after is not before and after.precision == "int4-bnb"
    assert _linear_types(after.model, "model.language_model.layers") == {"Linear4bit"}
    assert _generate(after).shape == (6,)
    assert manager.switch("int4-bnb").describe() == "Already loaded in int4-bnb."


def test_switch_that_would_not_fit_is_refused_and_the_old_model_stays(tiny_checkpoint: Path) -> None:
    # The tiny model's bf16 weights are ~1.5 MB; pretend only 100 KB beyond the loaded weights is free.
    manager = ModelManager(
        str(tiny_checkpoint), "int4-bnb", "cpu", "sdpa", Scheduler(1, 4), free_memory=lambda _: 100_000
    )
    before = manager.load()
    with pytest.raises(SwitchRefused, match=r"bf16 needs about .* but only .* would be free; kept int4-bnb"):
        manager.switch("bf16")
    assert manager.current() is before and _generate(before).shape == (6,)
    assert manager.switch("int4-bnb").describe() == "Already loaded in int4-bnb."


def test_flash_attention_without_the_package_is_refused_clearly(tiny_checkpoint: Path) -> None:
    import importlib.util

    from qwen3vl_webui.weights.model import LoadRefused

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(LoadRefused, match="needs the flash-attn package"):
        load_model(str(tiny_checkpoint), "fp32", "cpu", attn="flash_attention_2")


def test_cudnn_attention_is_turned_off_for_gpu_loads_only(tiny_checkpoint: Path) -> None:
    import torch

    from qwen3vl_webui.weights.loading import avoid_cudnn_attention, load_model

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        load_model(str(tiny_checkpoint), "fp32", "cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU load leaves the process setting alone
        avoid_cudnn_attention()  # what a CUDA load does first: no per-shape cuDNN plans for prompts
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_text_heads_come_from_the_preset_or_the_checkpoints_config_without_loading(tiny_checkpoint: Path) -> None:
    from transformers import AutoConfig

    from qwen3vl_webui.weights.loading import text_heads

    text = AutoConfig.from_pretrained(tiny_checkpoint).text_config
    assert text_heads(str(tiny_checkpoint)) == (text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert text_heads("random-weights:4b") == (32, 8, 128)  # Qwen3-VL-4B-Instruct's text model
    assert text_heads(str(tiny_checkpoint / "no-such-folder")) is None
    assert text_heads("random-weights:no-such-preset") is None


def test_the_engines_probe_pass_waits_for_the_early_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine process starts the kernels' probes before the weights load; the engine's own pass joins that
    thread first, so no probe ever runs twice at once (their answers are cached, not their runs)."""
    import time
    from types import SimpleNamespace

    from qwen3vl_webui.engine.batch import graphs

    running, calls, overlap = threading.Lock(), [], []

    def probe_kernels(*args: object) -> None:
        if not running.acquire(blocking=False):
            overlap.append(args)
            return
        calls.append(args)
        time.sleep(0.3)
        running.release()

    monkeypatch.setattr(graphs, "probe_kernels", probe_kernels)
    monkeypatch.setattr(graphs, "_early_probes", {})
    early = graphs.start_early_probes("cuda:0", torch.bfloat16, 32, 8, 128, decode_kernel=True, gemv_on=True)
    engine = SimpleNamespace(loaded=SimpleNamespace(device="cuda:0"), kv=SimpleNamespace(dtype=torch.bfloat16),
                             options=SimpleNamespace(decode_kernel=True), gemv=True)  # fmt: skip
    text = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=2560)
    graphs.DecodeGraphs._probe_kernels(engine, text)
    assert not early.is_alive() and not overlap
    assert calls == [("cuda:0", torch.bfloat16, 32, 8, 128, True, True)] * 2  # the same key: the second is a cache hit
    assert graphs._early_probes == {}  # taken: a later engine (a reload) probes for itself


def test_the_engine_process_starts_the_probes_with_the_engines_own_settings(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the engine process hands the early probes, from the spec the front end sends: the checkpoint's head
    shapes, the precision's compute dtype, the engine options' kernels (unset GEMV: on), and Triton's cache set up
    first, where the engine builds and saves (BatchOptions.kernel_cache_dir)."""
    from transformers import AutoConfig

    from qwen3vl_webui.engine.batch import engine, graphs
    from qwen3vl_webui.engine.remote import worker

    order: list[object] = []
    monkeypatch.setattr(
        engine, "prepare_kernels", lambda options, device: order.append(("cache", options.kernel_cache_dir, device))
    )
    monkeypatch.setattr(graphs, "start_early_probes", lambda *args, **kwargs: order.append(("probes", args, kwargs)))
    from qwen3vl_webui.kernels import pdl

    monkeypatch.setattr(pdl, "use_for", lambda precision, mma=None: order.append(("pdl", precision, mma)))  # the probes' kernels
    text = AutoConfig.from_pretrained(tiny_checkpoint).text_config
    spec = {"device": "cuda:0", "source": str(tiny_checkpoint), "precision": "int4",
            "options": {"max_batch": 2, "kernel_cache_dir": tmp_path / "triton", "decode_kernel": False}}  # fmt: skip
    worker._start_early_probes(spec)
    assert order == [
        ("cache", tmp_path / "triton", "cuda:0"),
        ("pdl", "int4", None),
        ("probes", ("cuda:0", torch.bfloat16, text.num_attention_heads, text.num_key_value_heads, text.head_dim),
         {"decode_kernel": False, "gemv_on": True}),
    ]  # fmt: skip
    # fp8: whether its weights will take kernels/fp8_mma.py's layout decides its PDL (it gains there only)
    from qwen3vl_webui.kernels import fp8_mma

    monkeypatch.setattr(fp8_mma, "wanted", lambda device: device == "cuda:0")
    order.clear()
    worker._start_early_probes({**spec, "precision": "fp8"})
    assert order[1] == ("pdl", "fp8", True)
    order.clear()
    worker._start_early_probes({**spec, "device": "cpu"})  # nothing to probe off CUDA
    worker._start_early_probes({**spec, "source": str(tmp_path / "elsewhere")})  # no config at hand: the engine probes
    assert order == []
