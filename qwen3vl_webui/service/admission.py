"""Admission and concurrency: at most N generations on the GPU, a bounded wait line, exclusive reloads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Busy(RuntimeError):
    """Refused at once because the wait line is full."""


class Cancelled(RuntimeError):
    """The request was cancelled (stop, disconnect) while waiting for a slot."""


@dataclass(frozen=True)
class QueueState:
    running: int
    waiting: int
    max_concurrency: int
    queue_size: int
    peak_running: int


class Scheduler:
    """Counts GPU slots. Gradio's queue limits the UI's events; this limits every caller, API included.

    Generations share the slots; `exclusive()` (precision switch) waits for all of them to finish
    and keeps new ones waiting until it is done, so a reload never overlaps a generation.
    """

    def __init__(self, max_concurrency: int, queue_size: int) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._peak = 0
        self._exclusive = False

    def state(self) -> QueueState:
        with self._cond:
            return QueueState(self._running, self._waiting, self.max_concurrency, self.queue_size, self._peak)

    @contextmanager
    def slot(self, cancel: threading.Event | None = None, timeout: float | None = None) -> Iterator[None]:
        """Holds one generation slot for the duration of the block."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._running >= self.max_concurrency and self._waiting >= self.queue_size:
                raise Busy("The server is busy (all GPU slots and the wait line are full). Please try again shortly.")
            self._waiting += 1
            try:
                while self._exclusive or self._running >= self.max_concurrency:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled while waiting for a GPU slot")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise Busy("Timed out waiting for a GPU slot. Please try again shortly.")
                    # Wake periodically so a cancel set without notify() is still noticed.
                    self._cond.wait(0.1 if remaining is None else min(0.1, remaining))
            finally:
                self._waiting -= 1
            self._running += 1
            self._peak = max(self._peak, self._running)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Waits until no generation runs, then blocks new ones until the block ends."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._exclusive:
                self._cond.wait(0.1)
            self._exclusive = True
            try:
                while self._running > 0:
                    if deadline is not None and time.monotonic() > deadline:
                        raise Busy("Generations are still running; try the switch again when they finish.")
                    self._cond.wait(0.1)
            except BaseException:
                self._exclusive = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
