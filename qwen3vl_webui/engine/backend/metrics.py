"""The backend's serving figures from its GET /metrics (Prometheus text, vLLM's names), and rates between scrapes."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

# Sample name -> figure. vLLM's names first (this app exports the same); older vLLM and SGLang spell some otherwise.
_SUMS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    "sglang:generation_tokens_total": "generation_tokens",
    "sglang:prompt_tokens_total": "prompt_tokens",
    "sglang:time_to_first_token_seconds_sum": "ttft_sum",
    "sglang:time_to_first_token_seconds_count": "ttft_count",
}
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
RATE_WINDOW_S = 10.0  # tokens/s over about this long: the panel's "now"
TTFT_WINDOW_S = 60.0  # the mean TTFT of requests that started answering in about this long
_KEEP_S = 120.0


@dataclass(frozen=True)
class BackendFigures:
    """One scrape of the backend's /metrics (every engine and model summed; KV use is the fullest engine's)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None  # 0..1, None when the backend exports no KV gauge
    generation_tokens: float = 0.0
    prompt_tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    gpu_memory_used: int | None = None  # this app's qwen3vl:gpu_memory_* (vLLM exports none)
    gpu_memory_total: int | None = None
    precision: str = ""  # this app's qwen3vl:precision_info label
    # this app's qwen3vl:output_tokens_per_second{window="current"}: its tokens counter moves when an answer ends,
    # so a rate between two scrapes would miss a long answer that is still streaming
    tokens_per_s: float | None = None
    known: bool = False  # the text held at least one figure we read


def parse_metrics(text: str) -> BackendFigures:
    """The figures the panel shows, from a Prometheus text exposition (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    kv: list[float] = []
    gpu_used: int | None = None
    gpu_total: int | None = None
    precision = ""
    speed: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, value = sample.name, float(sample.value)
            if not math.isfinite(value):
                continue
            if name in _SUMS:
                key = _SUMS[name]
                sums[key] = sums.get(key, 0.0) + value
            elif name in _KV:
                kv.append(value)
            elif name == "qwen3vl:gpu_memory_used_bytes":
                gpu_used = (gpu_used or 0) + int(value)
            elif name == "qwen3vl:gpu_memory_total_bytes":
                gpu_total = (gpu_total or 0) + int(value)
            elif name == "qwen3vl:output_tokens_per_second" and sample.labels.get("window") == "current":
                speed = value
            elif name == "qwen3vl:precision_info" and value:
                precision = sample.labels.get("label") or sample.labels.get("precision", "")
    return BackendFigures(
        **sums,
        kv_usage=max(kv) if kv else None,
        gpu_memory_used=gpu_used,
        gpu_memory_total=gpu_total,
        precision=precision,
        tokens_per_s=speed,
        known=bool(sums or kv),
    )


@dataclass(frozen=True)
class BackendLoad:
    """What the panel shows of the backend: its latest figures and the rates since earlier scrapes."""

    figures: BackendFigures
    tokens_per_s: float | None  # output tokens a second over the last ~RATE_WINDOW_S (None: one scrape so far)
    ttft_s: float | None  # mean TTFT over the last ~TTFT_WINDOW_S, else since the backend started
    age_s: float  # seconds since this scrape


class LoadTracker:
    """Scrapes in, rates out: a counter that went down (the backend restarted) starts the history again."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, BackendFigures]] = deque()
        self._lock = threading.Lock()

    def add(self, figures: BackendFigures, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._samples[-1][1] if self._samples else None
            if last is not None and (
                figures.generation_tokens < last.generation_tokens or figures.ttft_count < last.ttft_count
            ):
                self._samples.clear()
            self._samples.append((now, figures))
            while self._samples and now - self._samples[0][0] > _KEEP_S:
                self._samples.popleft()

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()

    def load(self, now: float | None = None) -> BackendLoad | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return None
        at, latest = samples[-1]
        rate = _since(samples, RATE_WINDOW_S)
        speed = latest.tokens_per_s  # the backend's own measure where it exports one
        if speed is None and rate is not None:
            then, old = rate
            speed = max(0.0, latest.generation_tokens - old.generation_tokens) / (at - then)
        ttft = None
        window = _since(samples, TTFT_WINDOW_S)
        if window is not None and latest.ttft_count > window[1].ttft_count:
            old = window[1]
            ttft = (latest.ttft_sum - old.ttft_sum) / (latest.ttft_count - old.ttft_count)
        elif latest.ttft_count:
            ttft = latest.ttft_sum / latest.ttft_count
        return BackendLoad(latest, speed, ttft, now - at)


def _since(samples: list[tuple[float, BackendFigures]], window: float) -> tuple[float, BackendFigures] | None:
    """The oldest sample within `window` of the latest one (not the latest itself), or None."""
    at = samples[-1][0]
    for then, figures in samples[:-1]:
        if at - then <= window and at - then > 0:
            return then, figures
    return None
