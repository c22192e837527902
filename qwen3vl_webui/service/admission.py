"""Admission and concurrency: one admission for every front door (a cap in all and per client), at most N generations
on the GPU with a bounded wait line, exclusive reloads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

BUSY_MESSAGE = "The server is busy (all GPU slots and the wait line are full). Please try again shortly."


class Busy(RuntimeError):
    """Refused at once because the wait line is full."""


class Cancelled(RuntimeError):
    """The request was cancelled (stop, disconnect) while waiting for a slot."""


class Preempted(RuntimeError):
    """A cold (batch-job) request gave its GPU slot back to an interactive chat; run it again later."""


@dataclass(frozen=True)
class QueueState:
    running: int
    waiting: int
    max_concurrency: int
    queue_size: int
    peak_running: int
    cold_running: int = 0  # of `running`, batch-job items (they yield their slot to any chat that waits)
    cold_waiting: int = 0  # batch-job items waiting for a slot no chat wants (not in `waiting`)


class _ColdHolder:
    """A cold request holding a slot: `preempt` asks it to leave (its cancel, seen within one decode step)."""

    def __init__(self, preempt: Callable[[], None]) -> None:
        self.preempt = preempt
        self.preempted = False


class Scheduler:
    """Counts GPU slots. Gradio's queue limits the UI's events; this limits every caller, API included.

    Generations share the slots; `exclusive()` (precision switch) waits for all of them to finish
    and keeps new ones waiting until it is done, so a reload never overlaps a generation.

    Two classes share the slots: interactive chats (hot) and batch-job items (cold, `slot(cold=True)`). A cold
    request takes a slot only while no chat waits, counts against no wait line, and is preempted (its `preempt`
    callback: the caller cancels it, which frees the slot at the next decode step) as soon as a chat waits and every
    slot is taken: the chat gets the slot, the job item goes back to its queue and is run again later.
    """

    def __init__(self, max_concurrency: int, queue_size: int) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._peak = 0
        self._exclusive = False
        self._cold: list[_ColdHolder] = []  # cold requests holding a slot, oldest first
        self._cold_waiting = 0

    def state(self) -> QueueState:
        with self._cond:
            return QueueState(
                self._running, self._waiting, self.max_concurrency, self.queue_size, self._peak, len(self._cold),
                self._cold_waiting,
            )  # fmt: skip

    @contextmanager
    def slot(
        self, cancel: threading.Event | None = None, timeout: float | None = None, *, cold: bool = False,
        preempt: Callable[[], None] | None = None,
    ) -> Iterator[None]:  # fmt: skip
        """Holds one generation slot for the duration of the block.

        `cold`: a batch-job item; it waits while any chat waits, and `preempt` is called (under the scheduler's lock:
        it must only signal) when a chat needs its slot.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        holder = _ColdHolder(preempt or (lambda: None)) if cold else None
        with self._cond:
            if not cold and self._running >= self.max_concurrency and self._waiting >= self.queue_size:
                raise Busy(BUSY_MESSAGE)
            if cold:
                self._cold_waiting += 1
            else:
                self._waiting += 1
            try:
                while self._exclusive or self._running >= self.max_concurrency or (cold and self._waiting > 0):
                    if not cold:
                        self._preempt_cold()
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled while waiting for a GPU slot")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise Busy("Timed out waiting for a GPU slot. Please try again shortly.")
                    # Wake periodically so a cancel set without notify() is still noticed.
                    self._cond.wait(0.1 if remaining is None else min(0.1, remaining))
            finally:
                if cold:
                    self._cold_waiting -= 1
                else:
                    self._waiting -= 1
            self._running += 1
            self._peak = max(self._peak, self._running)
            if holder is not None:
                self._cold.append(holder)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if holder is not None:
                    self._cold.remove(holder)
                self._cond.notify_all()

    def _preempt_cold(self, everyone: bool = False) -> None:
        """Asks as many cold holders to leave as chats wait beyond the free slots (the newest first: the least work
        is lost); all of them if `everyone`. Called under the lock."""
        leaving = sum(1 for h in self._cold if h.preempted)
        need = len(self._cold) if everyone else self._waiting - max(0, self.max_concurrency - self._running)
        for holder in reversed(self._cold):
            if need - leaving <= 0:
                return
            if not holder.preempted:
                holder.preempted = True
                holder.preempt()
                leaving += 1

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
                    self._preempt_cold(everyone=True)  # a reload does not wait for a batch job to finish
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

class TooManyRequests(Busy):
    """Refused because this client already has its share of chats running or waiting."""


@dataclass(frozen=True)
class Client:
    """Who sends a chat, for the per-client cap: an address, and whether the cap applies (the operator's do not)."""

    address: str
    exempt: bool = False


class Admission:
    """The one admission of every front door: at most max concurrency + queue size requests running or waiting in
    all, and at most `max_per_client` per client address (0: no cap; an exempt client, the operator, has none).

    A request counts from `enter` (its prompt is built while it counts), so more than max concurrency + queue size
    never run or wait, whichever door they came through; the scheduler holds the GPU slots within it.
    """

    def __init__(self, scheduler: Scheduler, max_per_client: int = 0, on_refused: Callable[[], None] = lambda: None):
        self.scheduler = scheduler
        self.max_per_client = max_per_client
        self.on_refused = on_refused  # a client over its cap was refused
        self._per_client: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def held(self) -> int:
        """Requests inside now (running, waiting, or having their prompt built)."""
        with self._lock:
            return self._total

    @contextmanager
    def enter(self, client: Client | None) -> Iterator[None]:
        """Holds one place for the block; Busy when all are taken, TooManyRequests when the client has its share."""
        cap = 0 if client is None or client.exempt else self.max_per_client
        address = client.address if client is not None else ""
        with self._lock:
            if self._total >= self.scheduler.max_concurrency + self.scheduler.queue_size:
                raise Busy(BUSY_MESSAGE)
            held = self._per_client.get(address, 0)
            if cap and held >= cap:
                self.on_refused()
                raise TooManyRequests(
                    f"You already have {held} chat{'s' if held != 1 else ''} running or waiting, the most one client "
                    "may have at once. Wait for an answer to finish (or stop it), then send this again."
                )
            self._total += 1
            self._per_client[address] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                left = self._per_client.pop(address) - 1
                if left:
                    self._per_client[address] = left


class SlotRequest:
    """Waits for a scheduler slot in a helper thread so the chat generator can keep yielding.

    A generator blocked inside `Scheduler.slot` cannot be closed; one that yields `Waiting` every
    quarter second can, so a client that leaves while waiting is dropped before any GPU work.
    """

    def __init__(
        self, scheduler: Scheduler, cancel: threading.Event, timeout: float | None, *, cold: bool = False,
        preempt: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._cm = scheduler.slot(cancel, timeout, cold=cold, preempt=preempt)
        self._cancel = cancel
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._held = False
        threading.Thread(target=self._acquire, name="slot-wait", daemon=True).start()

    def _acquire(self) -> None:
        try:
            self._cm.__enter__()
            self._held = True
        except BaseException as exc:  # Busy, Cancelled: re-raised in the chat's thread
            self._error = exc
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(seconds)

    def result(self) -> None:
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        if not self._done.is_set():
            self._cancel.set()  # the scheduler notices within 0.1 s
            self._done.wait()
        if self._held:
            self._held = False
            self._cm.__exit__(None, None, None)
