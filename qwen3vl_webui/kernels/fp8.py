"""FP8 weights ("fp8"): the text model's Linear layers hold float8 e4m3 weights with one fp32 scale per 128x128 block.

The layout is Qwen's official FP8 checkpoint's (Qwen/Qwen3-VL-4B-Instruct-FP8) and transformers' fine-grained FP8:
`weight` float8_e4m3fn `[N, K]`, `weight_scale_inv` fp32 `[ceil(N/128), ceil(K/128)]`, the real weight being
`weight * weight_scale_inv[n // 128, k // 128]`. Quantized here from 16-bit weights: absmax per block / 448 (e4m3's
largest finite value), round to nearest. Activations stay 16-bit (kernels/fp8_triton.py says why).

Offered only on GPUs with FP8 (compute capability 8.9 or newer: L4, RTX 4090, H100, H200; precisions.py's table says
so and the loader refuses it elsewhere); on a CPU it runs by dequantizing (tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qwen3vl_webui.kernels import fp8_mma
from qwen3vl_webui.kernels.fp8_blocks import BLOCK, FP8_MAX, dequantize_weight, quantize_weight  # noqa: F401 (API)
from qwen3vl_webui.kernels.parts import compiled_product, decode_kernels, rows_of

OP_NAMESPACE = "qwen3vl_webui"
OP_NAME = "fp8_linear"
SKINNY_MAX_ROWS = 64


@functools.cache
def _kernels() -> Any:
    try:
        from qwen3vl_webui.kernels import fp8_triton
    except ImportError:
        return None
    return fp8_triton


def fp8_linear_impl(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """`x [..., K] @ Wᵀ` in x's dtype for the block-scaled fp8 weight."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    kernels = _kernels() if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else None
    if kernels is None:
        return F.linear(x2, dequantize_weight(weight, scale_inv, x.dtype)).reshape(*x.shape[:-1], n)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    if 0 < rows <= SKINNY_MAX_ROWS:
        return kernels.fp8_matmul(x2, weight, scale_inv, BLOCK).reshape(*x.shape[:-1], n)
    return F.linear(x2, kernels.fp8_dequantize(weight, scale_inv, BLOCK, x.dtype)).reshape(*x.shape[:-1], n)


def parts_layout(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, bool]:
    """(partial sums, whether fp32) that `fp8_parts_impl` returns for `x` (its shape, device and dtype only)."""
    kernels = decode_kernels(x, _kernels, SKINNY_MAX_ROWS)
    k = x.shape[-1]
    return (1, False) if kernels is None else kernels.fp8_parts(x.numel() // k, weight.shape[0], k, BLOCK)


def fp8_parts_impl(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """`x [..., K] @ Wᵀ` as `[split, ..., N]` partial sums (`parts_layout`), to be added and cast to x's dtype."""
    split, fp32 = parts_layout(x, weight)
    if split == 1 and not fp32:
        return fp8_linear_impl(x, weight, scale_inv)[None]
    return _kernels().fp8_partials(rows_of(x), weight, scale_inv, BLOCK).reshape(split, *x.shape[:-1], weight.shape[0])


@functools.cache
def register_op() -> Any:
    """`torch.ops.qwen3vl_webui.fp8_linear`: opaque to dynamo, as int8wo's and int4's; `fp8_linear_parts`, the
    product's partial sums for the compiled graph to add and cast (kernels/parts.py)."""

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
    def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        return fp8_linear_impl(x, weight, scale_inv)

    @fp8_linear.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_parts", mutates_args=())
    def fp8_linear_parts(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        return fp8_parts_impl(x, weight, scale_inv)

    @fp8_linear_parts.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        split, fp32 = parts_layout(x, weight)  # one row, a static shape (parts.compiled_product checks)
        return x.new_empty((split, *x.shape[:-1], weight.shape[0]), dtype=torch.float32 if fp32 else x.dtype)

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_mma", mutates_args=())
    def fp8_linear_mma(x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, kind: torch.dtype) -> torch.Tensor:
        return fp8_mma.linear(x, words, scale_inv, kind)

    @fp8_linear_mma.register_fake
    def _(x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, kind: torch.dtype) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], words.shape[0]))

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_mma_parts", mutates_args=())
    def fp8_linear_mma_parts(
        x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, kind: torch.dtype
    ) -> torch.Tensor:
        return fp8_mma.parts(x, words, scale_inv, kind)

    @fp8_linear_mma_parts.register_fake
    def _(x: torch.Tensor, words: torch.Tensor, scale_inv: torch.Tensor, kind: torch.dtype) -> torch.Tensor:
        k, n = x.shape[-1], words.shape[0]
        count = fp8_mma.parts_count(x, n, k, kind)  # one row (compiled_product)
        dtype = torch.float32 if fp8_mma.decodes(x, kind) else x.dtype
        return x.new_empty((count, *x.shape[:-1], n), dtype=dtype)

    return fp8_linear


class Fp8Linear(nn.Module):
    """nn.Linear's interface over `weight` float8_e4m3fn `[out, in]` and `weight_scale_inv` fp32 block scales."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        n, k = weight.shape
        if weight.dtype != torch.float8_e4m3fn or scale_inv.dim() != 2:
            raise ValueError(f"need float8_e4m3fn [out, in] weights and 2-D block scales, got {weight.dtype}")
        if scale_inv.shape != (-(-n // BLOCK), -(-k // BLOCK)):
            raise ValueError(f"block scales {tuple(scale_inv.shape)} do not match {BLOCK}x{BLOCK} blocks of {n}x{k}")
        register_op()
        self.out_features, self.in_features = n, k
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        # kernels/fp8_mma.py's layout (`use_mma_layout`): the 16-bit kind its words were repacked for (the weight's
        # bytes reordered in place); None in this module's own layout
        self.mma_kind: torch.dtype | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Fp8Linear:
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        q, scale = quantize_weight(weight)
        del weight
        bias = linear.bias.detach().to(q.device) if linear.bias is not None else None
        return cls(q, scale, bias)

    @classmethod
    def fuse(cls, layers: list[Fp8Linear]) -> Fp8Linear | None:
        """One layer over the rows of `layers` (q/k/v, gate/up), sharing their buffers; only where every part's rows
        are whole 128-row blocks (the 4B's are; the tiny model's are not)."""
        from qwen3vl_webui.kernels.int8 import fuse_rows

        kinds = {layer.mma_kind for layer in layers}
        if len(kinds) != 1:  # two layouts do not fuse
            return None
        fused = fuse_rows(layers, ("weight", "weight_scale_inv"), row_block=BLOCK)  # 16-row tiles: whole blocks too
        if fused is None:
            return None
        module = cls(*fused)
        module.mma_kind = kinds.pop()
        return module

    def use_mma_layout(self, kind: torch.dtype) -> None:
        """Into kernels/fp8_mma.py's layout for 16-bit activations of `kind`, in place (its products then run
        there): the weight's bytes reordered within the memory they take; the block scales as they are. Once."""
        if self.mma_kind is not None:
            return
        if "_qwen3vl_group" in vars(self):  # a fused group's member: its rows would be reordered, the group's not
            raise RuntimeError("convert fp8 weights before fusing them (kernels/fusion.py)")
        with torch.inference_mode(self.weight.is_inference()), torch.no_grad():
            fp8_mma.repack_in_place(self.weight, kind)
        self.mma_kind = kind

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.mma_kind is not None:
            return fp8_mma.dequantize(self.weight, self.weight_scale_inv, self.mma_kind, dtype)
        return dequantize_weight(self.weight, self.weight_scale_inv, dtype)

    def partials(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product as `[split, ..., N]` partial sums (`fp8_parts_impl`: fp32, or the product in x's dtype; or
        fp8_mma's) for a consumer that adds them itself (kernels/layer.py); None with a bias."""
        if self.bias is not None:
            return None
        if self.mma_kind is not None:
            return fp8_mma.parts(x, self.weight, self.weight_scale_inv, self.mma_kind)
        return fp8_parts_impl(x, self.weight, self.weight_scale_inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mma_kind is not None:  # kernels/fp8_mma.py's layout
            buffers = (self.weight, self.weight_scale_inv, self.mma_kind)
            if torch.compiler.is_dynamo_compiling():
                ops = torch.ops.qwen3vl_webui
                y = compiled_product(x, ops.fp8_linear_mma, ops.fp8_linear_mma_parts, *buffers)
            else:
                y = fp8_mma.linear(x, *buffers)
        elif torch.compiler.is_dynamo_compiling():  # one row: the partial sums added and cast by the graph (parts.py)
            ops = torch.ops.qwen3vl_webui
            y = compiled_product(x, ops.fp8_linear, ops.fp8_linear_parts, self.weight, self.weight_scale_inv)
        else:
            y = fp8_linear_impl(x, self.weight, self.weight_scale_inv)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        layout = f", layout=mma ({self.mma_kind})" if self.mma_kind is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}"


def use_mma_layout(model: nn.Module, kind: torch.dtype) -> int:
    """Every Fp8Linear of `model` whose shape fits into kernels/fp8_mma.py's layout for activations of `kind`, in
    place (`Fp8Linear.use_mma_layout`: no memory): how many. Called by the loader where `fp8_mma.wanted`, before
    the engine fuses any."""
    if kind not in fp8_mma.BITS:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear) and fp8_mma.supports(module.out_features, module.in_features):
            module.use_mma_layout(kind)
            count += 1
    return count


def quantize_text_linears(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replaces each nn.Linear of the text decoder by an Fp8Linear on `device`, one layer at a time."""
    from qwen3vl_webui.kernels import int8

    return int8.replace_text_linears(model, lambda linear: Fp8Linear.from_linear(linear, device))
