"""How the decode step's Linears run: one GEMV instead of three (q/k/v) and two (gate/up) per layer, and a Triton
GEMV for one-row products on 16-bit weights; on the model's own modules. Weight-only quantized layers (int8wo, int4,
fp8) fuse the same way through their class's `fuse` (kernels/int8.py `fuse_rows`).

A decode step multiplies one row per stream by every weight once; at one stream the 5 MB k and v
projections are latency-bound (~10 us each for what the bandwidth moves in ~2). `fuse_projections` moves
each layer's q/k/v weights into one buffer and gate/up into another, leaves every `nn.Linear` in place with
its weight a view of that buffer (no extra memory), and routes calls with at most `max_rows` rows (None: any)
through one product over the fused weight, handing q then k then v (gate then up) their slices: transformers'
attention calls them in that order on the same hidden states. Larger inputs run each Linear as before, on the
same weights. The engine fuses for every row count: a row limit is a branch on the prompt chunk's length, which
would split its compiled prefill (engine/batch/prefill.py) into a graph per side. `unfuse` restores the forwards.

`gemv=True` (CUDA, bf16/fp16 weights, triton importable) also sends every one-row product of the text model and of
lm_head (the 1-stream decode step) to the custom op `qwen3vl_webui::gemv16` (kernels/gemv.py): cuBLAS's GEMV for these
skinny shapes streamed ~70% of the copy bandwidth inside the step graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from qwen3vl_webui.kernels import gemv as gemv_op


class _Shared:
    """The fused weight of one group and the pending slices of its last product."""

    def __init__(self, weight: Any, sizes: list[int], members: list[Any], partials: Callable[[Any], Any]) -> None:
        self.weight = weight
        self.sizes = sizes
        self.members = members  # the group's Linears, in order
        # x -> the whole group's product as [split, rows, sum(sizes)] partial sums, or [1, ...] the product itself: for
        # a consumer that adds them itself (the fused decode layer, kernels/layer.py)
        self.partials = partials
        self.x: Any = None
        self.parts: Any = None


def _forward(
    shared: _Shared, index: int, linear: Any, max_rows: int | None, product: Callable[[Any, Any], Any]
) -> Callable[[Any], Any]:
    last = len(shared.sizes) - 1
    alone = type(linear).forward  # the layer's own product (nn.Linear's, or a quantized layer's), on its slice

    def forward(x: Any) -> Any:
        if max_rows is not None and x.shape[:-1].numel() > max_rows:
            return alone(linear, x)
        if index == 0:
            parts = product(x, shared.weight).split(shared.sizes, dim=-1)
            shared.x, shared.parts = x, parts
        else:
            # Read once: the background compile's thread runs the same layers (its compiled code resets these at
            # each layer's end), so a check and a second read could see two states.
            parts = shared.parts
            if shared.x is not x or parts is None:  # called out of order, or reset meanwhile: compute this one alone
                return alone(linear, x)
        out = parts[index]
        if index == last:
            shared.x = shared.parts = None  # nothing outlives the layer
        return out

    return forward


def _fuse_group(linears: list[Any], max_rows: int | None, gemv: bool) -> bool:
    import torch

    if any(getattr(m, "bias", None) is not None for m in linears):
        return False  # biased layers keep their own path
    kind = type(linears[0])
    if kind is not torch.nn.Linear:
        # A weight-only quantized layer (int8wo, int4, fp8) fuses through its own `fuse`, which concatenates its
        # buffers and re-points each member at its rows (no extra memory); bitsandbytes layers keep their own path.
        fuse = getattr(kind, "fuse", None)
        fused = fuse(linears) if fuse is not None and all(type(m) is kind for m in linears) else None
        if fused is None:
            return False
        shared = _Shared(fused, [m.out_features for m in linears], linears, _partials_of(fused))
        for index, m in enumerate(linears):
            m.forward = _forward(shared, index, m, max_rows, lambda x, module: module(x))
            m._qwen3vl_fused = True
            m._qwen3vl_group = shared
        return True
    if any(type(m) is not torch.nn.Linear for m in linears):
        return False
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
    product = gemv_op.product(gemv and gemv_op.gemv_blocker(weight) is None)
    shared = _Shared(weight, [m.out_features for m in linears], linears, lambda x: product(x, weight)[None])
    for index, m in enumerate(linears):
        m.forward = _forward(shared, index, m, max_rows, product)
        m._qwen3vl_fused = True
        m._qwen3vl_group = shared
    return True


def _partials_of(module: Any) -> Callable[[Any], Any]:
    """x -> `module`'s product as partial sums: its own `partials` (int4, fp8), else the product itself, [1, ...]."""
    own = getattr(module, "partials", None)

    def partials(x: Any) -> Any:
        parts = own(x) if own is not None else None
        return parts if parts is not None else module(x)[None]

    return partials


def _route_gemv(linear: Any) -> bool:
    """A plain 16-bit Linear whose one-row products go to the Triton GEMV (others unchanged)."""
    import torch
    import torch.nn.functional as F

    if (
        type(linear) is not torch.nn.Linear
        or linear.bias is not None
        or gemv_op.gemv_blocker(linear.weight) is not None
    ):
        return False
    if "forward" in vars(linear):
        return False  # fused already (its group routes its own product)
    product = gemv_op.product(True)

    def forward(x: Any) -> Any:
        return product(x, linear.weight) if x.shape[:-1].numel() <= gemv_op.MAX_ROWS else F.linear(x, linear.weight)

    linear.forward = forward
    linear._qwen3vl_fused = True
    return True


def fuse_projections(text_model: Any, max_rows: int | None = None, gemv: bool = False) -> int:
    """Fuses q/k/v and gate/up of every decoder layer of `text_model`; returns how many groups were fused.

    `gemv`: the fused groups' one-row products run the Triton GEMV where it can (`gemv_blocker`).
    """
    fused = 0
    for layer in getattr(text_model, "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            fused += _fuse_group([attn.q_proj, attn.k_proj, attn.v_proj], max_rows, gemv)
        if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            fused += _fuse_group([mlp.gate_proj, mlp.up_proj], max_rows, gemv)
    return fused


def route_gemv(modules: Iterable[Any]) -> int:
    """Sends the one-row products of every plain 16-bit Linear in `modules` (and their children) that is not in a fused
    group to the Triton GEMV; returns how many. Call after `fuse_projections`."""
    import torch

    seen: set[int] = set()
    routed = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, torch.nn.Linear) and id(m) not in seen:
                seen.add(id(m))
                routed += _route_gemv(m)
    return routed


def unfuse(model: Any) -> None:
    """Back to each Linear's own forward (the weights stay views of the fused buffers: same values)."""
    for module in model.modules():
        if vars(module).pop("_qwen3vl_fused", False):
            del module.forward
            vars(module).pop("_qwen3vl_group", None)
