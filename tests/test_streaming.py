"""ui/streaming.py: the chat handler's generator on a thread of its own, its texts awaited on gradio's event loop."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterator

import pytest

from qwen3vl_webui.ui import streaming


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


def test_closing_early_closes_the_handler_after_its_current_step() -> None:
    # Stop, or a client gone: gradio closes the async generator; the handler's generator is closed on its own thread
    # at its next yield (its `finally` cancels the request), within one of its steps.
    seen: dict[str, object] = {}

    async def run() -> float:
        stream = streaming.on_event_loop(lambda: _texts(1000, 0.01, seen))()
        assert await stream.__anext__() == "w0 "
        closed = time.monotonic()
        await stream.aclose()
        return closed

    closed = asyncio.run(run())
    deadline = time.monotonic() + 5
    while "closed_at" not in seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert seen["closed_on"] == "chat-stream"
    assert 0 <= float(seen["closed_at"]) - closed < 0.5  # type: ignore[arg-type]


def test_the_switch_leaves_gradio_its_own_handling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "ENABLED", False)
    assert streaming.on_event_loop(handler) is handler
