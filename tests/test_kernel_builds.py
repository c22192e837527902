"""kernels/builds.py on the CPU: the dry pass skips this thread's Triton launches (compile-only), leaves other threads'
alone and puts Triton back as it was. The builds themselves need a GPU (bench.kernel_cache_check --ab times them)."""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_the_dry_pass_compiles_instead_of_launching_on_its_thread_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime import _async_compile, jit

    from qwen3vl_webui.kernels import builds

    calls: list[tuple[str, bool, Any]] = []  # (thread, warmup, the async mode Triton's compile would submit to)

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        calls.append((threading.current_thread().name, warmup, _async_compile.active_mode.get()))

    monkeypatch.setattr(jit.JITFunction, "run", run)  # stands in for Triton's launch (no GPU here)
    kernel = jit.JITFunction.__new__(jit.JITFunction)
    with builds.dry_launches(workers=3) as dry:
        kernel.run(1, 2, grid=(1,), warmup=False)
        other = threading.Thread(target=lambda: kernel.run(3, grid=(1,), warmup=False), name="elsewhere")
        other.start()
        other.join()
        kernel.run(4, grid=(1,), warmup=False)
    kernel.run(5, grid=(1,), warmup=False)
    assert [(name, warmup) for name, warmup, _ in calls] == [
        ("MainThread", True), ("elsewhere", False), ("MainThread", True), ("MainThread", False)
    ]  # fmt: skip
    assert isinstance(calls[0][2], _async_compile.AsyncCompileMode) and calls[1][2] is None and calls[3][2] is None
    assert jit.JITFunction.run is run  # put back
    assert (dry.workers, dry.skipped, dry.built, dry.errors) == (3, 2, 0, [])


def test_parallel_builds_can_be_turned_off_and_size_their_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3vl_webui.kernels import builds

    monkeypatch.setenv("QWEN3VL_PARALLEL_BUILDS", "1")
    assert builds.available()  # this Triton has AsyncCompileMode
    monkeypatch.setenv("QWEN3VL_PARALLEL_BUILDS", "0")
    assert not builds.available()
    assert [builds.workers_for(n) for n in (None, 1, 2, 16, 128)] == [1, 1, 2, builds.MAX_WORKERS, builds.MAX_WORKERS]
