"""GET /metrics: vLLM's names after real chats (tiny model, in-process app, raw HTTP), its login, a real Prometheus
scraping it, and the Grafana dashboard naming only what the app exports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import start_app, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "metrics-test-key"
HOURLY = 2.5


@pytest.fixture(scope="module")
def app_url(tiny_checkpoint: Path) -> Iterator[tuple[Any, str]]:
    # A login and a key: /metrics is theirs (no --metrics-public); the API takes the key.
    app, url = start_app(tiny_checkpoint.parent, "--api-key", KEY, "--auth", "ops:secret-pw",
                         "--gpu-hourly-cost", str(HOURLY))  # fmt: skip
    try:
        yield app, url
    finally:
        app.close()


def _chat(url: str, max_tokens: int = 6) -> dict[str, Any]:
    body = {"model": "qwen3vl-demo", "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": max_tokens, "ignore_eos": True}  # fmt: skip
    r = httpx.post(url + "v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def scrape(url: str, **kw: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from a raw GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "metrics", timeout=10, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matches) == 1, (name, labels, [k for k in samples if k[0] == name])
    return matches[0]


def test_scrape_after_chats_reads_vllm_counters(app_url: tuple[Any, str]) -> None:
    app, url = app_url
    auth = {"headers": {"Authorization": f"Bearer {KEY}"}}
    before = scrape(url, **auth)
    answers = [_chat(url) for _ in range(3)]
    after = scrape(url, **auth)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model_name": "qwen3vl-demo", "engine": "0"}
    assert grew("vllm:generation_tokens_total", **model) == sum(a["usage"]["completion_tokens"] for a in answers) == 18
    assert grew("vllm:prompt_tokens_total", **model) == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert grew("vllm:request_success_total", finished_reason="length", **model) == 3  # ignore_eos: to max_tokens
    assert grew("vllm:request_success_total", finished_reason="stop", **model) == 0
    assert grew("vllm:time_to_first_token_seconds_count", **model) == 3
    assert grew("vllm:e2e_request_latency_seconds_count", **model) == 3
    assert grew("vllm:request_queue_time_seconds_count", **model) == 3
    # Nothing waited for a slot: the queue times (admission and prompt building, milliseconds here) fall below vLLM's
    # first bound, into the finer ones under it, where a quantile can tell them apart.
    assert grew("vllm:request_queue_time_seconds_bucket", le="0.2", **model) == 3
    for bound in ("0.3", "0.5", "7680.0"):  # vLLM's bounds are all there: its dashboards read ours
        value(after, "vllm:request_queue_time_seconds_bucket", le=bound, **model)
    assert grew("vllm:inter_token_latency_seconds_count", **model) == 3 * 5  # one per gap between 6 tokens
    assert value(after, "vllm:e2e_request_latency_seconds_bucket", le="+Inf", **model) == value(
        after, "vllm:e2e_request_latency_seconds_count", **model
    )
    assert grew("vllm:e2e_request_latency_seconds_sum", **model) > 0
    assert value(after, "vllm:num_requests_running", **model) == 0
    assert value(after, "vllm:num_requests_waiting", **model) == 0
    assert 0 <= value(after, "vllm:kv_cache_usage_perc", **model) <= 1
    assert value(after, "qwen3vl:precision_info", precision="fp32", decoder="generate") == 1
    assert value(after, "qwen3vl:weights_bytes", precision="fp32") == app.service.manager.current().weights_bytes
    assert value(after, "qwen3vl:gpu_hourly_cost_usd") == HOURLY
    uptime = time.monotonic() - app.service.started_at
    assert 0 < value(after, "qwen3vl:cost_usd_total") <= HOURLY * uptime / 3600
    tokens = value(after, "vllm:generation_tokens_total", **model)
    per_million = value(after, "qwen3vl:cost_per_million_output_tokens_usd", window="total")
    assert per_million == pytest.approx(value(after, "qwen3vl:cost_usd_total") / tokens * 1e6, rel=0.05)
    for reason in ("busy", "per_client", "shutting_down", "rate_limited", "login_limited"):
        value(after, "qwen3vl:requests_refused_total", reason=reason)
    assert value(after, "qwen3vl:oom_survived_total") == 0
    assert value(after, "qwen3vl:engine_restarts_total") == 0


@pytest.mark.timeout(60)
def test_a_client_over_its_share_counts_as_refused(app_url: tuple[Any, str], tiny_checkpoint: Path) -> None:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.admission import Client, TooManyRequests
    from qwen3vl_webui.service.prompt import ChatRequest

    app, url = app_url
    service = app.service
    before = service.metrics.totals().refused["per_client"]
    aborted = service.metrics.totals().success["abort"]
    request = ChatRequest(UserMessage("hi"), sampling=SamplingParams(max_new_tokens=64, ignore_eos=True),
                          max_context=2048)
    client = Client("203.0.113.7")  # not the operator: --max-requests-per-client 2 holds
    # --max-concurrency 1: the first answers, the second waits for its slot (and says so); both count as this client's
    held = [service.chat(request, client=client, report_waiting=True) for _ in range(2)]
    try:
        for stream in held:
            next(stream)  # inside the admission
        with pytest.raises(TooManyRequests):
            next(service.chat(request, client=client))
    finally:
        for stream in held:
            stream.close()
    assert service.metrics.totals().refused["per_client"] == before + 1
    samples = scrape(url, headers={"Authorization": f"Bearer {KEY}"})
    assert value(samples, "qwen3vl:requests_refused_total", reason="per_client") == before + 1
    # the one answering was closed mid-answer: an abort; the one waiting never reached the model
    assert value(samples, "vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_metrics_need_the_key_or_the_login(app_url: tuple[Any, str]) -> None:
    _, url = app_url
    bare = httpx.get(url + "metrics", timeout=10)
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"].startswith("Basic")
    assert "vllm:" not in bare.text
    assert httpx.get(url + "metrics", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(url + "metrics", auth=("ops", "wrong"), timeout=10).status_code == 401
    assert httpx.get(url + "metrics", auth=("ops", "secret-pw"), timeout=10).status_code == 200
    assert httpx.get(url + "metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200


def test_metrics_public_serves_without_a_login(app_url: tuple[Any, str]) -> None:
    """The same service behind --metrics-public: the router answers without credentials."""
    import fastapi
    from fastapi.testclient import TestClient

    from qwen3vl_webui.server.metrics import MetricsConfig, build_router

    app, _ = app_url
    for public, status in ((True, 200), (False, 401)):
        http = fastapi.FastAPI()
        http.include_router(build_router(app.service, MetricsConfig("m", public, KEY, (("ops", "pw"),))))
        r = TestClient(http).get("/metrics")
        assert r.status_code == status
        assert ("vllm:num_requests_running" in r.text) == public


# ------------------------------------------------------------------------------- a real Prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_real_prometheus_reads_the_counters(app_url: tuple[Any, str], tmp_path: Path) -> None:
    assert shutil.which("prometheus"), "needs Debian's prometheus package (apt-get install prometheus; .ci/run does)"
    _, url = app_url
    target = url.removeprefix("http://").rstrip("/")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: qwen3vl\n    authorization:\n"
        f"      credentials: {KEY}\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1/"

    def query(expr: str) -> float | None:
        try:
            r = httpx.get(api + "query", params={"query": expr}, timeout=5).json()
        except (httpx.HTTPError, json.JSONDecodeError):
            return None
        result = r.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None

    try:
        assert wait_for(lambda: query("up") == 1.0, 30), prom.stderr.read1().decode() if prom.poll() is not None else ""
        start = query("vllm:generation_tokens_total")
        assert start is not None
        for _ in range(2):
            _chat(url, max_tokens=5)
        expected = start + 10
        assert wait_for(lambda: query("vllm:generation_tokens_total") == expected, 20), query(
            "vllm:generation_tokens_total"
        )
        assert query('sum(vllm:request_success_total{finished_reason="length"})') >= 2
        assert query("qwen3vl:gpu_hourly_cost_usd") == HOURLY
        assert query("histogram_quantile(0.9, sum by (le) (vllm:time_to_first_token_seconds_bucket))") is not None
        targets = httpx.get(api + "targets", timeout=5).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()


# ------------------------------------------------------------------------------- the dashboard

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless", "le",
    "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, keywords, labels, durations and Grafana variables dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, ${model})
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+|[smhdwy]+)?(?![A-Za-z0-9_:])", "", expr)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        after = expr[match.end():].lstrip()
        if after.startswith("(") or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def dashboard_expressions() -> list[str]:
    found = []
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("expr"), str):
                    found.append(node["expr"])
                for child in node.values():
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)

        walk(json.loads(path.read_text()))
    return found


def test_the_name_reader_reads_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
            '{model_name=~"$model", le!="x"}[$__rate_interval]))) / on() group_left qwen3vl:gpu_hourly_cost_usd '
            '* 1e6 + vllm:typo_total offset 5m')  # fmt: skip
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "qwen3vl:gpu_hourly_cost_usd",
                                  "vllm:typo_total"}  # fmt: skip


def test_every_dashboard_expression_names_only_exported_metrics(app_url: tuple[Any, str]) -> None:
    from qwen3vl_webui.server.metrics import exposed_names

    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    exported = exposed_names()
    unknown = {(name, e) for e in expressions for name in metric_names(e) if name not in exported}
    assert not unknown, unknown
    # and what the families declare is what a scrape holds (the GPU's figures only with a GPU; the cost per million
    # output tokens once some were made: one chat here, so the test holds alone as in the file's order)
    _, url = app_url
    _chat(url, max_tokens=2)
    scraped = {name for name, _ in scrape(url, headers={"Authorization": f"Bearer {KEY}"})}
    gpu_only = {"qwen3vl:gpu_memory_used_bytes", "qwen3vl:gpu_memory_total_bytes", "qwen3vl:torch_memory_bytes"}
    # the batch engine's own counts only with the batch engine (test_the_engine_process_figures_reach_metrics)
    engine_only = {"qwen3vl:engine_decode_steps_total", "qwen3vl:engine_tokens_total",
                   "qwen3vl:engine_prefill_forwards_total"}  # fmt: skip
    assert exported - gpu_only - engine_only - scraped == set()


# ------------------------------------------------------------------------------- live cost


def test_cost_arithmetic_and_throughput_windows() -> None:
    from qwen3vl_webui.service.metrics import LoadHistory, Sample, cost_per_million, cost_view

    assert cost_per_million(1.0, 100.0) == pytest.approx(1 / 3600 / 100 * 1e6)  # $2.78 per million at 100 tok/s
    assert cost_per_million(1.0, 0.0) is None
    clock = {"t": 1000.0, "tokens": 0}
    history = LoadHistory(lambda: Sample(clock["t"], None, clock["tokens"], 0, 0, 0, 1))
    for second in range(400):  # 100 tok/s for 300 s, then 400 tok/s for the last 100 s
        clock["t"], clock["tokens"] = 1000.0 + second, clock["tokens"] + (100 if second <= 300 else 400)
        history.sample()
    assert history.tokens_per_s(10.0) == pytest.approx(400, rel=0.01)
    assert history.tokens_per_s(300.0) == pytest.approx((200 * 100 + 100 * 400) / 300, rel=0.02)
    view = cost_view(2.0, 7200.0, 1_000_000, 400.0, None)
    assert view.cost_so_far == pytest.approx(4.0)
    assert view.per_million_so_far == pytest.approx(4.0)
    assert view.per_million_current == pytest.approx(2.0 / 3600 / 400 * 1e6)
    assert view.per_million_rolling is None


def test_the_panel_shows_cost_or_how_to_set_it(app_url: tuple[Any, str]) -> None:
    import dataclasses

    from qwen3vl_webui.ui.panels import format_panel

    app, url = app_url
    _chat(url, max_tokens=4)
    snap = app.service.snapshot()
    text = format_panel(snap)
    assert f"GPU at ${HOURLY:,.2f}/h" in text
    assert "cost so far" in text and "per 1M output tokens so far" in text
    unset = dataclasses.replace(snap, cost=dataclasses.replace(snap.cost, hourly_usd=None))
    assert "set `--gpu-hourly-cost USD` (or `QWEN3VL_GPU_HOURLY_COST`)" in format_panel(unset)


def test_the_live_plots_follow_the_load(app_url: tuple[Any, str]) -> None:
    import gradio as gr

    from qwen3vl_webui.ui.handlers import Handlers

    app, url = app_url
    before = len(app.service.history.samples())
    _chat(url, max_tokens=12)
    assert wait_for(lambda: len(app.service.history.samples()) >= before + 3, 6)  # sampled once a second
    memory, speed, queue, kv = Handlers(app.service, app.settings).plots()

    def column(payload: dict, name: str, series: str | None = None) -> list[Any]:
        i, s = payload["columns"].index(name), payload["columns"].index("series")
        return [row[i] for row in payload["data"] if series is None or row[s] == series]

    assert set(column(memory, "series")) == {"RAM (this process, no GPU)"} and min(column(memory, "GiB")) > 0
    assert max(column(speed, "tok/s")) > 0  # the answer's tokens appear as a rate
    assert max(column(speed, "seconds ago")) == 0 and min(column(speed, "seconds ago")) >= -301
    assert set(column(queue, "series")) == {"running", "waiting"}
    assert set(column(kv, "slots", "slots")) == {1}  # --max-concurrency 1
    # gradio sends these as they are (no DataFrame conversion per call): what its LinePlot would have made of them
    plot = gr.LinePlot(x="seconds ago", y="tok/s", color="series")
    assert plot.postprocess(speed) is speed
    assert speed["datatypes"] == {"seconds ago": "quantitative", "tok/s": "quantitative", "series": "nominal"}
    assert speed["mark"] == plot.get_mark()

def test_the_bench_scraper_sums_a_load_up(app_url: tuple[Any, str], tmp_path: Path, monkeypatch: Any) -> None:
    """bench.metrics_scrape (the device's /metrics record under load) against the app while chats run beside it."""
    import threading

    from bench import metrics_scrape

    _, url = app_url
    monkeypatch.setenv("QWEN3VL_API_KEY", KEY)
    chats = threading.Thread(target=lambda: [_chat(url, max_tokens=8) for _ in range(3)])
    chats.start()
    try:
        assert metrics_scrape.main(["--url", url, "--seconds", "3", "--every", "0.5", "--out", str(tmp_path / "m")]) == 0
    finally:
        chats.join()
    result = json.loads((tmp_path / "m.json").read_text())
    summary = result["summary"]
    assert summary["output_tokens"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["output_tokens"] == 8 * summary["requests"]["length"]
    assert summary["gpu_hourly_cost_usd"] == HOURLY and summary["cost_per_million_output_tokens_usd"] > 0
    assert summary["ttft_p50_s"] is not None and summary["ttft_p50_s"] <= summary["ttft_p99_s"]
    assert len(result["series"]) >= 4
    assert "vllm:generation_tokens_total" in (tmp_path / "m.prom").read_text()


def test_the_engine_process_figures_reach_metrics(tiny_checkpoint: Path) -> None:
    """--engine batch (the engine in its own process, on the CPU here): KV slots and the prefix cache come from the
    stats it reports every 0.5 s; a repeated prompt is a prefix-cache hit."""
    app, url = start_app(tiny_checkpoint.parent, "--engine", "batch", "--max-concurrency", "2")
    try:
        model = {"model_name": "qwen3vl-demo", "engine": "0"}

        def settled() -> bool:  # the engine reports every 0.5 s: the start-up warm-up's tokens are in once it is still
            seen = value(scrape(url), "qwen3vl:engine_tokens_total")
            time.sleep(0.6)
            return value(scrape(url), "qwen3vl:engine_tokens_total") == seen

        assert wait_for(settled, 20)
        before = scrape(url)
        body = {"model": "qwen3vl-demo", "messages": [{"role": "user", "content": "The same words again and again"}],
                "max_tokens": 4, "ignore_eos": True}  # fmt: skip
        for _ in range(2):
            assert httpx.post(url + "v1/chat/completions", json=body, timeout=60).status_code == 200

        def hits() -> float:
            return value(scrape(url), "vllm:prefix_cache_hits_total", **model)

        assert wait_for(lambda: hits() > value(before, "vllm:prefix_cache_hits_total", **model), 10)
        after = scrape(url)
        assert value(after, "vllm:prefix_cache_queries_total", **model) > value(
            before, "vllm:prefix_cache_queries_total", **model
        )
        assert value(after, "qwen3vl:precision_info", decoder="batch") == 1
        assert value(after, "vllm:request_success_total", finished_reason="length", **model) == 2

        def grew(name: str, **labels: str) -> float:  # a series absent before (no forward of that kind yet) was 0
            had = [v for (n, ls), v in before.items() if n == name and set(labels.items()) <= set(ls)]
            return value(scrape(url), name, **labels) - sum(had)

        # The engine's schedule: 2 answers of 4 tokens = 2 first tokens from prefill + 6 decode steps of one row.
        assert wait_for(lambda: grew("qwen3vl:engine_tokens_total") == 8, 5), grew("qwen3vl:engine_tokens_total")
        assert grew("qwen3vl:engine_decode_steps_total") == 6
        kinds = {dict(labels)["kind"] for (name, labels) in scrape(url) if name == "qwen3vl:engine_prefill_forwards_total"}
        assert kinds <= {"batched", "graphed", "eager", "compiled", "tower"} and grew(
            "qwen3vl:engine_prefill_forwards_total", kind="eager"
        ) >= 1  # on a CPU: no prefill graphs
        # nothing runs now (the engine's report, every 0.5 s, may still show the last request for a moment)
        assert wait_for(lambda: value(scrape(url), "vllm:kv_cache_usage_perc", **model) == 0, 5)
    finally:
        app.close()


def test_the_bench_scraper_finds_the_app_a_benchmark_started(tmp_path: Path) -> None:
    """--url auto: the `app.py --port P` process on this machine (what bench.load_test / bench.ab start themselves)."""
    import subprocess
    import sys

    from bench import metrics_scrape

    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "app.py"),
                                 "--host", "127.0.0.9", "--port", "4321"])  # fmt: skip
    try:
        assert metrics_scrape.find_app(timeout=10) == "http://127.0.0.9:4321"
    finally:
        stand_in.kill()
        stand_in.wait()
    with pytest.raises(SystemExit, match="never ran 1 requests"):
        metrics_scrape.wait_running("http://127.0.0.9:4321", None, 1, timeout=1)


def test_the_bench_scraper_reads_the_engine_schedule() -> None:
    """bench.metrics_scrape's engine figures over a window: decode steps, rows per step (decode tokens: each finished
    answer's first token came from its prefill), prefill forwards by kind; none without the batch engine's counters."""
    from bench import metrics_scrape

    def samples(steps: float, tokens: float, done: float, **forwards: float) -> dict:
        out = {("qwen3vl:engine_decode_steps_total", ()): steps, ("qwen3vl:engine_tokens_total", ()): tokens,
               ("vllm:request_success_total", (("finished_reason", "length"),)): done}  # fmt: skip
        out.update({("qwen3vl:engine_prefill_forwards_total", (("kind", k),)): v for k, v in forwards.items()})
        return out

    first = samples(100, 1_000, 10, graphed=10)
    last = samples(300, 6_032, 42, graphed=30, batched=4)
    engine = metrics_scrape.summarize(first, last, 2.0, [], None)["engine"]
    assert engine == {"decode_steps": 200, "steps_per_s": 100.0, "rows_per_step": 25.0,
                      "prefill_forwards": {"graphed": 20, "batched": 4}}  # (5,032 - 32 first tokens) / 200 steps
    assert "engine" not in metrics_scrape.summarize({}, {}, 2.0, [], None)


def test_each_front_door_reports_its_own_share_of_the_first_text(demo_app_server: tuple[Any, str]) -> None:
    # The door's own times, from the HTTP request's arrival (the outermost middleware's stamp): to the handler's start
    # and to the first text it hands on, for the page's gradio queue (the raw protocol, as the page speaks it) and for
    # a streamed API answer; a whole (non-streamed) answer starts a handler but sends no first text early.
    from bench import load_test

    _, url = demo_app_server
    start, first = "qwen3vl:frontdoor_handler_start_seconds", "qwen3vl:frontdoor_first_text_seconds"
    before = scrape(url)
    chat = load_test.GradioRawDoor(url, 0.0).connect()
    try:
        assert list(chat.stream("Name the colours you see.", None, 6, 0.0, 120))
    finally:
        chat.close()
    body = {"model": "qwen3vl-demo", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and any(line.startswith("data: ") for line in r.iter_lines())
    r = httpx.post(url + "v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    after = scrape(url)

    def added(name: str, suffix: str, door: str) -> float:
        return value(after, name + suffix, door=door) - value(before, name + suffix, door=door)

    assert added(start, "_count", "gradio") == 1 and added(first, "_count", "gradio") == 1
    assert added(start, "_count", "api") == 2 and added(first, "_count", "api") == 1
    for door in ("gradio", "api"):
        assert 0 < added(start, "_sum", door) and 0 < added(first, "_sum", door) < 60, door
    # the gradio request's first text comes after its handler started (one request: the sums are its times)
    assert added(first, "_sum", "gradio") >= added(start, "_sum", "gradio")
    cumulative = [v for (n, ls), v in after.items() if n == first + "_bucket" and ("door", "gradio") in ls]
    assert cumulative == sorted(cumulative) and len(cumulative) > 10


def test_the_event_loops_lag_shows_a_blocked_loop(demo_app_server: tuple[Any, str]) -> None:
    # The web server's event loop is read 20 times a second; a callback that holds it for 0.3 s (as a slow handler
    # step would) shows as a reading between 0.25 and 0.5 s, and an idle loop's readings stay small.
    app, url = demo_app_server
    name = "qwen3vl:frontend_event_loop_lag_seconds"

    def bucket(samples: dict, le: str) -> float:
        return value(samples, name + "_bucket", le=le)

    def slow(samples: dict) -> float:  # readings between 0.25 and 0.5 s
        return bucket(samples, "0.5") - bucket(samples, "0.25")

    before = scrape(url)
    time.sleep(0.5)
    idle = scrape(url)
    assert value(idle, name + "_count") - value(before, name + "_count") >= 5  # read ~20 times a second
    assert bucket(idle, "0.05") - bucket(before, "0.05") >= 5  # idle: each one late by well under 50 ms
    app.front._loop.call_soon_threadsafe(time.sleep, 0.3)
    assert wait_for(lambda: slow(scrape(url)) > slow(idle), 5)
