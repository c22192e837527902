"""The batch engine's policy: which requests join, which prompts the next prefill forward takes, when to decode.

Plain Python over CPU state (no torch): it decides; the runner and the KV slots act on its decisions.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from qwen3vl_webui.engine.batch.requests import EngineClosed, Request


@dataclass(eq=False)
class PrefillJob:
    """A request between admission and its first token: how much of its prompt is in its KV so far.

    A long text prompt fills its KV chunk by chunk; an image/video prompt first runs the vision tower alone, then
    its text in chunks. The tensors of all this are the runner's; the job holds only where it stands.
    """

    req: Request
    length: int
    multimodal: bool
    done: int = 0  # prompt tokens already in its KV
    base: int = 0  # of them, copied from a retained prefix: the vision tower runs only on media after it
    retried: bool = False  # already retried once after running out of memory

    def short_text(self, chunk: int) -> bool:
        """A text prompt not started yet that fits one chunk: it may share a forward with others."""
        return not self.multimodal and self.done == 0 and self.length <= chunk


@dataclass(frozen=True)
class Admission:
    admitted: list[Request]  # to start prefilling, in arrival order
    dropped: list[Request]  # cancelled while they waited


@dataclass(frozen=True)
class PrefillPlan:
    jobs: list[PrefillJob]  # one forward: several short text prompts together, or one prompt's next piece
    cancelled: list[PrefillJob] = field(default_factory=list)  # dropped on the way: their requests were cancelled
    # An image/video prompt whose vision tower has not run: the tower alone is this forward (streams are decoding and
    # more than half a chunk of its text is left), else the text follows it in the same forward.
    tower_alone: bool = False
    decoding: bool = False  # a running stream is mid-answer: this forward stalls it


class Scheduler:
    """Waiting requests (any thread adds), prompts being prefilled and the running batch (worker-owned).

    Running request i lives in KV slot i; a request that leaves is replaced by the last one, so slots stay dense.
    """

    def __init__(
        self, max_batch: int, prefill_chunk: int, idle_prefill_factor: int = 4, burst_forwards: int = 2
    ) -> None:
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.idle_prefill_factor = idle_prefill_factor
        self.burst_forwards = burst_forwards
        self._cond = threading.Condition()  # its lock is re-entrant: hold() may wrap add()
        self._waiting: deque[Request] = deque()
        self._closed = False
        self._nudged = False  # the worker has something of its own to do between two steps (a compiled bucket)
        self.prefilling: deque[PrefillJob] = deque()  # admitted, holding a slot, no token yet
        self.running: list[Request] = []
        self.peak = 0
        self.prefill_forwards = 0
        self.decode_launches = 0
        self._forwards_since_step = 0  # prefill forwards since the last decode step was enqueued

    # ------------------------------------------------------------------ any thread

    def add(self, req: Request) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("The generation engine is closed.")
            self._waiting.append(req)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No admission meanwhile: requests added inside are admitted together."""
        with self._cond:
            yield

    def nudge(self) -> None:
        """Wakes an idle worker for one step with nothing admitted (e.g. to swap in a compiled decode step)."""
        with self._cond:
            self._nudged = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def waiting_load(self) -> tuple[int, float | None]:
        """(waiting requests, submit time of the oldest, None if none)."""
        with self._cond:
            return len(self._waiting), min((r.submitted_at for r in self._waiting), default=None)

    # ------------------------------------------------------------------ worker

    def admit(self) -> Admission | None:
        """Blocks until there is work; then the waiting requests that fit the free slots, or None once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self.running and not self.prefilling:
                if self._nudged:
                    # Consumed only here, where it ends an idle wait: a nudge that lands while a step is in flight
                    # stays set until the worker is idle (clearing it on every admit lost it, and the swap and the
                    # compile thread behind it then waited for the next request).
                    self._nudged = False
                    break
                self._cond.wait()
            if self._closed:
                return None
            dropped = [r for r in self._waiting if r.cancel.is_set()]
            for r in dropped:
                self._waiting.remove(r)
            incoming = []
            while self._waiting and len(self.running) + len(self.prefilling) + len(incoming) < self.max_batch:
                incoming.append(self._waiting.popleft())
            return Admission(incoming, dropped)

    def start_prefill(self, req: Request, reused: int = 0) -> PrefillJob:
        """Queues an admitted request's prefill; `reused` prompt tokens came from a retained prefix."""
        job = PrefillJob(req, req.length, req.multimodal, done=reused, base=reused)
        self.prefilling.append(job)
        return job

    def mid_answer(self) -> bool:
        """Whether a running stream is past its first token (a stall would break an answer under way)."""
        return any(len(r.tokens) > 1 and r.finish_reason is None for r in self.running)  # not one that just ended

    def burst_pending(self) -> bool:
        """Short text prompts still to prefill while every running stream holds only its first token: a burst of
        arrivals. Its prefill goes first (the first decode step waits for up to burst_forwards forwards): 32 prompts
        at once then take 2 large forwards instead of 1 + 4 interleaved with decode steps; nobody is mid-answer."""
        if not self.prefilling or self.mid_answer():
            return False
        return all(j.short_text(self.prefill_chunk) for j in self.prefilling)

    def next_prefill(self) -> PrefillPlan | None:
        """The next forward's prompts: short text prompts together up to `prefill_chunk` padded tokens (rows times the
        widest, as the forward holds them: a long prompt among short ones no longer pads them all to its length),
        else one prompt.

        With no stream mid-answer there is nobody to stall, so short prompts batch up to idle_prefill_factor times
        more tokens: a burst of arrivals then takes a few large forwards instead of many small ones (each eager
        forward also costs ~30 ms of Python launches and one host sync for its first tokens). Cancelled prompts met
        on the way leave the queue. None when nothing is prefilling.
        """
        if not self.prefilling:
            return None
        group: list[PrefillJob] = []
        cancelled: list[PrefillJob] = []
        chunk = self.prefill_chunk
        decoding = self.mid_answer()
        budget = chunk * (1 if decoding else self.idle_prefill_factor)
        width = 0
        for job in list(self.prefilling):
            if job.req.cancel.is_set():
                self.prefilling.remove(job)
                cancelled.append(job)
                continue
            short = job.short_text(chunk)
            if not group:
                group.append(job)
                width = job.length
                if not short:
                    break
            elif short and (len(group) + 1) * max(width, job.length) <= budget:  # padded rows x widest
                group.append(job)
                width = max(width, job.length)
            else:
                break
        if not group:
            return PrefillPlan([], cancelled)
        self.prefill_forwards += 1
        self._forwards_since_step += 1
        first = group[0]
        # The vision tower costs under half as much per token as the text model: with the text left within half a
        # chunk, tower and text together stall the running streams no longer than a full chunk would.
        alone = len(group) == 1 and first.multimodal and bool(self.running) and first.length - first.done > chunk // 2
        return PrefillPlan(group, cancelled, alone, decoding)

    def advance(self, job: PrefillJob, done: int) -> None:
        job.done = done

    def prefill_done(self, job: PrefillJob) -> None:
        """The job left the prefill queue: its prompt is in, or it failed."""
        self.prefilling.remove(job)

    def may_retry(self, jobs: list[PrefillJob]) -> bool:
        """After a forward ran out of memory: whether its jobs run once more (each is retried once at most)."""
        if any(job.retried for job in jobs):
            return False
        for job in jobs:
            job.retried = True
        return True

    def join(self, req: Request) -> int:
        """The request joins the running batch; returns its slot."""
        slot = len(self.running)
        if slot == 0:  # the forwards before this stream existed delayed nobody (see burst_pending)
            self._forwards_since_step = 1
        self.running.append(req)
        self.peak = max(self.peak, len(self.running))
        return slot

    def unjoin(self, req: Request) -> int | None:
        """Takes back a join that failed half-way (only the last one can); returns the slot it held."""
        if self.running and self.running[-1] is req:
            self.running.pop()
            return len(self.running)
        return None

    def decode_now(self) -> bool:
        """Whether to enqueue a decode step now: someone runs, and no burst is still owed a prefill forward."""
        return bool(self.running) and not (self.burst_pending() and self._forwards_since_step < self.burst_forwards)

    def launched(self) -> None:
        self._forwards_since_step = 0
        self.decode_launches += 1

    def cancelled_slots(self) -> Iterator[int]:
        """Slots of cancelled running requests, highest first (release each before asking for the next)."""
        for slot in reversed(range(len(self.running))):
            if self.running[slot].cancel.is_set():
                yield slot

    def release(self, slot: int) -> int:
        """The request in `slot` leaves; the last one moves into the hole. Returns the last slot (now free)."""
        last = len(self.running) - 1
        if slot != last:
            self.running[slot] = self.running[last]
        self.running.pop()
        return last

    def fail_running(self) -> list[Request]:
        failed, self.running = self.running, []
        return failed

    def drain(self) -> list[Request]:
        """At shutdown: every request it holds (running, prefilling, waiting), all removed."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        held = [*self.running, *(job.req for job in self.prefilling), *waiting]
        self.running, self.prefilling = [], deque()
        return held
