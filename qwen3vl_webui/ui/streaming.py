"""The chat handler's texts handed to gradio's event loop from a thread of its own (issue 12).

gradio runs a sync generator's every `next` on a worker thread of its limiter and hands the result back to the event
loop: two thread hand-offs for the first text and one per update, each waiting behind every other chat's updates in
the one event loop (bench/RESULTS.md, session 16: at 32 chats 0.18 s of the door's time passed before the handler's
first line). `on_event_loop(fn)` gives gradio an async generator instead: `fn`'s generator runs on one thread for the
whole answer (as the OpenAI API's `_Run` does) and each text it yields reaches the loop with one `call_soon_threadsafe`;
gradio awaits it without a worker thread. Each text is the whole answer so far, so a text not yet taken is replaced by
a newer one. QWEN3VL_CHAT_ON_LOOP=0 keeps gradio's own handling (the benchmarks' A/B).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

ENABLED = os.environ.get("QWEN3VL_CHAT_ON_LOOP", "1") != "0"


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
        self._closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chat-stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
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
            self._texts.close()  # type: ignore[attr-defined]
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

    def close(self) -> None:
        """The client went or pressed Stop: the generator is closed on its thread after its current step."""
        self._closing.set()


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
            pump.close()

    return stream
