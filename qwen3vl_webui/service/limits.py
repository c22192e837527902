"""The context caps requests are held to: one owner, which the KV cache, the service and the sliders follow."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Prompt + answer tokens per request, and answer tokens."""

    max_context: int
    max_new_tokens: int


class ContextLimits:
    """The one owner of the context caps, shared by the model manager, the service and (through it) the UI.

    `configured`: the flags' caps (--max-context, --max-new-tokens): the sliders' tops as the page is built and the
    top the API check allows. `current`: what requests are held to: the configured caps, lowered by the start-up
    warm-up when they did not fit in memory (the status line says so, and the sliders' tops follow on the next page
    load; a request above them is held to them, not refused).

    The batch engine's KV slots follow `current`: the manager sizes them for `configured` at each load (the warm-up
    that follows a load tests the configured caps first, and a prompt longer than a slot is refused before it could
    run out of memory), and again for `current` once a warm-up has lowered it. Between a load and its warm-up no
    chat runs (the warm-up holds the scheduler's exclusive section); a load without a warm-up (`--warmup off`, or a
    failed precision switch reloading the old precision) keeps the configured slots, which only costs memory.
    """

    def __init__(self, configured: Limits) -> None:
        self.configured = configured
        self._current = configured
        self._lock = threading.Lock()

    @property
    def current(self) -> Limits:
        return self._current

    def set_current(self, limits: Limits) -> None:
        """The warm-up's result: never above the configured caps."""
        with self._lock:
            self._current = Limits(
                min(limits.max_context, self.configured.max_context),
                min(limits.max_new_tokens, self.configured.max_new_tokens),
            )
