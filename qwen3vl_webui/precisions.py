"""The weight precisions, in one table: the flags, the loader, the planner, --random-weights and the UI read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    label: str  # the status line's words for a model loaded in it
    bits: int  # bits per text weight
    menu: str | None = None  # the operator's reload menu; None: not offered there
    flag: bool = True  # --precision takes it (fp32 is what "auto" means on a CPU, not a choice)
    bitsandbytes: bool = False  # quantized by bitsandbytes while a checkpoint loads (needs the package, no CUDA graph
    # capture for LLM.int8's default threshold)
    in_memory: bool = True  # --random-weights can build it (bitsandbytes quantizes only while loading a checkpoint)
    weight_only: str | None = None  # the kernels module (qwen3vl_webui.kernels.<name>) whose Linears replace the
    # text model's: quantized on load from 16-bit weights, or loaded pre-quantized (weights/checkpoints.py)
    min_capability: tuple[int, int] | None = None  # the GPU's compute capability it needs (fp8: 8.9)


TABLE: tuple[Precision, ...] = (
    Precision("bf16", "BF16", 16, menu="BF16"),
    Precision("fp16", "FP16", 16, menu="FP16"),
    Precision("fp32", "FP32 (CPU)", 32, flag=False),
    Precision("fp8", "FP8 (e4m3 weights, 128x128 block scales, bf16 compute)", 8, menu="FP8 (block-scaled, fast)",
              weight_only="fp8", min_capability=(8, 9)),  # fmt: skip
    Precision("int8", "INT8 (bitsandbytes LLM.int8, fp16 compute)", 8, menu="INT8 (LLM.int8)", bitsandbytes=True,
              in_memory=False),  # fmt: skip
    Precision("int8wo", "INT8 weight-only (per-channel int8 weights, bf16 compute)", 8,
              menu="INT8 weight-only (fast, bf16 compute)", weight_only="int8"),  # fmt: skip
    Precision("int4", "INT4 (W4A16: 4-bit weights, a scale and zero point per group, bf16 compute)", 4, menu="INT4 (W4A16, fast)",
              weight_only="int4"),  # fmt: skip
    Precision("int4-bnb", "INT4 (bitsandbytes nf4, bf16 compute)", 4, menu="INT4 (bitsandbytes nf4)", bitsandbytes=True,
              in_memory=False),  # fmt: skip
)
BY_NAME = {p.name: p for p in TABLE}
# `--precision auto` on a GPU: the first of these that fits and can run there, fastest first by the engine's measured
# tok/s (bench/RESULTS.md): bf16 332 / 5,294 tok/s at 1 / 32 streams on an H200, fp8 215 / 3,945, int4 (ours) 119 /
# 2,355 with the first W4A16 kernels; int8wo 311 / 3,713 against bf16's 268 / 4,113 on an H100; bitsandbytes last.
# Session 20's H100 (the swap kernels tuned): bf16 262 / 4,184, fp8 294 / 4,419, int4 312 / 4,026. Session 21's H100
# (tile 6, fp8's atomic GEMV): bf16 262 / 4,369, fp8 328 / 4,474, int8wo 328 / 4,418, int4 312 / 4,898. fp8 has led
# at both loads in two runs, but on one GPU model; bf16 stays first until another FP8 GPU (an H200 run) confirms it,
# since auto would then quantize a model that fits unquantized.
AUTO_ORDER = ("bf16", "int8wo", "fp8", "int4", "int4-bnb", "int8")

# What a model can be loaded in (the planner's precisions).
LOADED = tuple(p.name for p in TABLE)
# What --precision takes: "auto" (the best that fits; fp32 on a CPU) and the rest.
CHOICES = ("auto", *(p.name for p in TABLE if p.flag))
# What --random-weights builds in memory.
IN_MEMORY = tuple(p.name for p in TABLE if p.in_memory)
# The operator's reload menu, fewest bits first: (label, name).
MENU = tuple((p.menu, p.name) for p in sorted(TABLE, key=lambda p: p.bits) if p.menu)


def label(name: str) -> str:
    """The status line's words for `name` (the name itself if unknown)."""
    precision = BY_NAME.get(name)
    return precision.label if precision else name


def needs_bitsandbytes(name: str) -> bool:
    precision = BY_NAME.get(name)
    return bool(precision and precision.bitsandbytes)


def weight_only_module(name: str) -> str | None:
    """`qwen3vl_webui.kernels.<module>` that quantizes the text Linears for `name`, or None."""
    precision = BY_NAME.get(name)
    return precision.weight_only if precision else None


def capability_blocker(name: str, capability: tuple[int, int] | None) -> str | None:
    """Why `name` cannot run on a GPU of `capability` (None: it can, or no GPU is involved)."""
    precision = BY_NAME.get(name)
    need = precision.min_capability if precision else None
    if need is None or capability is None or tuple(capability) >= need:
        return None
    return (
        f"{label(name)} needs a GPU of compute capability {need[0]}.{need[1]} or newer (L4, RTX 4090, H100, H200); "
        f"this one is {capability[0]}.{capability[1]}. Use int8wo or int4 instead."
    )
