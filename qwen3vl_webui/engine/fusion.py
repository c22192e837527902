"""One GEMV instead of three (q/k/v) and two (gate/up) per layer in decode, on the model's own modules.

A decode step multiplies one row per stream by every weight once; at one stream the 5 MB k and v
projections are latency-bound (~10 us each for what the bandwidth moves in ~2). `fuse_projections` moves
each layer's q/k/v weights into one buffer and gate/up into another, leaves every `nn.Linear` in place with
its weight a view of that buffer (no extra memory), and routes calls with at most `max_rows` rows (decode)
through one product over the fused weight, handing q then k then v (gate then up) their slices: transformers'
attention calls them in that order on the same hidden states. Larger inputs (prefill) run each Linear as
before, on the same weights. `unfuse` restores the forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FUSE_MAX_ROWS = 32  # the largest decode bucket


class _Shared:
    """The fused weight of one group and the pending slices of its last product."""

    def __init__(self, weight: Any, sizes: list[int]) -> None:
        self.weight = weight
        self.sizes = sizes
        self.x: Any = None
        self.parts: Any = None


def _forward(shared: _Shared, index: int, linear: Any, max_rows: int) -> Callable[[Any], Any]:
    import torch.nn.functional as F

    last = len(shared.sizes) - 1

    def forward(x: Any) -> Any:
        if x.shape[:-1].numel() > max_rows:
            return F.linear(x, linear.weight, linear.bias)
        if index == 0:
            shared.x, shared.parts = x, F.linear(x, shared.weight).split(shared.sizes, dim=-1)
        elif shared.x is not x or shared.parts is None:  # called out of order: compute this one alone
            return F.linear(x, linear.weight, linear.bias)
        out = shared.parts[index]
        if index == last:
            shared.x = shared.parts = None  # nothing outlives the layer
        return out

    return forward


def _fuse_group(linears: list[Any], max_rows: int) -> bool:
    import torch

    if any(type(m) is not torch.nn.Linear or m.bias is not None for m in linears):
        return False  # quantized (bnb, int8wo) or biased layers keep their own path
    if len({(m.in_features, m.weight.dtype, m.weight.device) for m in linears}) != 1:
        return False
    # Outside inference mode (the engine's worker runs in it): the weights outlive the engine, as normal tensors.
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears])
        start = 0
        for m in linears:
            rows = m.out_features
            m.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
            start += rows
    shared = _Shared(weight, [m.out_features for m in linears])
    for index, m in enumerate(linears):
        m.forward = _forward(shared, index, m, max_rows)
        m._qwen3vl_fused = True
    return True


def fuse_projections(text_model: Any, max_rows: int = FUSE_MAX_ROWS) -> int:
    """Fuses q/k/v and gate/up of every decoder layer of `text_model`; returns how many groups were fused."""
    fused = 0
    for layer in getattr(text_model, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            fused += _fuse_group([attn.q_proj, attn.k_proj, attn.v_proj], max_rows)
        if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            fused += _fuse_group([mlp.gate_proj, mlp.up_proj], max_rows)
    return fused


def unfuse(text_model: Any) -> None:
    """Back to each Linear's own forward (the weights stay views of the fused buffers: same values)."""
    for module in text_model.modules():
        if vars(module).pop("_qwen3vl_fused", False):
            del module.forward
