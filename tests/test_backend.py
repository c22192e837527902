"""--backend-url: this app as the front end of another OpenAI-compatible server. The backend is a second instance of
this app on loopback (--demo, the tiny model); chats go through the front end's /chat (gradio_client) and /v1 (the
official openai client), and the panel reads the backend's /metrics."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gradio_client import Client, handle_file

from qwen3vl_webui.conversation import ERROR_PREFIX
from tests.conftest import ASSETS, _free_port, start_app, wait_for

MODEL = "qwen3vl-demo"
ROOT = Path(__file__).resolve().parents[1]
LONG = {"max_tokens": 1000, "temperature": 0, "extra_body": {"ignore_eos": True}}


def start_front(cache_dir: Path, backend_url: str, *flags: str) -> tuple[Any, str]:
    """The app with --backend-url (no --demo: nothing loads here), launched without blocking."""
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_app

    port = _free_port()
    settings = parse_settings(
        ["--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache_dir), "--backend-url", backend_url,
         *flags]
    )  # fmt: skip
    app = build_app(settings)
    app.launch(prevent_thread_lock=True, quiet=True)
    app.service.manager.wait_ready(30)
    return app, f"http://127.0.0.1:{port}/"


def _openai(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0, timeout=60)


def _image_uri() -> str:
    return "data:image/png;base64," + base64.b64encode((ASSETS / "example.png").read_bytes()).decode()


def _backend_counts(url: str, key: str | None = None) -> dict[str, float]:
    from qwen3vl_webui.engine.backend.metrics import parse_metrics

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    figures = parse_metrics(httpx.get(f"{url}metrics", headers=headers, timeout=10).text)
    return {"running": figures.running, "generated": figures.generation_tokens, "prompt": figures.prompt_tokens}


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: Path):
    """(backend app, its url, front-end app, its url): the front end holds 1 chat running and 1 waiting."""
    backend, backend_url = start_app(tiny_checkpoint.parent, "--max-concurrency", "2", "--warmup", "off")
    front, front_url = start_front(tiny_checkpoint.parent, backend_url, "--max-concurrency", "1", "--queue-size", "1")
    try:
        yield backend, backend_url, front, front_url
    finally:
        front.close()
        backend.close()


def test_chat_and_v1_reach_the_backend_with_an_image_and_nothing_loads_here(pair) -> None:
    backend, backend_url, front, url = pair
    loaded = front.service.manager.current()
    assert loaded.model is None and loaded.precision == "backend"  # no weights, no processor, no GPU work here
    assert wait_for(lambda: front.service.manager.backend.model == MODEL, 10)
    assert httpx.get(f"{url}ready").json()["ready"] is True
    before = _backend_counts(backend_url)

    ui = Client(url, verbose=False)
    answer = ui.predict({"text": "What is in this picture?", "files": [handle_file(str(ASSETS / "example.png"))]},
                        max_new_tokens=12, api_name="/chat")  # fmt: skip
    assert answer and not answer.startswith(ERROR_PREFIX), answer

    client = _openai(url)
    assert [m.id for m in client.models.list()] == [MODEL]
    ask = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_uri()}},
                                        {"type": "text", "text": "describe"}]}]  # fmt: skip
    reply = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=10, temperature=0, seed=3)
    assert reply.model == MODEL and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 100  # the backend counted the image
    pieces, usage = [], None
    stream = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=10, temperature=0, seed=3,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == reply.choices[0].message.content  # greedy: the same answer, streamed
    assert usage is not None and usage.prompt_tokens == reply.usage.prompt_tokens

    after = _backend_counts(backend_url)
    assert after["generated"] >= before["generated"] + 20 and after["prompt"] > before["prompt"] + 300
    # The backend's own figures, not ours: the front end has no model to switch and shows no GPU controls.
    snap = front.service.snapshot()
    assert snap.backend is not None and snap.backend.problem == ""
    # The front end's own /metrics counts its own requests (the dashboard and the HPA read each pod's).
    own = httpx.get(f"{url}metrics").text
    assert 'finished_reason="length"' in own and 'precision="backend"' in own and 'decoder="backend"' in own
    assert f'model_name="{MODEL}"' in own  # the backend's model, learnt after start (no --backend-model)


def test_a_base_url_ending_in_v1_names_the_same_backend() -> None:
    from qwen3vl_webui.engine.backend.client import BackendClient

    for given in ("http://gpu:8000/v1", "http://gpu:8000/v1/", "http://gpu:8000", "http://u:p@gpu:8000/"):
        client = BackendClient(given)
        assert client.shown == "http://gpu:8000/" and client.url.endswith("gpu:8000/")
        client.close()


def test_stop_ends_the_request_on_the_backend_and_frees_the_slots(pair) -> None:
    backend, backend_url, front, url = pair
    ui = Client(url, verbose=False)
    # The tiny model's answers may end at its end-of-sequence token: without one they run to max new tokens.
    backend.service.manager.current().model.generation_config.eos_token_id = None
    job = ui.submit({"text": "Tell a very long story.", "files": []}, max_new_tokens=1000, api_name="/chat")
    assert wait_for(lambda: backend.service.scheduler.state().running == 1, 30)
    assert front.service.scheduler.state().running == 1
    job.cancel()
    assert wait_for(lambda: backend.service.scheduler.state().running == 0, 10)
    assert wait_for(lambda: front.service.scheduler.state().running == 0, 5)
    assert backend.service.stats.last.new_tokens < 1000

    # /v1: the client closing its stream is the API's Stop.
    client = _openai(url)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True, **LONG
    )
    next(iter(stream))
    assert wait_for(lambda: backend.service.scheduler.state().running == 1, 30)
    stream.close()
    assert wait_for(lambda: backend.service.scheduler.state().running == 0, 10)


def test_the_front_ends_queue_cap_and_the_panel_read_from_the_backends_metrics(pair) -> None:
    from qwen3vl_webui.ui.panels import format_panel

    backend, backend_url, front, url = pair
    client = _openai(url)
    ask = [{"role": "user", "content": "a long story"}]
    streams: list[Any] = []

    def hold() -> None:
        stream = client.chat.completions.create(model=MODEL, messages=ask, stream=True, **LONG)
        streams.append(stream)
        try:
            for _ in stream:
                pass
        except openai.APIError:  # the test closes it under this thread
            pass

    threading.Thread(target=hold, daemon=True).start()
    assert wait_for(lambda: backend.service.scheduler.state().running == 1, 30)
    threading.Thread(target=hold, daemon=True).start()  # waits in the front end's line (1 slot, 1 waiting)
    assert wait_for(lambda: front.service.scheduler.state().waiting == 1, 10)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=ask, max_tokens=5)
    assert "busy" in str(refused.value)
    busy = Client(url, verbose=False).predict({"text": "hi", "files": []}, api_name="/chat")
    assert busy.startswith(ERROR_PREFIX) and "busy" in busy

    # The panel's serving figures are the backend's (its /metrics, read every second).
    backend_side = front.service.manager.backend

    def running() -> bool:
        load = backend_side.tracker.load()
        return load is not None and load.figures.running == 1 and load.figures.kv_usage is not None

    assert wait_for(running, 10), backend_side.status()
    text = format_panel(front.service.snapshot())
    assert "backend requests | 1 running · 0 waiting · KV cache" in text and "output tok/s" in text, text
    assert "hidden here" in text and "VRAM" not in text
    # Local GPU controls: hidden from everyone, and refused if called anyway.
    from qwen3vl_webui.ui.handlers import Handlers

    handlers = Handlers(front.service, front.settings)
    assert handlers.operator_view(None)["visible"] is False
    assert handlers.switch("int4").startswith("Not switched: the model runs on the backend")
    streams[0].close()
    assert wait_for(lambda: len(streams) == 2, 15)  # the waiting one started once the slot was free
    streams[1].close()
    assert wait_for(lambda: backend.service.scheduler.state().running == 0 and not front.service.in_flight(), 15)

    # This app as the backend counts an answer's tokens when it ends (vLLM: every step): after a few, the panel
    # shows the backend's throughput and TTFT.
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=ask, max_tokens=24, extra_body={"ignore_eos": True})

    def measured() -> bool:
        load = backend_side.tracker.load()
        return load is not None and (load.tokens_per_s or 0) > 0 and load.ttft_s is not None

    assert wait_for(measured, 10), backend_side.status()
    assert "TTFT" in format_panel(front.service.snapshot())


def _serve_at(cache_dir: Path, port: int) -> Any:
    """The demo app as a backend on `port` (start_app picks a free port; a restart needs the same one)."""
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_app

    settings = parse_settings(["--demo", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache_dir),
                               "--warmup", "off", "--grace-seconds", "0"])  # fmt: skip
    app = build_app(settings)
    app.launch(prevent_thread_lock=True, quiet=True)
    return app


def test_a_backend_gone_mid_answer_is_a_clear_message_and_not_ready_until_it_is_back(tiny_checkpoint: Path) -> None:
    port = _free_port()
    backend_url = f"http://127.0.0.1:{port}/"
    backend = _serve_at(tiny_checkpoint.parent, port)
    front, url = start_front(tiny_checkpoint.parent, backend_url, "--max-concurrency", "2")
    restarted = None
    try:
        assert wait_for(lambda: httpx.get(f"{url}ready").status_code == 200, 60)  # once the backend has loaded
        ui = Client(url, verbose=False)
        first = ui.predict({"text": "hello", "files": []}, max_new_tokens=8, api_name="/chat")
        assert not first.startswith(ERROR_PREFIX), first
        # The backend goes away mid-answer (its server stops).
        client = _openai(url)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                stream=True, **LONG)  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        backend.close()
        # This app, closing, may drop the connection (an error, told plainly) or first end the answer it was giving
        # (then the stream ends as the backend ended it). A stream cut off without an end is an error in
        # test_what_the_backend_sends_is_capped_and_a_bad_chunk_is_its_failure_not_unreachable (the stand-in).
        try:
            for _ in chunks:
                pass
        except openai.APIError as failed:
            assert "model server" in str(failed) and backend_url not in str(failed), failed
        # The page's chat: one sentence, the server lives, the history stays for the next turn.
        down = ui.predict({"text": "and now?", "files": []}, max_new_tokens=8, api_name="/chat")
        assert down.startswith(ERROR_PREFIX) and "The model server" in down and backend_url not in down, down
        assert "this chat is kept" in down
        assert wait_for(lambda: httpx.get(f"{url}ready").status_code == 503, 5)
        assert httpx.get(f"{url}ready").json()["state"] == "backend unreachable"
        assert "⚠️" in front.service.manager.status and httpx.get(f"{url}health").status_code == 200
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert refused.value.status_code == 503 and "model server" in str(refused.value)

        # The backend comes back on the same port: ready again once it has loaded, and the next chat works.
        restarted = _serve_at(tiny_checkpoint.parent, port)
        assert wait_for(lambda: httpx.get(f"{url}ready").status_code == 200, 60)
        again = ui.predict({"text": "back?", "files": []}, max_new_tokens=8, api_name="/chat")
        assert again and not again.startswith(ERROR_PREFIX), again
    finally:
        front.close()
        backend.close()
        if restarted is not None:
            restarted.close()


def test_a_backend_with_an_api_key_needs_backend_api_key(tiny_checkpoint: Path, monkeypatch) -> None:
    backend, backend_url = start_app(tiny_checkpoint.parent, "--api-key", "sesame", "--warmup", "off")
    without = with_key = None
    try:
        without, url = start_front(tiny_checkpoint.parent, backend_url)
        answer = Client(url, verbose=False).predict({"text": "hi", "files": []}, max_new_tokens=4, api_name="/chat")
        assert answer.startswith(ERROR_PREFIX) and "credentials" in answer, answer  # the flag: the operator's log
        assert httpx.get(f"{url}ready").status_code == 503
        monkeypatch.setenv("QWEN3VL_BACKEND_API_KEY", "sesame")  # the env var, as every flag has one
        with_key, url = start_front(tiny_checkpoint.parent, backend_url)
        assert wait_for(lambda: httpx.get(f"{url}ready").status_code == 200, 10)
        answer = Client(url, verbose=False).predict({"text": "hi", "files": []}, max_new_tokens=4, api_name="/chat")
        assert answer and not answer.startswith(ERROR_PREFIX), answer
        assert _backend_counts(backend_url, "sesame")["generated"] > 0  # its /metrics needs the key too
    finally:
        for app in (without, with_key, backend):
            if app is not None:
                app.close()


# ------------------------------------------------------------------------------ plain data, no server

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} 0.25
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} GEN
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="Qwen/Qwen3-VL-4B-Instruct"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-VL-4B-Instruct"} COUNT
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} COUNT
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-VL-4B-Instruct"} SUM
"""


def _vllm(generated: float, count: float, total: float) -> str:
    return VLLM_METRICS.replace("GEN", str(generated)).replace("COUNT", str(count)).replace("SUM", str(total))


def test_vllm_metrics_are_read_as_they_are_and_rates_come_from_two_scrapes() -> None:
    from qwen3vl_webui.engine.backend.metrics import LoadTracker, parse_metrics

    figures = parse_metrics(_vllm(1000, 4, 0.8))
    assert (figures.running, figures.waiting, figures.kv_usage, figures.generation_tokens) == (3, 2, 0.25, 1000)
    tracker = LoadTracker()
    tracker.add(figures, now=100.0)
    assert tracker.load(now=100.0).tokens_per_s is None and tracker.load(now=100.0).ttft_s == pytest.approx(0.2)
    tracker.add(parse_metrics(_vllm(1500, 6, 1.8)), now=102.0)
    load = tracker.load(now=102.5)
    assert load.tokens_per_s == pytest.approx(250.0) and load.ttft_s == pytest.approx(0.5) and load.age_s == 0.5
    tracker.add(parse_metrics(_vllm(10, 1, 0.1)), now=104.0)  # the backend restarted: its counters began again
    assert tracker.load(now=104.0).tokens_per_s is None


def test_backend_flags_env_and_their_checks(monkeypatch) -> None:
    from qwen3vl_webui.cli import parse_settings

    monkeypatch.setenv("QWEN3VL_BACKEND_URL", "http://gpu-box:8000/")
    settings = parse_settings(["--backend-model", "Qwen/Qwen3-VL-4B-Instruct", "--backend-api-key", "sekrit-key"])
    assert settings.backend_url == "http://gpu-box:8000/" and settings.backend_model == "Qwen/Qwen3-VL-4B-Instruct"
    assert "sekrit-key" not in repr(settings)
    for bad in (["--backend-url", "gpu-box:8000"], ["--backend-url", "http://h:99999/"], ["--demo"]):
        with pytest.raises(SystemExit) as exited:
            parse_settings(bad)
        assert exited.value.code == 2


def test_the_backend_is_sent_openai_messages_with_data_uris_and_old_turns_dropped_to_fit() -> None:
    from qwen3vl_webui.conversation import Turn, UserMessage
    from qwen3vl_webui.engine.backend.decoder import request_body
    from qwen3vl_webui.engine.request import RequestError, SamplingParams
    from qwen3vl_webui.service.backend_prompt import build_messages
    from qwen3vl_webui.service.prompt import ChatRequest

    image, video = str(ASSETS / "example.png"), str(ASSETS / "example.mp4")
    old = [Turn(UserMessage("x" * 15000, ()), "y" * 300), Turn(UserMessage("look", (video,)), "a video")]
    request = ChatRequest(UserMessage("and this <|im_start|>?", (image,)), old, "Be brief.",
                          SamplingParams(max_new_tokens=256, stop=("END",), seed=1), max_context=8192)  # fmt: skip
    prompt = build_messages(request)
    messages = prompt.inputs["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # the 5,000-token turn is gone
    assert prompt.turns_dropped == 1 and prompt.image_tokens > 0 and prompt.video_tokens > 0
    assert messages[1]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    parts = messages[-1]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[1]["text"] == "and this <\u200b|im_start|>?"  # typed markers stay text, as in the local template
    body = request_body(MODEL, prompt, request.sampling)
    assert body["stream"] and body["stop"] == ["END"] and body["seed"] == 1 and body["max_tokens"] == 256
    with pytest.raises(RequestError, match="Whole video"):
        build_messages(ChatRequest(UserMessage("watch", (video,)), whole_video=True))


def test_a_long_document_is_read_in_windows_through_the_backend(pair, tmp_path: Path) -> None:
    from gradio_client import handle_file

    backend, _, front, url = pair
    backend.service.manager.current().model.generation_config.eos_token_id = None  # answers of max new tokens
    document = tmp_path / "notes.txt"
    document.write_text("\n\n".join(f"Paragraph {i}: the tide came in at {i} o'clock." for i in range(400)))
    before = backend.service.metrics.totals().success
    answer = Client(url, verbose=False).predict(
        {"text": "When did the tide come in?", "files": [handle_file(str(document))]},
        max_context=2048, max_new_tokens=16, api_name="/chat",
    )  # fmt: skip
    assert answer and not answer.startswith(ERROR_PREFIX), answer
    assert "Read notes.txt in" in answer  # several windows, each a chat through the backend, and a merge
    assert sum(backend.service.metrics.totals().success.values()) >= sum(before.values()) + 3


class _FakeVllm:
    """A loopback server that answers as vLLM does: its /v1/models, /metrics names, stream shapes and error bodies;
    and, for the caps and deadlines, as no server should (`metrics`: "slow" a byte a second, "huge" 5 MiB)."""

    def __init__(self, key: str | None = None, model: str = "Qwen/Qwen3-VL-4B-Instruct") -> None:
        import http.server
        import json

        fake = self
        self.bodies: list[dict[str, Any]] = []
        self.left = threading.Event()  # a request's client closed its connection (queued, or mid-stream)
        self.streaming = threading.Event()  # a "stream" request has begun sending
        self.metrics = "vllm"

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _refused(self) -> bool:
                if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                    self._send(401, json.dumps({"error": {"message": "bad key", "code": 401}}).encode())
                    return True
                return False

            def do_GET(self) -> None:
                if self._refused():
                    return
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": model}]}).encode())
                elif self.path == "/metrics" and fake.metrics == "slow":  # a byte a second, for 25 s
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    try:
                        for _ in range(25):
                            self.wfile.write(b"#")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:
                        pass
                elif self.path == "/metrics" and fake.metrics == "slow headers":  # the headers a byte a second
                    try:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                        for _ in range(25):
                            self.wfile.write(b"a")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:
                        pass
                elif self.path == "/metrics" and fake.metrics == "huge":
                    self._send(200, b"# padding\n" * (5 * 2**20 // 10) + _vllm(1, 1, 1).encode(), "text/plain")
                elif self.path == "/metrics":
                    self._send(200, _vllm(1000, 4, 0.8).encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b'{"detail": "Not Found"}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                if self._refused():
                    return
                text = body["messages"][-1]["content"][-1]["text"]
                if text == "too long":
                    error = {"object": "error", "message": "This model's maximum context length is 4096 tokens.",
                             "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip
                    self._send(400, json.dumps(error).encode())
                    return
                if text == "markup":  # a backend's error that would render as a picture, a link and HTML
                    error = {"object": "error", "type": "BadRequestError", "code": 400,
                             "message": "![pixel](http://127.0.0.1:9/p.png) <b>bold</b> [click](http://x.test/)"}  # fmt: skip
                    self._send(400, json.dumps(error).encode())
                    return
                if text == "huge error":  # 8 MiB of error body
                    self._send(500, b"x" * 8 * 2**20, "text/plain")
                    return
                if text == "queued":  # waits in the backend's line: not a byte (not even headers) until the client goes
                    self.connection.settimeout(15)
                    if self.connection.recv(1) == b"":  # the client closed its end
                        fake.left.set()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                head = {"id": "c", "object": "chat.completion.chunk", "model": body["model"]}
                if text in ("stream", "flood", "long line", "not json"):
                    self._misbehave(text, head)
                    return
                events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
                events += [{**head, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                           for w in ("Two ", "cats.")]  # fmt: skip
                events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if text == "fail":
                    events = events[:2] + [{"object": "error", "message": "engine dead", "type": "InternalServerError"}]
                if text == "cut":  # the stream ends cleanly, but before the answer did: no finish reason, no [DONE]
                    events = events[:2]
                    for event in events:
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    return
                events.append({**head, "choices": [], "usage": {"prompt_tokens": 1234, "completion_tokens": 2}})
                for event in events:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

            def _misbehave(self, text: str, head: dict[str, Any]) -> None:
                try:
                    if text == "long line":  # 2 MiB and no newline
                        self.wfile.write(b"data: " + b"x" * 2 * 2**20)
                    elif text == "not json":
                        self.wfile.write(b"data: {\"choices\": [{\"delta\": \n\n")
                    elif text == "flood":  # 4 MiB of one-character pieces, whatever max_tokens was
                        event = {**head, "choices": [{"index": 0, "delta": {"content": "a"}}]}
                        piece = f"data: {json.dumps(event)}\n\n".encode()
                        self.wfile.write(piece * (4 * 2**20 // len(piece)))
                    else:  # a piece every 5 ms for 20 s: only a closed connection ends it early
                        for _ in range(4000):
                            event = {**head, "choices": [{"index": 0, "delta": {"content": "w "}}]}
                            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                            self.wfile.flush()
                            fake.streaming.set()
                            time.sleep(0.005)
                    self.wfile.flush()
                except OSError:  # the client closed its end
                    fake.left.set()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ask(decoder: Any, text: str, cancel: threading.Event | None = None, max_new_tokens: int = 8) -> list[Any]:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.backend_prompt import build_messages
    from qwen3vl_webui.service.prompt import ChatRequest

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    prompt = build_messages(ChatRequest(UserMessage(text, ()), sampling=sampling))
    return list(decoder.stream(None, prompt, sampling, cancel or threading.Event()))


def test_vllms_shapes_models_stream_usage_metrics_and_errors_are_read() -> None:
    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.backend.client import BackendError, BackendRefused
    from qwen3vl_webui.engine.backend.decoder import BackendDecoder
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.backend_prompt import build_messages
    from qwen3vl_webui.service.prompt import ChatRequest

    fake = _FakeVllm()
    decoder = BackendDecoder(fake.url)
    try:
        decoder.probe()  # as attach does
        status = decoder.status()
        assert status.model == "Qwen/Qwen3-VL-4B-Instruct" and status.problem == "" and status.metrics is True
        assert status.load.figures.running == 3 and status.load.figures.kv_usage == 0.25

        def ask(text: str) -> list[Any]:
            prompt = build_messages(ChatRequest(UserMessage(text, ()), sampling=SamplingParams(max_new_tokens=8)))
            return list(decoder.stream(None, prompt, SamplingParams(max_new_tokens=8), threading.Event()))

        events = ask("count the cats")
        assert [text for text, _ in events] == ["Two ", "Two cats.", "Two cats."]
        stats = events[-1][1]
        assert stats.prompt_tokens == 1234 and stats.new_tokens == 2  # vLLM's usage, not our estimate
        assert fake.bodies[-1]["model"] == "Qwen/Qwen3-VL-4B-Instruct" and fake.bodies[-1]["stream_options"]
        with pytest.raises(BackendRefused, match="maximum context length is 4096"):
            ask("too long")
        with pytest.raises(BackendError, match="engine dead"):
            ask("fail")
        # Stop while the backend holds the request in its line: the connection closes, the backend sees it go.
        cancel, stopped = threading.Event(), []
        prompt = build_messages(ChatRequest(UserMessage("queued", ()), sampling=SamplingParams(max_new_tokens=8)))
        stream = decoder.stream(None, prompt, SamplingParams(max_new_tokens=8), cancel, stopped.append)
        threading.Timer(0.3, cancel.set).start()
        began = time.monotonic()
        assert list(stream) == [] and time.monotonic() - began < 2.0
        assert len(stopped) == 1 and stopped[0].new_tokens == 0
        assert fake.left.wait(5)
    finally:
        decoder.close()
        fake.close()


# ------------------------------------------------------------------------------ cancel, deadlines, caps, secrets


def test_stop_ends_a_backend_that_streams_fast_within_a_moment() -> None:
    """A backend sending a piece every 5 ms never leaves the reader's queue empty: Stop must still end the request
    and close the connection (the backend sees it go)."""
    from qwen3vl_webui.engine.backend.decoder import BackendDecoder

    fake = _FakeVllm()
    decoder = BackendDecoder(fake.url, model="m")
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        began = time.monotonic()
        events = _ask(decoder, "stream", cancel, max_new_tokens=4000)
        assert time.monotonic() - began < 1.5 and 0 < len(events) < 1000
        assert all(stats is None for _, stats in events)  # stopped: no final figures
        assert fake.left.wait(3)
    finally:
        decoder.close()
        fake.close()


def test_stop_before_the_connection_exists_sends_nothing() -> None:
    """Stop while the request is still being connected: the request is never sent (no answer then waited for)."""
    import queue

    from qwen3vl_webui.engine.backend.decoder import BackendDecoder

    fake = _FakeVllm()
    decoder = BackendDecoder(fake.url, model="m")
    try:
        for _ in range(5):
            cancel = threading.Event()
            cancel.set()
            assert _ask(decoder, "queued", cancel) == []
        # The reader itself, stopped before its connection completes: it connects but sends no request.
        events: queue.Queue[Any] = queue.Queue()
        decoder.client._read({"model": "m", "messages": []}, events, {"closed": True}, (2**20, 2**20))
        assert events.empty()
        time.sleep(0.3)
        assert fake.bodies == []
    finally:
        decoder.close()
        fake.close()


def test_stop_timeout_and_a_v1_client_leaving_end_the_backend_request_and_free_the_slot(tmp_path: Path) -> None:
    fake = _FakeVllm()
    front, url = start_front(tmp_path, fake.url, "--request-timeout", "2", "--max-concurrency", "1",
                             "--backend-model", "m")  # fmt: skip
    try:
        scheduler = front.service.scheduler
        # /v1: the client closes its stream.
        client = _openai(url)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "stream"}],
                                                stream=True, max_tokens=1000)  # fmt: skip
        next(iter(stream))
        assert fake.streaming.wait(5)
        stream.close()
        assert fake.left.wait(3) and wait_for(lambda: scheduler.state().running == 0, 3)

        # The page's Stop.
        fake.left.clear()
        job = Client(url, verbose=False).submit({"text": "stream", "files": []}, max_new_tokens=1000,
                                                api_name="/chat")  # fmt: skip
        assert wait_for(lambda: scheduler.state().running == 1, 10)
        time.sleep(0.3)
        job.cancel()
        assert fake.left.wait(3) and wait_for(lambda: scheduler.state().running == 0, 3)

        # --request-timeout (2 s) while the backend streams on.
        fake.left.clear()
        began = time.monotonic()
        with pytest.raises(openai.APIStatusError) as timed_out:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "stream"}],
                                           max_tokens=1000)  # fmt: skip
        assert timed_out.value.status_code == 504 and time.monotonic() - began < 4.5
        assert fake.left.wait(3) and wait_for(lambda: scheduler.state().running == 0, 3)

        # The backend's model name is its own text: plain text in the panel (item: escape).
        from qwen3vl_webui.ui.panels import format_panel, format_status

        front.service.manager.backend.model = "[click](http://evil.example) <b>|x"
        panel = format_panel(front.service.snapshot())
        assert "[click](" not in panel and "<b>" not in panel and "\\[click\\]" in panel
        status = format_status(front.service.snapshot())
        assert "[click]" not in status and "<b>" not in status and "model ?click?" in status
    finally:
        front.close()
        fake.close()
    # Closing the app closes the backend's HTTP clients (their connections), not just its watcher.
    decoder = front.service.manager.decoder
    assert decoder.client._http.is_closed and decoder.client._chats.is_closed


def test_a_slow_metrics_probe_ends_at_its_deadline_and_a_huge_one_is_skipped(monkeypatch, caplog) -> None:
    from qwen3vl_webui.engine.backend import client as client_module
    from qwen3vl_webui.engine.backend.decoder import BackendDecoder

    monkeypatch.setattr(client_module, "PROBE_TIMEOUT_S", 1.0)
    fake = _FakeVllm()
    decoder = BackendDecoder(fake.url)
    try:
        fake.metrics = "slow"  # a byte a second: httpx's per-read timeout alone would wait 25 s
        began = time.monotonic()
        decoder.probe()
        assert time.monotonic() - began < 3.5
        assert decoder.status().reachable is False and "in time" in decoder.problem
        fake.metrics = "slow headers"
        began = time.monotonic()
        decoder.probe()
        assert time.monotonic() - began < 2.5 and "in time" in decoder.problem

        fake.metrics = "huge"  # 5 MiB: that scrape is skipped (one log line), the backend still serves
        with caplog.at_level("WARNING"):
            decoder.probe()
            decoder.probe()
        assert decoder.problem == "" and decoder.model == "Qwen/Qwen3-VL-4B-Instruct"
        assert sum("/metrics" in r.getMessage() for r in caplog.records) == 1
    finally:
        decoder.close()
        fake.close()


def test_what_the_backend_sends_is_capped_and_a_bad_chunk_is_its_failure_not_unreachable() -> None:
    from qwen3vl_webui.engine.backend.client import BackendError, BackendTooLarge, BackendUnavailable
    from qwen3vl_webui.engine.backend.decoder import BackendDecoder

    fake = _FakeVllm()
    decoder = BackendDecoder(fake.url)
    try:
        decoder.probe()
        assert decoder.status().reachable is True
        with pytest.raises(BackendTooLarge, match="line over 1 MiB"):
            _ask(decoder, "long line", max_new_tokens=1000)
        with pytest.raises(BackendTooLarge, match="max tokens"):  # 4 MiB for an answer of at most 8 tokens
            _ask(decoder, "flood")
        began = time.monotonic()
        with pytest.raises(BackendError) as failed:  # 8 MiB of error body: 64 KiB read, 200 characters told
            _ask(decoder, "huge error")
        assert len(str(failed.value)) < 300 and time.monotonic() - began < 2
        with pytest.raises(BackendUnavailable, match="mid-answer"):  # not an answer that merely ended early
            _ask(decoder, "cut")
        decoder.probe()
        with pytest.raises(BackendError) as bad:
            _ask(decoder, "not json")
        assert not isinstance(bad.value, BackendUnavailable) and bad.value.status == 502
        assert decoder.status().reachable is True and decoder.problem == ""
    finally:
        decoder.close()
        fake.close()


def test_no_probe_on_the_chat_path_and_a_fresh_exception_for_every_chat() -> None:
    from qwen3vl_webui.engine.backend.client import BackendUnavailable
    from qwen3vl_webui.engine.backend.decoder import BackendDecoder

    decoder = BackendDecoder(f"http://127.0.0.1:{_free_port()}/")  # nothing listens there
    try:
        decoder.probe()
        assert decoder.status().reachable is False and decoder.model is None
        probes: list[str] = []
        decoder.client.models = lambda: probes.append("models")  # type: ignore[method-assign]
        decoder.client.metrics_text = lambda: probes.append("metrics")  # type: ignore[method-assign]
        raised = []
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as failed:
                _ask(decoder, "hi")
            raised.append(failed.value)
        assert probes == []  # a chat holding a slot never waits on a probe
        assert len({id(e) for e in raised}) == 3
        depth = [len(__import__("traceback").extract_tb(e.__traceback__)) for e in raised]
        assert depth[0] == depth[-1]  # the tracebacks do not grow from chat to chat
    finally:
        decoder.close()


def test_the_backends_key_and_address_are_the_operators_alone(tmp_path: Path, capsys) -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.ui.panels import format_panel, format_status

    with pytest.raises(SystemExit):
        parse_settings(["--backend-url", "ftp://admin:hunter2@gpu-box:8000/"])
    assert "hunter2" not in capsys.readouterr().err

    fake = _FakeVllm(key="right")
    address = f"127.0.0.1:{fake.port}"
    front, url = start_front(tmp_path, f"http://admin:hunter2@{address}/v1", "--backend-api-key", "sekrit-key",
                             "--backend-model", "m")  # fmt: skip
    try:
        assert "hunter2" not in repr(front.settings) and "sekrit" not in repr(front.settings)
        assert wait_for(lambda: httpx.get(f"{url}ready").status_code == 503, 5)
        assert httpx.get(f"{url}ready").json()["state"] == "backend refused this app's key"  # not "unreachable"
        chat = Client(url, verbose=False).predict({"text": "hi", "files": []}, max_new_tokens=4, api_name="/chat")
        assert chat.startswith(ERROR_PREFIX) and "credentials" in chat, chat
        with pytest.raises(openai.APIStatusError) as refused:
            _openai(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        snap = front.service.snapshot()
        shown = {
            "panel": format_panel(snap), "status": format_status(snap), "chat": chat,
            "v1": refused.value.response.text, "metrics": httpx.get(f"{url}metrics").text,
            "ready": httpx.get(f"{url}ready").text,
        }  # fmt: skip
        for where, text in shown.items():
            for secret in ("hunter2", "admin:", "sekrit", address, "--backend-api-key"):
                assert secret not in text, (where, secret, text)
        assert "the model server" in shown["panel"]
    finally:
        front.close()
        fake.close()


def test_a_backends_error_words_reach_the_chat_as_text_not_markdown(tiny_checkpoint: Path) -> None:
    """A backend's 400 quotes its own message: the chat shows it escaped (no picture fetched from its address, no link,
    no HTML), and the front end lives on."""
    fake = _FakeVllm(model=MODEL)
    front, url = start_front(tiny_checkpoint.parent, fake.url)
    try:
        ui = Client(url, verbose=False)
        said = ui.predict({"text": "markup", "files": []}, max_new_tokens=8, api_name="/chat")
        assert said.startswith(ERROR_PREFIX) and "model server refused" in said, said
        for raw in ("![pixel](", "<b>", "[click](http"):
            assert raw not in said, said
        assert "\\!\\[pixel\\]" in said and "\\<b\\>bold" in said
        assert not ui.predict({"text": "count the cats", "files": []}, max_new_tokens=8, api_name="/chat").startswith(ERROR_PREFIX)
    finally:
        front.close()
        fake.close()
