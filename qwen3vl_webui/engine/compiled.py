"""torch.compile for the decode step: when to compile, inductor's on-disk cache, the decode attention route."""

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
    """None means: on for CUDA bf16/fp16, int8wo (its matmul is a custom op) and int4; off on CPU and for LLM.int8.

    nf4 compiles with graph breaks around the bitsandbytes matmuls: 256 tok/s at 1 stream against ~130 with
    graphs alone on an H100 (bench/matrix_int4.h100.json), greedy tokens parting from `generate`'s only at exact
    ties of its logits. LLM.int8 with its default threshold cannot be captured and decodes eagerly.
    """
    if requested is not None:
        return requested
    return str(device).startswith("cuda") and precision in ("bf16", "fp16", "int8wo", "int4")


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
    """transformers' SDPA attention, except for one-token queries: the decode kernel, else SDPA GQA-packed.

    With `kv_lengths` ([rows], keys 0..length-1 live; the batch engine passes it) a one-token query runs
    `attention.decode_attention`, which reads only each row's live keys and ignores `attention_mask`.
    Without it, one-token queries still run GQA-packed: transformers packs the 4 query heads of each KV head into
    the query-length axis, so SDPA reads K/V once, but not while dynamo traces (`is_torchdynamo_compiling`):
    compiled, it materialises `repeat_kv`, 4x the KV bytes per step (at 32 streams x 1k tokens, ~20 GB per step).
    Everything else is delegated, so prefill and plain `generate` are unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop("kv_lengths", None)
    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] == 1 and not dropout and kwargs.get("position_bias") is None
    if lengths is not None and plain:
        from qwen3vl_webui.engine.attention import decode_attention

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query, key, value, lengths, scale).transpose(1, 2), None
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if not plain or groups == 1 or per_head_mask:
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

    from qwen3vl_webui.engine.attention import decode_attention_op

    previous = text_config._attn_implementation
    if previous != "sdpa":
        return lambda: None
    decode_attention_op()  # registered before any trace (dynamo cannot trace a registration)
    AttentionInterface.register(PACKED_DECODE_ATTENTION, packed_decode_attention)
    AttentionMaskInterface.register(PACKED_DECODE_ATTENTION, sdpa_mask)  # prefill masks exactly as for "sdpa"
    text_config._attn_implementation = PACKED_DECODE_ATTENTION

    def restore() -> None:
        text_config._attn_implementation = previous

    return restore


def compile_decode(
    fn: Callable[[int], Any], buckets: int, fullgraph: bool, dynamic_batch: bool = False
) -> Callable[[int], Any]:
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
    return torch.compile(fn, mode=COMPILE_MODE, fullgraph=fullgraph, dynamic=None if dynamic_batch else False)


def graph_blocker(model: Any) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph, or None."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and getattr(getattr(module, "state", None), "threshold", 0.0) > 0:
            return (
                "bitsandbytes LLM.int8 with llm_int8_threshold > 0 tests its outliers on the host "
                "(`outliers.any()`), which CUDA graph capture forbids"
            )
    return None


def decode_kernel_blocker(device: str, text_config: Any, dtype: Any) -> str | None:
    """Why decode steps cannot use the split-KV Triton attention (attention.py) here, or None.

    It needs CUDA, transformers' SDPA as the text model's attention (the engine routes through
    `packed_decode_attention`), and a kernel that compiles and matches the torch reference on this GPU.
    """
    if not str(device).startswith("cuda"):
        return "not on CUDA"
    if text_config._attn_implementation not in ("sdpa", PACKED_DECODE_ATTENTION):
        return f"attention implementation {text_config._attn_implementation!r} is not sdpa"
    from qwen3vl_webui.engine.attention import kernel_blocker

    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return kernel_blocker(device, dtype, heads, kv_heads, head_dim)
