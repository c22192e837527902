"""Weight-only precisions (int8wo, int4, fp8) applied to a loaded 16-bit model, and where each can run."""

from __future__ import annotations

import importlib
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.weights.model import LoadRefused


def check_device(precision: str, device: str) -> None:
    """Raises LoadRefused (one sentence) where `precision` cannot run on `device` (fp8 on a GPU older than sm_89)."""
    if not str(device).startswith("cuda"):
        return
    import torch

    blocker = precisions.capability_blocker(precision, torch.cuda.get_device_capability(torch.device(device)))
    if blocker:
        raise LoadRefused(blocker)


def quantize(model: Any, precision: str, device: str) -> int:
    """Replaces the text model's Linears for a weight-only `precision`, straight onto `device` one layer at a time
    (so the GPU never holds the 16-bit text weights); returns how many (0 for other precisions)."""
    module = precisions.weight_only_module(precision)
    if module is None:
        return 0
    kernels = importlib.import_module(f"qwen3vl_webui.kernels.{module}")
    return kernels.quantize_text_linears(model, device)
