"""INT4 weight-only ("int4", W4A16): the text model's Linear layers hold 4-bit weights in groups of G along K.

Each group of G input columns of an output row has a 16-bit scale and a 4-bit zero point: `w ≈ (q - zero) * scale`
with `q` in [0, 15] (asymmetric round-to-nearest over the group's min..max when quantized here; symmetric
checkpoints load with zero 8). Activations stay 16-bit, so like int8wo nothing is tested on the host and the decode
step compiles with `fullgraph=True` into CUDA graphs. The layout (w4a16_triton.py's docstring) is what pre-quantized
checkpoints are converted to (weights/checkpoints.py: compressed-tensors pack-quantized, AutoAWQ GEMM).

Matmul: one row on CUDA -> the Triton GEMV (0.5 byte read per weight); 2..SKINNY_MAX_ROWS rows -> the Triton
tensor-core kernel that unpacks in registers; more rows (prefill) -> the weight dequantized to 16 bits by a Triton
kernel, then cuBLAS. On a CPU (tests) or without Triton: dequantize in torch, then F.linear. Under torch.compile a
one-row product whose K is split (qkv, o, down at one stream) comes back as its fp32 partial sums, and the compiled
graph adds them where it consumes the product (`int4_linear_parts`), saving the reduction's own launch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qwen3vl_webui.kernels import w4_mma
from qwen3vl_webui.kernels.int4_words import PACK, dequantize_weight, pack, unpack  # noqa: F401 (this module's API)
from qwen3vl_webui.kernels.parts import compiled_product, decode_kernels, rows_of

OP_NAMESPACE = "qwen3vl_webui"
OP_NAME = "int4_linear"
GROUP_SIZE = 128  # the 4B's K (2560, 4096, 9728) are multiples; smaller shapes take the largest power of 2 dividing K
SKINNY_MAX_ROWS = 64  # the engine's decode buckets; prefill chunks go through dequantize + cuBLAS


def group_size_for(in_features: int, preferred: int = GROUP_SIZE) -> int:
    """`preferred` if it divides K, else the largest power of two >= 8 that does (K must be a multiple of 8)."""
    if in_features % PACK:
        raise ValueError(f"4-bit packing needs in_features divisible by {PACK}, got {in_features}")
    group = preferred
    while in_features % group:
        group //= 2
    return group


def quantize_weight(
    weight: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight [N, K]` -> (int32 qweight `[N, K/8]`, scales `[N, K/G]`, uint8 zeros `[N, K/G]`): asymmetric
    round-to-nearest per group. The scale is rounded to `scale_dtype` before `q` is computed, so dequantizing
    the stored values reproduces exactly what the rounding chose."""
    n, k = weight.shape
    w = weight.detach().to(torch.float32).reshape(n, k // group, group)
    lo = w.amin(dim=2).clamp(max=0.0)  # the range always holds 0, so zero weights stay exact
    hi = w.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).to(scale_dtype).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(w / scale[:, :, None] + zero[:, :, None]).clamp_(0, 15)
    return pack(q.reshape(n, k)), scale.to(scale_dtype), zero.to(torch.uint8)


def to_tinygemm(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, inner_k_tiles: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """This layout -> the operands of torch's own W4A16 kernel (`aten._weight_int4pack_mm`, "tinygemm", the one
    torchao's int4 weight-only path runs): the weight packed by `aten._convert_weight_to_int4pack` (its CPU twin on a
    CPU) and bf16 `scales_and_zeros [K/G, N, 2]`. tinygemm dequantizes `(q - 8) * scale + zero_f`, so
    `zero_f = (8 - zero) * scale`, rounded once to bf16 (at most 1/64 of a quantization step off; the rest exact).
    CUDA wants K a multiple of 16 x inner_k_tiles (2, 4 or 8) and N of 8; not yet used by `Int4Linear` (issue 13:
    `bench.quant_check --formats tinygemm` times it against this module's kernels first)."""
    q = unpack(qweight).to(torch.int32)
    if q.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), inner_k_tiles)
    else:  # even columns in the high nibble (torch >= 2.5's uint8 input)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    scale = scales.to(torch.float32)
    zero_f = (8.0 - zeros.to(torch.float32)) * scale
    pairs_sz = torch.stack([scales.to(torch.bfloat16), zero_f.to(torch.bfloat16)], dim=2)
    return packed, pairs_sz.transpose(0, 1).contiguous()


def tinygemm_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """`x @ W.T` through tinygemm (`to_tinygemm`'s operands): bf16 in, bf16 out."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    if x.device.type == "cpu":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm(rows, packed, group, scales_and_zeros)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@functools.cache
def _kernels() -> Any:
    """The Triton kernel module, or None where triton cannot be imported (the torch path is used then)."""
    try:
        from qwen3vl_webui.kernels import w4a16_triton
    except ImportError:
        return None
    return w4a16_triton


def int4_linear_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """`x [..., K] @ Wᵀ` in x's dtype for the W4 weight (qweight, scales, zeros)."""
    k, n = x.shape[-1], qweight.shape[0]
    group = k // scales.shape[1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    kernels = _kernels() if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else None
    if kernels is None:
        return F.linear(x2, dequantize_weight(qweight, scales, zeros, x.dtype)).reshape(*x.shape[:-1], n)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    if 0 < rows <= SKINNY_MAX_ROWS:
        return kernels.w4_matmul(x2, qweight, scales, zeros, group).reshape(*x.shape[:-1], n)
    weight = kernels.w4_dequantize(qweight, scales, zeros, group, x.dtype)
    return F.linear(x2, weight).reshape(*x.shape[:-1], n)


def parts_split(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """How many partial sums `int4_parts_impl` returns for `x` (its shape, device and dtype only): the Triton
    kernels' K split for a decode-sized product on CUDA, else 1."""
    kernels = decode_kernels(x, _kernels, SKINNY_MAX_ROWS)
    k = x.shape[-1]
    return 1 if kernels is None else kernels.w4_split(x.numel() // k, qweight.shape[0], k, k // scales.shape[1])


def int4_parts_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """`x [..., K] @ Wᵀ` as `[split, ..., N]` partial sums (`parts_split`): fp32 when split > 1, whose sum over the
    first dim is the product; the product itself in x's dtype when 1."""
    split = parts_split(x, qweight, scales)
    if split == 1:
        return int4_linear_impl(x, qweight, scales, zeros)[None]
    parts = _kernels().w4_partials(rows_of(x), qweight, scales, zeros, x.shape[-1] // scales.shape[1])
    return parts.reshape(split, *x.shape[:-1], qweight.shape[0])


@functools.cache
def register_op() -> Any:
    """`torch.ops.qwen3vl_webui.int4_linear`: opaque to dynamo (inductor calls it as an extern kernel), as int8wo's;
    and `int4_linear_parts`, the same product as its split-K partial sums, whose addition Int4Linear leaves to the
    compiled graph (fused into the kernel that consumes the product, not a launch of its own)."""

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
    def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return int4_linear_impl(x, qweight, scales, zeros)

    @int4_linear.register_fake
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_parts", mutates_args=())
    def int4_linear_parts(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return int4_parts_impl(x, qweight, scales, zeros)

    @int4_linear_parts.register_fake
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        split = parts_split(x, qweight, scales)  # one row, a static shape (Int4Linear.forward checks)
        return x.new_empty((split, *x.shape[:-1], qweight.shape[0]), dtype=x.dtype if split == 1 else torch.float32)

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_mma", mutates_args=())
    def int4_linear_mma(
        x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
    ) -> torch.Tensor:
        return w4_mma.linear(x, words, table, scales, zeros)

    @int4_linear_mma.register_fake
    def _(x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        return x.new_empty((*x.shape[:-1], words.shape[0]))

    @torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}_mma_parts", mutates_args=())
    def int4_linear_mma_parts(
        x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
    ) -> torch.Tensor:
        return w4_mma.parts(x, words, table, scales, zeros)

    @int4_linear_mma_parts.register_fake
    def _(x: torch.Tensor, words: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        k, n = x.shape[-1], words.shape[0]
        count = w4_mma.parts_count(x, n, k, k // scales.shape[1], scales.dtype)  # one row (compiled_product)
        dtype = torch.float32 if w4_mma.decodes(x, scales.dtype) else x.dtype
        return x.new_empty((count, *x.shape[:-1], n), dtype=dtype)

    return int4_linear


class Int4Linear(nn.Module):
    """nn.Linear's interface over the W4 buffers: `qweight` int32 `[out, in/8]`, `scales` `[out, in/G]` (16-bit),
    `zeros` uint8 `[out, in/G]`."""

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        n, words = qweight.shape
        if qweight.dtype != torch.int32 or scales.shape != zeros.shape or scales.shape[0] != n:
            raise ValueError(
                f"need int32 [out, in/8] qweight and matching [out, in/G] scales and zeros, got {qweight.dtype} "
                f"{tuple(qweight.shape)} / {tuple(scales.shape)} / {tuple(zeros.shape)}"
            )
        if (words * PACK) % scales.shape[1]:
            raise ValueError(f"{scales.shape[1]} groups do not divide in_features {words * PACK}")
        register_op()
        self.out_features, self.in_features = n, words * PACK
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros.to(torch.uint8))
        # kernels/w4_mma.py's layout (`use_mma_layout`): qweight's words reordered in place, and each group's scale and
        # zero in one 4-byte entry `[out/16, in/G, 16]`; None in this module's own layout
        self.register_buffer("table", None)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None, group: int | None = None) -> Int4Linear:
        """Quantizes `linear` (round-to-nearest) on `device` (default: where its weight is); the result lives there."""
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        scale_dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        qweight, scales, zeros = quantize_weight(weight, group or group_size_for(weight.shape[1]), scale_dtype)
        del weight
        bias = linear.bias.detach().to(qweight.device) if linear.bias is not None else None
        return cls(qweight, scales, zeros, bias)

    @classmethod
    def fuse(cls, layers: list[Int4Linear]) -> Int4Linear | None:
        """One layer over the rows of `layers` (q/k/v, gate/up), sharing their buffers (kernels/fusion.py)."""
        from qwen3vl_webui.kernels.int8 import fuse_rows

        mma = {layer.table is not None for layer in layers}
        if len(mma) != 1:
            return None
        fused = fuse_rows(layers, ("qweight", "scales", "zeros"))
        if fused is None:
            return None
        tables = fuse_rows(layers, ("table",), row_block=16) if mma == {True} else None  # a 16-row tile a row
        if mma == {True} and tables is None:
            return None
        module = cls(*fused)
        module.table = tables[0] if tables else None
        return module

    def use_mma_layout(self) -> None:
        """Into kernels/w4_mma.py's layout, in place (its products then run there): the words reordered within the
        memory they take, each group's scale and zero also as one 4-byte entry. Once; fused rows stay each layer's."""
        if self.table is not None:
            return
        if "_qwen3vl_group" in vars(self):  # a fused group's member: its rows would be reordered, the group's not
            raise RuntimeError("convert int4 weights before fusing them (kernels/fusion.py)")

        # an inference tensor (a model built in inference mode) is written in that mode; others outside it, so that
        # the table outlives it as the weights do
        with torch.inference_mode(self.qweight.is_inference()), torch.no_grad():
            table = w4_mma.repack_in_place(self.qweight, self.scales, self.zeros)
        self.table = table

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.table is not None:
            return w4_mma.dequantize(self.qweight, self.scales, self.zeros, dtype)
        return dequantize_weight(self.qweight, self.scales, self.zeros, dtype)

    def partials(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product as `[split, ..., N]` partial sums (`int4_parts_impl`, or w4_mma's) for a consumer that adds
        them itself (the fused decode layer's kernels, kernels/layer.py); None with a bias."""
        if self.bias is not None:
            return None
        if self.table is not None:
            return w4_mma.parts(x, self.qweight, self.table, self.scales, self.zeros)
        return int4_parts_impl(x, self.qweight, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is not None:  # kernels/w4_mma.py's layout
            buffers = (self.qweight, self.table, self.scales, self.zeros)
            if torch.compiler.is_dynamo_compiling():
                ops = torch.ops.qwen3vl_webui
                y = compiled_product(x, ops.int4_linear_mma, ops.int4_linear_mma_parts, *buffers)
            else:
                y = w4_mma.linear(x, *buffers)
        elif torch.compiler.is_dynamo_compiling():  # one row: the split-K partial sums added by the graph (parts.py)
            ops = torch.ops.qwen3vl_webui
            y = compiled_product(x, ops.int4_linear, ops.int4_linear_parts, self.qweight, self.scales, self.zeros)
        else:  # eager: skip the custom ops' dispatch
            y = int4_linear_impl(x, self.qweight, self.scales, self.zeros)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}" + (", layout=mma" if self.table is not None else "")
        )


def use_mma_layout(model: nn.Module, dtype: torch.dtype) -> int:
    """Every Int4Linear of `model` into kernels/w4_mma.py's layout, in place (`Int4Linear.use_mma_layout`: no memory
    but a 4-byte scale-and-zero a group), where its shape and group fit and its scales are `dtype` (the
    activations'): how many. Called by the loader where `w4_mma.wanted`, before the engine fuses any."""
    count = 0
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.scales.dtype == dtype and dtype in w4_mma.MAGIC:
            if w4_mma.supports(module.out_features, module.in_features, module.group_size):
                module.use_mma_layout()
                count += 1
    return count


def quantize_text_linears(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Replaces each nn.Linear of the text decoder by an Int4Linear on `device`, one layer at a time (as int8wo's)."""
    from qwen3vl_webui.kernels import int8

    return int8.replace_text_linears(model, lambda linear: Int4Linear.from_linear(linear, device))
