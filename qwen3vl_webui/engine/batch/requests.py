"""Requests of the batch engine: their state, the plain-data outputs of each step, and the streams readers hold."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen3vl_webui.engine.stops import StopText
from qwen3vl_webui.telemetry import RequestStats

if TYPE_CHECKING:
    from qwen3vl_webui.engine.batch.prefix import Medium
    from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
    from qwen3vl_webui.engine.stops import StopMatcher

_next_id = itertools.count(1).__next__


class EngineClosed(RuntimeError):
    """The engine was closed (model switch, shutdown) while the request waited or ran."""


@dataclass(eq=False)
class Request:
    """One generation on the engine's side: what it asked for and what it has produced (CPU state only)."""

    prompt: PreparedPrompt | None
    sampling: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)
    length: int = 0  # prompt tokens
    multimodal: bool = False  # the prompt holds images or videos
    id: int = field(default_factory=_next_id)
    submitted_at: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens held in its KV slot (prompt + fed-back tokens)
    first_at: float | None = None
    last_at: float | None = None
    ids: Any = None  # the prompt's token ids, 1-D on the CPU
    media: tuple[Medium, ...] = ()  # its images and videos (found only when prefix reuse is on)
    reusable: bool = True  # False: its media could not be told apart, so it neither reuses nor is kept
    stop: StopMatcher | None = None
    generator: Any = None  # its sampling generator (the sampler's), when it samples
    finish_reason: str | None = None

    @staticmethod
    def of(prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event) -> Request:
        inputs = prompt.inputs
        media = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        return Request(prompt, sampling, cancel, int(inputs["input_ids"].shape[1]), media)

    def ends(self, token: int, eos: frozenset[int]) -> str | None:
        """Why `token`, the request's next one, is its last ("stop", "length", "cancelled"), or None.

        Called once per token (the stop matcher keeps the bytes of the last few), before the token is emitted.
        """
        stopped = self.stop is not None and self.stop.push(token)
        if stopped or (token in eos and not self.sampling.ignore_eos):
            reason: str | None = "stop"
        elif len(self.tokens) + 1 >= self.sampling.max_new_tokens:
            reason = "length"
        else:
            reason = "cancelled" if self.cancel.is_set() else None
        self.finish_reason = reason
        return reason

    def stats(self) -> RequestStats:
        first = self.first_at or time.perf_counter()
        prompt = self.prompt
        return RequestStats(
            prompt_text_tokens=prompt.text_tokens if prompt else 0,
            prompt_image_tokens=prompt.image_tokens if prompt else 0,
            prompt_video_tokens=prompt.video_tokens if prompt else 0,
            new_tokens=len(self.tokens),
            ttft_s=first - self.submitted_at,
            decode_s=(self.last_at or first) - first,
        )


@dataclass(frozen=True)
class RequestOutput:
    """What one request got in one step: new token ids, and at its end why it ended and its stats (or an error)."""

    request_id: int
    new_token_ids: tuple[int, ...] = ()
    finished: str | None = None  # "stop", "length", "cancelled"; set with `stats`
    stats: RequestStats | None = None
    error: BaseException | None = None  # the request failed (bad media, engine closed): raised to its reader


@dataclass(frozen=True)
class EngineOutputs:
    """One message of the engine core: every request's news since the last one, and the core's counters."""

    outputs: tuple[RequestOutput, ...]
    steps: int  # decode steps read back so far
    prefill_forwards: int  # prefill forwards so far
    decode_launches: int  # decode steps enqueued so far


class Outbox:
    """Collects a step's outputs per request, in order, until the core publishes them as one EngineOutputs."""

    def __init__(self) -> None:
        self._tokens: dict[int, list[int]] = {}
        self._ends: dict[int, RequestOutput] = {}

    def __bool__(self) -> bool:
        return bool(self._tokens or self._ends)

    def token(self, req: Request, token: int) -> None:
        self._tokens.setdefault(req.id, []).append(token)

    def finish(self, req: Request, reason: str) -> None:
        self._tokens.setdefault(req.id, [])
        self._ends.setdefault(req.id, RequestOutput(req.id, finished=reason, stats=req.stats()))

    def fail(self, req: Request, error: BaseException) -> None:
        self._tokens.setdefault(req.id, [])
        self._ends.setdefault(req.id, RequestOutput(req.id, error=error))

    def take(self) -> tuple[RequestOutput, ...]:
        out = []
        for rid, tokens in self._tokens.items():
            end = self._ends.get(rid)
            out.append(RequestOutput(rid, tuple(tokens), end.finished, end.stats, end.error) if end else RequestOutput(rid, tuple(tokens)))  # fmt: skip
        self._tokens, self._ends = {}, {}
        return tuple(out)


class Mailbox(queue.SimpleQueue):  # type: ignore[type-arg]
    """One request's outputs, and `ended`: set once its last one (finished, or an error) is in, so that a reader that
    waits between two reads to take several tokens at once (`coalesced`) is woken at once by the end."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = threading.Event()

    def put_last(self, item: RequestOutput) -> None:
        self.put(item)
        self.ended.set()


class RequestStreams:
    """The reader side's mailboxes: routes each published output to the queue of its request's reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[int, Mailbox] = {}

    def open(self, request_id: int) -> Mailbox:
        mailbox = Mailbox()
        with self._lock:
            self._queues[request_id] = mailbox
        return mailbox

    def discard(self, request_id: int) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def fail_all(self, error: BaseException) -> None:
        """Every open request ends with `error` (the engine behind them is gone)."""
        with self._lock:
            queues, self._queues = self._queues, {}
        for request_id, mailbox in queues.items():
            mailbox.put_last(RequestOutput(request_id, error=error))

    def deliver(self, outputs: EngineOutputs) -> None:
        with self._lock:
            for out in outputs.outputs:
                mailbox = self._queues.get(out.request_id)
                if mailbox is None:
                    continue
                if out.finished or out.error is not None:
                    del self._queues[out.request_id]
                    mailbox.put_last(out)
                else:
                    mailbox.put(out)


class TokenStream:
    """An iterator whose close() (or garbage collection) cancels the request, even before the first next()."""

    def __init__(self, gen: Iterator[Any], cancel: threading.Event) -> None:
        self._gen, self._cancel = gen, cancel

    def __iter__(self) -> TokenStream:
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


def token_events(
    mailbox: queue.SimpleQueue[RequestOutput], alive: Callable[[], bool], poll_s: float
) -> Iterator[tuple[list[int], RequestStats | None]]:
    """(new token ids, None) per batch of tokens, then ([], stats). Raises the worker's error."""
    while True:
        try:
            item = mailbox.get(timeout=poll_s)
        except queue.Empty:
            if alive():
                continue
            try:  # what the engine's side put before it was seen dead (the reason it stopped) comes first
                item = mailbox.get_nowait()
            except queue.Empty:
                raise EngineClosed("The generation engine stopped.") from None
        new: list[int] = []
        while True:  # drain: a slow reader decodes several tokens at once
            new.extend(item.new_token_ids)
            if item.error is not None:
                raise item.error
            if item.finished is not None:
                if new:
                    yield new, None
                yield [], item.stats
                return
            try:
                item = mailbox.get_nowait()
            except queue.Empty:
                break
        yield new, None


def coalesced(
    events: Iterator[tuple[list[int], RequestStats | None]], ended: threading.Event, interval_s: float
) -> Iterator[tuple[list[int], RequestStats | None]]:
    """`events` read at most every `interval_s` (what arrived meanwhile comes in one batch), except that the first
    comes at once and the end of the request wakes the reader at once: a reader that waited out the interval after
    the last tokens would see the end up to `interval_s` late, and the client's next request with it."""
    last = 0.0
    for new, stats in events:
        yield new, stats
        now = time.monotonic()
        if stats is None and now - last < interval_s:
            ended.wait(interval_s - (now - last))
        last = time.monotonic()


class Detokenizer:
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


def text_events(
    events: Iterator[tuple[list[int], RequestStats | None]],
    tokenizer: Any,
    stop: tuple[str, ...],
    cancel: threading.Event,
    stats: Callable[[], RequestStats],
    on_cancel: Callable[[RequestStats], None] | None = None,
) -> Iterator[tuple[str, RequestStats | None]]:
    """(text so far, None) as it grows, then (full text, stats); a stop string is never shown, nor its start.

    However it ends early (closed, garbage-collected), `cancel` is set; a close reports `stats()` to `on_cancel`.
    """
    detok = Detokenizer(tokenizer)
    stops = StopText(stop) if stop else None
    text = ""
    ended = False
    try:
        for new, final_stats in events:
            if final_stats is not None:
                ended = True
                final = detok.final()
                yield (stops.cut(final)[0] if stops is not None else final), final_stats
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
        cancel.set()
        if not ended and on_cancel is not None:
            on_cancel(stats())
