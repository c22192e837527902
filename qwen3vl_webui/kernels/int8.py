"""INT8 weight-only ("int8wo"): the text model's Linear layers hold int8 weights, one scale per output row.

Activations stay in the compute dtype (bf16 on a GPU), so only the weights are rounded: symmetric absmax per output
channel, `w ≈ q * scale` with `q` in [-127, 127]. Unlike bitsandbytes LLM.int8 nothing about the activations is
quantized or tested on the host, so the decode step compiles with `fullgraph=True` and replays from a CUDA graph.

Matmul: up to `SKINNY_MAX_ROWS` token rows on CUDA (decode) a Triton kernel reads the int8 weights once and
dequantizes in registers (kernels/matmul_triton.py); otherwise (prefill, CPU, no triton) the int8 weights are cast to
the activation dtype for one `F.linear` and the scales are applied to its output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

OP_NAMESPACE = "qwen3vl_webui"
OP_NAME = "int8wo_linear"
# Quantized: every nn.Linear under the text decoder. Not the vision tower (model.visual) and not lm_head, which is
# tied to the input embeddings in the 4B checkpoint (and kept 16-bit by the bitsandbytes precisions too).
TEXT_PREFIX = "model.language_model."
SKINNY_MAX_ROWS = 32  # the engine's largest decode bucket by default; above, dequantize + cuBLAS measured better


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` -> (int8 `[N, K]`, fp32 scale `[N]`), symmetric absmax per output row, round to nearest."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


@functools.cache
def _kernels() -> Any:
    """The Triton kernel module, or None where triton cannot be imported (the torch path is used then)."""
    try:
        from qwen3vl_webui.kernels import matmul_triton as int8_kernels
    except ImportError:
        return None
    return int8_kernels


def _dequant_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16:  # sums of |q| <= 127 products could pass fp16's 65,504: scale the weights first
        return F.linear(x, dequantize_weight(q, scale, x.dtype))
    # q is exact in bf16/fp32; the scale multiplies the output in fp32 (y * scale promotes), then one rounding.
    return (F.linear(x, q.to(x.dtype)) * scale).to(x.dtype)


def int8wo_linear_impl(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x [..., K] @ (q * scale)ᵀ` in x's dtype, without materialising 16-bit weights for decode-sized inputs."""
    k, n = x.shape[-1], q.shape[0]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < rows <= SKINNY_MAX_ROWS:
        kernels = _kernels()
        if kernels is not None:
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            return kernels.int8_matmul(x2, q, scale).reshape(*x.shape[:-1], n)
    return _dequant_matmul(x2, q, scale).reshape(*x.shape[:-1], n)


@functools.cache
def register_op() -> Any:
    """Registers `torch.ops.qwen3vl_webui.int8wo_linear` once: opaque to dynamo, with a fake impl for its shapes.

    A custom op keeps torch.compile(fullgraph=True) from tracing into triton's launcher, and inductor calls it as an
    extern kernel, which the engine then captures in its CUDA graphs like any other launch.
    """

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
    def int8wo_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return int8wo_linear_impl(x, q, scale)

    @int8wo_linear.register_fake
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], q.shape[0]))

    return int8wo_linear


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear's interface over an int8 `weight [out, in]` buffer and an fp32 `weight_scale [out]` buffer."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ValueError(
                f"need int8 [out, in] weights and [out] scales, got {q.dtype} {tuple(q.shape)} / {tuple(scale.shape)}"
            )
        register_op()
        self.out_features, self.in_features = q.shape
        # Buffers, not parameters: nothing trains them, and Module.to(dtype) leaves int8 alone either way.
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Int8WeightOnlyLinear:
        """Quantizes `linear` on `device` (default: where its weight is); the result lives there."""
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        q, scale = quantize_weight(weight)
        del weight
        bias = linear.bias.detach().to(q.device) if linear.bias is not None else None
        return cls(q, scale, bias)

    @classmethod
    def fuse(cls, layers: list[Int8WeightOnlyLinear]) -> Int8WeightOnlyLinear | None:
        """One layer over the rows of `layers` (q/k/v, gate/up), sharing their buffers (kernels/fusion.py)."""
        fused = fuse_rows(layers, ("weight", "weight_scale"))
        return cls(*fused) if fused is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_dynamo_compiling():
            y = torch.ops.qwen3vl_webui.int8wo_linear(x, self.weight, self.weight_scale)
        else:  # eager: skip the custom op's dispatch (~tens of µs a call in plain generate's Python-bound loop)
            y = int8wo_linear_impl(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fuse_rows(layers: list[nn.Module], names: tuple[str, ...], row_block: int = 1) -> list[torch.Tensor] | None:
    """Each named buffer of `layers` concatenated along dim 0 (their output rows), every layer's buffer re-pointed at
    its slice of it: one buffer per name for a fused product, no extra memory. `row_block`: output rows per buffer
    row (fp8's block scales: 128); None where the layers cannot share buffers (shapes, dtypes, devices, blocks)."""
    first = [getattr(layers[0], name) for name in names]
    for layer in layers:
        if layer.out_features % row_block or any(
            getattr(layer, n).shape[1:] != f.shape[1:] or getattr(layer, n).dtype != f.dtype
            or getattr(layer, n).device != f.device for n, f in zip(names, first, strict=True)
        ):  # fmt: skip
            return None
    fused = []
    with torch.inference_mode(False), torch.no_grad():  # the buffers outlive the engine (its worker is in it)
        for name in names:
            whole = torch.cat([getattr(layer, name) for layer in layers])
            start = 0
            for layer in layers:
                rows = getattr(layer, name).shape[0]
                setattr(layer, name, whole[start : start + rows])
                start += rows
            fused.append(whole)
    return fused


def quantize_text_linears(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replaces each nn.Linear under `model.language_model.` by an Int8WeightOnlyLinear on `device`; returns how many."""
    return replace_text_linears(model, lambda linear: Int8WeightOnlyLinear.from_linear(linear, device))


def replace_text_linears(model: nn.Module, quantize: Callable[[nn.Linear], nn.Module]) -> int:
    """Replaces each nn.Linear under `model.language_model.` by `quantize(linear)`; returns how many.

    One layer at a time, and the 16-bit weight is dropped as soon as its replacement exists, so the model never holds
    both copies of more than one layer: loaded on the CPU and quantized onto the GPU, the GPU only ever holds the
    quantized weights plus one layer's temporaries (fp32 copy, rounding): under 0.2 GB for the 4B's 9728 x 2560 MLP
    weights. Every weight-only precision (int8wo, int4, fp8) goes through here.
    """
    names = [n for n, m in model.named_modules() if n.startswith(TEXT_PREFIX) and type(m) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize(getattr(parent, child)))
    return len(names)
