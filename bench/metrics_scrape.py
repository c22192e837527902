"""Scrapes a running app's GET /metrics while a load runs beside it, and sums the scrapes up: output tokens/s from
vLLM's counters, TTFT / inter-token / e2e percentiles from its histograms, the queue's peak, KV use, refusals, and the
cost per million output tokens at a stated GPU price.

    python -m bench.metrics_scrape --url http://127.0.0.1:7860 --seconds 120 --gpu-hourly-cost 3.50 --out /tmp/m
        (run bench.load_test, or any client, against the same app meanwhile; QWEN3VL_API_KEY if the app has a key)
    python -m bench.metrics_scrape --url auto --when-running 16 --seconds 20 --out /tmp/m &
        (beside `bench.load_test` / `bench.ab` starting the app themselves: finds the `app.py --port P` process on this
        machine and starts scraping once that many requests run)

Writes FILE.json (the summary and the scrapes' samples over time) and FILE.prom (the last raw scrape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str | None) -> tuple[str, Samples]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=10)
    r.raise_for_status()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    return r.text, samples


def find_app(timeout: float) -> str:
    """The URL of an `app.py ... --port P` process on this machine (the newest), waiting up to `timeout` for one."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv]
            if any(a.endswith("app.py") for a in args) and "--port" in args[:-1]:
                host = args[args.index("--host") + 1] if "--host" in args[:-1] else "127.0.0.1"
                found.append((int(proc.name) if proc.name.isdigit() else 0, f"http://{host}:{args[args.index('--port') + 1]}"))
        if found:
            return max(found)[1]
        if time.monotonic() > deadline:
            raise SystemExit("error: no `app.py --port P` process found")
        time.sleep(0.5)


def wait_running(url: str, key: str | None, running: int, timeout: float) -> None:
    """Until the app reports at least `running` requests in the engine (a load test under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if total(scrape(url, key)[1], "vllm:num_requests_running") >= running:
                return
        except Exception:  # noqa: BLE001 - the app is still starting
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {url} never ran {running} requests within {timeout:.0f} s")


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def quantile(first: Samples, last: Samples, name: str, q: float) -> float | None:
    """The q-quantile of a histogram's observations between two scrapes (Prometheus' histogram_quantile rule)."""
    def buckets(samples: Samples) -> dict[float, float]:
        out: dict[float, float] = {}
        for (n, ls), v in samples.items():
            if n == name + "_bucket":
                le = float(dict(ls)["le"])
                out[le] = out.get(le, 0.0) + v
        return out

    a, b = buckets(first), buckets(last)
    bounds = sorted(b)
    counts = [b[x] - a.get(x, 0.0) for x in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, previous_bound, previous_count = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / max(1e-12, count - previous_count)
        previous_bound, previous_count = bound, count
    return None


def summarize(first: Samples, last: Samples, seconds: float, series: list[dict[str, float]],
              hourly: float | None) -> dict[str, Any]:  # fmt: skip
    generated = total(last, "vllm:generation_tokens_total") - total(first, "vllm:generation_tokens_total")
    tps = generated / seconds if seconds > 0 else 0.0
    hourly = hourly if hourly is not None else (total(last, "qwen3vl:gpu_hourly_cost_usd") or None)
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "output_tokens": generated,
        "prompt_tokens": total(last, "vllm:prompt_tokens_total") - total(first, "vllm:prompt_tokens_total"),
        "output_tokens_per_s": round(tps, 1),
        "requests": {r: total(last, "vllm:request_success_total", finished_reason=r)
                     - total(first, "vllm:request_success_total", finished_reason=r)
                     for r in ("stop", "length", "abort", "error")},  # fmt: skip
        "refused": {dict(ls)["reason"]: v - first.get((n, ls), 0.0)
                    for (n, ls), v in last.items() if n == "qwen3vl:requests_refused_total"},  # fmt: skip
        "peak_running": max((s["running"] for s in series), default=0),
        "peak_waiting": max((s["waiting"] for s in series), default=0),
        "peak_kv_usage": max((s["kv"] for s in series), default=0),
        "gpu_memory_used_max": max((s["gpu_used"] for s in series), default=0),
    }
    # The batch engine's schedule (issue 12): decode steps, rows per step, prefill forwards by kind over the window.
    steps = total(last, "qwen3vl:engine_decode_steps_total") - total(first, "qwen3vl:engine_decode_steps_total")
    if steps > 0:
        made = total(last, "qwen3vl:engine_tokens_total") - total(first, "qwen3vl:engine_tokens_total")
        forwards = {dict(ls)["kind"]: v - first.get((n, ls), 0.0)
                    for (n, ls), v in last.items() if n == "qwen3vl:engine_prefill_forwards_total"}  # fmt: skip
        first_tokens = sum(out["requests"].values())  # each answer's first token comes from its prefill
        out["engine"] = {"decode_steps": steps, "steps_per_s": round(steps / seconds, 1) if seconds > 0 else None,
                         "rows_per_step": round(max(0.0, made - first_tokens) / steps, 2),
                         "prefill_forwards": forwards}  # fmt: skip
    for key, name in (("ttft", "vllm:time_to_first_token_seconds"), ("itl", "vllm:inter_token_latency_seconds"),
                      ("e2e", "vllm:e2e_request_latency_seconds"), ("queue", "vllm:request_queue_time_seconds")):  # fmt: skip
        for q in (0.5, 0.9, 0.99):
            value = quantile(first, last, name, q)
            out[f"{key}_p{int(q * 100)}_s"] = None if value is None else round(value, 4)
    if hourly:
        out["gpu_hourly_cost_usd"] = hourly
        out["cost_per_million_output_tokens_usd"] = round(hourly / 3600 / tps * 1e6, 4) if tps > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the app's URL, or `auto`: the `app.py --port P` process on this machine")
    ap.add_argument("--when-running", type=int, default=0, help="start once the app runs this many requests (a load)")
    ap.add_argument("--wait-s", type=float, default=600.0, help="how long --url auto / --when-running may wait")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to scrape")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between scrapes")
    ap.add_argument("--gpu-hourly-cost", type=float, help="USD an hour (default: the app's qwen3vl:gpu_hourly_cost_usd)")
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.prom")
    args = ap.parse_args(argv)
    key = os.environ.get("QWEN3VL_API_KEY")
    if args.url == "auto":
        args.url = find_app(args.wait_s)
        print(f"scraping {args.url}", flush=True)
    if args.when_running:
        wait_running(args.url, key, args.when_running, args.wait_s)
    _, first = scrape(args.url, key)
    started = time.monotonic()
    series: list[dict[str, float]] = []
    raw, last = "", first
    while True:
        raw, last = scrape(args.url, key)
        series.append({
            "t": round(time.monotonic() - started, 2),
            "running": total(last, "vllm:num_requests_running"), "waiting": total(last, "vllm:num_requests_waiting"),
            "kv": total(last, "vllm:kv_cache_usage_perc"), "gpu_used": total(last, "qwen3vl:gpu_memory_used_bytes"),
            "generated": total(last, "vllm:generation_tokens_total"),
        })  # fmt: skip
        if time.monotonic() - started >= args.seconds:
            break
        time.sleep(args.every)
    summary = summarize(first, last, time.monotonic() - started, series, args.gpu_hourly_cost)
    Path(args.out + ".json").write_text(json.dumps({"url": args.url, "summary": summary, "series": series}, indent=1))
    Path(args.out + ".prom").write_text(raw)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
