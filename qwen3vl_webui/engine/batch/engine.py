"""BatchEngine: continuous batching on one worker thread that owns the model; readers get streams of its outputs."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from qwen3vl_webui.engine.batch import artifacts, compiled, prefix
from qwen3vl_webui.engine.batch.core import EngineCore, EngineSnapshot
from qwen3vl_webui.engine.batch.options import BatchOptions
from qwen3vl_webui.engine.batch.prefix import Entry
from qwen3vl_webui.engine.batch.requests import (
    EngineOutputs,
    Request,
    RequestStreams,
    TokenStream,
    text_events,
    token_events,
)
from qwen3vl_webui.engine.request import PreparedPrompt, RequestError, SamplingParams
from qwen3vl_webui.engine.stops import StopMatcher, TokenBytes
from qwen3vl_webui.telemetry import RequestStats
from qwen3vl_webui.weights.model import LoadedModel

log = logging.getLogger(__name__)


def _graphs_attr(name: str, doc: str) -> Any:
    return property(lambda self: getattr(self.core.graphs, name), doc=doc)


# (artifacts folder, device, Triton cache) already unpacked in this process: the engine process does it before its
# weights load, for the kernels' early probes, and the engine then finds it done. Only what loaded is kept: a file
# absent or refused is looked at again (a compile may have saved one since).
_prepared_kernels: set[tuple[str, str, str]] = set()
_prepared_lock = threading.Lock()


def prepare_kernels(options: BatchOptions, device: str) -> str:
    """Points Triton's cache at `options.kernel_cache_dir` (unless TRITON_CACHE_DIR is set) and unpacks this GPU's
    carried kernel builds into it (artifacts.load_kernels): before any of our kernels is built, or they are built
    again where Triton looks by default and the saved artifacts miss them. Returns "off" (no artifacts folder, or
    not CUDA), "loaded", "absent" or "ignored"."""
    cache = compiled.use_kernel_cache_dir(options.kernel_cache_dir)
    if options.artifacts_dir is None or not str(device).startswith("cuda"):
        return "off"
    key = (str(options.artifacts_dir), str(device), str(cache))
    with _prepared_lock:
        if key in _prepared_kernels:
            return "loaded"
        answer = artifacts.load_kernels(options.artifacts_dir, artifacts.kernels_key(device))
        if answer == "loaded":
            _prepared_kernels.add(key)
        return answer


class BatchEngine:
    """Serves many generations at once from one worker thread that owns the model.

    KV memory is allocated once: `token_budget` tokens split into `max_batch` slots of `max_len` tokens.
    Prompts are prefilled through the real Qwen3-VL forward (vision tower, deepstack, mrope) between decode
    steps, at most `prefill_chunk` prompt tokens per step (short text prompts batched together, long ones in
    chunks, an image/video prompt's vision tower first), so a new prompt stalls running streams for one forward at
    most. All running requests decode together one token per step; they join and leave at step boundaries. On
    CUDA the decode step is compiled by inductor and replayed from graphs captured at start-up, one per batch-size
    bucket; start-up therefore compiles, and no request ever waits for a compile (graphs.py).

    Prefix reuse (kv.py): finished requests' KV is kept in up to `prefix_slots` entries; a new prompt starts from the
    retained entry sharing its longest token prefix with equal media (same pixels), so a chat's next turn, or a
    regenerated answer, prefills only what is new, and the vision tower runs only on media after the reused part.
    Entries are evicted least recently used, and dropped when a prefill runs out of memory.

    The worker's loop is EngineCore.step (core.py): scheduler (admission and prefill policy) -> runner (forwards)
    -> scheduler update; each step's outputs are plain data (EngineOutputs) routed here to each request's stream.
    """

    def __init__(
        self, loaded: LoadedModel, options: BatchOptions | None = None, compile_gate: threading.Semaphore | None = None
    ) -> None:
        """`compile_gate` (tests, benchmarks): the background compile takes one release of it per batch bucket."""
        self.loaded = loaded
        self.options = options if options is not None else BatchOptions()
        kernels = prepare_kernels(self.options, loaded.device)  # before any of our kernels is built
        self._streams = RequestStreams()
        self._listeners: list[Callable[[EngineOutputs], None]] = []
        self.core = EngineCore(loaded, self.options, self._publish)
        self.core.graphs.gate = compile_gate
        self.core.graphs.kernel_artifacts = kernels
        self._tokenizer = loaded.processor.tokenizer
        self._token_bytes = TokenBytes(self._tokenizer)
        self._startup_error: BaseException | None = None
        self._ready = threading.Event()
        # One persistent thread: CUDA graphs and their capture stream are per-thread state.
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    # ------------------------------------------------------------------ public API (any thread)

    def submit(
        self,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        cancel: threading.Event,
        on_cancel: Callable[[RequestStats], None] | None = None,
    ) -> Iterator[tuple[str, RequestStats | None]]:
        """Yields (text so far, None) as tokens arrive, then (full text, stats), like `stream_generate`.

        Closing the iterator or setting `cancel` removes the request at the next token boundary; after a
        close, `on_cancel` gets the stats of what was generated.
        """
        req, events = self._enqueue(prompt, sampling, cancel)
        texts = text_events(events, self._tokenizer, sampling.stop, cancel, req.stats, on_cancel)
        return TokenStream(texts, cancel)

    def submit_tokens(self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event) -> Iterator[int]:
        """Yields the generated token ids (eos included), for tests and benchmarks."""
        _req, events = self._enqueue(prompt, sampling, cancel)

        def tokens() -> Iterator[int]:
            try:
                for new, _stats in events:
                    yield from new
            finally:
                cancel.set()

        return TokenStream(tokens(), cancel)

    def snapshot(self) -> EngineSnapshot:
        return self.core.snapshot()

    def close(self, timeout: float = 60.0) -> None:
        """Stops the worker; running and waiting requests end with EngineClosed. Frees the KV memory."""
        self.core.scheduler.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ seams for tests and benchmarks

    @contextlib.contextmanager
    def hold_admission(self) -> Iterator[None]:
        """Requests submitted inside are admitted together (the worker admits none meanwhile)."""
        with self.core.scheduler.hold():
            yield

    def add_listener(self, listener: Callable[[EngineOutputs], None]) -> None:
        """`listener` gets every EngineOutputs the core publishes, on the worker thread, just before the streams."""
        self._listeners.append(listener)

    def forget_prefixes(self) -> None:
        """Drops the retained prefixes (call it while no request runs): the next prompts prefill whole."""
        self.core.kv.forget_prefixes()

    @property
    def prefix_entries(self) -> tuple[Entry, ...]:
        """The retained prefixes now (a snapshot; each holds its ids and, while kept, its KV)."""
        return self.core.kv.entries()

    @property
    def kv_slots(self) -> int:
        """KV slots of the running batch (retained prefixes are allocated outside them)."""
        return self.core.kv.slots

    # ------------------------------------------------------------------ figures

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    @property
    def max_len(self) -> int:
        return self.options.max_len

    @property
    def prefill_chunk(self) -> int:
        return self.options.prefill_chunk

    @property
    def prefix_slots(self) -> int:
        return self.options.retained_slots

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.core.graphs.buckets

    decode_path = _graphs_attr("decode_path", "How decode steps run, in words (the live panel shows it).")
    prefill_path = _graphs_attr("prefill_path", "How prompt chunks run, in words.")
    decode_attention = _graphs_attr("decode_attention", "The decode attention route, in words.")
    cuda_graphs = _graphs_attr("cuda_graphs", "Whether decode steps replay CUDA graphs.")
    compile = _graphs_attr("compile", "Whether the decode step is compiled.")
    compile_error = _graphs_attr("compile_error", "Why the decode step is not compiled after all, or None.")
    graph_error = _graphs_attr("graph_error", "Why decode steps are not graphed after all, or None.")
    prefill_error = _graphs_attr("prefill_error", "Why prompt chunks run eagerly after all, or None.")
    warmup_s = _graphs_attr("warmup_s", "Per bucket: seconds of compile (if any) and two warm-up steps.")
    compile_state = _graphs_attr("compile_state", "The decode step's compile: none, waiting, compiling, done, failed.")
    artifacts = _graphs_attr("artifacts", "Compile artifacts: off, absent, ignored, loaded, saved.")
    kernel_artifacts = _graphs_attr(
        "kernel_artifacts", "Our kernels' builds: off, absent, ignored, loaded, saving, saved."
    )
    prefill_warmup_s = _graphs_attr("prefill_warmup_s", "Seconds spent readying prompt chunks at start-up.")
    fused_groups = _graphs_attr("fused_groups", "Projection groups fused into one product.")
    gemv_linears = _graphs_attr("gemv_linears", "Linears routed through the Triton GEMV.")
    layers_path = _graphs_attr("layers_path", "The eager decode step's layers: fused kernels, or transformers' (why).")
    pdl_mode = _graphs_attr("pdl_mode", "Our kernels' programmatic dependent launch: 0 off, 1 early, 2 late.")
    pdl_name = _graphs_attr("pdl_name", "The same in words, with the one-row graph's mode where it differs.")

    # ------------------------------------------------------------------ reader side

    def add(
        self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event, request_id: int | None = None
    ) -> Request:
        """Queues a request whose outputs only listeners see (the engine process forwards them); any thread."""
        req = self._request(prompt, sampling, cancel, request_id)
        self.core.scheduler.add(req)
        return req

    @property
    def worker_thread(self) -> threading.Thread:
        """The one thread that owns the GPU: if it has died, the engine is gone."""
        return self._thread

    def _request(
        self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event, request_id: int | None
    ) -> Request:
        need = int(prompt.inputs["input_ids"].shape[1]) + sampling.max_new_tokens
        if need > self.max_len:
            raise RequestError(
                f"This request needs {need:,} tokens (prompt + max new tokens), but each of the engine's "
                f"{self.max_batch} slots holds {self.max_len:,}. Lower max new tokens or the context."
            )
        req = Request.of(prompt, sampling, cancel)
        if request_id is not None:
            req.id = request_id
        req.ids = prompt.inputs["input_ids"][0].cpu()
        if sampling.stop:
            req.stop = StopMatcher(sampling.stop, self._token_bytes)
        if self.core.kv.pool and (prompt.image_tokens or prompt.video_tokens):
            # Hashing the pixels is CPU work: done here, in the caller's thread, not on the GPU worker.
            config = self.loaded.model.config
            merge = config.vision_config.spatial_merge_size
            try:
                req.media = prefix.find_media(prompt.inputs, config.image_token_id, config.video_token_id, merge)
            except ValueError as exc:  # placeholders that do not fit the grids: the prefill will say so
                log.warning("prefix reuse off for a prompt: %s", exc)
                req.reusable = False
        return req

    def _enqueue(
        self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event
    ) -> tuple[Request, Iterator[tuple[list[int], RequestStats | None]]]:
        req = self._request(prompt, sampling, cancel, None)
        mailbox = self._streams.open(req.id)
        try:
            self.core.scheduler.add(req)
        except BaseException:
            self._streams.discard(req.id)
            raise
        return req, token_events(mailbox, self._thread.is_alive, self.options.poll_s)

    def _publish(self, outputs: EngineOutputs) -> None:
        for listener in self._listeners:  # first: what a listener saw is complete when a reader sees the end
            try:
                listener(outputs)
            except Exception:  # a probe's bug must not fail the requests of the step
                log.exception("engine output listener failed")
        self._streams.deliver(outputs)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        import torch

        device = torch.device(self.core.loaded.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # a new thread starts on cuda:0: streams and events on the model's GPU
        try:
            with torch.inference_mode():
                self.core.start()
        except BaseException as exc:  # reported by the constructor
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        with torch.inference_mode():
            while self.core.step():
                pass
        self.core.shutdown()
