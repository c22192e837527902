"""The OpenAI-compatible API on the app's port, driven by the official `openai` client (in-process app, tiny model)."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gradio_client import Client

from qwen3vl_webui.conversation import ERROR_PREFIX
from tests.conftest import ASSETS, start_app, wait_for

MODEL = "qwen3vl-demo"


def _client(url: str, key: str = "none", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0, timeout=120, **kwargs)


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(text: str, *parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


@pytest.fixture(scope="module")
def api_app(tiny_checkpoint: Path):
    app, url = start_app(tiny_checkpoint.parent, "--max-concurrency", "2")
    try:
        yield app, url
    finally:
        app.close()


def test_models_and_a_text_answer_with_usage(api_app) -> None:
    _, url = api_app
    client = _client(url)
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=_ask("hello there"), max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_greedy_answer_in_pieces_and_usage_last(api_app) -> None:
    _, url = api_app
    client = _client(url)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Count the objects"},
    ]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0, seed=1)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=48, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_image_and_video_as_data_uris(api_app) -> None:
    app, url = api_app
    client = _client(url)
    image = {"type": "image_url", "image_url": {"url": _data_uri(ASSETS / "example.png", "image/png")}}
    reply = client.chat.completions.create(model=MODEL, messages=_ask("What is it?", image), max_tokens=8)
    assert reply.choices[0].message.content and app.service.stats.last.prompt_image_tokens > 0
    video = {"type": "video_url", "video_url": {"url": _data_uri(ASSETS / "example.mp4", "video/mp4")}}
    reply = client.chat.completions.create(model=MODEL, messages=_ask("What happens?", video), max_tokens=8)
    assert reply.choices[0].message.content and app.service.stats.last.prompt_video_tokens > 0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"messages": _ask("x", {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})}, "not valid base64"),
        ({"messages": _ask("x", {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"plain text").decode()}})}, "not a valid image"),
        ({"messages": _ask("x", {"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}})}, "is not accepted"),
        ({"messages": _ask("word " * 20000)}, "max context"),
        ({"messages": _ask("hi"), "max_tokens": 10**6}, "max_tokens must be"),
        ({"messages": _ask("hi"), "temperature": 9.0}, "temperature must be between"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "must follow a user message"),
        ({"messages": []}, "non-empty"),
    ],
)
def test_bad_input_is_a_400_in_openais_shape(api_app, kwargs: dict[str, Any], fragment: str) -> None:
    _, url = api_app
    with pytest.raises(openai.BadRequestError) as err:
        _client(url).chat.completions.create(model=MODEL, **{"max_tokens": 8, **kwargs})
    assert err.value.status_code == 400 and fragment in err.value.body["message"], err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_and_a_huge_body_a_413(api_app) -> None:
    app, url = api_app
    with pytest.raises(openai.NotFoundError) as err:
        _client(url).chat.completions.create(model="gpt-4o", messages=_ask("hi"))
    assert err.value.body["code"] == "model_not_found"
    big = "A" * (app.settings.max_file_mb * 2**20 * 2)
    reply = httpx.post(f"{url}v1/chat/completions", content=f'{{"model": "{MODEL}", "x": "{big}"}}', timeout=60)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_the_api_key_is_required_when_set(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--api-key", "sk-test-123")
    try:
        for key in ("none", "sk-wrong"):
            with pytest.raises(openai.AuthenticationError) as err:
                _client(url, key).chat.completions.create(model=MODEL, messages=_ask("hi"), max_tokens=8)
            assert err.value.status_code == 401
        assert _client(url, "sk-test-123").chat.completions.create(model=MODEL, messages=_ask("hi"), max_tokens=8)
    finally:
        app.close()


def test_a_ui_login_closes_the_api_unless_opened(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--auth", "user:pw")
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(url).chat.completions.create(model=MODEL, messages=_ask("hi"), max_tokens=8)
    finally:
        app.close()
    app, url = start_app(tiny_checkpoint.parent, "--auth", "user:pw", "--open-api")
    try:
        assert _client(url).chat.completions.create(model=MODEL, messages=_ask("hi"), max_tokens=8)
    finally:
        app.close()


def test_one_admission_across_the_chat_page_api_and_v1(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--max-concurrency", "1", "--queue-size", "1")
    try:
        long = {"max_tokens": 800, "extra_body": {"ignore_eos": True}, "temperature": 0}
        api = _client(url)
        running = threading.Thread(
            target=lambda: api.chat.completions.create(model=MODEL, messages=_ask("story"), **long), daemon=True
        )
        running.start()
        deadline = time.monotonic() + 30
        while app.service.scheduler.state().running < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = Client(url, verbose=False).submit({"text": "hi", "files": []}, max_new_tokens=16, api_name="/chat")
        while app.service.scheduler.state().waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.service.scheduler.state().waiting == 1  # the /chat call waits behind the /v1 one
        with pytest.raises(openai.RateLimitError) as err:  # the line is full: /v1 gets 429 with Retry-After
            api.chat.completions.create(model=MODEL, messages=_ask("and me?"), max_tokens=8)
        assert err.value.response.headers["retry-after"] == "1"
        third = Client(url, verbose=False).predict({"text": "me too", "files": []}, api_name="/chat")
        assert third.startswith(ERROR_PREFIX + "busy")
        app.service.stop_all("test")
        waiting.result(timeout=60)
        assert app.service.scheduler.state().peak_running == 1
    finally:
        app.close()


def _post_and_leave_open(url: str, body: dict[str, Any]) -> socket.socket:
    """Sends a whole chat completion request over a raw connection and returns it unread (closing it is leaving)."""
    host, port = url.removeprefix("http://").strip("/").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)))
    conn.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return conn


def test_a_client_leaving_a_non_streamed_answer_frees_its_slot_at_once(tiny_checkpoint: Path, caplog) -> None:
    # 8,000 tokens take the tiny model half a minute or more on a CPU: without the watch on the connection both
    # chats below would hold their places that long.
    app, url = start_app(tiny_checkpoint.parent, "--max-concurrency", "1", "--max-new-tokens", "8000")
    service = app.service
    try:
        long = {"model": MODEL, "messages": _ask("story"), "max_tokens": 8000, "ignore_eos": True, "temperature": 0}
        totals = service.metrics.totals()
        tokens, aborted, started = totals.generation_tokens, totals.success["abort"], service.counters.generations_started
        running = _post_and_leave_open(url, long)
        assert wait_for(lambda: service.counters.active == 1, 30)  # generating: the one slot is taken
        waiting = _post_and_leave_open(url, {**long, "messages": _ask("and me?")})
        assert wait_for(lambda: service.scheduler.state().waiting == 1 and service.admission.held() == 2, 30)
        with caplog.at_level(logging.ERROR):
            waiting.close()  # gone while waiting for a slot: dropped before any GPU work
            assert wait_for(lambda: service.admission.held() == 1 and service.scheduler.state().waiting == 0, 5)
            running.close()  # gone mid-answer: leaves the engine at its next step
            assert wait_for(lambda: service.admission.held() == 0 and service.scheduler.state().running == 0, 5)
        assert service.counters.active == 0 and service.counters.generations_started == started + 1  # not the 2nd
        assert 0 < service.metrics.totals().generation_tokens - tokens < 8000  # stopped early
        assert service.metrics.totals().success["abort"] == aborted + 1  # counted as vLLM does: not "stop"/"length"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a client left: no error
        reply = _client(url).chat.completions.create(model=MODEL, messages=_ask("still there?"), max_tokens=8)
        assert reply.choices[0].message.content
    finally:
        app.close()


def test_while_loading_and_draining_the_api_answers_503(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent)
    try:
        app.service.begin_drain()
        with pytest.raises(openai.InternalServerError) as err:
            _client(url).chat.completions.create(model=MODEL, messages=_ask("hi"), max_tokens=8)
        assert err.value.status_code == 503 and err.value.body["code"] == "draining"
    finally:
        app.close()


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits += 1
        body = (ASSETS / "example.png").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("allowed", [False, True])
def test_an_http_image_url_to_a_loopback_server_is_never_fetched(tiny_checkpoint: Path, allowed: bool) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    flags = ("--allowed-media-domains", "127.0.0.1,localhost") if allowed else ()
    app, url = start_app(tiny_checkpoint.parent, *flags)
    try:
        _Counting.hits = 0
        for host in ("127.0.0.1", "localhost"):
            image = {"type": "image_url", "image_url": {"url": f"http://{host}:{server.server_port}/cat.png"}}
            with pytest.raises(openai.BadRequestError) as err:
                _client(url).chat.completions.create(model=MODEL, messages=_ask("what?", image), max_tokens=8)
            expected = "non-public address" if allowed else "not fetched by this server"
            assert expected in err.value.body["message"]
        assert _Counting.hits == 0
    finally:
        app.close()
        server.shutdown()
