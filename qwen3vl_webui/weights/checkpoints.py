"""Pre-quantized checkpoints (compressed-tensors W4A16, AutoAWQ GEMM, FP8): detected and converted at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def detect(path: Path) -> Any | None:
    """The checkpoint's quantization format, or None for a 16-bit checkpoint."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("quantization_config")


def load(path: Path, fmt: Any, precision: str, device: str, attn: str) -> Any:
    from qwen3vl_webui.weights.model import LoadRefused

    raise LoadRefused(f"pre-quantized checkpoints ({fmt.get('quant_method')}) are not supported yet")
