"""ui/streaming.py: the chat handler's generator on a thread of its own, its texts awaited on gradio's event loop."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from qwen3vl_webui.ui import streaming
from tests.conftest import wait_for


def _texts(n: int, pause_s: float, seen: dict[str, object]) -> Iterator[str]:
    seen["thread"] = threading.current_thread().name
    try:
        text = ""
        for k in range(n):
            text += f"w{k} "
            time.sleep(pause_s)
            yield text
    finally:
        seen["closed_on"] = threading.current_thread().name
        seen["closed_at"] = time.monotonic()


async def _close_after_first(handler: Callable[[], Iterator[str]], first: str) -> float:
    """Reads the first text of `handler` streamed on the loop, then closes the stream (Stop): the close's seconds."""
    stream = streaming.on_event_loop(handler)()
    assert await stream.__anext__() == first
    started = time.monotonic()
    await stream.aclose()
    return time.monotonic() - started


def handler(message: str, history: list, request: object = None) -> Iterator[str]:  # the shape gradio inspects
    yield from _texts(3, 0.0, {})


def test_the_wrapper_keeps_the_handlers_signature_and_is_an_async_generator() -> None:
    wrapped = streaming.on_event_loop(handler)
    assert inspect.isasyncgenfunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(handler)  # gradio fills in `request` by it


def test_texts_arrive_in_order_and_the_generator_ends_on_its_own_thread() -> None:
    seen: dict[str, object] = {}

    async def run() -> list[str]:
        return [t async for t in streaming.on_event_loop(lambda: _texts(5, 0.01, seen))()]

    got = asyncio.run(run())
    assert got == ["w0 ", "w0 w1 ", "w0 w1 w2 ", "w0 w1 w2 w3 ", "w0 w1 w2 w3 w4 "]
    assert seen["thread"] == seen["closed_on"] == "chat-stream" != threading.current_thread().name


def test_a_slow_reader_gets_the_newest_text_and_always_the_last() -> None:
    async def run() -> list[str]:
        out = []
        async for text in streaming.on_event_loop(lambda: _texts(40, 0.001, {}))():
            out.append(text)
            await asyncio.sleep(0.02)  # gradio busy with other chats: texts pile up meanwhile
        return out

    got = asyncio.run(run())
    assert got[-1] == "".join(f"w{k} " for k in range(40))
    assert len(got) < 40 and all(b.startswith(a) for a, b in zip(got, got[1:]))  # older texts were replaced


def test_an_error_in_the_handler_reaches_the_event_loop() -> None:
    def failing() -> Iterator[str]:
        yield "partial"
        raise RuntimeError("engine gone")

    async def run() -> list[str]:
        return [t async for t in streaming.on_event_loop(failing)()]

    with pytest.raises(RuntimeError, match="engine gone"):
        asyncio.run(run())


def test_closing_early_cancels_the_request_and_waits_for_the_handlers_end() -> None:
    # Stop, or a client gone: gradio closes the async generator. The handler's request is cancelled at once (it
    # waits on the service, which ends on that cancel), and the close returns once the handler's generator has been
    # closed on its own thread (its `finally` records the turn and gives the admission's place back).
    seen: dict[str, object] = {}

    def handler() -> Iterator[str]:
        cancel = streaming.current_cancel()
        try:
            yield "a"
            seen["cancelled"] = cancel is not None and cancel.wait(5)  # the service's stream ends on the cancel
            yield "b"
            yield "c"
        finally:
            seen["closed_on"] = threading.current_thread().name

    took = asyncio.run(_close_after_first(handler, "a"))
    assert seen == {"cancelled": True, "closed_on": "chat-stream"} and took < 1.0, (seen, took)
    assert streaming.current_cancel() is None  # only on a stream's thread


def test_the_handler_runs_in_the_callers_context_and_plain_iterators_pass() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def handler() -> Iterator[str]:
        yield var.get()

    async def run() -> list[str]:
        var.set("the event's")
        return [t async for t in streaming.on_event_loop(handler)()] + [
            t async for t in streaming.on_event_loop(lambda: iter(["x", "y"]))()
        ]

    got = asyncio.run(run())  # a plain iterator has no close(); its "x" may be replaced by "y" before it is taken
    assert got[0] == "the event's" and got[-1] == "y" and set(got[1:]) <= {"x", "y"}, got


def test_the_switch_leaves_gradio_its_own_handling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "ENABLED", False)
    assert streaming.on_event_loop(handler) is handler


def test_a_request_that_sets_its_own_cancel_at_its_end_still_delivers_its_last_text() -> None:
    # The service sets a request's cancel itself once its stream is over (a stop string, the end): the last texts,
    # which come after that, still reach the page.
    def handler() -> Iterator[str]:
        cancel = streaming.current_cancel()
        yield "the answer"
        assert cancel is not None
        cancel.set()
        yield "the answer, whole"

    async def run() -> list[str]:
        return [t async for t in streaming.on_event_loop(handler)()]

    assert asyncio.run(run())[-1] == "the answer, whole"


def test_a_handler_that_ignores_the_close_is_waited_for_at_most_close_wait_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stop pressed while the handler is deaf to its cancel (a long step): the close gives up after CLOSE_WAIT_S and
    # the page moves on; the handler's thread finishes on its own later, its `finally` on that thread.
    monkeypatch.setattr(streaming, "CLOSE_WAIT_S", 0.3)
    release = threading.Event()
    seen: dict[str, object] = {}

    def deaf() -> Iterator[str]:
        try:
            yield "first"
            release.wait(10)  # ignores current_cancel()
            yield "never read"
        finally:
            seen["closed_on"] = threading.current_thread().name

    waited = asyncio.run(_close_after_first(deaf, "first"))
    assert 0.25 <= waited < 2.0 and "closed_on" not in seen
    release.set()
    assert wait_for(lambda: "closed_on" in seen, 5) and seen["closed_on"] == "chat-stream"


def test_a_reused_thread_carries_no_cancel_over() -> None:
    # The streams' threads are pooled: the next job on the thread a stream used sees no cancel of that stream.
    during: dict[str, object] = {}

    def handler_with_state() -> Iterator[str]:
        during["cancel"] = streaming.current_cancel()
        during["thread"] = threading.get_ident()
        yield "done"

    async def run() -> list[str]:
        return [t async for t in streaming.on_event_loop(handler_with_state)()]

    assert asyncio.run(run()) == ["done"]
    after: dict[str, object] = {}
    finished = threading.Event()

    def next_job() -> None:
        after.update(cancel=streaming.current_cancel(), thread=threading.get_ident())
        finished.set()

    assert wait_for(lambda: streaming._WORKERS.idle > 0, 5)  # the stream's thread back in the pool
    streaming._WORKERS.run(next_job)
    assert finished.wait(5)
    assert during["cancel"] is not None and after["thread"] == during["thread"]  # the same, reused thread
    assert after["cancel"] is None
