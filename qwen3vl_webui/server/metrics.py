"""GET /metrics: Prometheus text on the app's port, with vLLM's metric names (so vLLM dashboards and alerts work as
they are) and the project's own under `qwen3vl:`.

The engine runs in its own process, but it already reports its load to the front end every 0.5 s (EngineStats), and
every request ends in the front end's ChatService: one custom collector here reads both at each scrape. Nothing is
written to a multiprocess directory and no global registry is touched (each app has its own CollectorRegistry).
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fastapi
from fastapi.responses import Response

from qwen3vl_webui import precisions
from qwen3vl_webui.service.metrics import FINISH_REASONS, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE = "0"  # vLLM's `engine` label: one engine per app

# Every family the collector can export: name -> (type, help). The dashboard test checks its expressions against it.
FAMILIES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "vllm:num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "vllm:kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "vllm:prompt_tokens": ("counter", "Number of prefill tokens processed."),
    "vllm:generation_tokens": ("counter", "Number of generation tokens processed."),
    "vllm:request_success": ("counter", "Count of successfully processed requests."),
    "vllm:prefix_cache_queries": ("counter", "Prefix cache queries, in terms of number of queried tokens."),
    "vllm:prefix_cache_hits": ("counter", "Prefix cache hits, in terms of number of cached tokens."),
    "vllm:time_to_first_token_seconds": ("histogram", "Histogram of time to first token in seconds."),
    "vllm:inter_token_latency_seconds": ("histogram", "Histogram of inter-token latency in seconds."),
    "vllm:e2e_request_latency_seconds": ("histogram", "Histogram of e2e request latency in seconds."),
    "vllm:request_queue_time_seconds": ("histogram", "Histogram of time spent in WAITING phase for request."),
    "qwen3vl:frontdoor_handler_start_seconds": (
        "histogram", "From a chat's HTTP request reaching the server to its handler's start, by front door."
    ),
    "qwen3vl:frontdoor_first_text_seconds": (
        "histogram", "From a chat's HTTP request reaching the server to its first text handed to the door, by door."
    ),
    "qwen3vl:frontend_event_loop_lag_seconds": (
        "histogram", "How late the web server's event loop ran a timer due every 50 ms (read 20 times a second)."
    ),
    "qwen3vl:gpu_memory_used_bytes": ("gauge", "GPU memory in use on the card, every process (NVML)."),
    "qwen3vl:gpu_memory_total_bytes": ("gauge", "GPU memory of the card (NVML)."),
    "qwen3vl:torch_memory_bytes": ("gauge", "The model process's torch allocator: allocated, reserved, peak."),
    "qwen3vl:weights_bytes": ("gauge", "Bytes of the loaded weights."),
    "qwen3vl:precision_info": ("gauge", "The loaded model's precision and decoder (value 1)."),
    "qwen3vl:requests_refused": ("counter", "Requests refused before running, by reason."),
    "qwen3vl:oom_survived": ("counter", "CUDA out-of-memory errors the server recovered from."),
    "qwen3vl:engine_restarts": ("counter", "Engine processes restarted after dying."),
    "qwen3vl:engine_decode_steps": ("counter", "Decode steps of the batch engine (restarts with its process)."),
    "qwen3vl:engine_tokens": (
        "counter", "Tokens the batch engine made (each answer's first comes from its prefill; restarts with it)."
    ),
    "qwen3vl:engine_prefill_forwards": (
        "counter", "Prefill forwards of the batch engine by kind: batched, graphed, eager, compiled, tower."
    ),
    "qwen3vl:output_tokens_per_second": ("gauge", "Output tokens a second over a window (current 10 s, rolling 5 min)."),
    "qwen3vl:gpu_hourly_cost_usd": ("gauge", "The GPU's price per hour (--gpu-hourly-cost)."),
    "qwen3vl:cost_usd": ("counter", "What the GPU has cost since the app started, at --gpu-hourly-cost."),
    "qwen3vl:cost_per_million_output_tokens_usd": (
        "gauge", "USD per million output tokens at the current and rolling throughput, and so far."
    ),
}  # fmt: skip


def exposed_names() -> set[str]:
    """The sample names a scrape may hold (counters with _total, histograms with _bucket/_sum/_count)."""
    names: set[str] = set()
    for name, (kind, _) in FAMILIES.items():
        if kind == "counter":
            names.add(name + "_total")
        elif kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
        else:
            names.add(name)
    return names


@dataclass(frozen=True)
class MetricsConfig:
    model_name: str | Callable[[], str]  # a callable: read at each scrape (a front end learns its backend's model)
    public: bool  # --metrics-public: no key or login asked
    api_key: str | None
    credentials: tuple[tuple[str, str], ...]  # --auth / --auth-file / --admin-auth


class ServingCollector:
    """Reads the service (and the front door's rate limiters) at each scrape; holds no counts of its own."""

    def __init__(
        self, service: Any, model_name: str | Callable[[], str], front: Callable[[], Any] = lambda: None
    ) -> None:
        self.service = service
        self.model_name = model_name
        self.front = front

    def describe(self) -> list[Any]:
        return []  # no checks at registration: collect() reads a service that may still be loading

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.service
        name = self.model_name() if callable(self.model_name) else self.model_name
        labels, values = ["model_name", "engine"], [name, ENGINE]

        def family(name: str, labelnames: list[str] | None = None) -> Any:
            kind, text = FAMILIES[name]
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            return cls(name, text, labels=labelnames if labelnames is not None else labels)

        load = s.load()
        totals = s.metrics.totals()
        for name, value in (
            ("vllm:num_requests_running", load.running),
            ("vllm:num_requests_waiting", load.waiting),
            ("vllm:kv_cache_usage_perc", load.kv_used / load.kv_total if load.kv_total else 0.0),
            ("vllm:prompt_tokens", totals.prompt_tokens),
            ("vllm:generation_tokens", totals.generation_tokens),
            ("vllm:prefix_cache_queries", load.prefix_queries),
            ("vllm:prefix_cache_hits", load.prefix_hits),
        ):
            metric = family(name)
            metric.add_metric(values, value)
            yield metric
        success = family("vllm:request_success", [*labels, "finished_reason"])
        for reason in FINISH_REASONS:
            success.add_metric([*values, reason], totals.success.get(reason, 0))
        yield success
        for name, histogram in (
            ("vllm:time_to_first_token_seconds", totals.ttft),
            ("vllm:inter_token_latency_seconds", totals.itl),
            ("vllm:e2e_request_latency_seconds", totals.e2e),
            ("vllm:request_queue_time_seconds", totals.queue),
        ):
            yield _histogram(name, labels, [(values, histogram)])
        doors = s.door_metrics.totals()
        for name, key in (("qwen3vl:frontdoor_handler_start_seconds", "start"),
                          ("qwen3vl:frontdoor_first_text_seconds", "first_text")):  # fmt: skip
            yield _histogram(name, [*labels, "door"], [([*values, d], h) for d, h in doors[key].items()])
        yield _histogram("qwen3vl:frontend_event_loop_lag_seconds", labels, [(values, s.door_metrics.lag())])
        yield from self._own(family, load.engine)

    def _own(self, family: Callable[..., Any], engine: Any) -> Iterator[Any]:
        s = self.service
        gpu = s.gpu()
        if gpu is not None:
            for name, value in (("qwen3vl:gpu_memory_used_bytes", gpu.memory_used),
                                ("qwen3vl:gpu_memory_total_bytes", gpu.memory_total)):  # fmt: skip
                metric = family(name, ["gpu"])
                metric.add_metric([gpu.name], value)
                yield metric
            torch_memory = family("qwen3vl:torch_memory_bytes", ["kind"])
            for kind, value in (("allocated", gpu.torch_allocated), ("reserved", gpu.torch_reserved),
                                ("peak", gpu.torch_peak)):  # fmt: skip
                torch_memory.add_metric([kind], value)
            yield torch_memory
        loaded = s.manager.current()
        if loaded is not None:
            weights = family("qwen3vl:weights_bytes", ["precision"])
            weights.add_metric([loaded.precision], loaded.weights_bytes)
            yield weights
            info = family("qwen3vl:precision_info", ["precision", "label", "device", "decoder"])
            decoder = s.manager.decoder.name if s.manager.decoder is not None else ""
            info.add_metric([loaded.precision, precisions.label(loaded.precision), loaded.device, decoder], 1)
            yield info
        refused = family("qwen3vl:requests_refused", ["reason"])
        for reason, count in s.metrics.totals().refused.items():
            refused.add_metric([reason], count)
        front = self.front()
        if front is not None:  # the front door's limits refuse before the service sees a request
            refused.add_metric(["rate_limited"], front.events.refused)
            refused.add_metric(["login_limited"], front.limiter.refused)
        yield refused
        for name, value in (("qwen3vl:oom_survived", s.counters.oom),
                            ("qwen3vl:engine_restarts", s.manager.engine_restarts)):  # fmt: skip
            metric = family(name, [])
            metric.add_metric([], value)
            yield metric
        if engine is not None and engine.max_batch:  # the batch engine's own counts (not with generate or a backend)
            for name, value in (("qwen3vl:engine_decode_steps", engine.steps),
                                ("qwen3vl:engine_tokens", engine.tokens)):  # fmt: skip
                metric = family(name, [])
                metric.add_metric([], value)
                yield metric
            forwards = family("qwen3vl:engine_prefill_forwards", ["kind"])
            for kind, count in engine.prefill_kinds:
                forwards.add_metric([kind], count)
            yield forwards
        cost = s.cost()
        speed = family("qwen3vl:output_tokens_per_second", ["window"])
        for window, value in (("current", cost.current_tokens_per_s), ("rolling", cost.rolling_tokens_per_s)):
            speed.add_metric([window], value or 0.0)
        yield speed
        if cost.hourly_usd is None:
            return
        hourly = family("qwen3vl:gpu_hourly_cost_usd", [])
        hourly.add_metric([], cost.hourly_usd)
        total = family("qwen3vl:cost_usd", [])
        total.add_metric([], cost.cost_so_far or 0.0)
        per_million = family("qwen3vl:cost_per_million_output_tokens_usd", ["window"])
        for window, value in (("current", cost.per_million_current), ("rolling", cost.per_million_rolling),
                              ("total", cost.per_million_so_far)):  # fmt: skip
            if value is not None and math.isfinite(value):
                per_million.add_metric([window], value)
        yield from (hourly, total, per_million)


def _histogram(name: str, labels: list[str], series: list[tuple[list[str], Histogram]]) -> Any:
    """One histogram family: a histogram per label values."""
    from prometheus_client.core import HistogramMetricFamily

    metric = HistogramMetricFamily(name, FAMILIES[name][1], labels=labels)
    for values, histogram in series:
        buckets = [("+Inf" if math.isinf(b) else repr(float(b)), n) for b, n in histogram.cumulative()]
        metric.add_metric(values, buckets, histogram.total)
    return metric


def build_router(service: Any, config: MetricsConfig, front: Callable[[], Any] = lambda: None) -> Any:
    """GET /metrics, bound to `service`; open with --metrics-public, else behind --api-key (Bearer) or the login
    (HTTP Basic, what Prometheus' `basic_auth` sends), and open when neither is set."""
    from prometheus_client import CollectorRegistry, generate_latest

    from qwen3vl_webui.server.frontdoor import LoginLimiter, client_key

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServingCollector(service, config.model_name, front))
    limiter = LoginLimiter()  # wrong keys and passwords count as failed logins: no guessing at network speed
    router = fastapi.APIRouter()

    @router.get("/metrics")
    def metrics(request: fastapi.Request) -> Response:  # sync: the collector reads NVML; FastAPI runs it on a thread
        if not config.public and (config.api_key or config.credentials):
            client = client_key(request.scope)
            wait_s = limiter.begin(client)
            if wait_s > 0:
                return Response("Too many failed attempts; try again later.\n", 429,
                                headers={"Retry-After": str(math.ceil(wait_s))})  # fmt: skip
            if not _authorized(request.headers.get("authorization", ""), config):
                headers = {"WWW-Authenticate": 'Basic realm="metrics"'} if config.credentials else {}
                return Response("Unauthorized: send the --api-key as a Bearer token, or the login as HTTP Basic "
                                "(or start the app with --metrics-public).\n", 401, headers=headers)  # fmt: skip
            limiter.succeeded(client)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    return router


def _authorized(header: str, config: MetricsConfig) -> bool:
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and config.api_key:
        return secrets.compare_digest(value.encode(), config.api_key.encode())
    if scheme.lower() == "basic" and config.credentials:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok = False
        for known_user, known_password in config.credentials:  # no early exit: every pair costs the same
            ok |= secrets.compare_digest(user.encode(), known_user.encode()) & secrets.compare_digest(
                password.encode(), known_password.encode()
            )
        return ok
    return False
