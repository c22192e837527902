"""The 16-bit one-row GEMV (`matmul_triton.gemv16`) as the custom op `qwen3vl_webui::gemv16`, and where it can run.

cuBLAS's GEMV for the decode step's skinny shapes streamed ~70% of the copy bandwidth inside the step graph; the
Triton GEMV reads each weight once per row at the card's bandwidth. `fusion` routes one-row products here.
"""

from __future__ import annotations

import functools
from typing import Any

MAX_ROWS = 1  # the Triton GEMV reads the weights once per row: cuBLAS's GEMM wins from two rows on
OP_NAME = "qwen3vl_webui::gemv16"


@functools.cache
def _kernels() -> Any:
    """The Triton kernel module, or None if triton cannot be imported here (any error: the GEMV is optional)."""
    try:
        from qwen3vl_webui.kernels import matmul_triton
    except Exception:
        return None
    return matmul_triton


def gemv_impl(x: Any, weight: Any) -> Any:
    """`x [..., K] @ weightᵀ` through the Triton GEMV (x's rows made contiguous first)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    return _kernels().gemv16(x2, weight).reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def register_op() -> Any:
    """`torch.ops.qwen3vl_webui.gemv16(x, weight)`: opaque to dynamo (an extern kernel inductor calls), as int8wo's."""
    import torch

    # An explicit schema: this module's annotations are strings and torch is not among its globals.
    @torch.library.custom_op(OP_NAME, mutates_args=(), schema="(Tensor x, Tensor weight) -> Tensor")
    def gemv16(x: Any, weight: Any) -> Any:
        return gemv_impl(x, weight)

    @gemv16.register_fake
    def _(x: Any, weight: Any) -> Any:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return gemv16


def gemv_blocker(weight: Any) -> str | None:
    """Why one-row products on `weight` cannot use the Triton GEMV, or None."""
    import torch

    if not weight.is_cuda:
        return "not on CUDA"
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return f"weights are {weight.dtype}, not bf16/fp16"
    if _kernels() is None:
        return "triton is not importable"
    return probe(str(weight.device), weight.dtype)


@functools.cache
def probe(device: str, dtype: Any) -> str | None:
    """Runs the GEMV once on this GPU against F.linear (a GPU or triton that cannot build it is refused here, at
    start-up, rather than inside the decode warm-up)."""
    import torch
    import torch.nn.functional as F

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 512, device=device, generator=gen).to(dtype)
        w = torch.randn(96, 512, device=device, generator=gen).to(dtype)
        ref = F.linear(x.float(), w.float())
        err = float((_kernels().gemv16(x, w).float() - ref).norm() / ref.norm())
    except Exception as exc:
        return f"the Triton GEMV failed here: {type(exc).__name__}: {str(exc)[:200]}"
    return None if err < 1e-2 else f"the Triton GEMV disagreed with F.linear here (relative error {err:.3g})"


def product(gemv: bool) -> Any:
    """`x @ weightᵀ` for decode-sized `x`: the Triton GEMV for one row where `gemv`, else F.linear."""
    import torch
    import torch.nn.functional as F

    if not gemv:
        return lambda x, weight: F.linear(x, weight)  # looked up per call (tests count the calls)
    register_op()

    def one_row(x: Any, weight: Any) -> Any:
        if x.shape[:-1].numel() > MAX_ROWS:
            return F.linear(x, weight)
        if torch.compiler.is_dynamo_compiling():
            return torch.ops.qwen3vl_webui.gemv16(x, weight)
        return gemv_impl(x, weight)  # eager (graphs only): no custom-op dispatch

    return one_row
