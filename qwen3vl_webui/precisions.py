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


TABLE: tuple[Precision, ...] = (
    Precision("bf16", "BF16", 16, menu="BF16"),
    Precision("fp16", "FP16", 16, menu="FP16"),
    Precision("fp32", "FP32 (CPU)", 32, flag=False),
    Precision("int8", "INT8 (bitsandbytes LLM.int8, fp16 compute)", 8, menu="INT8 (LLM.int8)", bitsandbytes=True,
              in_memory=False),  # fmt: skip
    Precision("int8wo", "INT8 weight-only (per-channel int8 weights, bf16 compute)", 8,
              menu="INT8 weight-only (fast, bf16 compute)"),  # fmt: skip
    Precision("int4", "INT4 (bitsandbytes nf4, bf16 compute)", 4, menu="INT4 (nf4)", bitsandbytes=True, in_memory=False),
)
BY_NAME = {p.name: p for p in TABLE}

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
