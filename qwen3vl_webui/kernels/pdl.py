"""Programmatic dependent launch (PDL) for the decode step's Triton kernels, on GPUs that have it (Hopper and later).

A decode step at one stream is ~380 small kernels in a CUDA graph, and between two of them the GPU idles while the
next one launches and its programs are placed: ~0.5-0.9 ms of a 2.5-3.4 ms step on an H200 (bench/RESULTS.md,
session 25's step profile). Launched with PDL, a kernel may start before the one before it has finished: its
programs are placed and wait at `griddepcontrol.wait` (`start`), which returns once the kernel before has finished
and its writes are visible. Each of our kernels waits there before its first memory access, so nothing reads or
writes early; what overlaps is the launch and the placement. Mode 1 ("early") lets the next kernel launch as soon as
every program of this one has started; mode 2 ("late") once each has done its work, before its stores (a launch
that waits holds a program's registers and shared memory on an SM; early suits kernels of one wave).

Measured on H100s (bench/RESULTS.md, sessions 26 and 27; the engine at 1 / 32 streams, PDL off -> late): bf16 270 ->
279 tok/s and 273 -> 285, int4 379 -> 410 and 393 -> 424 (5,298 -> 5,310 at 32), but fp8 365 -> 333 and 372 -> 353
at one stream. fp8's loss is in its own kernels (0.99x with them launched without, `QWEN3VL_PDL_SKIP=fp8`), not in
the zero fill of its atomic GEMV (`splitk.zeros`, ours where PDL is on: it stayed at 0.95x). In kernels/fp8_mma.py's
layout (its CUDA kernel loads its first weights before the wait) fp8 gains instead: 1.08x at one stream (session 30). Early mode gained more
at one stream (bf16 1.08x) and lost 1-2% at 32. So the engine turns it on for the precisions where it was measured
to gain (`use_for`): early in the one-row decode graph, late in the others (`step_rows`: each batch size's graph
keeps the mode it was captured with; session 28 measured the combination against late everywhere: 1.025x int4 and
1.024x bf16 at one stream, the same at 32), and leaves it off for the others. QWEN3VL_PDL set to a mode applies
that mode to every precision and graph.

Every kernel that takes PDL must call `start(PDL)` before touching memory, and `finish(PDL)` before its stores;
a kernel launched without it (cuBLAS, torch's ops, inductor's) is ordered after the one before as usual, and the one
after it waits for it in full, so kernels of both kinds mix in one stream or graph. QWEN3VL_PDL: 0 off, 1 early,
2 late (the default is bench/RESULTS.md's pick). Off where the GPU lacks it (compute capability below 9), where
Triton lacks it, and on a CPU (Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

import triton
import triton.language as tl

try:  # Triton 3.3+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: PDL stays off (`available`), the names are never compiled
    gdc_launch_dependents = gdc_wait = None

OFF, EARLY, LATE = 0, 1, 2
NAMES = ("off", "early", "late")
DEFAULT = LATE
# Precisions whose decode gained with it (sessions 26-27: bf16, int4; fp16 runs bf16's kernels, not measured itself).
MEASURED_GAIN = frozenset({"bf16", "fp16", "int4"})
# The one-row decode graph's mode where PDL is on. At one stream (that graph alone) early mode gained bf16 1.08x
# against late's 1.04x and int4 1.08x against 1.08x; at 32 streams it lost 1-2% where late did not (session 27, H100).
ONE_ROW = EARLY
_default = OFF  # the mode where QWEN3VL_PDL names none: off until `use_for` names the loaded precision
_one_row = OFF  # the same, for the launches of a one-row decode step (`step_rows`)
_step = threading.local()  # .rows: the decode step whose graph this thread builds, warms up or captures (0: none)


@triton.jit
def start(PDL: tl.constexpr):
    """At a kernel's top, before any load or store: wait for the kernel before (mode 1: then let the next launch)."""
    if PDL != 0:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()


@triton.jit
def finish(PDL: tl.constexpr):
    """Before a kernel's stores (mode 2): the next kernel may launch now; it waits for this one's end to read."""
    if PDL == 2:
        gdc_launch_dependents()


def use_for(precision: str, mma_layout: bool | None = None) -> int:
    """The engine loaded `precision`: PDL (DEFAULT's mode) where it was measured to gain, else off, unless
    QWEN3VL_PDL names a mode. fp8 gained in kernels/fp8_mma.py's layout only (session 30, H100: 443.2 tok/s with
    PDL late against 409.6 off at one stream; its Triton kernels had lost): `mma_layout` says whether its weights
    took it (the engine counts them; the worker's probes before the weights load ask `fp8_mma.wanted`). Returns the
    mode its kernels launch with from now on."""
    global _default, _one_row
    gained = str(precision) in MEASURED_GAIN or (str(precision) == "fp8" and bool(mma_layout))
    _default, _one_row = (DEFAULT, ONE_ROW) if gained else (OFF, OFF)
    return mode()


@contextlib.contextmanager
def step_rows(rows: int) -> Iterator[None]:
    """The launches made in this block on this thread are a decode step of `rows` rows (DecodeGraphs wraps each batch
    size's kernel builds, warm-up and capture): a graph keeps the mode its launches were captured with, so the
    one-row graph runs ONE_ROW's mode and the others the default."""
    before = getattr(_step, "rows", 0)
    _step.rows = rows
    try:
        yield
    finally:
        _step.rows = before


def _forced() -> int | None:
    """QWEN3VL_PDL as a mode (0, 1, 2), or None where it names none (unset, or anything else)."""
    value = os.environ.get("QWEN3VL_PDL", "").strip()
    return int(value) if value in ("0", "1", "2") else None


def describe() -> str:
    """The modes in words, for the start-up line: e.g. "late; early at one row"."""
    if _forced() is not None or _one_row == _default:
        return NAMES[mode()]
    return f"{NAMES[_default]}; {NAMES[_one_row]} at one row"


def mode() -> int:
    """QWEN3VL_PDL's mode where it names one; else the loaded precision's (`use_for`), for a one-row decode step's
    launches (`step_rows`) its one-row mode."""
    forced = _forced()
    if forced is not None:
        return forced
    return _one_row if getattr(_step, "rows", 0) == 1 else _default


@functools.cache
def available(device_index: int) -> bool:
    """Whether this Triton launches with PDL and this GPU has it (sm_90 and later)."""
    if gdc_wait is None:
        return False
    try:
        import torch
        from triton.backends.nvidia.compiler import CUDAOptions

        if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
            return False
        return torch.cuda.get_device_capability(device_index) >= (9, 0)
    except Exception:
        return False


@functools.cache
def _skipped() -> frozenset[str]:
    """QWEN3VL_PDL_SKIP: kernel families (comma list: layer, attention, gemv, int4, fp8, splitk) launched without."""
    return frozenset(name.strip() for name in os.environ.get("QWEN3VL_PDL_SKIP", "").split(",") if name.strip())


def args(tensor: Any, family: str = "") -> dict[str, Any]:
    """The launch arguments for a kernel of `family` on `tensor`'s device: `PDL` (the kernel's constexpr) and
    Triton's `launch_pdl`, or none (the kernels' PDL defaults to 0) where PDL is off."""
    if tensor.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    chosen = mode()
    if chosen == OFF or family in _skipped() or not available(tensor.get_device()):
        return {}
    return {"PDL": chosen, "launch_pdl": True}
