"""Model + processor loading, precision (bitsandbytes configs), device choice, unloading."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.weights import checkpoints, lean, quantize
from qwen3vl_webui.weights.model import LoadedModel, LoadRefused, TokenizerOnly, compute_dtype, loaded

log = logging.getLogger(__name__)

# Modules kept in 16-bit when quantizing. transformers' `llm_int8_skip_modules` replaces its defaults with this list, and
# matches module names: ["visual"] would still quantize the vision tower (its Linears are under model.visual) and
# lm_head; with ["model.visual", "lm_head"] both stay 16-bit (nf4 4B: 3.56 GiB on an H100, 2.93 GiB with ["visual"]).
SKIP_QUANTIZATION = ["model.visual", "lm_head"]


class ModelUnavailable(RuntimeError):
    """The model could not be fetched or found; the message is one plain sentence."""


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"--device {requested} was asked for, but no CUDA GPU is visible.")
    return requested


def load_front(source: str, precision: str, device: str, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """What the front end of an engine process needs of a model: its processor and config, no weights (the engine
    process loads those). A checkpoint is downloaded here, once, so the engine process finds it in the cache."""
    lean.skip(*lean.NEVER_USED)
    from transformers import AutoConfig, AutoProcessor

    from qwen3vl_webui.weights import random_weights
    from qwen3vl_webui.weights.tiny_model import is_demo_checkpoint

    started = time.perf_counter()
    is_demo = False
    if random_weights.is_random_source(source):
        processor, config = random_weights.build_front(source)
    else:
        path = locate_checkpoint(source, progress)
        processor, config = AutoProcessor.from_pretrained(path), AutoConfig.from_pretrained(path)
        is_demo = is_demo_checkpoint(path)
    return LoadedModel(None, processor, precision, device, source, time.perf_counter() - started, 0, is_demo, config)


def quantization_config(precision: str, device: str) -> Any | None:
    """The BitsAndBytesConfig for int4-bnb/int8, None for 16/32-bit and the weight-only precisions (int8wo, int4, fp8:
    quantized by our kernels after loading)."""
    if not precisions.needs_bitsandbytes(precision):
        return None
    from transformers import BitsAndBytesConfig

    if precision == "int4-bnb":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # transformers' default is fp4
            bnb_4bit_compute_dtype=compute_dtype("int4-bnb", device),  # default would be float32
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=SKIP_QUANTIZATION,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANTIZATION)


CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def cached_checkpoint(source: str) -> Path | None:
    """`source` on this machine without a download: a local directory, or a snapshot in the Hugging Face cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):  # not cached; not a repo id
        return None


def text_heads(source: str) -> tuple[int, int, int] | None:
    """(attention heads, KV heads, head dim) of `source`'s text model without loading anything: a random-weights
    preset's, or the config.json of a checkpoint already on this machine; None when neither is at hand."""
    from qwen3vl_webui.weights import random_weights

    if random_weights.is_random_source(source):
        from qwen3vl_webui.weights.tiny_model import PRESETS

        preset = PRESETS.get(source.removeprefix(random_weights.PREFIX))
        text = preset["text"] if preset else None
    else:
        try:
            path = cached_checkpoint(source)
            text = json.loads((path / "config.json").read_text()).get("text_config") if path else None
        except (OSError, ValueError):
            return None
    try:
        heads, kv_heads = int(text["num_attention_heads"]), int(text["num_key_value_heads"])
        return heads, kv_heads, int(text.get("head_dim") or 128)  # Qwen3VLTextConfig's default, as the engine reads
    except (TypeError, KeyError, ValueError):
        return None


def locate_checkpoint(source: str, progress: Callable[[str], None] | None = None) -> Path:
    """A local directory holding `source`: the path itself, the HF cache, or a fresh download."""
    local = cached_checkpoint(source)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    patterns = CHECKPOINT_FILES
    if progress:
        progress(f"Downloading {source} from the Hugging Face Hub…")
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, tqdm_class=_progress_tqdm(progress)))
    except Exception as exc:  # offline, DNS, 401/404: one sentence for the user, the detail in the log
        log.debug("download of %s failed: %r", source, exc)  # the sentence below is what the console shows
        raise ModelUnavailable(
            f"Could not download {source} (no internet connection or no cached copy), so the demo model starts instead."
        ) from exc


def _progress_tqdm(progress: Callable[[str], None] | None) -> Any:
    """A tqdm class that also reports byte progress to `progress` (the UI status line)."""
    from tqdm.auto import tqdm

    class _Reporting(tqdm):  # type: ignore[misc,valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if progress and self.total:
                progress(f"Downloading model: {self.n / 1e9:.2f} / {self.total / 1e9:.2f} GB")
            return out

    return _Reporting


def avoid_cudnn_attention() -> None:
    """Keeps SDPA off its cuDNN backend (process-wide), so prompts use the flash / memory-efficient kernels.

    cuDNN attention builds an execution plan for every new (query length, key length) shape, and every prompt
    has a new one: on an H100 (`git show 0ad4f07^:bench/reuse_probe.py`) a 512-token prompt's first prefill took 195 ms with it and
    126 ms without, a 1280x720 image prompt's text part 206 ms against 43 ms, a one-token follow-up over a
    reused prefix 106 ms against 40 ms; once a shape is planned both run alike.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(
    source: str,
    precision: str,
    device: str,
    attn: str = "sdpa",
    progress: Callable[[str], None] | None = None,
    tokenizer_only: bool = False,
) -> LoadedModel:
    """Loads processor + model exactly as for the real checkpoint (also for the tiny demo one). `tokenizer_only`: the
    processor's tokenizer alone, in a `TokenizerOnly` (the engine process: it never preprocesses media)."""
    lean.skip(*lean.NEVER_USED)  # torchvision too only in the engine process (worker.main): a process-wide choice
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from qwen3vl_webui.weights import random_weights
    from qwen3vl_webui.weights.tiny_model import is_demo_checkpoint

    if device.startswith("cuda"):
        avoid_cudnn_attention()
    if random_weights.is_random_source(source):  # --random-weights: benchmarking only, built in memory
        return random_weights.load_random(source, precision, device, attn, progress, tokenizer_only)
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        # Without the package transformers tries to fetch a kernel from the Hub, which hangs offline.
        raise LoadRefused("--attn flash_attention_2 needs the flash-attn package; install it or use sdpa.")
    path = locate_checkpoint(source, progress)
    if precisions.needs_bitsandbytes(precision):
        import bitsandbytes  # noqa: F401  (fail here with a clear ImportError, not deep inside transformers)
    quantize.check_device(precision, device)
    prequantized = checkpoints.detect(path)
    if progress:
        progress(f"Loading {source} in {precisions.label(precision)} on {device}…")
    started = time.perf_counter()
    processor = (
        TokenizerOnly(AutoTokenizer.from_pretrained(path)) if tokenizer_only else AutoProcessor.from_pretrained(path)
    )
    if prequantized is not None:  # an AWQ / compressed-tensors / FP8 checkpoint: its own weights, converted
        model = checkpoints.load(path, prequantized, precision, device, attn)
        return loaded(model.eval(), processor, precision, device, source, started, is_demo=is_demo_checkpoint(path))
    quant = quantization_config(precision, device)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=compute_dtype(precision, device),
        quantization_config=quant,
        attn_implementation=attn,
        device_map={"": device} if quant is not None else None,
    )
    # Weight-only precisions: loaded on the CPU in 16-bit, each text Linear is quantized straight onto `device` and its
    # 16-bit weight dropped: the GPU never holds the 16-bit text weights, so a card that fits the quantized model loads.
    quantize.quantize(model, precision, device)
    if quant is None:
        model.to(device)
    return loaded(model.eval(), processor, precision, device, source, started, is_demo=is_demo_checkpoint(path))
