"""fp8's block-scaled weights (kernels/fp8.py's layout, Qwen's FP8 checkpoint's): quantizing and dequantizing in torch.

`weight` float8_e4m3fn `[N, K]`, `scale_inv` fp32 `[ceil(N/128), ceil(K/128)]`, the real weight being
`weight * scale_inv[n // 128, k // 128]`. Its own module so that kernels/fp8.py and kernels/fp8_mma.py both read it
without importing each other.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

BLOCK = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_weight(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` -> (float8_e4m3fn `[N, K]`, fp32 scale_inv `[ceil(N/B), ceil(K/B)]`): absmax per block."""
    n, k = weight.shape
    nb, kb = -(-n // block), -(-k // block)
    w = weight.detach().to(torch.float32)
    padded = F.pad(w, (0, kb * block - k, 0, nb * block - n))
    absmax = padded.reshape(nb, block, kb, block).abs().amax(dim=(1, 3))
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    q = (w / full).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_weight(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    n, k = weight.shape
    full = scale_inv.to(torch.float32).repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (weight.to(torch.float32) * full).to(dtype)
