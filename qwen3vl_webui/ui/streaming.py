"""The chat handler's texts handed to gradio's event loop from a thread of its own (issue 12).

gradio runs a sync generator's every `next` on a worker thread of its limiter and hands the result back to the event
loop: two thread hand-offs for the first text and one per update, each waiting behind every other chat's updates in
the one event loop (bench/RESULTS.md, session 16: at 32 chats 0.18 s of the door's time passed before the handler's
first line). `on_event_loop(fn)` gives gradio an async generator instead: `fn`'s generator runs on one thread for the
whole answer (as the OpenAI API's `_Run` does) and each text it yields reaches the loop with one `call_soon_threadsafe`;
gradio awaits it without a worker thread. The thread comes from a pool (workers.py), so the loop never waits for a
thread to start. Each text is the whole answer so far, so a text not yet taken is replaced by
a newer one. QWEN3VL_CHAT_ON_LOOP=0 keeps gradio's own handling (the benchmarks' A/B).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from qwen3vl_webui.workers import Workers

ENABLED = os.environ.get("QWEN3VL_CHAT_ON_LOOP", "1") != "0"
_WORKERS = Workers("chat-stream")
# How long a closed stream (Stop, a client gone) waits for the handler to finish its step and its bookkeeping (the
# request cancelled, the turn recorded, the admission's place given back), as gradio's own handling waited for it.
CLOSE_WAIT_S = 10.0
_local = threading.local()


def current_cancel() -> threading.Event | None:
    """On the thread of an `on_event_loop` stream: the event its closing sets (the handler passes it to the service
    as the request's cancel, so a Stop reaches the engine at its next step); None elsewhere."""
    return getattr(_local, "cancel", None)


class _Pump:
    """Iterates `texts` on a thread; the event loop takes the newest text, or learns the end (or the error)."""

    def __init__(self, texts: Iterator[str]) -> None:
        self._texts = texts
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._newest: str | None = None
        self._done = False
        self._error: BaseException | None = None
        # Set by close(): the handler's request stops at its next step. The service may set it too once the request
        # is over (a stop string, the end), so the pump stops taking texts only on `_closing`.
        self.cancel = threading.Event()
        self._closing = threading.Event()
        # The caller's context goes along (gradio's own worker threads run the handler in a copy of it too). A thread
        # of the pool, not a new one: Thread.start would hold the event loop until the thread ran (workers.py).
        context = contextvars.copy_context()
        _WORKERS.run(functools.partial(context.run, self._run))

    def _run(self) -> None:
        _local.cancel = self.cancel  # this stream's, for as long as it runs on this (pooled) thread
        try:
            for text in self._texts:
                if self._closing.is_set():
                    break
                with self._lock:
                    self._newest = text
                self._signal()
        except BaseException as exc:  # handed to the event loop, raised there to gradio
            self._error = exc
        finally:
            # On this thread, where the generator runs: its `finally` (the conversation's bookkeeping, the request's
            # cancel when closed early) runs here, never on the event loop.
            try:
                close = getattr(self._texts, "close", None)
                if close is not None:
                    close()
            finally:
                _local.cancel = None
                with self._lock:
                    self._done = True
                self._signal()

    def _signal(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: the server stopped under the stream
            pass

    async def next(self) -> str | None:
        """The newest text not yet taken; None at the end."""
        while True:
            with self._lock:
                text, self._newest = self._newest, None
                done = self._done
            if text is not None:
                return text
            if done:
                if self._error is not None:
                    raise self._error
                return None
            self._wake.clear()  # a text arriving from here on sets it again (the set runs on this loop)
            await self._wake.wait()

    @property
    def done(self) -> bool:
        with self._lock:
            return self._done

    async def close(self) -> None:
        """The client went or pressed Stop: the request is cancelled (it leaves the engine at its next step) and the
        generator closed on its thread after its current step, which this waits for (at most CLOSE_WAIT_S)."""
        self._closing.set()
        self.cancel.set()
        deadline = self._loop.time() + CLOSE_WAIT_S
        while not self.done:  # the thread's last `_signal` comes after `done` is set
            self._wake.clear()
            if self.done:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - self._loop.time()))
            except asyncio.TimeoutError:  # the thread ends on its own; its request is cancelled
                break


def on_event_loop(fn: Callable[..., Iterator[str]]) -> Callable[..., Any]:
    """`fn` (a generator function of texts) as an async generator function with `fn`'s signature (gradio reads it to
    fill in `request` and the inputs); `fn` itself when QWEN3VL_CHAT_ON_LOOP=0."""
    if not ENABLED:
        return fn

    @functools.wraps(fn)
    async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
        pump = _Pump(fn(*args, **kwargs))
        try:
            while (text := await pump.next()) is not None:
                yield text
        finally:
            await pump.close()

    return stream
