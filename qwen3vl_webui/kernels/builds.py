"""Our Triton kernels built in parallel, before their first launch (issue 14: a cold start's kernel builds).

A cold engine builds each of its Triton kernels (split-KV attention, the GEMV, the quantized products: 13-17
specialisations for one model and precision) when the warm-up first launches it, one after the other: 6 s of the
first-serving path's 10.7 s on an H100 (bench/results/h100/s17_cs_kc.json). A build is mostly ptxas (a child process)
and MLIR passes, which leave the GIL free: on the 2-core CPU VM eight of our kernels built for sm_90 took 3.9 s one
after the other and 2.2 s on two threads, each build as long as alone.

`dry_launches` runs a pass of the engine's own forward in which no Triton kernel is launched: each launch whose
kernel is not built yet hands the build to a pool of threads (Triton's `AsyncCompileMode`, the API torch's inductor
uses for the same purpose) and returns at once; leaving the block waits for every build. The pass's torch ops still
run on whatever the skipped kernels left in their outputs, so its results are garbage and must be dropped (the
engine's warm-up follows and zeroes the KV). The kernels, their arguments and specialisations are exactly what the
real launches will ask for, with no list of them to keep up to date.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_WORKERS = 8


@dataclass
class DryRun:
    """What a `dry_launches` block saw: kernel launches skipped, builds started, seconds spent waiting at the end."""

    workers: int
    skipped: int = 0
    built: int = 0
    wait_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def workers_for(cpus: int | None) -> int:
    """Threads for the builds: one per core, at most MAX_WORKERS, at least 1."""
    return max(1, min(MAX_WORKERS, cpus or 1))


def available() -> bool:
    """Whether this Triton can build kernels asynchronously (3.4 and later) and parallel builds are not turned off
    (`QWEN3VL_PARALLEL_BUILDS=0`: the kernels build one by one at their first launch, as before)."""
    if os.environ.get("QWEN3VL_PARALLEL_BUILDS", "1") == "0":
        return False
    try:
        from triton.runtime import _async_compile, jit
    except ImportError:
        return False
    return hasattr(_async_compile, "AsyncCompileMode") and hasattr(jit.JITFunction, "run")


@contextlib.contextmanager
def dry_launches(workers: int | None = None) -> Iterator[DryRun]:
    """Within the block, on this thread: Triton kernel launches are skipped and missing kernels built in `workers`
    threads (None: one per core, up to MAX_WORKERS); leaving it waits for the builds. A build that fails is left for
    the real launch, which builds it again and raises where it always did. Other threads launch as usual."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime import _async_compile, jit

    run = DryRun(workers=workers or workers_for(os.cpu_count()))
    owner = threading.get_ident()
    original = jit.JITFunction.run

    def skip_launch(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - Triton's signature
        if threading.get_ident() != owner:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        run.skipped += 1
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    with ThreadPoolExecutor(run.workers, thread_name_prefix="triton-build") as pool:
        mode = _async_compile.AsyncCompileMode(pool, ignore_errors=True)
        jit.JITFunction.run = skip_launch
        try:
            with mode:
                yield run
                run.built = len(mode.future_kernels)
                waited = time.perf_counter()
            run.wait_s = time.perf_counter() - waited
        finally:
            jit.JITFunction.run = original
        run.errors = [repr(f.exception()) for f in mode.raw_futures if f.done() and f.exception() is not None]
    if run.errors:
        log.warning("kernel builds: %d failed in the parallel pass (retried at first launch): %s", len(run.errors),
                    run.errors[0][:300])  # fmt: skip
