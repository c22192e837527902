"""A loaded model and what every loader shares: its record, the compute dtype per precision, freeing GPU memory."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

from qwen3vl_webui import precisions

log = logging.getLogger(__name__)


class LoadRefused(RuntimeError):
    """A load option that cannot work here (e.g. a kernel whose package is missing)."""


@dataclass(frozen=True)
class TokenizerOnly:
    """The processor where only its tokenizer is used: the engine process, whose prompts arrive as token ids and
    pixel values. Loading the processor there would import its image and video modules (torchvision) for nothing."""

    tokenizer: Any


@dataclass(frozen=True)
class LoadedModel:
    """A model as the app uses it. In the front end of an engine process `model` is None: the weights live in that
    process, and this side holds what prompts need (processor, config) and what the engine reported it loaded."""

    model: Any
    processor: Any
    precision: str
    device: str
    source: str
    load_seconds: float
    weights_bytes: int
    is_demo: bool
    config: Any = None  # the model's config (the model's own when it is here)

    def __post_init__(self) -> None:
        if self.config is None and self.model is not None:
            object.__setattr__(self, "config", self.model.config)

    @property
    def label(self) -> str:
        words = precisions.label(self.precision)
        if precisions.weight_only_module(self.precision) and not str(self.device).startswith("cuda"):
            return words.replace("bf16 compute", "fp32 compute on CPU")
        return words


def compute_dtype(precision: str, device: str) -> Any:
    """The dtype of unquantized weights and activations for `precision` on `device`."""
    import torch

    if precision == "int8":
        return torch.float16  # LLM.int8 casts activations to fp16 anyway (one warning per layer otherwise)
    if precisions.weight_only_module(precision):
        # The quantized weights are widened to the activation dtype per matmul; CPUs do fp32 matmuls faster than bf16.
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return torch.float32
    return torch.bfloat16


def loaded(
    model: Any, processor: Any, precision: str, device: str, source: str, started: float, is_demo: bool
) -> LoadedModel:
    """The LoadedModel of a model now on `device` (`started`: perf_counter at the start of the load)."""
    if precision == "int4" and device.startswith("cuda"):
        from qwen3vl_webui.kernels import int4, w4_mma

        if w4_mma.wanted(device):  # int4's weights into the CUDA decode kernel's layout (QWEN3VL_INT4_MMA=0: not)
            dtype = model.get_input_embeddings().weight.dtype
            log.info("int4: %d weights in the CUDA decode kernel's layout", int4.use_mma_layout(model, dtype))
    if precision == "fp8" and device.startswith("cuda"):
        from qwen3vl_webui.kernels import fp8, fp8_mma

        if fp8_mma.wanted(device):  # fp8's weights into the CUDA decode kernel's layout (QWEN3VL_FP8_MMA=0: not)
            dtype = model.get_input_embeddings().weight.dtype
            log.info("fp8: %d weights in the CUDA decode kernel's layout", fp8.use_mma_layout(model, dtype))
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        release_cached_memory()  # quantizing on the GPU leaves transient blocks cached
    return LoadedModel(
        model=model,
        processor=processor,
        precision=precision,
        device=device,
        source=source,
        load_seconds=time.perf_counter() - started,
        weights_bytes=model.get_memory_footprint(),
        is_demo=is_demo,
    )


def release_cached_memory() -> None:
    """Returns cached GPU memory to the driver once the caller has dropped its references."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
