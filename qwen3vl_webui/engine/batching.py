"""Continuous-batching decode engine: one worker thread, a slot KV cache, CUDA-graph decode steps."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_webui.engine.generation import PreparedPrompt, RequestError, SamplingParams
from qwen3vl_webui.engine.loading import LoadedModel
from qwen3vl_webui.telemetry import RequestStats

# Batch sizes with a captured decode graph; a step of n requests replays the smallest bucket >= n.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)
# KV rows per slot are rounded to this (SDPA's memory-efficient kernel wants 16-aligned masks).
LEN_ALIGN = 64
# How often a waiting reader checks that the worker is still alive.
POLL_S = 1.0


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


class _SlotCache:
    """The `past_key_values` of one decode step over slots [0, rows): writes each row at its own position.

    Duck-typed for transformers' attention layers, which only call `update`. Returns the whole slot rows
    (max_len keys); the 4D mask built from the same positions hides what lies past each row's length.
    """

    def __init__(self, kv: Any, rows: int, pos: Any) -> None:
        self._kv, self._rows, self._pos = kv, rows, pos

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys = self._kv[layer_idx, 0, : self._rows]
        values = self._kv[layer_idx, 1, : self._rows]
        index = self._pos.view(-1, 1, 1, 1).expand_as(key_states)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

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
    Requests are prefilled one at a time through the real Qwen3-VL forward (vision tower, deepstack,
    mrope), then decode together one token per step; they join and leave at step boundaries. On CUDA the
    decode step is replayed from graphs captured at start-up, one per batch-size bucket.
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
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        max_len = token_budget // max_batch // LEN_ALIGN * LEN_ALIGN
        if max_len < LEN_ALIGN:
            raise ValueError(
                f"token_budget {token_budget} leaves under {LEN_ALIGN} tokens per slot for {max_batch} slots; "
                f"give at least {LEN_ALIGN * max_batch}."
            )
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_len = max_len
        self._device = loaded.device
        on_cuda = str(loaded.device).startswith("cuda")
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        sizes = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.buckets = tuple(sizes)
        if eos_token_ids is None:
            eos = loaded.model.generation_config.eos_token_id
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._tokenizer = loaded.processor.tokenizer
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # worker-owned; request i lives in KV slot i
        self._closed = False
        self._peak = 0
        self._steps = 0
        self._tokens = 0
        self._startup_s = 0.0
        self._graphs: dict[int, tuple[Any, Any]] = {}
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
        )

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
        text = ""
        ended = False
        try:
            for new, stats in self._events(req):
                if stats is not None:
                    ended = True
                    yield detok.final(), stats
                    return
                grown = detok.add(new)
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
                if self.cuda_graphs:
                    self._capture()
        except BaseException as exc:  # reported by the constructor
            self._startup_error = exc
            self._ready.set()
            return
        self._startup_s = time.perf_counter() - started
        self._ready.set()
        with torch.inference_mode():
            while True:
                incoming, dropped = self._next_work()
                if incoming is None:
                    break
                for req in dropped:
                    self._finish_unstarted(req)
                for req in incoming:
                    self._prefill_or_fail(req)
                try:
                    self._drop_cancelled()
                    if self._active:
                        self._step()
                except BaseException as exc:  # fail this batch's requests, keep serving the next ones
                    self._fail_active(exc)
        self._shutdown()

    def _next_work(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Blocks until there is work; returns (requests to admit, cancelled waiting ones), or None on close."""
        with self._cond:
            while not self._closed and not self._waiting and not self._active:
                self._cond.wait()
            if self._closed:
                return None, []
            dropped = [r for r in self._waiting if r.cancel.is_set()]
            for r in dropped:
                self._waiting.remove(r)
            incoming = []
            while self._waiting and len(self._active) + len(incoming) < self.max_batch:
                incoming.append(self._waiting.popleft())
            return incoming, dropped

    def _allocate(self) -> None:
        import torch

        model = self.loaded.model
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._lm = model.model.language_model
        self._lm_head = model.lm_head
        self._dtype = self._lm.embed_tokens.weight.dtype
        dev = self._device
        # One tensor for all layers, K and V: moving a slot (compaction) is one copy, not 2 x layers.
        self._kv = torch.zeros(
            text.num_hidden_layers, 2, self.max_batch, text.num_key_value_heads, self.max_len, head_dim,
            dtype=self._dtype, device=dev,
        )  # fmt: skip
        self._ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # next KV write index per slot
        self._delta = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._arange = torch.arange(self.max_len, device=dev)
        self._penalty = torch.ones(self.max_batch, 1, dtype=torch.float32, device=dev)
        self._seen = torch.zeros(self.max_batch, self._lm_head.out_features, dtype=torch.bool, device=dev)

    def _forward(self, rows: int) -> Any:
        """Logits [rows, vocab] of one decode step over slots [0, rows); only device ops (capturable)."""
        pos = self._pos[:rows]
        rope = (pos + self._delta[:rows]).view(1, rows, 1).expand(3, rows, 1)  # text: the 3 mrope axes agree
        mask = (self._arange.view(1, -1) <= pos.view(-1, 1)).view(rows, 1, 1, self.max_len)
        hidden = self._lm(
            input_ids=self._ids[:rows],
            position_ids=rope,
            attention_mask=mask,
            past_key_values=_SlotCache(self._kv, rows, pos),
            use_cache=True,
        ).last_hidden_state
        return self._lm_head(hidden[:, -1])

    def _capture(self) -> None:
        import torch

        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for rows in self.buckets:
                for _ in range(2):
                    self._forward(rows)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for rows in sorted(self.buckets, reverse=True):  # largest first: the shared pool fits them all
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._forward(rows)
            self._graphs[rows] = (graph, out)
        torch.cuda.synchronize()
        self._kv.zero_()
        self._pos.zero_()

    def _decode_logits(self, n: int) -> Any:
        if self._graphs:
            rows = next(b for b in self.buckets if b >= n)
            graph, out = self._graphs[rows]
            graph.replay()
            return out[:n]
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

    def _prefill_or_fail(self, req: _Request) -> None:
        """A failing prompt (bad media, out of memory) fails its own request only, not the running batch."""
        try:
            self._prefill(req)
        except Exception as exc:
            if self._active and self._active[-1] is req:
                self._active.pop()
                self._pos[len(self._active)] = 0
                self._delta[len(self._active)] = 0
            req.out.put(exc)

    def _prefill(self, req: _Request) -> None:
        import torch
        from transformers import DynamicCache

        if req.cancel.is_set():
            self._finish_unstarted(req)
            return
        model = self.loaded.model
        inputs = {k: v.to(self._device) if hasattr(v, "to") else v for k, v in req.prompt.inputs.items()}
        positions, delta = self._prompt_positions(inputs)
        # The prompt runs through the model's own forward into a private DynamicCache (the same path as
        # `generate`'s first step), then its KV is copied into the request's slot.
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        out = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        length = int(inputs["input_ids"].shape[1])
        slot = len(self._active)
        for layer, kv in enumerate(cache.layers):
            self._kv[layer, 0, slot, :, :length].copy_(kv.keys[0])
            self._kv[layer, 1, slot, :, :length].copy_(kv.values[0])
        del cache
        req.kv_len, req.delta = length, delta
        self._pos[slot] = length
        self._delta[slot] = delta
        self._penalty[slot] = req.sampling.repetition_penalty
        self._seen[slot] = False
        if req.sampling.repetition_penalty != 1.0:
            self._seen[slot, inputs["input_ids"][0]] = True
        if req.sampling.temperature > 0:
            seed = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            req.generator = torch.Generator(device=self._device).manual_seed(seed)
        self._active.append(req)
        self._peak = max(self._peak, len(self._active))
        token = self._choose(out.logits[:, -1].float(), slot, slot + 1)
        self._ids[slot, 0] = token[0]
        if req.sampling.repetition_penalty != 1.0:
            self._seen[slot, token[0]] = True
        if self._emit(req, int(token[0]), time.perf_counter()):
            self._release(slot)

    def _step(self) -> None:
        n = len(self._active)
        logits = self._decode_logits(n).float()
        tokens = self._choose(logits, 0, n)
        self._ids[:n, 0].copy_(tokens)
        self._pos[:n] += 1
        if any(r.sampling.repetition_penalty != 1.0 for r in self._active):
            self._seen[:n].scatter_(1, tokens.view(n, 1), True)
        now = time.perf_counter()
        self._steps += 1
        done = []
        for i, (req, token) in enumerate(zip(self._active, tokens.tolist())):
            req.kv_len += 1
            if self._emit(req, token, now):
                done.append(i)
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

    def _emit(self, req: _Request, token: int, now: float) -> bool:
        """Hands one token to the reader; True when the request is finished."""
        req.tokens.append(token)
        req.first_at = req.first_at or now
        req.last_at = now
        self._tokens += 1
        req.out.put(token)
        return token in self._eos or len(req.tokens) >= req.sampling.max_new_tokens or req.cancel.is_set()

    def _release(self, slot: int) -> None:
        """Ends the request in `slot` and moves the last active request into the hole (slots stay dense)."""
        req = self._active[slot]
        req.out.put(req.stats())
        last = len(self._active) - 1
        if slot != last:
            moved = self._active[last]
            self._kv[:, :, slot, :, : moved.kv_len].copy_(self._kv[:, :, last, :, : moved.kv_len])
            for buf in (self._ids, self._pos, self._delta, self._penalty, self._seen):
                buf[slot].copy_(buf[last])
            self._active[slot] = moved
        self._active.pop()
        self._pos[last] = 0  # padding rows of a graph bucket write at position 0 of a free slot
        self._delta[last] = 0

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._active))):
            if self._active[i].cancel.is_set():
                self._release(i)

    def _finish_unstarted(self, req: _Request) -> None:
        req.out.put(req.stats())

    def _fail_active(self, exc: BaseException) -> None:
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
        for req in [*self._active, *waiting]:
            req.out.put(closed)
        self._active.clear()
        self._graphs.clear()
        self._kv = self._seen = None
