"""Continuous-batching decode engine: one worker thread, a slot KV cache, compiled CUDA-graph decode steps."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen3vl_webui.engine import compiled, fusion, prefill, vision
from qwen3vl_webui.engine.generation import PreparedPrompt, RequestError, SamplingParams
from qwen3vl_webui.engine.loading import LoadedModel
from qwen3vl_webui.engine.prefix import Medium, PrefixPool, find_media
from qwen3vl_webui.engine.stops import StopMatcher, StopText, TokenBytes
from qwen3vl_webui.telemetry import RequestStats

log = logging.getLogger(__name__)

# Batch sizes with a captured decode graph; a step of n requests replays the smallest bucket >= n.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)
# KV rows per slot are rounded to this (SDPA's memory-efficient kernel wants 16-aligned masks).
LEN_ALIGN = 64
# Prompt tokens one prefill forward may take between two decode steps (about 60 ms of H100 time in bf16):
# bounds how long a new prompt stalls the running streams.
PREFILL_CHUNK = 2048
# Padded lengths of the first-chunk prefill graphs (engine/prefill.py), capped at the engine's prefill chunk: every
# multiple of LEN_ALIGN, so a prompt pays at most 63 tokens of padding (capturing one takes ~0.1 s on an H100).
PREFILL_GRAPH_STEP = 64
# Short text prompts batch up to this many times PREFILL_CHUNK tokens in one forward while no stream is mid-answer.
IDLE_PREFILL_FACTOR = 4
# A burst's first decode step waits for at most this many prefill forwards (32 prompts of 512 tokens: 2), so
# arrivals that keep trickling in cannot hold the first streams' second token (nor the GIL) for long.
BURST_FORWARDS = 2
# How often a waiting reader checks that the worker is still alive.
POLL_S = 1.0
# Retained-KV slots per running slot when `prefix_slots` is not given (rounded up, so at least one).
PREFIX_SHARE = 0.25


class EngineClosed(RuntimeError):
    """The engine was closed (model switch, shutdown) while the request waited or ran."""


@dataclass(frozen=True)
class EngineSnapshot:
    """Load of the engine for the live panel (plain data)."""

    active: int
    waiting: int
    max_batch: int
    max_len: int
    peak_active: int
    steps: int
    tokens: int
    oldest_wait_s: float
    graph_buckets: tuple[int, ...]
    startup_s: float
    prefilling: int = 0  # admitted requests whose prompt is still being prefilled (chunk by chunk)
    decode_path: str = ""  # e.g. "cuda graphs + torch.compile", "cuda graphs", "eager (why)"
    prefill_path: str = ""  # "torch.compile" or "eager (why)"
    prefill_tokens: int = 0  # prompt tokens run through prefill forwards (reused ones are not)
    prefix_slots: int = 0  # KV slots that keep finished requests for reuse (0: reuse off)
    prefix_entries: int = 0  # of them, holding a finished request now
    prefix_hits: int = 0  # prompts that started from a retained prefix
    prefix_tokens_reused: int = 0  # prompt tokens taken from retained KV instead of prefilled
    prefix_evicted: int = 0  # entries pushed out (least recently used) to keep a newer one
    prefix_dropped: int = 0  # entries dropped because a prefill ran out of memory


@dataclass(eq=False)
class _Request:
    prompt: PreparedPrompt
    sampling: SamplingParams
    cancel: threading.Event
    submitted_at: float
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    tokens: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens held in its KV slot (prompt + fed-back tokens)
    delta: int = 0  # mrope delta: rope position minus sequence position for generated tokens
    generator: Any = None
    first_at: float | None = None
    last_at: float | None = None
    ids: Any = None  # the prompt's token ids, 1-D on the CPU
    media: tuple[Medium, ...] = ()  # its images and videos (found only when prefix reuse is on)
    reusable: bool = True  # False: its media could not be told apart, so it neither reuses nor is kept
    stop: StopMatcher | None = None

    def stats(self) -> RequestStats:
        first = self.first_at or time.perf_counter()
        return RequestStats(
            prompt_text_tokens=self.prompt.text_tokens,
            prompt_image_tokens=self.prompt.image_tokens,
            prompt_video_tokens=self.prompt.video_tokens,
            new_tokens=len(self.tokens),
            ttft_s=first - self.submitted_at,
            decode_s=(self.last_at or first) - first,
        )


@dataclass(eq=False)
class _Prefill:
    """A request between admission and its first token.

    A long text prompt fills `kv` chunk by chunk; an image/video prompt first runs the vision tower alone
    (`media`: per kind, the merged embeddings and the stacked deepstack features of all its media), then its
    text model in chunks, each chunk taking the visual features of the placeholder tokens it holds.
    """

    req: _Request
    length: int
    multimodal: bool
    kv: Any = None  # the prompt's keys/values [length, layers, 2, kv_heads, head_dim], filled up to `done`; allocated
    # at a prefix hit or when a first chunk leaves more to go (engine/prefill.py's layout)
    ids: Any = None  # input ids on the device, once chunking started
    positions: Any = None  # [4, 1, length]: text row + the 3 mrope rows
    delta: int = 0
    media: dict[str, tuple[Any, Any]] | None = None
    done: int = 0  # prompt tokens already in `kv`
    base: int = 0  # of them, copied from a retained prefix: the vision tower runs only on media after it
    retried: bool = False  # already retried once after running out of memory

    @staticmethod
    def of(req: _Request) -> _Prefill:
        inputs = req.prompt.inputs
        media = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        return _Prefill(req, int(inputs["input_ids"].shape[1]), media)


class _SlotCache:
    """The `past_key_values` of one decode step over slots [0, rows): writes each row at its own position.

    Duck-typed for transformers' attention layers, which only call `update`. Each layer's K (and V) is one flat
    tensor [slots x kv_heads x max_len, head_dim] written with `index_copy_` on the tensor itself: inductor then
    updates it in place (a write through a view of a graph input is functionalised into a copy of the whole
    KV per layer). Returns the [rows, kv_heads, max_len, head_dim] view; the 4D mask hides each row's tail.
    """

    def __init__(self, layers: list[tuple[Any, Any]], shape: tuple[int, int, int, int], rows: int, index: Any) -> None:
        self._layers, self._shape, self._rows, self._index = layers, shape, rows, index

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = self._layers[layer_idx]
        dim = self._shape[-1]
        keys.index_copy_(0, self._index, key_states.reshape(-1, dim))  # [rows, heads, 1, dim] -> rows x heads
        values.index_copy_(0, self._index, value_states.reshape(-1, dim))
        return keys.view(self._shape)[: self._rows], values.view(self._shape)[: self._rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never consulted: position_ids and the 4D mask are always passed


class _Stream:
    """An iterator whose close() (or garbage collection) cancels the request, even before the first next()."""

    def __init__(self, gen: Iterator[Any], cancel: threading.Event) -> None:
        self._gen, self._cancel = gen, cancel

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        self._cancel.set()
        self._gen.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown; nothing left to cancel
            pass


class _Detokenizer:
    """Incremental decode over a short window of tokens, so each step costs O(window), not O(answer)."""

    WINDOW = 32

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._start = 0
        self._prefix = ""
        self.text = ""

    def add(self, new: list[int]) -> str:
        self.ids.extend(new)
        window = self._tok.decode(self.ids[self._start :], skip_special_tokens=True)
        # A trailing U+FFFD is usually a UTF-8 character split across tokens: wait for the rest (a few tokens).
        if window.endswith("\ufffd") and len(self.ids) - self._start < self.WINDOW:
            return self.text
        self.text = self._prefix + window
        if len(self.ids) - self._start >= self.WINDOW:
            self._prefix, self._start = self.text, len(self.ids)
        return self.text

    def final(self) -> str:
        return self._tok.decode(self.ids, skip_special_tokens=True)


class BatchEngine:
    """Serves many generations at once from one worker thread that owns the model.

    KV memory is allocated once: `token_budget` tokens split into `max_batch` slots of `max_len` tokens.
    Prompts are prefilled through the real Qwen3-VL forward (vision tower, deepstack, mrope) between decode
    steps, at most `prefill_chunk` prompt tokens per step (short text prompts batched together, long ones in
    chunks, an image/video prompt whole), so a new prompt stalls running streams for one forward at most.
    All running requests decode together one token per step; they join and leave at step boundaries. On
    CUDA the decode step is compiled by inductor (`compile`) and replayed from graphs captured at start-up,
    one per batch-size bucket; start-up therefore compiles (~a minute per bucket cold, far less with the
    on-disk cache in `compile_cache_dir`), and no request ever waits for a compile.

    Prefix reuse: up to `prefix_slots` retained entries (default: a quarter of `max_batch`, at least one; 0
    turns it off) keep finished requests' KV (prompt + answer), each allocated when kept, exactly its length,
    so memory goes only to what is kept and comes back when an entry is evicted. A new prompt starts from the retained entry sharing
    its longest token prefix with equal media (same pixels), so a chat's next turn, or a regenerated
    answer, prefills only what is new, and the vision tower runs only on media after the reused part.
    Entries are evicted least recently used, and dropped when a prefill runs out of memory.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 8,
        token_budget: int = 8 * 4096,
        *,
        cuda_graphs: bool | None = None,
        buckets: Iterable[int] = GRAPH_BUCKETS,
        eos_token_ids: Iterable[int] | None = None,
        compile: bool | None = None,
        compile_cache_dir: str | os.PathLike[str] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_slots: int | None = None,
        fuse: bool | None = None,
        gemv: bool | None = None,
        prefill_graphs: bool | None = None,
        compile_prefill: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefix_slots is None:
            prefix_slots = max(1, math.ceil(max_batch * PREFIX_SHARE))
        if prefix_slots < 0:
            raise ValueError(f"prefix_slots must be >= 0 (0 turns prefix reuse off), got {prefix_slots}")
        if prefill_chunk < LEN_ALIGN:
            raise ValueError(f"prefill_chunk must be >= {LEN_ALIGN} tokens, got {prefill_chunk}")
        max_len = token_budget // max_batch // LEN_ALIGN * LEN_ALIGN
        if max_len < LEN_ALIGN:
            raise ValueError(
                f"token_budget {token_budget} leaves under {LEN_ALIGN} tokens per slot for {max_batch} slots; "
                f"give at least {LEN_ALIGN * max_batch}."
            )
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prefix_slots = prefix_slots
        # Pool slots follow the running ones: rows [0, max_batch) of the KV are what decode steps read.
        self._pool = PrefixPool(range(prefix_slots))
        self._device = loaded.device
        on_cuda = str(loaded.device).startswith("cuda")
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.compile = compiled.should_compile(compile, loaded.device, loaded.precision)
        self.compile_error: str | None = None
        self.graph_error: str | None = None
        # Prompt chunks (engine/prefill.py): the eager text model costs ~0.85 ms of host time a layer whatever the
        # length, ~30 ms for any prompt. `prefill_graphs` (None: wherever decode steps are graphed) replays first
        # chunks from CUDA graphs captured at start-up. `compile_prefill` runs chunks through torch.compile with
        # dynamic lengths instead (a CPU test covers it; on an H100 it adds minutes of compiling to start-up).
        self.prefill_graphs = self.cuda_graphs if prefill_graphs is None else bool(prefill_graphs)
        self.compile_prefill = bool(compile_prefill)
        self.prefill_error: str | None = None
        self.prefill_warmup_s = 0.0
        self._chunk_forward: Callable[..., Any] = prefill.chunk_forward
        self._chunk_graphs: prefill.ChunkGraphs | None = None
        self._compile_cache_dir = compile_cache_dir
        sizes = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.buckets = tuple(sizes)
        if eos_token_ids is None:
            eos = loaded.model.generation_config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._tokenizer = loaded.processor.tokenizer
        self._token_bytes = TokenBytes(self._tokenizer)
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Prefill] = deque()  # worker-owned: admitted, holding a slot, no token yet
        self._active: list[_Request] = []  # worker-owned; request i lives in KV slot i
        self._closed = False
        self._peak = 0
        self._steps = 0
        self._tokens = 0
        self._startup_s = 0.0
        self._prefill_forwards = 0
        self._forwards_since_step = 0  # prefill forwards since the last decode step was enqueued
        self._prefill_tokens = 0
        self._inflight: tuple[int, Any] | None = None  # (rows, device tokens) of the enqueued decode step
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._restore_attention: Callable[[], None] = lambda: None
        self._restore_vision: Callable[[], None] = lambda: None
        # Decode Linears (engine/fusion.py): q/k/v and gate/up as one product each, and one-row products on 16-bit
        # weights through the Triton GEMV. On by default on CUDA (bf16 1 stream 219 -> 270 tok/s on an H100,
        # bench/gemv_check.h100.json); each skips the layers it cannot take (quantized, fp32).
        self.fuse = on_cuda if fuse is None else bool(fuse)
        self.gemv = on_cuda if gemv is None else bool(gemv)
        self.gemv_linears = 0
        self.fused_groups = 0
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
        req = self._enqueue(prompt, sampling, cancel)
        return _Stream(self._texts(req, on_cancel), cancel)

    def submit_tokens(self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event) -> Iterator[int]:
        """Yields the generated token ids (eos included), for tests and benchmarks."""
        req = self._enqueue(prompt, sampling, cancel)

        def tokens() -> Iterator[int]:
            try:
                for new, _stats in self._events(req):
                    yield from new
            finally:
                req.cancel.set()

        return _Stream(tokens(), cancel)

    def snapshot(self) -> EngineSnapshot:
        now = time.perf_counter()
        with self._cond:
            oldest = min((r.submitted_at for r in self._waiting), default=now)
            waiting = len(self._waiting)
        return EngineSnapshot(
            active=len(self._active),
            waiting=waiting,
            max_batch=self.max_batch,
            max_len=self.max_len,
            peak_active=self._peak,
            steps=self._steps,
            tokens=self._tokens,
            oldest_wait_s=now - oldest,
            graph_buckets=tuple(sorted(self._graphs)),
            startup_s=self._startup_s,
            prefilling=len(self._prefilling),
            decode_path=self.decode_path,
            prefill_path=self.prefill_path,
            prefill_tokens=self._prefill_tokens,
            prefix_slots=self.prefix_slots,
            prefix_entries=len(self._pool.entries),
            prefix_hits=self._pool.hits,
            prefix_tokens_reused=self._pool.tokens_reused,
            prefix_evicted=self._pool.evicted,
            prefix_dropped=self._pool.dropped,
        )

    @property
    def decode_path(self) -> str:
        """How decode steps run, in words (the live panel shows it)."""
        if self._graphs:
            return "cuda graphs + torch.compile" if self.compile else "cuda graphs"
        if self.compile:
            return "torch.compile (no graphs)"
        reasons = [r for r in (self.graph_error, self.compile_error) if r]
        return "eager" + (f" ({'; '.join(reasons)})" if reasons else "")

    @property
    def prefill_path(self) -> str:
        """How prompt chunks run, in words."""
        paths = []
        if self._chunk_graphs is not None:
            paths.append("cuda graphs (first chunks)")
        paths.append("torch.compile" if self._chunk_forward is not prefill.chunk_forward else "eager")
        return " + ".join(paths) + (f" ({self.prefill_error})" if self.prefill_error else "")

    def close(self, timeout: float = 60.0) -> None:
        """Stops the worker; running and waiting requests end with EngineClosed. Frees the KV memory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reader side

    def _enqueue(self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event) -> _Request:
        need = int(prompt.inputs["input_ids"].shape[1]) + sampling.max_new_tokens
        if need > self.max_len:
            raise RequestError(
                f"This request needs {need:,} tokens (prompt + max new tokens), but each of the engine's "
                f"{self.max_batch} slots holds {self.max_len:,}. Lower max new tokens or the context."
            )
        req = _Request(prompt, sampling, cancel, time.perf_counter())
        req.ids = prompt.inputs["input_ids"][0].cpu()
        if sampling.stop:
            req.stop = StopMatcher(sampling.stop, self._token_bytes)
        if self._pool and (prompt.image_tokens or prompt.video_tokens):
            # Hashing the pixels is CPU work: done here, in the caller's thread, not on the GPU worker.
            config = self.loaded.model.config
            merge = config.vision_config.spatial_merge_size
            try:
                req.media = find_media(prompt.inputs, config.image_token_id, config.video_token_id, merge)
            except ValueError as exc:  # placeholders that do not fit the grids: the prefill will say so
                log.warning("prefix reuse off for a prompt: %s", exc)
                req.reusable = False
        with self._cond:
            if self._closed:
                raise EngineClosed("The generation engine is closed.")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def _events(self, req: _Request) -> Iterator[tuple[list[int], RequestStats | None]]:
        """(new token ids, None) per batch of tokens, then ([], stats). Raises the worker's error."""
        while True:
            try:
                item = req.out.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineClosed("The generation engine stopped.") from None
                continue
            new: list[int] = []
            while True:  # drain: a slow reader decodes several tokens at once
                if isinstance(item, int):
                    new.append(item)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if new:
                        yield new, None
                    yield [], item
                    return
                try:
                    item = req.out.get_nowait()
                except queue.Empty:
                    break
            yield new, None

    def _texts(
        self, req: _Request, on_cancel: Callable[[RequestStats], None] | None
    ) -> Iterator[tuple[str, RequestStats | None]]:
        detok = _Detokenizer(self._tokenizer)
        stops = StopText(req.sampling.stop) if req.sampling.stop else None
        text = ""
        ended = False
        try:
            for new, stats in self._events(req):
                if stats is not None:
                    ended = True
                    final = detok.final()
                    yield (stops.cut(final)[0] if stops is not None else final), stats
                    return
                grown = detok.add(new)
                if stops is not None:  # never show a stop string, nor what may be the start of one
                    grown = stops.visible(grown)
                if grown != text:
                    text = grown
                    yield text, None
        except GeneratorExit:
            raise
        except BaseException:
            ended = True  # a failure is reported by the exception, not as a cancel
            raise
        finally:
            req.cancel.set()
            if not ended and on_cancel is not None:
                on_cancel(req.stats())

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        import torch

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                self._allocate()
                self._prepare_decode()
                self._prepare_prefill()
        except BaseException as exc:  # reported by the constructor
            self._restore_attention()
            self._restore_vision()
            fusion.unfuse(self.loaded.model)
            self._startup_error = exc
            self._ready.set()
            return
        self._startup_s = time.perf_counter() - started
        self._ready.set()
        with torch.inference_mode():
            while True:
                admitted, dropped = self._next_work()
                if admitted is None:
                    break
                for req in dropped:
                    self._finish_unstarted(req)
                self._prefilling.extend(self._admit(req) for req in admitted)
                if self._prefilling:
                    self._prefill_next()  # at most one forward between two decode steps
                try:
                    if self._inflight is None:
                        self._drop_cancelled()
                        if self._active and not (self._burst_pending() and self._forwards_since_step < BURST_FORWARDS):
                            self._launch()
                    if self._inflight is not None:
                        self._collect()  # launches the following step first when no request leaves
                except BaseException as exc:  # fail this batch's requests, keep serving the next ones
                    self._fail_active(exc)
        self._shutdown()

    def _next_work(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Blocks until there is work; returns (requests to admit, cancelled waiting ones), or None on close."""
        with self._cond:
            while not self._closed and not self._waiting and not self._active and not self._prefilling:
                self._cond.wait()
            if self._closed:
                return None, []
            dropped = [r for r in self._waiting if r.cancel.is_set()]
            for r in dropped:
                self._waiting.remove(r)
            incoming = []
            while self._waiting and len(self._active) + len(self._prefilling) + len(incoming) < self.max_batch:
                incoming.append(self._waiting.popleft())
            return incoming, dropped

    def _allocate(self) -> None:
        import torch

        model = self.loaded.model
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = text.num_key_value_heads
        self._lm = model.model.language_model
        self._lm_head = model.lm_head
        self._dtype = self._lm.embed_tokens.weight.dtype
        dev = self._device
        # Slots [0, max_batch) hold the running batch, the prefix pool's slots come after them.
        self._kv_shape = (self.max_batch, heads, self.max_len, head_dim)
        rows = self._kv_shape[0] * heads * self.max_len
        # One K and one V tensor per layer, each flat (see _SlotCache); a slot's rows are [slot, :, :len] of the view.
        self._kv_layers = [
            (
                torch.zeros(rows, head_dim, dtype=self._dtype, device=dev),
                torch.zeros(rows, head_dim, dtype=self._dtype, device=dev),
            )
            for _ in range(text.num_hidden_layers)
        ]
        # Flat KV row of (slot, kv head) at position 0.
        slots = torch.arange(self.max_batch, device=dev).view(-1, 1)
        self._kv_base = (slots * heads + torch.arange(heads, device=dev).view(1, -1)) * self.max_len
        self._ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # next KV write index per slot
        self._delta = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._arange = torch.arange(self.max_len, device=dev)
        self._penalty = torch.ones(self.max_batch, 1, dtype=torch.float32, device=dev)
        self._seen = torch.zeros(self.max_batch, self._lm_head.out_features, dtype=torch.bool, device=dev)
        self._decode_fn: Callable[[int], Any] = self._forward
        # A first chunk's past: no tokens, in prefill.chunk_forward's layout.
        self._no_past = torch.zeros(0, text.num_hidden_layers, 2, heads, head_dim, dtype=self._dtype, device=dev)
        self._deepstack_layers = len(getattr(model.model.visual, "deepstack_visual_indexes", ()))
        self.warmup_s: dict[int, float] = {}  # per bucket: compile (if any) + two warm-up steps

    def _forward(self, rows: int) -> Any:
        """Logits [rows, vocab] of one decode step over slots [0, rows); only device ops (capturable)."""
        pos = self._pos[:rows]
        rope = (pos + self._delta[:rows]).view(1, rows, 1).expand(3, rows, 1)  # text: the 3 mrope axes agree
        mask = (self._arange.view(1, -1) <= pos.view(-1, 1)).view(rows, 1, 1, self.max_len)
        index = (self._kv_base[:rows] + pos.view(-1, 1)).view(-1)
        # The decode kernel reads each row's live length instead of the mask (compiled, the mask is dead code).
        lengths = {"kv_lengths": pos + 1} if self._decode_kernel else {}
        hidden = self._lm(
            input_ids=self._ids[:rows],
            position_ids=rope,
            attention_mask=mask,
            past_key_values=_SlotCache(self._kv_layers, self._kv_shape, rows, index),
            use_cache=True,
            **lengths,
        ).last_hidden_state
        return self._lm_head(hidden[:, -1])

    def _prepare_decode(self) -> None:
        """Compiles (if asked) and warms up every bucket, then captures the graphs: all before the first request."""
        import torch

        model = self.loaded.model
        text = model.config.text_config
        on_cuda = str(self._device).startswith("cuda")
        if self.cuda_graphs and (blocker := compiled.graph_blocker(model)):
            log.warning("decode steps run eagerly: %s", blocker)
            self.graph_error, self.cuda_graphs = blocker, False
        # Decode attention: the split-KV kernel over each row's live length where it runs (CUDA), compiled or not;
        # else SDPA over the whole slot behind the 4D mask (CPU: exactly as `generate`'s eager path).
        kernel_blocker = compiled.decode_kernel_blocker(self._device, text, self._dtype)
        if kernel_blocker is not None and on_cuda:
            log.warning("decode attention stays on SDPA: %s", kernel_blocker)
        self._decode_kernel = kernel_blocker is None
        if self.compile or self._decode_kernel:
            self._restore_attention = compiled.use_packed_decode_attention(text)
            self._decode_kernel = self._decode_kernel and text._attn_implementation == compiled.PACKED_DECODE_ATTENTION
        self.decode_attention = "split-KV triton" if self._decode_kernel else f"sdpa ({kernel_blocker or 'not routed'})"
        self._restore_vision = vision.use_packed_vision_attention(model.model.visual)
        if self.fuse:
            self.fused_groups = fusion.fuse_projections(self._lm, gemv=self.gemv)
        if self.gemv:
            self.gemv_linears = fusion.route_gemv([self._lm, self._lm_head])
        forward: Callable[[int], Any] = self._forward
        if self.compile:
            compiled.use_cache_dir(self._compile_cache_dir)
            # bitsandbytes layers break the graph (tensor-subclass weights); the pieces between them still fuse.
            fullgraph = self.loaded.precision not in ("int4", "int8")
            forward = compiled.compile_decode(
                self._forward, len(self.buckets), fullgraph=fullgraph, dynamic_batch=compiled.DYNAMIC_BATCH
            )
        if not self.compile and not self.cuda_graphs:
            return  # plain eager: nothing to prepare
        side = torch.cuda.Stream() if on_cuda else None
        try:
            self._warm_up(forward, side)
        except Exception as exc:
            if not self.compile:
                raise
            # Decoding stays correct uncompiled (graphs only): report it rather than refuse to start.
            log.warning("torch.compile of the decode step failed; decoding uncompiled: %r", exc)
            self.compile_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.compile = False
            if not self._decode_kernel:  # the packed route was only there for the compiled step
                self._restore_attention()
                self._restore_attention = lambda: None
            torch._dynamo.reset()
            forward = self._forward
            if self.cuda_graphs:
                self._warm_up(forward, side)
        self._decode_fn = forward
        if self.cuda_graphs:
            self._capture(forward)
        for keys, values in self._kv_layers:  # warm-up wrote at position 0 of every slot
            keys.zero_()
            values.zero_()
        self._pos.zero_()

    def _warm_up(self, forward: Callable[[int], Any], stream: Any) -> None:
        """Two steps per bucket (the first one compiles), off the capture stream as torch.cuda.graph asks."""
        import contextlib

        import torch

        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for rows in self.buckets:
                started = time.perf_counter()
                for _ in range(2):
                    forward(rows)
                if stream is not None:
                    stream.synchronize()
                self.warmup_s[rows] = round(time.perf_counter() - started, 2)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()

    def _capture(self, forward: Callable[[int], Any]) -> None:
        import torch

        pool = torch.cuda.graph_pool_handle()
        try:
            for rows in sorted(self.buckets, reverse=True):  # largest first: the shared pool fits them all
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = forward(rows)
                self._graphs[rows] = (graph, out)
        except Exception as exc:
            log.warning("CUDA graph capture of the decode step failed; decoding without graphs: %r", exc)
            self._graphs.clear()
            self.cuda_graphs = False
            self.graph_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.synchronize()

    def _prepare_prefill(self) -> None:
        """Captures the first-chunk graphs and/or compiles chunks, so no request waits for either.

        A failure leaves prompts on the eager path, correct and slower, and says why in `prefill_path`.
        """
        started = time.perf_counter()
        self.prefill_graphs = self.prefill_graphs and self.cuda_graphs  # not where decode steps could not be graphed
        if self.prefill_graphs:
            steps = range(PREFILL_GRAPH_STEP, self.prefill_chunk, PREFILL_GRAPH_STEP)
            lengths = (*steps, self.prefill_chunk)
            try:
                graphs = prefill.ChunkGraphs(self._lm, lengths, self._deepstack_layers, self._no_past.shape[1:])
                graphs.capture()
                self._chunk_graphs = graphs
            except Exception as exc:
                log.warning("CUDA graph capture of the prefill failed; prompts prefill eagerly: %r", exc)
                self.prefill_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        if self.compile_prefill:
            self._compile_prefill()
        self.prefill_warmup_s = round(time.perf_counter() - started, 2)

    def _compile_prefill(self) -> None:
        """Compiles prompt chunks and warms both graphs.

        `dynamic=True` makes the chunk and past lengths symbolic; dynamo still specialises an empty past, so a
        first chunk and a later one are two graphs, each covering every length >= 2 (1-token chunks run eagerly).
        """
        import torch

        fn = torch.compile(prefill.chunk_forward, dynamic=True, fullgraph=True, mode=compiled.COMPILE_MODE)
        text = self.loaded.model.config.text_config
        length = 2 * LEN_ALIGN
        try:
            compiled.use_cache_dir(self._compile_cache_dir)
            for past in (0, length):
                embeds = torch.zeros(1, length, text.hidden_size, dtype=self._dtype, device=self._device)
                positions = torch.arange(past, past + length, device=self._device).view(1, 1, -1).repeat(4, 1, 1)
                kv = self._no_past.new_zeros(past, *self._no_past.shape[1:])
                deepstack = embeds.new_zeros(self._deepstack_layers, *embeds.shape)
                fn(self._lm, embeds, positions, kv, deepstack)
        except Exception as exc:
            log.warning("torch.compile of the prefill failed; prompts prefill eagerly: %r", exc)
            self.prefill_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            return
        self._chunk_forward = fn

    def _decode_logits(self, n: int) -> Any:
        if self._graphs or self.compile:
            rows = next(b for b in self.buckets if b >= n)  # compiled code exists for the buckets only
            if self._graphs:
                graph, out = self._graphs[rows]
                graph.replay()
                return out[:n]
            return self._decode_fn(rows)[:n]
        return self._forward(n)

    def _prompt_positions(self, inputs: dict[str, Any]) -> tuple[Any, int]:
        """Position ids [4, 1, P] (text row + 3 mrope rows) as `generate` builds them, and the rope delta."""
        import torch

        ids = inputs["input_ids"]
        length = ids.shape[1]
        text = torch.arange(length, device=ids.device).view(1, 1, length)
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return torch.cat([text, text.expand(3, 1, length)]), 0
        vision, deltas = self.loaded.model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
        )
        return torch.cat([text, vision]), int(deltas.view(-1)[0])

    # ------------------------------------------------------------------ prefill (worker)

    def _admit(self, req: _Request) -> _Prefill:
        """A new request's prefill, started from the retained entry sharing the longest usable prefix, if any.

        The entry's KV for that prefix is copied (on the device) into the prefill's own cache at once, so the
        entry may be evicted meanwhile; the prefill then starts mid-prompt, like a long prompt's next chunk.
        """
        job = _Prefill.of(req)
        if not self._pool or not req.reusable:
            return job
        try:
            entry, reuse = self._pool.match(req.ids, req.media)
            if entry is None:
                return job
            kv = self._no_past.new_empty(job.length, *self._no_past.shape[1:])
            kv[:reuse].copy_(entry.kv[:, :, :, :reuse].permute(3, 0, 1, 2, 4))  # [layers, 2, heads, len, dim] ->
        except Exception as exc:  # e.g. out of memory for the copy: prefill it all instead
            log.warning("prefix reuse skipped: %r", exc)
            return _Prefill.of(req)
        job.kv, job.done, job.base = kv, reuse, reuse
        return job

    def _memory_pressure(self, group: list[_Prefill]) -> None:
        """A prefill ran out of memory: drops the retained entries and cached blocks; its jobs run once more.

        The jobs restart from their last whole step (a chunk's keys/values join `kv` only once it is done).
        """
        log.warning("a prefill ran out of memory: dropping %d retained prefixes and retrying", len(self._pool.entries))
        self._pool.clear()
        for job in group:
            job.retried = True
        if str(self._device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _prefill_next(self) -> None:
        """One prefill forward; a failing prompt (bad media, out of memory) fails its own requests only."""
        group = self._prefill_group()
        if not group:
            return
        try:
            results = self._prefill_forward(group)
        except Exception as exc:
            if _is_out_of_memory(exc) and not any(job.retried for job in group):
                self._memory_pressure(group)  # the same jobs run again next time round
                return
            for job in group:
                self._prefilling.remove(job)
                job.kv = None
                job.req.out.put(exc)
            return
        for job, result in zip(group, results):
            if result is None:
                continue  # more chunks to go
            self._prefilling.remove(job)
            try:
                self._activate(job, *result)
            except Exception as exc:
                if self._active and self._active[-1] is job.req:
                    self._active.pop()
                    self._pos[len(self._active)] = 0
                    self._delta[len(self._active)] = 0
                job.req.out.put(exc)

    def _mid_answer(self) -> bool:
        """Whether a running stream is past its first token (a stall would break an answer under way)."""
        return any(len(r.tokens) > 1 for r in self._active)

    def _burst_pending(self) -> bool:
        """Short text prompts still to prefill while every running stream holds only its first token: a burst of
        arrivals. Its prefill goes first (the first decode step waits for up to BURST_FORWARDS forwards): 32 prompts
        at once then take 2 large forwards instead of 1 + 4 interleaved with decode steps; nobody is mid-answer."""
        if not self._prefilling or self._mid_answer():
            return False
        return all(not j.multimodal and j.done == 0 and j.length <= self.prefill_chunk for j in self._prefilling)

    def _prefill_group(self) -> list[_Prefill]:
        """The next forward's prompts: short text prompts together up to `prefill_chunk` tokens, else one prompt.

        With no stream mid-answer there is nobody to stall, so short prompts batch up to IDLE_PREFILL_FACTOR times
        more tokens: a burst of arrivals then takes a few large forwards instead of many small ones (each eager
        forward also costs ~30 ms of Python launches and one host sync for its first tokens).
        """
        group: list[_Prefill] = []
        tokens = 0
        budget = self.prefill_chunk * (1 if self._mid_answer() else IDLE_PREFILL_FACTOR)
        for job in list(self._prefilling):
            if job.req.cancel.is_set():
                self._prefilling.remove(job)
                job.kv = None
                self._finish_unstarted(job.req)
                continue
            short_text = not job.multimodal and job.done == 0 and job.length <= self.prefill_chunk
            if not group:
                group.append(job)
                tokens = job.length
                if not short_text:
                    break
            elif short_text and tokens + job.length <= budget:
                group.append(job)
                tokens += job.length
            else:
                break
        return group

    def _prefill_forward(self, group: list[_Prefill]) -> list[tuple[Any, int, Any] | None]:
        """One prefill forward: several short text prompts batched, or one prompt's next piece.

        Per job: None while pieces are left, else (prompt KV [length, layers, 2, kv_heads, head_dim], rope delta,
        logits [1, vocab]).
        """
        self._prefill_forwards += 1
        self._forwards_since_step += 1
        job = group[0]
        if len(group) > 1:
            return self._prefill_texts(group)
        if job.multimodal and job.media is None and self._encode_media(job):
            # The vision tower and the text in one turn when nobody decodes, or when the text left fits in half a
            # chunk (the tower costs under half as much per token as the text model, so the stall stays within
            # a full chunk's); otherwise the tower was this turn's forward.
            if self._active and job.length - job.done > self.prefill_chunk // 2:
                return [None]
        return [self._prefill_chunk(job)]

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.loaded.model.config.get_text_config(decoder=True))

    def _prefill_texts(self, group: list[_Prefill]) -> list[tuple[Any, int, Any] | None]:
        """Short text prompts in one right-padded batch through the model's own forward: one forward, eager."""
        import torch

        dev = self._device
        lengths = [j.length for j in group]
        width = max(lengths)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, j in enumerate(group):
            ids[row, : j.length] = j.req.prompt.inputs["input_ids"][0]
            mask[row, : j.length] = 1
        positions = torch.arange(width, device=dev).view(1, 1, -1).expand(4, len(group), -1)
        cache = self._new_cache()
        out = self.loaded.model.model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions, past_key_values=cache,
            use_cache=True,
        )  # fmt: skip
        self._prefill_tokens += sum(lengths)
        rows = torch.arange(len(group), device=dev)
        logits = self._lm_head(out.last_hidden_state[rows, torch.tensor(lengths, device=dev) - 1])

        def layer_kv(row: int, n: int) -> Callable[[int], tuple[Any, Any]]:
            return lambda layer: (cache.layers[layer].keys[row, :, :n], cache.layers[layer].values[row, :, :n])

        return [(layer_kv(row, n), 0, logits[row : row + 1]) for row, n in enumerate(lengths)]

    def _encode_media(self, job: _Prefill) -> bool:
        """The prompt's mrope positions, and the vision tower over its media after the reused prefix (if any).

        Positions come from the whole prompt (a medium's rope positions depend on everything before it);
        returns whether the vision tower ran (not when every medium lies inside the reused prefix).
        """
        import torch

        dev = self._device
        inputs = job.req.prompt.inputs
        shapes = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
        job.positions, job.delta = self._prompt_positions(
            {k: inputs[k].to(dev) for k in shapes if inputs.get(k) is not None}
        )
        job.ids = inputs["input_ids"].to(dev)
        media = {}
        model = self.loaded.model.model
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):  # fmt: skip
            if inputs.get(pixels) is None:
                continue
            first_row, first = 0, 0
            if job.base:  # media after the reused prefix are the kind's last ones, in token order
                fresh = [m for m in job.req.media if m.kind == kind and m.start >= job.base]
                if not fresh:
                    continue
                first_row, first = fresh[0].rows[0], fresh[0].index
            # Grid-derived inputs from the CPU grid: the tower then never waits on the GPU (engine/vision.py).
            extra = vision.vision_kwargs(model.visual, inputs[grid][first:], dev)
            grid_thw = inputs[grid][first:] if extra else inputs[grid][first:].to(dev)
            out = model.get_image_features(
                inputs[pixels][first_row:].to(dev), grid_thw, return_dict=True, **extra
            )  # videos: the same  # fmt: skip
            deepstack = torch.stack([torch.cat(f) for f in out.deepstack_features])  # [layers, tokens, hidden]
            media[kind] = (torch.cat(out.pooler_output), deepstack)
        job.media = media  # set last: a failed vision forward leaves the job to be retried whole
        return bool(media)

    def _prefill_chunk(self, job: _Prefill) -> tuple[Any, int, Any] | None:
        """The next `prefill_chunk` prompt tokens, attending to the chunks before them (engine/prefill.py)."""
        import torch

        dev = self._device
        if job.ids is None:  # a text prompt's first chunk
            job.ids = job.req.prompt.inputs["input_ids"].to(dev)
            job.positions = torch.arange(job.length, device=dev).view(1, 1, -1).expand(4, 1, -1)
        start, end = job.done, min(job.length, job.done + self.prefill_chunk)
        last = end == job.length
        if job.kv is None and not last:  # the whole prompt's KV, written chunk by chunk
            job.kv = self._no_past.new_empty(job.length, *self._no_past.shape[1:])
        past = self._no_past if start == 0 else job.kv[:start]
        out = None if job.kv is None else job.kv[start:end]
        pieces = []
        if job.media:
            config = self.loaded.model.config
            ids = job.req.prompt.inputs["input_ids"][0].numpy()  # numpy: torch CPU ops wake its intra-op pool
            for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
                if kind not in job.media:
                    continue
                placeholders = ids == token  # features exist for those after the reused prefix only
                lo, where = int(placeholders[job.base : start].sum()), np.flatnonzero(placeholders[start:end])
                if len(where):
                    embeds, deepstack = job.media[kind]
                    pieces.append((self._to_device(where), embeds[lo : lo + len(where)], deepstack[:, lo : lo + len(where)]))  # fmt: skip
        embeds, deepstack = prefill.media_inputs(self._lm.embed_tokens(job.ids[:, start:end]), self._deepstack_layers, pieces)  # fmt: skip
        forward = self._chunk_forward if prefill.compiles(start, end - start) else prefill.chunk_forward
        # Contiguous positions: a text prompt's are an expanded view, an image prompt's not, and dynamo guards strides.
        positions = job.positions[:, :, start:end].contiguous()
        if self._chunk_graphs is not None and self._chunk_graphs.fits(start, end - start):
            # The graphs' output buffer, overwritten by the next replay: a prompt's last chunk is copied into its
            # slot at once (_activate), an earlier one into the prompt's KV.
            hidden, kv = self._chunk_graphs.run(embeds, positions, deepstack)
        elif forward is prefill.chunk_forward:
            hidden, kv = forward(self._lm, embeds, positions, past, deepstack, out)
        else:  # compiled: returns its own output (writing into `out` would be another graph)
            hidden, kv = forward(self._lm, embeds, positions, past, deepstack)
        if out is not None and kv is not out:
            out.copy_(kv)
        job.done = end
        self._prefill_tokens += end - start
        if not last:
            return None
        if job.kv is not None:
            kv = job.kv
        length, job.kv, job.ids, job.media = job.length, None, None, None
        return _layer_view(kv, length), job.delta, self._lm_head(hidden[:, -1])

    def _to_device(self, array: Any) -> Any:
        """A small host array on the device without waiting for the GPU (pinned, so the copy is asynchronous)."""
        import torch

        host = torch.from_numpy(array)
        if str(self._device).startswith("cuda"):
            return host.pin_memory().to(self._device, non_blocking=True)
        return host.to(self._device)

    def _activate(self, job: _Prefill, layer_kv: Callable[[int], tuple[Any, Any]], delta: int, logits: Any) -> None:
        """Joins the running batch in the next free slot, emits the first token, copies the prompt's KV into the slot.

        `layer_kv(layer)`: the prompt's keys and values in that layer, each [kv_heads, length, head_dim].
        """
        import torch

        req, length = job.req, job.length
        if req.cancel.is_set():
            self._finish_unstarted(req)
            return
        slot = len(self._active)
        if slot == 0:  # the forwards before this stream existed delayed nobody (see _burst_pending)
            self._forwards_since_step = 1
        req.kv_len, req.delta = length, delta
        self._pos[slot] = length
        self._delta[slot] = delta
        self._penalty[slot] = req.sampling.repetition_penalty
        self._seen[slot] = False
        if req.sampling.repetition_penalty != 1.0:
            self._seen[slot, req.prompt.inputs["input_ids"][0].to(self._device)] = True
        if req.sampling.temperature > 0:
            seed = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            req.generator = torch.Generator(device=self._device).manual_seed(seed)
        self._active.append(req)
        self._peak = max(self._peak, len(self._active))
        token = self._choose(logits.float(), slot, slot + 1)
        self._ids[slot, 0] = token[0]
        if req.sampling.repetition_penalty != 1.0:
            self._seen[slot, token[0]] = True
        first = int(token[0])
        ends = self._ends(req, first)
        self._emit(req, first, time.perf_counter())
        # The prompt's KV into the slot after the first token is out (72 launches off the time to first token);
        # the next decode step is enqueued after these copies.
        for layer, (keys, values) in enumerate(self._kv_layers):
            prompt_keys, prompt_values = layer_kv(layer)
            keys.view(self._kv_shape)[slot, :, :length].copy_(prompt_keys)
            values.view(self._kv_shape)[slot, :, :length].copy_(prompt_values)
        if ends:
            self._release(slot)

    # ------------------------------------------------------------------ decode (worker)

    def _launch(self) -> None:
        """Enqueues one decode step for the running batch; device work only, no host sync."""
        n = len(self._active)
        self._forwards_since_step = 0
        logits = self._decode_logits(n).float()
        tokens = self._choose(logits, 0, n)
        self._ids[:n, 0].copy_(tokens)
        self._pos[:n] += 1
        if any(r.sampling.repetition_penalty != 1.0 for r in self._active):
            self._seen[:n].scatter_(1, tokens.view(n, 1), True)
        self._inflight = (n, tokens)

    def _collect(self) -> None:
        """Reads the step in flight; if nobody leaves, the next step is enqueued before the tokens are handed out.

        Handing tokens to readers wakes their threads (GIL), and slots only move (compaction) between steps,
        so the GPU runs step k+1 while the host emits step k. Requests only join meanwhile (prefill appends a
        slot past the step's rows), never leave, so rows [0, n) still map to `_active[:n]`.
        """
        n, tokens = self._inflight
        self._inflight = None
        values = tokens.tolist()
        now = time.perf_counter()
        self._steps += 1
        reqs = self._active[:n]
        done = [i for i, (req, token) in enumerate(zip(reqs, values)) if self._ends(req, token)]
        if not done and len(self._active) == n:
            self._launch()
        for req, token in zip(reqs, values):
            req.kv_len += 1
            self._emit(req, token, now)
        for i in reversed(done):  # highest first: moving the last slot down never moves a finished one
            self._release(i)

    def _choose(self, logits: Any, lo: int, hi: int) -> Any:
        """Next token per slot in [lo, hi): repetition penalty, then greedy or temperature/top-k/top-p."""
        import torch

        reqs = self._active[lo:hi]
        if any(r.sampling.repetition_penalty != 1.0 for r in reqs):
            penalty = self._penalty[lo:hi]
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self._seen[lo:hi], penalised, logits)
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(reqs) if r.sampling.temperature > 0]
        if not sampled:
            return tokens
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        temperature = torch.tensor([reqs[i].sampling.temperature for i in sampled], device=dev).view(-1, 1)
        top_k = torch.tensor([reqs[i].sampling.top_k or logits.shape[-1] for i in sampled], device=dev).view(-1, 1)
        top_p = torch.tensor([reqs[i].sampling.top_p for i in sampled], device=dev).view(-1, 1)
        scores, order = (logits[rows] / temperature).sort(-1, descending=True)
        rank = torch.arange(scores.shape[-1], device=dev).view(1, -1)
        scores = scores.masked_fill(rank >= top_k, float("-inf"))
        probs = scores.softmax(-1)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
        for j, i in enumerate(sampled):
            choice = torch.multinomial(probs[j], 1, generator=reqs[i].generator)
            tokens[i] = order[j, choice[0]]
        return tokens

    def _ends(self, req: _Request, token: int) -> bool:
        """Whether `token`, the request's next one, is its last: eos, max new tokens, cancel or a stop string.

        Called once per token (the stop matcher keeps the bytes of the last few), before the token is emitted.
        """
        stopped = req.stop is not None and req.stop.push(token)
        return (
            stopped or token in self._eos or len(req.tokens) + 1 >= req.sampling.max_new_tokens or req.cancel.is_set()
        )

    def _emit(self, req: _Request, token: int, now: float) -> None:
        """Hands one token to the reader."""
        req.tokens.append(token)
        req.first_at = req.first_at or now
        req.last_at = now
        self._tokens += 1
        req.out.put(token)

    def _release(self, slot: int) -> None:
        """Ends the request in `slot` and moves the last active request into the hole (slots stay dense)."""
        req = self._active[slot]
        self._retain(req, slot)  # before the reader hears of the end: its next turn finds the entry
        req.out.put(req.stats())
        last = len(self._active) - 1
        if slot != last:
            moved = self._active[last]
            for pair in self._kv_layers:
                for flat in pair:
                    view = flat.view(self._kv_shape)
                    view[slot, :, : moved.kv_len].copy_(view[last, :, : moved.kv_len])
            for buf in (self._ids, self._pos, self._delta, self._penalty, self._seen):
                buf[slot].copy_(buf[last])
            self._active[slot] = moved
        self._active.pop()
        self._pos[last] = 0  # padding rows of a graph bucket write at position 0 of a free slot
        self._delta[last] = 0

    def _retain(self, req: _Request, slot: int) -> None:
        """Keeps the finished request's KV (prompt + fed-back tokens) in a pool slot for a later prompt."""
        if not self._pool or not req.reusable or req.kv_len < len(req.ids):
            return
        import torch

        length = req.kv_len
        fed = req.tokens[: length - len(req.ids)]  # the last token emitted has no KV yet
        ids = torch.cat([req.ids, torch.tensor(fed, dtype=req.ids.dtype)]) if fed else req.ids
        entry = self._pool.store(ids, req.media)
        if entry is None:
            return
        try:
            # Exactly this entry's tokens, allocated now: memory is taken only by what is kept, and evicting the
            # entry (or dropping the pool under memory pressure) gives it back.
            _, heads, _, dim = self._kv_shape
            kv = torch.empty(len(self._kv_layers), 2, heads, length, dim, dtype=self._dtype, device=self._device)
            for layer, pair in enumerate(self._kv_layers):
                for half, flat in enumerate(pair):
                    kv[layer, half].copy_(flat.view(self._kv_shape)[slot, :, :length])
            entry.kv = kv
        except Exception as exc:  # e.g. out of memory: a lost entry costs a full prefill later, nothing else
            log.warning("could not keep a finished request's KV: %r", exc)
            self._pool.forget(entry)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._active))):
            if self._active[i].cancel.is_set():
                self._release(i)

    def _finish_unstarted(self, req: _Request) -> None:
        req.out.put(req.stats())

    def _fail_active(self, exc: BaseException) -> None:
        self._inflight = None
        for req in self._active:
            req.out.put(exc)
        self._active.clear()
        self._pos.zero_()
        self._delta.zero_()

    def _shutdown(self) -> None:
        closed = EngineClosed("The generation engine was closed.")
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in [*self._active, *(job.req for job in self._prefilling), *waiting]:
            req.out.put(closed)
        self._active.clear()
        self._prefilling.clear()
        self._graphs.clear()
        self._chunk_graphs = None
        self._kv_layers = []
        self._seen = None
        self._restore_attention()
        self._restore_vision()
        fusion.unfuse(self.loaded.model)


def _layer_view(kv: Any, length: int) -> Callable[[int], tuple[Any, Any]]:
    """`_activate`'s per-layer (keys, values) [kv_heads, length, head_dim] of a prompt KV in prefill's layout."""
    return lambda layer: (kv[:length, layer, 0].transpose(0, 1), kv[:length, layer, 1].transpose(0, 1))


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)
