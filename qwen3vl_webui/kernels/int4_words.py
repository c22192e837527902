"""int4's words (kernels/int4.py's layout): nibble j of int32 word w of a row is column 8w + j; a group of G columns
has a 16-bit scale and a 4-bit zero point, `w = (q - zero) * scale`. What both int4.py and w4_mma.py read."""

from __future__ import annotations

import torch

PACK = 8  # nibbles per int32 word


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint4 values `[N, K]` (any integer dtype, 0..15) -> int32 `[N, K // 8]`, nibble j of word w = column 8w + j."""
    n, k = q.shape
    q = q.to(torch.int32).reshape(n, k // PACK, PACK)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (q << shifts).sum(dim=2, dtype=torch.int64).to(torch.uint32).view(torch.int32)  # bit pattern kept


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 `[N, K // 8]` -> uint8 `[N, K]` (0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = (qweight[:, :, None] >> shifts) & 0xF
    return q.reshape(qweight.shape[0], -1).to(torch.uint8)


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The `[N, K]` weight `(q - zero) * scale`, computed in fp32 and rounded once to `dtype`."""
    q = unpack(qweight).to(torch.float32)
    n, k = q.shape
    group = k // scales.shape[1]
    w = (q.reshape(n, k // group, group) - zeros.to(torch.float32)[:, :, None]) * scales.to(torch.float32)[:, :, None]
    return w.reshape(n, k).to(dtype)
