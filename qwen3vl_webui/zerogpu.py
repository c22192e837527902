"""Hugging Face ZeroGPU support: `spaces.GPU` on the GPU function there, a no-op everywhere else."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# Seconds of GPU a ZeroGPU Space reserves per chat call (the platform's quota unit).
ZERO_GPU_DURATION_S = 120


def on_zero_gpu() -> bool:
    """ZeroGPU Spaces set SPACES_ZERO_GPU=true; there the GPU exists only inside decorated calls."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu_function(fn: F) -> F:
    if not on_zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=ZERO_GPU_DURATION_S)(fn)
