"""torch.compile for the decode step: when to compile, inductor's on-disk cache, a GQA-packed decode attention."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Registered in transformers' attention and mask interfaces; the text config points at it while an engine compiles.
PACKED_DECODE_ATTENTION = "qwen3vl_webui_sdpa"
# Inductor's mode: "default" fuses the pointwise/norm/rope kernels around cuBLAS GEMMs. "max-autotune-no-cudagraphs"
# benchmarks GEMM templates per shape (minutes per bucket) for little gain on decode's skinny GEMMs.
COMPILE_MODE = "default"


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
    """None means: on for CUDA bf16/fp16; off on CPU and for bitsandbytes models.

    nf4 compiles (with graph breaks) and measured 217 tok/s against 130 uncompiled on an H100, but its greedy
    tokens are not yet checked against `generate` there, so it stays opt-in (`compile=True`).
    """
    if requested is not None:
        return requested
    return str(device).startswith("cuda") and precision in ("bf16", "fp16")


def packed_decode_attention(
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
    """transformers' SDPA attention, except that one-token queries always run GQA-packed.

    transformers packs the 4 query heads of each KV head into the query-length axis for a one-token query, so
    SDPA reads K/V once, but not while dynamo traces (`is_torchdynamo_compiling`): compiled, it materialises
    `repeat_kv`, 4x the KV bytes per step (at 32 streams x 1k tokens, ~20 GB per step). Everything else is
    delegated, so prefill and plain `generate` are unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or groups == 1 or per_head_mask or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_packed_decode_attention(text_config: Any) -> Callable[[], None]:
    """Routes the text model's attention through `packed_decode_attention` (if it uses SDPA); returns the undo."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    previous = text_config._attn_implementation
    if previous != "sdpa":
        return lambda: None
    AttentionInterface.register(PACKED_DECODE_ATTENTION, packed_decode_attention)
    AttentionMaskInterface.register(PACKED_DECODE_ATTENTION, sdpa_mask)  # prefill masks exactly as for "sdpa"
    text_config._attn_implementation = PACKED_DECODE_ATTENTION

    def restore() -> None:
        text_config._attn_implementation = previous

    return restore


def compile_decode(fn: Callable[[int], Any], buckets: int, fullgraph: bool) -> Callable[[int], Any]:
    """`fn(rows)` compiled once per distinct `rows` (static shapes: `dynamic=False` never generalises a bucket)."""
    import torch

    # One dynamo cache entry per bucket; the default limit (8) would silently fall back to eager past it.
    limit = buckets + 4
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    if getattr(config, name) < limit:
        setattr(config, name, limit)
    return torch.compile(fn, mode=COMPILE_MODE, fullgraph=fullgraph, dynamic=False)


def graph_blocker(model: Any) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph, or None."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and getattr(getattr(module, "state", None), "threshold", 0.0) > 0:
            return (
                "bitsandbytes LLM.int8 with llm_int8_threshold > 0 tests its outliers on the host "
                "(`outliers.any()`), which CUDA graph capture forbids"
            )
    return None
