"""Session 14: where one gradio_client request's time goes before its first output (1 chat, the tiny app on
127.0.0.1:7891, gradio_client's polls cut to 5 ms as bench.load_test does): times since the submit of the join POST,
of each httpx.Client built (gradio_client builds a new one, with a new TLS context, for the join, the event stream
and the heartbeat of every request) and of each SSE message.

    python3 bench/results/cpu/s14_gradio_client_trace.py [URL]
"""

import sys
import time
from pathlib import Path

import gradio_client.client as gc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.load_test import GradioDoor, shorten_client_polling  # noqa: E402

marks: dict = {}
_post, _client_init, _loads = httpx.post, httpx.Client.__init__, gc.json.loads


def post(*args, **kwargs):
    marks.setdefault("join_post_start", time.monotonic())
    reply = _post(*args, **kwargs)
    marks.setdefault("join_post_end", time.monotonic())
    return reply


def client_init(self, *args, **kwargs):
    started = time.monotonic()
    _client_init(self, *args, **kwargs)
    marks.setdefault("httpx_client_builds_s", []).append(round(time.monotonic() - started, 4))


def loads(text, *args, **kwargs):
    value = _loads(text, *args, **kwargs)
    if isinstance(value, dict) and value.get("msg"):
        marks.setdefault("messages", []).append((value["msg"], round(time.monotonic() - marks["t0"], 4)))
    return value


gc.httpx.post, httpx.Client.__init__, gc.json.loads = post, client_init, loads
shorten_client_polling(5)
chat = GradioDoor(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7891/", 0.005).connect()
for i in range(6):
    chat.new_conversation()
    marks.clear()
    marks["t0"] = t0 = time.monotonic()
    first = None
    for _ in chat.stream(f"hello {i} " * 20, None, 64, 0.7, 60):
        first = first or time.monotonic() - t0
    shown = {k: (round(v - t0, 4) if isinstance(v, float) else v) for k, v in marks.items() if k != "t0"}
    print(f"first output at {first:.4f} s;", shown)
