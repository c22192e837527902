"""Serving metrics as plain data: vLLM-style request counters and histograms, a 1 s history of the load (live plots,
throughput windows) and the GPU's cost. The HTTP exposition (Prometheus text) is server/metrics.py's."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen3vl_webui.telemetry import RequestStats

# vLLM's own bucket bounds (vllm/v1/metrics/loggers.py), so that dashboards built on its histograms read ours alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# Queue time: vLLM's bounds with finer ones below its first (0.3 s). Behind the admission a chat waits milliseconds
# while a slot is free, and with vLLM's bounds alone every such wait fell in the first bucket, where a quantile reads
# 0.15 s whatever the waits were. vLLM's bounds stay a subset, so a dashboard built on its series still reads ours.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, *LATENCY_BUCKETS)
# The front doors' own latencies (handler start, first text): finer than vLLM's TTFT bounds where a door's costs lie.
DOOR_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                30.0, 120.0)  # fmt: skip
# How late the front end's event loop runs a timer (its lag): every update and every request's hop through gradio
# waits that long on top of its own work.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
DOORS = ("gradio", "api")  # the page and gradio's API (one queue), the OpenAI-compatible API
# vLLM's FinishReason strings (stop, length, abort) and the "error" newer vLLMs add.
FINISH_REASONS = ("stop", "length", "abort", "error")
# Why a request was refused before it ran: the admission's wait line was full ("busy"), the client had its share
# ("per_client"), the server was draining ("shutting_down"); the front door adds rate_limited and login_limited.
REFUSAL_REASONS = ("busy", "per_client", "shutting_down")

HISTORY_S = 300  # the live plots' span: one sample a second
CURRENT_WINDOW_S = 10.0  # "current" throughput
ROLLING_WINDOW_S = 300.0  # "rolling" throughput


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus' shape): counts per upper bound, the +Inf count, the sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bound, not cumulative; the last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, n: int = 1) -> None:
        """Adds `n` observations of `value` (n > 1: one request's mean inter-token gap for each of its gaps)."""
        if n <= 0:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= it)], ending with (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


ARRIVED = "qwen3vl_arrived"  # the ASGI scope's state key of a request's arrival (server/frontdoor.Arrival)


def arrived_at(request: object) -> float | None:
    """The arrival stamp of a FastAPI/Starlette request or of a gradio `gr.Request` (None where there is none)."""
    # Through __dict__ only: gr.Request's __getattr__ would JSON-copy whatever it forwards (the whole scope).
    attrs = getattr(request, "__dict__", {})
    inner = attrs.get("request", request)  # a gr.Request holds the join's Starlette request
    scope = getattr(inner, "__dict__", {}).get("scope")
    if not isinstance(scope, dict):
        return None
    value = (scope.get("state") or {}).get(ARRIVED)
    return value if isinstance(value, float) else None


class DoorMetrics:
    """Where a chat's wait for its first text goes before and after the service, per front door: from the HTTP
    request's arrival at the server (the ASGI middleware's stamp, server/frontdoor.py) to the handler's first line
    (`start`: gradio's queue and its event plumbing; the API's body parsing and media checks), and to the first text
    handed to the door's transport (`first_text`). Beside vLLM's TTFT (the service's arrival to the first token) they
    say how much of a client's wait is the door's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.start = {door: Histogram(DOOR_BUCKETS) for door in DOORS}
        self.first_text = {door: Histogram(DOOR_BUCKETS) for door in DOORS}
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS)  # the HTTP server's event loop (server/frontdoor.py's probe)

    def started(self, door: str, arrived: float | None, now: float | None = None) -> None:
        """`arrived`: time.monotonic() of the request's arrival (None: not stamped, nothing observed)."""
        self._observe(self.start, door, arrived, now)

    def first(self, door: str, arrived: float | None, now: float | None = None) -> None:
        self._observe(self.first_text, door, arrived, now)

    def _observe(self, table: dict[str, Histogram], door: str, arrived: float | None, now: float | None) -> None:
        if arrived is None or door not in table:
            return
        elapsed = max(0.0, (time.monotonic() if now is None else now) - arrived)
        with self._lock:
            table[door].observe(elapsed)

    def lagged(self, seconds: float) -> None:
        """One reading of the event loop's lag (a timer's lateness)."""
        with self._lock:
            self.loop_lag.observe(max(0.0, seconds))

    def totals(self) -> dict[str, dict[str, Histogram]]:
        """{"start": {door: copy}, "first_text": {door: copy}}."""
        with self._lock:
            return {"start": {d: h.copy() for d, h in self.start.items()},
                    "first_text": {d: h.copy() for d, h in self.first_text.items()}}  # fmt: skip

    def lag(self) -> Histogram:
        with self._lock:
            return self.loop_lag.copy()


@dataclass(frozen=True)
class Sample:
    """One second of the load, for the live plots and the throughput windows."""

    t: float  # time.time()
    gpu_used: int | None  # bytes on the card (NVML), None without a GPU
    generated: int  # output tokens so far (monotonic)
    running: int
    waiting: int
    kv_used: int  # KV slots holding a request
    kv_total: int
    process_rss: int = 0  # this process's resident bytes (the memory plot without a GPU)


@dataclass(frozen=True)
class RequestTotals:
    """What finished requests added up to (copies: safe to read while requests go on)."""

    prompt_tokens: int
    generation_tokens: int
    success: dict[str, int]
    refused: dict[str, int]
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram


class RequestMetrics:
    """Counters and histograms every request adds to when it ends, as vLLM's frontend records them.

    Times are the service's: arrival = the chat entered the admission; queue = arrival to a GPU slot (the prompt is
    built meanwhile); TTFT = arrival to the first token; e2e = arrival to the end. The decoders report one mean
    inter-token gap per request: it is observed once per gap (new tokens - 1), so the sum and count are exact.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue = Histogram(QUEUE_BUCKETS)

    def finished(
        self, reason: str, arrival: float, slot_at: float, prompt_tokens: int, stats: RequestStats | None,
        now: float | None = None,
    ) -> None:  # fmt: skip
        """A request that reached the decoder ended (`reason` one of FINISH_REASONS); times are time.monotonic()."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.success[reason] = self.success.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.queue.observe(max(0.0, slot_at - arrival))
            self.e2e.observe(max(0.0, now - arrival))
            if stats is None:
                return
            self.generation_tokens += stats.new_tokens
            if stats.new_tokens > 0:
                self.ttft.observe(max(0.0, slot_at - arrival) + stats.ttft_s)
            if stats.new_tokens > 1 and stats.decode_s > 0:
                self.itl.observe(stats.decode_s / (stats.new_tokens - 1), stats.new_tokens - 1)

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def totals(self) -> RequestTotals:
        with self._lock:
            return RequestTotals(
                self.prompt_tokens, self.generation_tokens, dict(self.success), dict(self.refused),
                self.ttft.copy(), self.itl.copy(), self.e2e.copy(), self.queue.copy(),
            )  # fmt: skip


class MonotonicTotal:
    """A running total fed by a counter that restarts at 0 (an engine process that was restarted): never goes down."""

    def __init__(self) -> None:
        self.total = 0
        self._last: int | None = None

    def feed(self, value: int) -> int:
        if self._last is not None:
            self.total += value - self._last if value >= self._last else value
        else:
            self.total += value
        self._last = value
        return self.total


class LoadHistory:
    """The last HISTORY_S seconds of Samples, taken by a daemon thread once a second (`start`; `stop` ends it)."""

    def __init__(self, take: Callable[[], Sample], every_s: float = 1.0, span_s: int = HISTORY_S) -> None:
        self.take = take
        self.every_s = every_s
        self._samples: deque[Sample] = deque(maxlen=int(span_s / every_s) + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="load-history", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> Sample:
        try:
            sample = self.take()
        except Exception:  # a probe failing must not end the history
            return self.latest() or Sample(time.time(), None, 0, 0, 0, 0, 0)
        with self._lock:
            self._samples.append(sample)
        return sample

    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def tokens_per_s(self, window_s: float, now: Sample | None = None) -> float | None:
        """Output tokens a second over the last `window_s` (None until two samples span at least a second)."""
        samples = self.samples()
        last = now or (samples[-1] if samples else None)
        if last is None:
            return None
        inside = [s for s in samples if last.t - s.t <= window_s + 0.5]
        first = inside[0] if inside else last
        span = last.t - first.t
        if span < 1.0:
            return None
        return max(0, last.generated - first.generated) / span


def cost_per_million(hourly_usd: float, tokens_per_s: float | None) -> float | None:
    """USD per million output tokens at a throughput (None when idle or unknown)."""
    if not tokens_per_s or tokens_per_s <= 0:
        return None
    return hourly_usd / 3600.0 / tokens_per_s * 1e6


@dataclass(frozen=True)
class CostView:
    """The GPU's price and what it has come to, for the panel and /metrics."""

    hourly_usd: float | None  # None: not set (--gpu-hourly-cost)
    uptime_s: float
    cost_so_far: float | None
    per_million_current: float | None  # at the last 10 s' throughput
    per_million_rolling: float | None  # at the last 5 minutes'
    per_million_so_far: float | None  # the cost so far over every output token so far
    current_tokens_per_s: float | None
    rolling_tokens_per_s: float | None


def cost_view(
    hourly_usd: float | None, uptime_s: float, generated: int, current_tps: float | None, rolling_tps: float | None
) -> CostView:
    if hourly_usd is None:
        return CostView(None, uptime_s, None, None, None, None, current_tps, rolling_tps)
    so_far = hourly_usd * uptime_s / 3600.0
    return CostView(
        hourly_usd, uptime_s, so_far,
        cost_per_million(hourly_usd, current_tps), cost_per_million(hourly_usd, rolling_tps),
        so_far / generated * 1e6 if generated > 0 else None,
        current_tps, rolling_tps,
    )  # fmt: skip
