"""torch.compile for the decode step: when to compile, inductor's on-disk cache, what keeps a step out of a graph."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Inductor's mode: "default" fuses the pointwise/norm/rope kernels around cuBLAS GEMMs. "max-autotune-no-cudagraphs"
# benchmarks GEMM templates per shape (minutes per bucket) for little gain on decode's skinny GEMMs.
COMPILE_MODE = "default"
# Whether batch buckets share one dynamic compile, and whether decode uses the split-KV kernel: the batch engine's
# options (engine/batch/options.py: dynamic_batch, decode_kernel).


def default_cache_dir() -> Path:
    """Where compiled kernels persist between runs: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/qwen3vl-webui/inductor."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3vl-webui" / "inductor"


def use_cache_dir(path: str | os.PathLike[str] | None) -> Path:
    """Points inductor's FX-graph, AOT and Triton caches at `path` (read by torch at each compile), and returns it.

    torch's own default lives under /tmp (gone after a reboot or a fresh container); a warm cache turns the
    ~minute of compiling per batch bucket into a re-trace plus cache loads.
    """
    target = Path(path) if path is not None else default_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    return target


def should_compile(requested: bool | None, device: str, precision: str) -> bool:
    """None means: on for CUDA bf16/fp16, the weight-only precisions (int8wo, int4, fp8: their matmuls are custom ops)
    and int4-bnb; off on CPU and for LLM.int8.

    nf4 compiles with graph breaks around the bitsandbytes matmuls: 256 tok/s at 1 stream against ~130 with
    graphs alone on an H100 (`git show 0ad4f07^:bench/matrix_int4.h100.json`), greedy tokens parting from `generate`'s only at exact
    ties of its logits. LLM.int8 with its default threshold cannot be captured and decodes eagerly.
    """
    if requested is not None:
        return requested
    return str(device).startswith("cuda") and precision in ("bf16", "fp16", "int8wo", "int4", "fp8", "int4-bnb")


def compile_decode(
    fn: Callable[..., Any], buckets: int, fullgraph: bool, dynamic_batch: bool = False, backend: str = "inductor"
) -> Callable[..., Any]:
    """`fn(rows)` compiled per distinct `rows`, or (`dynamic_batch`) once for 1 and once for every larger `rows`.

    Static (`dynamic=False`) never generalises a bucket. Dynamic (`dynamic=None`, dynamo's automatic dynamic
    shapes): the first call compiles for its `rows`; the first call with another `rows` recompiles with `rows`
    symbolic (guarded to >= 2: dynamo specialises sizes 0 and 1), which every later bucket reuses. So call it with
    the buckets in ascending order, 1 first.
    """
    import torch

    # One dynamo cache entry per bucket; the default limit (8) would silently fall back to eager past it.
    limit = buckets + 4
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    if getattr(config, name) < limit:
        setattr(config, name, limit)
    dynamic = None if dynamic_batch else False
    if backend != "inductor":  # a stand-in (tests: "eager", dynamo alone); modes are inductor's
        return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return torch.compile(fn, mode=COMPILE_MODE, fullgraph=fullgraph, dynamic=dynamic)


def graph_blocker(model: Any) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph, or None."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and getattr(getattr(module, "state", None), "threshold", 0.0) > 0:
            return (
                "bitsandbytes LLM.int8 with llm_int8_threshold > 0 tests its outliers on the host "
                "(`outliers.any()`), which CUDA graph capture forbids"
            )
    return None
