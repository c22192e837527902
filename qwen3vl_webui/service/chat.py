"""The service the UI talks to: chats under one admission and the scheduler, warm-up, OOM recovery, deadlines, drain."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen3vl_webui import plan, planner, precisions
from qwen3vl_webui.engine.faults import FaultInjector, is_out_of_memory
from qwen3vl_webui.engine.request import PreparedPrompt, RequestError
from qwen3vl_webui.heap import HeapTrimmer
from qwen3vl_webui.media import MediaError
from qwen3vl_webui.service import warmup
from qwen3vl_webui.service.admission import (
    Admission,
    Busy,
    Client,
    Preempted,
    QueueState,
    Scheduler,
    SlotRequest,
    TooManyRequests,
)
from qwen3vl_webui.service.backend_prompt import WHOLE_VIDEO_REFUSED, MediaParts, build_messages
from qwen3vl_webui.service.limits import Limits
from qwen3vl_webui.service.longdoc import LongDocuments, has_documents
from qwen3vl_webui.service.longvideo import LongVideos, long_video
from qwen3vl_webui.service.manager import ModelManager, SwitchRefused, SwitchReport
from qwen3vl_webui.service.metrics import (
    CostView,
    DoorMetrics,
    LoadHistory,
    MonotonicTotal,
    RequestMetrics,
    Sample,
    cost_view,
)
from qwen3vl_webui.service.prompt import ChatRequest, MediaCache, RequestTimedOut, TurnCounts, build_prompt
from qwen3vl_webui.telemetry import (
    GenerationStats,
    GpuProbe,
    GpuSnapshot,
    RequestStats,
    SystemSnapshot,
    format_bytes,
    read_system,
)
from qwen3vl_webui.weights.model import LoadedModel

if TYPE_CHECKING:
    from qwen3vl_webui.engine.backend.decoder import BackendStatus
    from qwen3vl_webui.engine.batch import EngineSnapshot

log = logging.getLogger(__name__)

# How long a chat waits for the first model load before it is told to come back.
READY_TIMEOUT_S = 600.0
# How often a waiting request reports back; between reports gradio may close it (client gone).
WAIT_REPORT_S = 0.25
SHUTDOWN_MESSAGE = "The server is shutting down; this message was not run. Please try again in a minute."


class ShuttingDown(Busy):
    """Refused because the server is draining for shutdown."""


@dataclass(frozen=True)
class Waiting:
    """Yielded by `chat(..., report_waiting=True)` while the request waits (model load or GPU slot)."""

    reason: str
    waiting: int
    running: int


@dataclass
class Counters:
    """What the service did, for tests, the soak report and the panel. Updated under the service lock."""

    generations_started: int = 0
    generations_finished: int = 0
    oom: int = 0
    timed_out: int = 0
    refused_shutdown: int = 0
    refused_per_client: int = 0
    memory_releases: int = 0
    active: int = 0  # generate() calls running right now, counted around the worker itself
    peak_active: int = 0


@dataclass(frozen=True)
class Finished:
    """Yielded last by `chat(..., report_end=True)`: the whole answer (stop strings cut) and its figures."""

    text: str
    stats: RequestStats


@dataclass(frozen=True)
class PanelSnapshot:
    """Everything the live panel shows, as plain data (the UI formats it)."""

    status: str
    notice: str
    precision: str | None
    is_demo: bool
    device: str | None
    gpu: GpuSnapshot | None
    gpu_reason: str
    system: SystemSnapshot
    queue: QueueState
    last: RequestStats | None
    rolling_tokens_per_s: float | None
    rolling_ttft_s: float | None
    requests: int
    decoder: str = ""
    engine: EngineSnapshot | None = None  # the batch engine's figures (prefix reuse), if it decodes
    cost: CostView | None = None  # the GPU's price against the measured throughput (--gpu-hourly-cost)
    backend: BackendStatus | None = None  # a front end's backend (--backend-url): reachable, its /metrics figures


@dataclass(frozen=True)
class ServingLoad:
    running: int
    waiting: int
    kv_used: int  # KV slots holding a request (the batch engine's), or GPU slots in use
    kv_total: int
    engine: EngineSnapshot | None
    prefix_queries: int = 0  # prompt tokens the batch engine looked up in its retained KV, since start
    prefix_hits: int = 0  # of them, reused


class _Active:
    """One chat in flight: its cancel event and, when the server stopped it, why."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.stopped_by: str | None = None

    def stop(self, reason: str) -> None:
        self.stopped_by = self.stopped_by or reason
        self.cancel.set()


class ChatService:
    def __init__(
        self,
        manager: ModelManager,
        scheduler: Scheduler,
        stats: GenerationStats,
        probe: GpuProbe,
        *,
        faults: FaultInjector | None = None,
        request_timeout: float = 0.0,
        max_per_client: int = 0,
        gpu_hourly_cost: float | None = None,
    ) -> None:
        self.manager = manager
        self.scheduler = scheduler
        self.stats = stats
        self.probe = probe
        self.faults = faults or FaultInjector()
        self.request_timeout = request_timeout
        self.context = manager.limits  # the one owner of the context caps (service/limits.py)
        self.counters = Counters()
        self.warmup_note = ""
        self.warmed = threading.Event()  # cleared while a start-up load + warm-up is pending
        self.warmed.set()
        self._fatal: str | None = None
        self._media = MediaCache()
        self._parts = MediaParts()  # a front end's files as data: URIs (service/backend_prompt.py)
        self._heap = HeapTrimmer()  # gives freed host memory back to the OS when no generation runs
        self._counts = TurnCounts()
        # The one admission of every front door: slots + wait line in all, and each client's own cap (0: none).
        self.admission = Admission(scheduler, max_per_client, on_refused=lambda: self._count("refused_per_client"))
        self._shape_cache: tuple[int, planner.ModelShape] | None = None
        self._lock = threading.Lock()
        self._switch_lock = threading.Lock()
        self._last_switch = -1e9
        self._switch_guards: list[Callable[[], str | None]] = []  # each: why not to switch now, or None
        self._switching = False
        self._active: set[_Active] = set()
        self._draining = threading.Event()
        # /metrics and the panel's plots and cost (service/metrics.py)
        self.metrics = RequestMetrics()
        self.door_metrics = DoorMetrics()  # the front doors' own share of a chat's first-token wait
        self.gpu_hourly_cost = gpu_hourly_cost
        self.started_at = time.monotonic()
        self.history = LoadHistory(self._sample)
        self._engine_tokens = MonotonicTotal()
        self._prefix_queries = MonotonicTotal()
        self._prefix_hits = MonotonicTotal()
        self._engine_seen = False
        # Chats with documents attached: whole if they fit, else sliding windows + summary merge (service/longdoc.py).
        self.documents = LongDocuments(
            self.chat, lambda: self.manager.wait_ready(READY_TIMEOUT_S).processor.tokenizer, Finished
        )
        self.videos = LongVideos(self.chat, Finished, self.documents.counter)  # "whole video": time segments

    @property
    def limits(self) -> Limits:
        """The caps requests are held to now (the configured ones, lowered by the warm-up if those did not fit)."""
        return self.context.current

    @property
    def configured_limits(self) -> Limits:
        return self.context.configured

    # -- chat -------------------------------------------------------------------------------
    def chat(
        self,
        request: ChatRequest,
        cancel: threading.Event | None = None,
        *,
        report_waiting: bool = False,
        client: Client | None = None,
        report_end: bool = False,
        cold: bool = False,
        deadline: float | None = None,
    ) -> Iterator[str | Waiting | Finished]:
        """Yields the growing answer (and, if asked, `Waiting` while queued, and `Finished` last).

        `cold`: a batch-job item (service/jobs.py). It takes no place in the admission (the job runner bounds its
        own), gets a GPU slot only while no chat waits for one, and raises Preempted when a chat takes its slot back.

        Raises RequestError (the user's to fix, or an OOM / timeout told as one), Busy, TooManyRequests or
        ShuttingDown. Closing it stops the GPU work within one decode step and frees the slot. The prompt is
        built before the request waits for a GPU slot, within the request's deadline: a slow prompt (many
        files, a long chat) never holds a slot another chat could use. `deadline` (time.monotonic()): an earlier
        end than --request-timeout's; the whole answer's, when this chat is one step of a long document or video.
        """
        if request.whole_video and self.manager.backend is not None:  # segments are decoded here, not sent
            raise RequestError(WHOLE_VIDEO_REFUSED)
        if has_documents(request.message) or long_video(request) is not None:
            yield from self._in_steps(request, cancel, report_waiting, report_end, client, cold, deadline)
            return
        try:
            yield from self._chat(request, cancel, report_waiting, client, report_end, cold, deadline)
        except Busy as exc:  # ShuttingDown and TooManyRequests are Busy too
            reason = {ShuttingDown: "shutting_down", TooManyRequests: "per_client"}.get(type(exc), "busy")
            self.metrics.refuse(reason)
            raise

    def _in_steps(
        self, request: ChatRequest, cancel: threading.Event | None, report_waiting: bool, report_end: bool,
        client: Client | None, cold: bool, deadline: float | None,
    ) -> Iterator[str | Waiting | Finished]:  # fmt: skip
        """A long document or a whole video: several chats (each part, then the merge) that come back through
        `chat` without documents. --request-timeout bounds them all together, not each one."""
        request = self._within_limits(request)  # the windows are planned for the context the steps will get
        if self.request_timeout:
            whole = time.monotonic() + self.request_timeout
            deadline = whole if deadline is None else min(deadline, whole)
        kw = {"client": client, "cold": cold, "deadline": deadline}
        video = long_video(request)
        steps = (
            self.documents.answer(request, cancel, report_waiting, report_end, **kw) if video is None
            else self.videos.answer(request, video, cancel, report_waiting, report_end, **kw)
        )  # fmt: skip
        shown = ""  # the answer text the caller has (the merge's); a part's own notes are never shown
        with contextlib.closing(steps):
            try:
                for item in steps:
                    if isinstance(item, str):
                        shown = item
                    yield item
            except RequestTimedOut:
                if deadline is None or time.monotonic() < deadline:  # not the deadline: the server shutting down
                    raise
                raise RequestTimedOut(
                    f"Stopped after {self.request_timeout:g} s, the server's per-request limit (--request-timeout), "
                    "which covers every part of a long document or video.", shown,
                ) from None  # fmt: skip

    def _chat(
        self, request: ChatRequest, cancel: threading.Event | None, report_waiting: bool, client: Client | None,
        report_end: bool, cold: bool = False, given_deadline: float | None = None,
    ) -> Iterator[str | Waiting | Finished]:  # fmt: skip
        active = _Active(cancel or threading.Event())
        if self._draining.is_set():
            self._count("refused_shutdown")
            raise ShuttingDown(SHUTDOWN_MESSAGE)
        started = time.monotonic()
        deadline = started + self.request_timeout if self.request_timeout else None
        if given_deadline is not None:  # one step of a longer answer: the whole answer's end comes first
            deadline = given_deadline if deadline is None else min(deadline, given_deadline)
        with contextlib.nullcontext() if cold else self.admission.enter(client):
            with self._lock:
                self._active.add(active)
            try:
                yield from self._wait_ready(started, deadline, report_waiting)
                if self._fatal:
                    raise RequestError(self._fatal)
                request = self._within_limits(request)
                prompt = self._build(request, deadline)
                remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
                preempt = (lambda: active.stop("preempted")) if cold else None
                slot = SlotRequest(self.scheduler, active.cancel, remaining, cold=cold, preempt=preempt)
                try:
                    while not slot.wait(WAIT_REPORT_S):
                        if report_waiting:
                            state = self.scheduler.state()
                            reason = "the model reload to finish" if self.manager.current() is None else "a GPU slot"
                            yield Waiting(reason, state.waiting, state.running)
                    slot.result()
                    if active.stopped_by == "shutdown":
                        raise ShuttingDown(SHUTDOWN_MESSAGE)
                    yield from self._generate(request, prompt, active, deadline, report_end, (started, time.monotonic()))
                finally:
                    slot.release()
            finally:
                with self._lock:
                    self._active.discard(active)

    def _wait_ready(self, started: float, deadline: float | None, report: bool) -> Iterator[Waiting]:
        while True:
            try:
                self.manager.wait_ready(WAIT_REPORT_S)
                self.warmed.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                return
            except TimeoutError:
                limit = started + READY_TIMEOUT_S if deadline is None else min(deadline, started + READY_TIMEOUT_S)
                if time.monotonic() > limit:
                    raise
                if report:
                    yield Waiting("the model to load", 0, 0)

    def _build(self, request: ChatRequest, deadline: float | None) -> PreparedPrompt:
        loaded = self.manager.wait_ready(0)
        if self.manager.backend is not None:  # a front end: OpenAI messages for the backend, no processor here
            return build_messages(request, self._parts, deadline)
        try:
            self.faults.fire("build", 1)  # the prompt's length is not known yet: rules with a `>N` never fire here
            return build_prompt(loaded, request, self._media, self._counts, deadline)
        except RequestTimedOut:
            self._count("timed_out")
            raise
        except MediaError as exc:
            raise RequestError(str(exc)) from exc

    def _generate(
        self, request: ChatRequest, prompt: PreparedPrompt, active: _Active, deadline: float | None, report_end: bool,
        times: tuple[float, float] = (0.0, 0.0),
    ) -> Iterator[str | Finished]:  # fmt: skip
        """`times`: (arrival, GPU slot taken), time.monotonic(), for the request metrics."""
        # After the slot: a precision switch may have happened. The prompt holds no weights (the processor's
        # output is the same in every precision), so it stays valid.
        loaded = self.manager.wait_ready(0)
        timer = None
        if deadline is not None:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), active.stop, args=("timeout",))
            timer.daemon = True
            timer.start()
        text, oom, final, cancelled_first = "", None, None, False
        stopped: list[RequestStats] = []  # a request stopped early reports its figures through on_cancel
        outcome = "abort"  # closed by the caller (client gone) unless it ends otherwise

        def on_cancel(stats: RequestStats) -> None:
            stopped.append(stats)
            self.stats.record(stats)

        self._generation_began()
        try:
            decoder = self.manager.decoder
            if decoder is None:  # only before the first load finishes; wait_ready above rules it out
                raise RuntimeError("no decoder attached")
            tokens = decoder.stream(loaded, prompt, request.sampling, active.cancel, on_cancel, self.faults)
            with contextlib.closing(tokens):
                for text, stats in tokens:
                    if stats is not None:
                        self.stats.record(stats)
                        final = Finished(text, stats)
                        # Cancelled before its end came (Stop, an API client gone: openai_api sets the cancel) is an
                        # abort, as in vLLM. Read here: a decoder sets the cancel itself once its stream is over.
                        cancelled_first = active.cancel.is_set()
                    else:
                        yield text
            cancelled = stopped or active.stopped_by or cancelled_first
            outcome = "abort" if final is None or cancelled else (
                "length" if final.stats.new_tokens >= request.sampling.max_new_tokens else "stop"
            )
        except Exception as exc:
            outcome = "error"
            if not is_out_of_memory(exc):
                raise
            oom = _first_line(exc)
        finally:
            if timer is not None:
                timer.cancel()
            self._generation_ended(finished=oom is None)
            figures = final.stats if final is not None else (stopped[-1] if stopped else None)
            self.metrics.finished(outcome, times[0], times[1], prompt.tokens, figures)
        if oom is not None:  # outside the except block: the traceback (and its tensors) is gone now
            del loaded
            self.release_memory()
            self._count("oom")
            log.warning("CUDA OOM on a %d-token prompt: %s", prompt.tokens, oom)
            raise RequestError(
                f"The GPU ran out of memory on this request ({prompt.tokens:,} prompt tokens + up to "
                f"{request.sampling.max_new_tokens:,} new); it was stopped and its memory released. Try a shorter "
                "message, fewer or smaller images and videos, or a lower max context."
            )
        if active.stopped_by == "timeout":
            self._count("timed_out")
            raise RequestTimedOut(
                f"Stopped after {self.request_timeout:g} s, the server's per-request limit (--request-timeout).",
                text,
            )
        if active.stopped_by == "shutdown":
            raise RequestTimedOut("Stopped: the server is shutting down.", text)
        if active.stopped_by == "preempted":
            raise Preempted("an interactive chat took this slot back")
        if report_end and final is not None:
            yield final

    def _within_limits(self, request: ChatRequest) -> ChatRequest:
        """Holds the request to the warm-up's limits (which may be below the sliders' tops)."""
        limits = self.limits
        if request.max_context <= limits.max_context and request.sampling.max_new_tokens <= limits.max_new_tokens:
            return request
        sampling = dataclasses.replace(
            request.sampling, max_new_tokens=min(request.sampling.max_new_tokens, limits.max_new_tokens)
        )
        return dataclasses.replace(request, max_context=min(request.max_context, limits.max_context), sampling=sampling)

    def _generation_began(self) -> None:
        with self._lock:
            c = self.counters
            c.generations_started += 1
            c.active += 1
            c.peak_active = max(c.peak_active, c.active)

    def _generation_ended(self, finished: bool) -> None:
        with self._lock:
            self.counters.active -= 1
            self.counters.generations_finished += int(finished)
            idle = self.counters.active == 0
        if idle:
            self._heap.trim()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    # -- start-up ---------------------------------------------------------------------------
    def start_in_background(self, use_demo: bool, warmup_mode: str, image_pixels: int) -> threading.Thread:
        """Loads the model, then warms it up, in a thread: the page is up meanwhile; chats wait for both."""
        self.warmed.clear()
        self.history.start()  # the live plots' and the throughput's samples, once a second
        thread = threading.Thread(
            target=self._start, args=(use_demo, warmup_mode, image_pixels), name="model-load", daemon=True
        )
        thread.start()
        return thread

    def _start(self, use_demo: bool, warmup_mode: str, image_pixels: int) -> None:
        try:
            self.manager.load(use_demo)
        except BaseException:  # the manager records it for the status line and for waiting chats
            log.exception("model load failed")
            self.warmed.set()
            return
        self.warm_up(warmup_mode, image_pixels)

    def warm_up(self, mode: str, image_pixels: int) -> warmup.WarmupResult | None:
        """Runs the warm-up while no chat runs; lowers `limits` (and says so) if the caps did not fit."""
        try:
            loaded = self.manager.wait_ready(READY_TIMEOUT_S)
            plan = warmup.resolve_mode(mode, loaded.device)
            if plan == "off":
                return None
            self.warmup_note = "warming up…"
            with self.scheduler.exclusive():
                loaded = self.manager.wait_ready(0)
                decoder = self.manager.decoder
                result = warmup.run(
                    loaded, plan, self.configured_limits.max_context, self.configured_limits.max_new_tokens,
                    self.scheduler.max_concurrency, image_pixels, self.faults, self.release_memory,
                    **({"stream": decoder.stream} if decoder is not None else {}),
                    peak_chats=getattr(decoder, "warmup_chats", None),
                )  # fmt: skip
                del loaded, decoder
                self.context.set_current(Limits(result.max_context, result.max_new_tokens))
                if not result.failed:  # the KV slots follow the lowered caps (when chats are refused, nothing runs)
                    self.manager.fit_decoder()
            self._fatal = result.note if result.failed else None
            self.warmup_note = result.note
            log.info("warm-up: %s", result.note)
            return result
        except Exception as exc:  # a warm-up must not keep the app from serving
            log.exception("warm-up failed")
            self.warmup_note = f"warm-up failed ({type(exc).__name__}: {exc}); limits unchanged"
            return None
        finally:
            self.warmed.set()

    # -- shutdown ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """From now on new chats are refused; running ones continue."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    def stop_all(self, reason: str = "shutdown") -> int:
        """Stops every chat in flight at its next decode step; returns how many."""
        with self._lock:
            active = list(self._active)
        for item in active:
            item.stop(reason)
        return len(active)

    # -- the rest of the UI's needs ---------------------------------------------------------
    def estimate(self, max_context: int, image_pixels: int, video_frames: int, video_total_pixels: int) -> str:
        """One line for beside the sliders: visual tokens per file and the KV cache these caps allow."""
        loaded = self.manager.current()
        if loaded is None:
            return "The estimate appears once the model has loaded."
        if self.manager.backend is not None:
            return ("The model runs on the model server (--backend-url): its memory is planned there, and it counts "
                    "each prompt's tokens itself.")  # fmt: skip
        shape = self._shape(loaded)
        # A 16:9 source at the cap is the common worst case for a photo or a screen recording.
        width = int((image_pixels * 16 / 9) ** 0.5)
        image = planner.image_tokens(width, int(width * 9 / 16), image_pixels, shape)
        frame_px = max(1, video_total_pixels // max(1, video_frames))
        fw = int((frame_px * 16 / 9) ** 0.5)
        video = planner.video_tokens(video_frames, fw, int(fw * 9 / 16), shape, max_pixels=video_total_pixels)
        per_token = planner.kv_bytes_per_token(shape)
        kv = per_token * max_context
        slots = self.scheduler.max_concurrency
        line = (
            f"≈ {image:,} tokens per image · ≈ {video:,} per video · KV cache ≤ {format_bytes(kv)} per chat "
            f"({max_context:,} tokens), ≤ {format_bytes(kv * slots)} for {slots} concurrent"
        )
        engine = self.manager.decoder.engine_figures() if self.manager.decoder is not None else None
        if engine is not None and engine[1]:  # allocated as entries are kept, freed when evicted
            max_len, prefix_slots = engine
            pool = per_token * max_len * prefix_slots
            plural = "ies" if prefix_slots != 1 else "y"
            line += f" · + up to {format_bytes(pool)} kept for follow-up turns ({prefix_slots} entr{plural})"
        gpu = self.probe.read() if loaded.device.startswith("cuda") else None
        if gpu is not None and loaded.precision in precisions.BY_NAME:
            line += "  \n" + plan.summary(shape, loaded.precision, max_context, slots, gpu.name, gpu.memory_total)
        return line

    def _shape(self, loaded: LoadedModel) -> planner.ModelShape:
        key = id(loaded.config)
        if self._shape_cache is None or self._shape_cache[0] != key:
            self._shape_cache = (key, planner.ModelShape.from_config(loaded.config))
        return self._shape_cache[1]

    def refuse_switch_while(self, guard: Callable[[], str | None]) -> None:
        """`guard()` is asked before every precision switch; a reason it returns refuses the switch (SwitchRefused)."""
        self._switch_guards.append(guard)

    def switch_precision(
        self, precision: str, warmup_mode: str = "off", image_pixels: int = 0, min_interval_s: float = 0.0
    ) -> SwitchReport:
        """One switch at a time: a second caller waits, then finds the precision loaded (no double load).

        A reload starts at most `min_interval_s` after the previous one ended (SwitchRefused otherwise), whoever
        asks: a warm reload takes ~20 s of the GPU from every user.
        """
        if self._draining.is_set():
            raise ShuttingDown(SHUTDOWN_MESSAGE)
        with self._switch_lock:
            loaded = self.manager.current()
            # a no-op, or a backend's model (the manager refuses that itself): no guard to ask
            change = not (loaded is not None and loaded.precision == precision) and self.manager.backend is None
            self._switching = change  # before the guards: a job board refuses to start a job from here on
            try:
                if change:
                    for guard in self._switch_guards:
                        if reason := guard():
                            raise SwitchRefused(reason)
                return self._switch(precision, loaded, warmup_mode, image_pixels, min_interval_s)
            finally:
                self._switching = False

    def switching(self) -> bool:
        """A precision switch is under way (from its guards to the end of its warm-up)."""
        return self._switching

    def _switch(
        self, precision: str, loaded: LoadedModel | None, warmup_mode: str, image_pixels: int, min_interval_s: float
    ) -> SwitchReport:
        """switch_precision's reload, under the switch lock."""
        wait = self._last_switch + min_interval_s - time.monotonic()
        if wait > 0 and not (loaded is not None and loaded.precision == precision):
            raise SwitchRefused(
                f"the last switch was under {min_interval_s:g} s ago; try again in {math.ceil(wait)} s."
            )
        try:
            report = self.manager.switch(precision)
        finally:
            self._last_switch = time.monotonic()
        if report.old != report.new and warmup_mode != "off":
            self.warm_up(warmup_mode, image_pixels)
        return report

    def release_memory(self) -> None:
        gc.collect()
        self.manager.release_memory()
        self._count("memory_releases")

    def snapshot(self) -> PanelSnapshot:
        loaded = self.manager.current()
        status = self.manager.status
        if self.warmup_note and loaded is not None:
            status = f"{status} · {self.warmup_note}"
        if self._draining.is_set():
            status = f"Shutting down: finishing {self.in_flight()} running chat(s)."
        return PanelSnapshot(
            status=status,
            notice=self.manager.notice,
            precision=loaded.label if loaded else None,
            is_demo=bool(loaded and loaded.is_demo),
            device=loaded.device if loaded else None,
            gpu=self._gpu(),
            gpu_reason=self.probe.reason,
            system=read_system(),
            queue=self.scheduler.state(),
            last=self.stats.last,
            rolling_tokens_per_s=self.stats.rolling_tokens_per_s,
            rolling_ttft_s=self.stats.rolling_ttft_s,
            requests=self.stats.count,
            decoder=self.manager.decoder.describe() if self.manager.decoder else "",
            engine=self._engine_snapshot(),
            cost=self.cost(),
            backend=self.manager.backend.status() if self.manager.backend is not None else None,
        )

    # -- metrics (service/metrics.py; /metrics and the panel read these) ----------------------
    def load(self) -> ServingLoad:
        """Requests running and waiting and KV slots in use now, as vLLM's scheduler gauges count them."""
        queue = self.scheduler.state()
        # Everything admitted that holds no GPU slot waits: for a slot, for the model, or while its prompt is built.
        waiting = max(queue.waiting, self.admission.held() - queue.running)
        engine = self._engine_snapshot()
        if engine is not None:  # the engine's counts restart with its process: kept monotonic here
            with self._lock:
                queries = self._prefix_queries.feed(engine.prefill_tokens + engine.prefix_tokens_reused)
                hits = self._prefix_hits.feed(engine.prefix_tokens_reused)
        else:
            queries, hits = self._prefix_queries.total, self._prefix_hits.total
        if engine is not None and engine.max_batch:
            used, total = engine.active + engine.prefilling, engine.max_batch
        else:
            used, total = queue.running, queue.max_concurrency
        return ServingLoad(queue.running, waiting, used, total, engine, queries, hits)

    def _sample(self) -> Sample:
        load = self.load()
        gpu = self.probe.read()
        with self._lock:  # the sampler's thread and a /metrics scrape both feed the running total
            if load.engine is not None:  # the engine's count moves every step; finished answers only at their end
                self._engine_seen = True
                generated = self._engine_tokens.feed(load.engine.tokens)
            elif self._engine_seen:  # an engine being restarted: its count resumes from here
                generated = self._engine_tokens.total
            else:
                generated = self.metrics.totals().generation_tokens
        rss = 0 if gpu else _process_rss()
        return Sample(time.time(), gpu.memory_used if gpu else None, generated, load.running, load.waiting,
                      load.kv_used, load.kv_total, rss)  # fmt: skip

    def cost(self) -> CostView:
        """The GPU's price (--gpu-hourly-cost) against the measured output throughput."""
        from qwen3vl_webui.service.metrics import CURRENT_WINDOW_S, ROLLING_WINDOW_S

        now = self._sample()  # read now, not at the sampler's last tick; compared with its history
        return cost_view(
            self.gpu_hourly_cost, time.monotonic() - self.started_at, self.metrics.totals().generation_tokens,
            self.history.tokens_per_s(CURRENT_WINDOW_S, now), self.history.tokens_per_s(ROLLING_WINDOW_S, now),
        )  # fmt: skip

    def close(self) -> None:
        """Stops the load history's sampler."""
        self.history.stop()

    def _engine_snapshot(self) -> EngineSnapshot | None:
        decoder = self.manager.decoder
        return decoder.snapshot() if decoder is not None else None

    def gpu(self) -> GpuSnapshot | None:
        return self._gpu()

    def _gpu(self) -> GpuSnapshot | None:
        """NVML's view of the GPU; the torch allocator's figures are the engine process's when it has one."""
        gpu = self.probe.read()
        decoder = self.manager.decoder
        stats = decoder.memory() if decoder is not None else None
        if gpu is None or stats is None:
            return gpu
        return dataclasses.replace(
            gpu, torch_allocated=stats.allocated, torch_reserved=stats.reserved, torch_peak=stats.peak
        )


def _process_rss() -> int:
    import psutil  # not read_system(): its CPU percentage counts from the previous call, the panel's

    return int(psutil.Process().memory_info().rss)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
