"""The batch engine behind ChatService when it runs in its own process: the Decoder the model manager attaches."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from qwen3vl_webui.engine.batch.options import PEAK_CHATS
from qwen3vl_webui.engine.remote.client import EngineProcess, EngineStartFailed
from qwen3vl_webui.engine.remote.protocol import EngineInfo

log = logging.getLogger(__name__)


class RemoteDecoder:
    """One engine process per loaded precision. `attach` starts it (the weights load there) and returns what it
    loaded; `detach` stops it (its exit gives all its GPU memory back); `stream` sends a prompt and streams text.

    Its KV memory is allocated once in that process: `max_context` tokens for each of `max_batch` slots, plus
    the retained-prefix slots for follow-up turns (a quarter as many, at least one)."""

    name = "batch"
    remote = True  # the weights load in the engine process, not here
    warmup_chats = PEAK_CHATS  # the batch engine's, in its process

    def __init__(
        self,
        max_batch: int,
        max_context: int,
        cache_dir: str | None = None,
        attn: str = "sdpa",
        on_progress: Callable[[str], None] = lambda text: None,
        on_death: Callable[[int | None], None] = lambda code: None,
        compile_mode: str = "background",
    ) -> None:
        from qwen3vl_webui.engine.batch.options import compile_options

        self.max_batch = max_batch
        self.compile_options = compile_options(compile_mode)
        self.max_context = max_context
        self.attn = attn
        # Inductor's compiled decode steps persist here: a restart compiles in seconds, not minutes.
        base = Path(cache_dir or Path.home() / ".cache" / "qwen3vl-webui")
        self.compile_cache_dir = str(base / "inductor")
        # Portable compile artifacts, one file per setup (engine/batch/artifacts.py): written after the first compile,
        # read at the next start (or written ahead of time by `python -m qwen3vl_webui.precompile`).
        self.artifacts_dir = str(base / "compiled")
        self.kernel_cache_dir = str(base / "triton")  # our Triton kernels' builds (unless TRITON_CACHE_DIR is set)
        self.on_progress = on_progress
        self.on_death = on_death
        self.process: EngineProcess | None = None
        self.info: EngineInfo | None = None
        self._lock = threading.Lock()
        self._early: tuple[dict[str, Any], Future[EngineInfo]] | None = None
        self._closed = False  # shutting down: a start that ends now stops its process

    def spec(self, source: str, precision: str, device: str) -> dict[str, Any]:
        options = {
            "max_batch": self.max_batch,
            "token_budget": self.max_context * self.max_batch,
            "compile_cache_dir": self.compile_cache_dir,
            "artifacts_dir": self.artifacts_dir,
            "kernel_cache_dir": self.kernel_cache_dir,
            **self.compile_options,
        }
        return {"source": source, "precision": precision, "device": device, "attn": self.attn, "options": options}

    def start(self, source: str, precision: str, device: str) -> EngineInfo:
        """Starts an engine process for this model and precision; blocks until it serves. EngineStartFailed if not."""
        process = EngineProcess(self.spec(source, precision, device), self.on_progress, self._died)
        info = process.start()
        with self._lock:
            closed = self._closed
            if not closed:
                self.process, self.info = process, info
        if closed:  # the app began shutting down while this process started
            process.stop()
            raise EngineStartFailed("the app is shutting down")
        log.info("engine process %d serves %s (%s) on %s", info.pid, info.source, info.label, info.device)
        return info

    def start_early(self, source: str, precision: str, device: str) -> None:
        """Starts the engine process on a thread now, while the front end builds its page and loads the processor
        (on an H200 its start, imports and CUDA set-up to graphs captured, took ~24 s after the ~25 s the front end
        took first); `attach` with the same model then waits for it instead of starting another."""
        self.cancel_early()  # an early start whose model was not loaded after all (e.g. the demo instead)
        self.detach()
        spec = self.spec(source, precision, device)
        future: Future[EngineInfo] = Future()

        def run() -> None:
            try:
                future.set_result(self.start(source, precision, device))
            except BaseException as exc:  # noqa: BLE001 - handed to attach, which raises it as start would
                future.set_exception(exc)

        self._early = (spec, future)
        threading.Thread(target=run, name="engine-start", daemon=True).start()

    def cancel_early(self) -> None:
        """Stops the process `start_early` started (once it has started: a start cannot be interrupted)."""
        early, self._early = self._early, None
        if early is not None:
            with contextlib.suppress(BaseException):
                early[1].result()
            self.detach()

    def close(self) -> None:
        """The app is shutting down: stops the engine process, and one still starting as soon as it has started."""
        with self._lock:
            self._closed = True
        early, self._early = self._early, None
        self.detach()
        if early is not None:  # its start ends by stopping the process (`start` sees _closed)
            with contextlib.suppress(BaseException):
                early[1].result(timeout=0)

    def _died(self, code: int | None) -> None:
        with self._lock:
            self.process = None
        self.on_death(code)

    # -- the Decoder protocol -----------------------------------------------------------------------
    def attach(self, loaded: Any) -> None:
        """Starts the engine process for `loaded` (the front end's view: processor and config, no weights), or waits
        for the one `start_early` started for it (another model or precision: that one is stopped once started)."""
        early, self._early = self._early, None
        if early is not None:
            spec, future = early
            try:
                future.result()
            except BaseException:
                if spec == self.spec(loaded.source, loaded.precision, loaded.device):
                    raise
            else:  # (one that died since it started, e.g. while the front end still loaded: started again below)
                process = self.process
                if spec == self.spec(loaded.source, loaded.precision, loaded.device) and process and process.alive:
                    return
        self.detach()
        self.start(loaded.source, loaded.precision, loaded.device)

    def loaded_view(self, loaded: Any) -> Any:
        """`loaded` with what the engine process reported it loaded (precision, load time, weights' size)."""
        from dataclasses import replace

        info = self.info
        if info is None:
            return loaded
        return replace(loaded, precision=info.precision, load_seconds=info.load_seconds, weights_bytes=info.weights_bytes)

    def detach(self) -> None:
        with self._lock:
            process, self.process = self.process, None
        if process is not None:
            process.stop()

    def stream(self, loaded, prompt, sampling, cancel, on_cancel=None, faults=None):  # type: ignore[no-untyped-def]
        process = self.process
        if process is None:
            from qwen3vl_webui.engine.remote.protocol import EngineDied

            raise EngineDied("The engine process is not running; it is being restarted. Please try again.")
        return process.submit(prompt, sampling, loaded.processor.tokenizer, cancel, on_cancel)

    def describe(self) -> str:
        process = self.process
        if process is None or self.info is None:
            return "batch engine process (starting)"
        stats = process.stats
        head = f"batch engine in process {process.pid}"
        if stats is None:
            return head
        snap = stats.snapshot
        graphs = f"graphs {list(snap.graph_buckets)}" if snap.graph_buckets else "no CUDA graphs"
        wait = f" (oldest {snap.oldest_wait_s:.1f} s)" if snap.waiting else ""
        note = f"; {self.info.note}" if self.info.note else ""
        return (
            f"{head}: {snap.active}/{snap.max_batch} decoding, {snap.prefilling} prefilling, {snap.waiting} waiting"
            f"{wait}, {snap.max_len:,} tokens a slot, {graphs}, decode: {snap.decode_path}{note}"
        )

    # -- what the service reads ---------------------------------------------------------------------
    def snapshot(self) -> Any:
        """The engine's EngineSnapshot as of its last report (every half second), or None."""
        process = self.process
        return process.stats.snapshot if process is not None and process.stats is not None else None

    def engine_figures(self) -> tuple[int, int] | None:
        info = self.info
        return (info.max_len, info.prefix_slots) if info is not None else None

    def memory(self) -> Any:
        """The engine process's EngineStats (its torch allocator's figures and free memory), or None."""
        process = self.process
        return process.stats if process is not None else None

    def release(self) -> None:
        process = self.process
        if process is not None:
            process.send(("release",))

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None else None


__all__ = ["EngineStartFailed", "RemoteDecoder"]
