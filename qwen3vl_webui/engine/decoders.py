"""The two decode paths behind ChatService: plain `generate` per request, or one shared BatchEngine."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from qwen3vl_webui.engine.faults import FaultInjector
from qwen3vl_webui.engine.generate import stream_generate
from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
from qwen3vl_webui.telemetry import RequestStats
from qwen3vl_webui.weights.model import LoadedModel, release_cached_memory

log = logging.getLogger(__name__)

Stream = Iterator[tuple[str, "RequestStats | None"]]


class Decoder(Protocol):
    name: str
    max_context: int  # tokens per request the next `attach` sizes the KV slots for; 0: nothing to size (generate)
    remote: bool  # the weights load in a process of the decoder's, not here (the front end loads processor + config)
    pid: int | None  # that process, while it runs
    # How many worst-case chats at once reach this decoder's memory peak (the start-up warm-up runs that many of the
    # concurrency), or None: all of them.
    warmup_chats: int | None

    def attach(self, loaded: LoadedModel) -> None: ...  # a model was loaded: build what decoding needs

    def detach(self) -> None: ...  # the model is about to be unloaded: free what `attach` built

    def stream(
        self,
        loaded: LoadedModel,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        cancel: threading.Event,
        on_cancel: Callable[[RequestStats], None] | None = None,
        faults: FaultInjector | None = None,
    ) -> Stream: ...

    def describe(self) -> str: ...

    def loaded_view(self, loaded: LoadedModel) -> LoadedModel: ...  # `loaded` as the decoder loaded it

    def snapshot(self) -> Any: ...  # the batch engine's EngineSnapshot, or None

    def engine_figures(self) -> tuple[int, int] | None: ...  # (tokens a slot, retained-prefix slots), or None

    def memory(self) -> Any: ...  # another process's allocator figures (EngineStats), or None: this process's own

    def release(self) -> None: ...  # give cached memory back to the driver, wherever the model runs


class InProcess:
    """What the decoders that run the model in this process share."""

    remote = False
    pid: int | None = None
    warmup_chats: int | None = None

    def loaded_view(self, loaded: LoadedModel) -> LoadedModel:
        return loaded

    def snapshot(self) -> Any:
        return None

    def engine_figures(self) -> tuple[int, int] | None:
        return None

    def memory(self) -> Any:
        return None

    def release(self) -> None:
        release_cached_memory()


class GenerateDecoder(InProcess):
    """transformers' `generate` in a thread per request: simple, CPU-bound (~36 ms of Python a step)."""

    name = "generate"
    max_context = 0  # generate's KV cache grows with each request: nothing to size

    def attach(self, loaded: LoadedModel) -> None:
        pass

    def detach(self) -> None:
        pass

    def stream(self, loaded, prompt, sampling, cancel, on_cancel=None, faults=None) -> Stream:  # type: ignore[no-untyped-def]
        return stream_generate(loaded, prompt, sampling, cancel, on_cancel, faults)

    def describe(self) -> str:
        return "transformers generate (one request per thread)"


class BatchDecoder(InProcess):
    """One BatchEngine per loaded model: continuous batching, CUDA-graph decode on a GPU.

    Its KV memory is allocated at `attach`: `max_context` tokens for each of `max_batch` slots (the context cap times
    the concurrency: what the sliders allow is reserved up front; the model manager sets `max_context`), plus the
    retained-prefix slots for follow-up turns (a quarter as many, at least one, same size; the status line shows them).
    """

    name = "batch"

    @property
    def warmup_chats(self) -> int | None:
        """The engine's `PEAK_CHATS` while it serves (its fallback, generate, grows a cache per chat: all)."""
        from qwen3vl_webui.engine.batch.options import PEAK_CHATS

        return PEAK_CHATS if self.engine is not None else None

    def __init__(
        self, max_batch: int, max_context: int, cache_dir: str | None = None, compile_mode: str = "background"
    ) -> None:
        from qwen3vl_webui.engine.batch.options import compile_options

        self.max_batch = max_batch
        self.compile_options = compile_options(compile_mode)
        self.max_context = max_context
        # Inductor's compiled decode steps persist here: a restart compiles in seconds, not minutes.
        base = Path(cache_dir or Path.home() / ".cache" / "qwen3vl-webui")
        self.compile_cache_dir = base / "inductor"
        self.artifacts_dir = base / "compiled"  # portable compile artifacts (engine/batch/artifacts.py)
        self.kernel_cache_dir = base / "triton"  # our Triton kernels' builds (unless TRITON_CACHE_DIR is set)
        self.engine = None
        self.fallback: GenerateDecoder | None = None  # used when the engine cannot start
        self.reason = ""

    def attach(self, loaded: LoadedModel) -> None:
        from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions

        self.detach()
        budget = self.max_context * self.max_batch
        options = BatchOptions(
            max_batch=self.max_batch, token_budget=budget, compile_cache_dir=self.compile_cache_dir,
            artifacts_dir=self.artifacts_dir, kernel_cache_dir=self.kernel_cache_dir, **self.compile_options,
        )  # fmt: skip
        try:
            self.engine = BatchEngine(loaded, options)
        except Exception as exc:  # e.g. a kernel that cannot be captured: keep serving, eagerly
            log.warning("batch engine with CUDA graphs failed to start (%s); retrying without graphs", exc)
            try:
                eager = BatchOptions(max_batch=self.max_batch, token_budget=budget, cuda_graphs=False)
                self.engine = BatchEngine(loaded, eager)
                self.reason = f"CUDA graphs off: {exc}"
            except Exception as exc2:
                log.warning("batch engine failed to start (%s); using generate", exc2)
                self.fallback, self.reason = GenerateDecoder(), f"engine off: {exc2}"

    def detach(self) -> None:
        engine, self.engine = self.engine, None
        self.fallback, self.reason = None, ""
        if engine is not None:
            engine.close()
            del engine
            release_cached_memory()

    def stream(self, loaded, prompt, sampling, cancel, on_cancel=None, faults=None) -> Stream:  # type: ignore[no-untyped-def]
        # Fault injection (tests, device checks) hooks generate's path; the engine fails for real.
        if self.fallback is not None:
            return self.fallback.stream(loaded, prompt, sampling, cancel, on_cancel, faults)
        if self.engine is None or self.engine.loaded is not loaded:
            raise RuntimeError("the decode engine is not attached to the loaded model")
        return self.engine.submit(prompt, sampling, cancel, on_cancel)

    def snapshot(self) -> Any:
        return self.engine.snapshot() if self.engine is not None else None

    def engine_figures(self) -> tuple[int, int] | None:
        return (self.engine.max_len, self.engine.prefix_slots) if self.engine is not None else None

    def describe(self) -> str:
        if self.fallback is not None:
            return f"transformers generate ({self.reason})"
        if self.engine is None:
            return "batch engine (starting)"
        snap = self.engine.snapshot()
        graphs = f"graphs {list(snap.graph_buckets)}" if snap.graph_buckets else "no CUDA graphs"
        extra = f"; {self.reason}" if self.reason else ""
        wait = f" (oldest {snap.oldest_wait_s:.1f} s)" if snap.waiting else ""
        return (
            f"batch engine: {snap.active}/{snap.max_batch} decoding, {snap.prefilling} prefilling, "
            f"{snap.waiting} waiting{wait}, {snap.max_len:,} tokens a slot, {graphs}, decode: {snap.decode_path}{extra}"
        )


def make_decoder(
    kind: str,
    device: str,
    max_batch: int,
    max_context: int,
    cache_dir: str | None = None,
    attn: str = "sdpa",
    on_progress: Callable[[str], None] = lambda text: None,
    on_death: Callable[[int | None], None] = lambda code: None,
    compile_mode: str = "background",
) -> Decoder:
    """`auto`: the batch engine in its own process on a GPU (outside ZeroGPU, where the GPU exists only inside a
    decorated call); generate elsewhere. `batch-inproc`: the batch engine on a thread of this process (the layout
    before the engine process; kept to measure one against the other). `attn`, `on_progress` and `on_death` are the
    engine process's: how it loads, what it says while loading, what to do if it dies."""
    from qwen3vl_webui.zerogpu import on_zero_gpu

    if kind == "auto":
        kind = "batch" if device.startswith("cuda") and not on_zero_gpu() else "generate"
    if kind == "batch":
        from qwen3vl_webui.engine.remote.decoder import RemoteDecoder

        return RemoteDecoder(max_batch, max_context, cache_dir, attn, on_progress, on_death, compile_mode)
    if kind == "batch-inproc":
        return BatchDecoder(max_batch, max_context, cache_dir, compile_mode)
    return GenerateDecoder()
