"""Long-lived threads for the event loop's blocking work: a hand-off that never waits for a thread to start.

The chat page's stream (`ui.streaming`) and the OpenAI API's (`server.openai_api`) each iterate a chat on a thread of
their own, started from the event loop. `threading.Thread.start` blocks its caller until the new thread has run its
first line, which needs the GIL: under load the event loop stood in `Thread.start` for 11.5% of py-spy's samples of
its thread (2-core VM, 16 chats; bench/RESULTS.md, session 17), every other chat's update waiting meanwhile. A `Workers`
pool hands a job to an idle thread through its own queue (a lock and a put) and starts a thread only when every one
is busy; a thread idle for `idle_s` ends.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

IDLE_S = 60.0


class Workers:
    """`run(job)`: `job()` on an idle thread of the pool, or a new one; never more threads than jobs at once."""

    def __init__(self, name: str, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the most recently idle last: reused first, the others time out
        self.started = 0  # threads started so far (tests and the log read it)

    def run(self, job: Callable[[], object]) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self.started += 1
        if worker is None:
            worker = _Worker(self, job)
            worker.thread.start()  # the one wait left: every thread is busy
        else:
            worker.inbox.put(job)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def _rest(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _leave(self, worker: _Worker) -> bool:
        """True if `worker` left the idle list (it may end); False if `run` took it meanwhile (its job is coming)."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False


class _Worker:
    def __init__(self, pool: Workers, first: Callable[[], object]) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self.inbox.put(first)
        self.thread = threading.Thread(target=self._serve, name=pool.name, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                job = self.inbox.get(timeout=self.pool.idle_s)
            except queue.Empty:
                if self.pool._leave(self):
                    return
                continue  # taken by `run` just now: its job is on the way
            try:
                contextvars.Context().run(job)  # each job in a context of its own, as on a new thread
            except BaseException:  # noqa: BLE001 - a job's own errors are its own to report; the thread serves on
                log.exception("a %s job failed", self.pool.name)
            del job
            self.pool._rest(self)
