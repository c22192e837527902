"""The vision tower without host syncs: its grid-derived inputs computed on the CPU, and packed attention on the GPU.

Run as shipped, Qwen3-VL's vision tower stops the host about 30 times per image: its helpers build interpolation
indices, rotary positions and sequence boundaries from `grid_thw` on the GPU and read them back, and with SDPA each of
its 24 blocks splits the packed patches per image with `lengths.tolist()`. The host then waits for the GPU before
launching each block, so the GPU idles while Python launches the next one (a 720p image: ~21 ms on an H100).

- `vision_kwargs` computes those inputs from the CPU grid with transformers' own helpers (which take them
  precomputed through `**kwargs`), so nothing is read back.
- `use_packed_vision_attention` points the vision config at `packed_vision_attention`, registered under a name with
  "flash" in it: transformers' vision blocks then pass the sequence boundaries instead of splitting, and the
  function runs torch's variable-length flash attention kernel (`aten._flash_attention_forward`, what
  `torch.nn.attention.varlen` runs when it does not pick cuDNN) over the packed patches. Called directly: on an H100
  `varlen_attn` picks cuDNN, which plans every new shape (each new image size) for ~100 ms, the cost the app turns
  off for SDPA (`loading.avoid_cudnn_attention`). CUDA, 16-bit, and a GPU where the kernel runs and agrees with
  SDPA (checked once); elsewhere the tower keeps SDPA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

PACKED_VISION_ATTENTION = "qwen3vl_webui_flash_varlen"  # "flash" in it: transformers passes cu_seqlens


def vision_kwargs(visual: Any, grid_thw: Any, device: Any) -> dict[str, Any]:
    """The tower's grid-derived inputs for CPU `grid_thw`, on `device`; {} if this transformers lacks the helpers."""
    try:
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )
    except ImportError:
        return {}
    needed = ("num_grid_per_side", "interpolation_mode", "interpolation_align_corners", "spatial_merge_size")
    if not all(hasattr(visual, name) for name in needed):
        return {}
    grid = grid_thw.cpu()
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    cu_seqlens = get_vision_cu_seqlens(grid)
    return dict(
        interp_indices=indices.to(device, non_blocking=True),
        interp_weights=weights.to(device, non_blocking=True),
        position_ids=get_vision_position_ids(grid, visual.spatial_merge_size).to(device, non_blocking=True),
        cu_seqlens=cu_seqlens.to(device, non_blocking=True),
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    )


def packed_vision_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Non-causal attention of each image's (frame's) patches among themselves: [1, heads, T, D] in,
    [1, T, heads, D] out (flash layout), one varlen flash call for all of them."""
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    max_q = kwargs["max_length_q"]
    max_k = kwargs.get("max_length_k", max_q)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, heads, D]
    return flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling).unsqueeze(0), None


def flash_varlen(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, scale: float | None) -> Any:
    """[T, heads, D] each, int32 boundaries: torch's flash kernel, non-causal, no dropout (its first ten arguments
    have been stable since torch 2.1)."""
    import torch

    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)[0]


def packed_attention_blocker(device: Any, dtype: Any) -> str | None:
    """Why the vision tower cannot use `packed_vision_attention` here, or None."""
    import torch

    if not str(device).startswith("cuda"):
        return "not on CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"vision weights are {dtype}, not bf16/fp16"
    return probe(str(device), dtype)


@functools.cache
def probe(device: str, dtype: Any) -> str | None:
    """Runs `flash_varlen` once on this GPU against per-segment SDPA (flash needs Ampere or newer)."""
    import torch
    import torch.nn.functional as F

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(80, 2, 64, device=device, generator=gen).to(dtype) for _ in range(3))
        cu = torch.tensor([0, 30, 80], device=device, dtype=torch.int32)
        out = flash_varlen(q, k, v, cu, cu, 50, 50, None).float()
        ref = torch.cat([
            F.scaled_dot_product_attention(*(t[a:b].float().transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in ((0, 30), (30, 80))
        ])  # fmt: skip
        err = float((out - ref).norm() / ref.norm())
    except Exception as exc:
        return f"packed flash attention failed here: {type(exc).__name__}: {str(exc)[:200]}"
    return None if err < 1e-2 else f"packed flash attention disagreed with SDPA here (relative error {err:.3g})"


def use_packed_vision_attention(visual: Any) -> Callable[[], None]:
    """Routes the vision tower's SDPA attention through `packed_vision_attention` where it can; returns the undo."""
    from transformers import AttentionInterface

    config = visual.config
    previous = config._attn_implementation
    dtype = next(visual.parameters()).dtype
    if previous != "sdpa" or packed_attention_blocker(next(visual.parameters()).device, dtype) is not None:
        return lambda: None
    AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)
    config._attn_implementation = PACKED_VISION_ATTENTION

    def restore() -> None:
        config._attn_implementation = previous

    return restore
