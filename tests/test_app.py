"""The real gradio app in-process, driven through gradio_client: /chat, history, refusals, queue, panel."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from qwen3vl_webui.conversation import ERROR_PREFIX, WAIT_PREFIX
from tests.conftest import ASSETS, start_app


def _client(url: str) -> Client:
    return Client(url, verbose=False)  # one client = one conversation


def test_chat_api_answers_text_and_image_and_keeps_history(demo_app_server) -> None:
    app, url = demo_app_server
    client = _client(url)
    first = client.predict(
        {"text": "Describe this image.", "files": [handle_file(str(ASSETS / "example.png"))]}, api_name="/chat"
    )
    assert isinstance(first, str) and first and not first.startswith(ERROR_PREFIX)
    assert app.service.stats.last.prompt_image_tokens > 0
    tokens_first = app.service.stats.last.prompt_tokens
    second = client.predict({"text": "And the colours?", "files": []}, api_name="/chat")
    assert second and not second.startswith(ERROR_PREFIX)
    # The second prompt carries the first turn (image included), so it is longer.
    assert app.service.stats.last.prompt_tokens > tokens_first
    assert app.service.stats.last.prompt_image_tokens > 0


def test_video_turn_through_the_api(demo_app_server) -> None:
    app, url = demo_app_server
    answer = _client(url).predict(
        {"text": "What happens?", "files": [handle_file(str(ASSETS / "example.mp4"))]}, api_name="/chat"
    )
    assert answer and not answer.startswith(ERROR_PREFIX)
    assert app.service.stats.last.prompt_video_tokens > 0


def test_bad_inputs_get_a_clear_message_and_history_and_server_survive(demo_app_server, tmp_path: Path) -> None:
    _, url = demo_app_server
    client = _client(url)
    assert client.predict({"text": "Hello", "files": []}, api_name="/chat")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all\n" * 20)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes((ASSETS / "example.mp4").read_bytes()[:2000])
    cases = {
        "fake.png": {"text": "what?", "files": [handle_file(str(fake))]},
        "cut.mp4": {"text": "what?", "files": [handle_file(str(cut))]},
        "empty": {"text": "", "files": []},
        "prompt tokens": {"text": "word " * 20000, "files": []},
    }
    for fragment, message in cases.items():
        reply = client.predict(message, api_name="/chat")
        assert reply.startswith(ERROR_PREFIX) and fragment in reply, (fragment, reply)
    with pytest.raises(AppError):  # out-of-range slider value: gradio's own range check refuses it
        client.predict({"text": "hi", "files": []}, temperature=9.0, api_name="/chat")
    follow_up = client.predict({"text": "Still there?", "files": []}, api_name="/chat")
    assert follow_up and not follow_up.startswith(ERROR_PREFIX)


def test_panel_without_a_gpu_shows_cpu_and_ram(demo_app_server) -> None:
    app, _ = demo_app_server
    from qwen3vl_webui.ui.handlers import Handlers

    text, status = Handlers(app.service, app.settings).panel()
    assert "no NVIDIA GPU found" in text and "NVMLError" not in text and "CPU · RAM" in text and "process RSS" in text
    assert "FP32 (CPU) on cpu" in text and "Ready:" in status and "demo model: random weights" in status


def test_one_concurrency_group_covers_every_gpu_event(demo_app_server) -> None:
    app, _ = demo_app_server
    gpu = [fn for fn in app.demo.fns.values() if fn.concurrency_id == "gpu"]
    names = {fn.name for fn in gpu}
    assert {"chat", "_submit_fn", "switch"} <= names
    # gradio starts every chat the admission may run or keep waiting (and a burst more, to refuse at once);
    # the service admits max_concurrency + queue_size and the scheduler runs max_concurrency of them.
    limit = app.settings.max_concurrency + app.settings.queue_size + 16
    assert all(fn.concurrency_limit == limit for fn in gpu)
    assert app.demo.max_threads >= limit


def test_stop_from_the_client_frees_the_slot(demo_app_server) -> None:
    app, url = demo_app_server
    client = _client(url)
    app.service.manager.current().model.generation_config.eos_token_id = None
    job = client.submit({"text": "Tell a very long story.", "files": []}, max_new_tokens=1000, api_name="/chat")
    deadline = time.monotonic() + 30
    while app.service.scheduler.state().running == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.service.scheduler.state().running == 1
    job.cancel()
    deadline = time.monotonic() + 10
    while app.service.scheduler.state().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.service.scheduler.state().running == 0
    assert app.service.stats.last.new_tokens < 1000


def test_switch_precision_through_the_api(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent)
    try:
        client = _client(url)
        report = client.predict("int8", api_name="/switch_precision")
        assert "Switched fp32 → int8" in report and app.service.manager.current().precision == "int8"
        assert client.predict({"text": "hi", "files": []}, api_name="/chat")
    finally:
        app.close()


def test_overload_is_refused_at_once_and_accepted_requests_complete(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--max-concurrency", "1", "--queue-size", "2")
    try:
        app.service.manager.current().model.generation_config.eos_token_id = None

        def one(i: int) -> str:
            return _client(url).predict({"text": f"story {i}", "files": []}, max_new_tokens=200, api_name="/chat")

        refused, answers = 0, []
        with cf.ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(one, i) for i in range(8)]:
                try:
                    answer = future.result(timeout=120)
                except Exception as exc:  # gradio_client raises QueueError / AppError if gradio's queue is full
                    assert "Queue is full" in str(exc), exc
                    refused += 1
                    continue
                if answer.startswith(ERROR_PREFIX + "busy"):  # the service's one admission refused it at once
                    refused += 1
                else:
                    answers.append(answer)
        assert refused >= 1 and len(answers) >= 1 and refused + len(answers) == 8
        assert all(a and not a.startswith(ERROR_PREFIX) for a in answers)
        assert app.service.scheduler.state().peak_running == 1
    finally:
        app.close()


def test_panel_counts_requests_waiting_in_the_queue(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--max-concurrency", "1", "--queue-size", "4")
    try:
        app.service.manager.current().model.generation_config.eos_token_id = None
        panel = next(fn.fn for fn in app.demo.fns.values() if fn.name == "panel")
        jobs = [
            _client(url).submit({"text": f"long {i}", "files": []}, max_new_tokens=1000, api_name="/chat")
            for i in range(3)
        ]
        deadline, seen = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "1 running / 1 slot · 2 waiting" not in seen:
            seen = panel()[0]
            time.sleep(0.1)
        assert "1 running / 1 slot · 2 waiting" in seen
        for job in jobs:
            job.cancel()
    finally:
        app.close()


def test_stop_strings_through_the_api(demo_app_server) -> None:
    _, url = demo_app_server
    ask = {"text": "Count the objects", "files": []}
    full = _client(url).predict(ask, temperature=0.0, max_new_tokens=48, api_name="/chat")
    at = next(
        i for i in range(6, len(full) - 3)
        if full[i : i + 3].isascii() and "\\" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
    )  # fmt: skip
    stop = full[at : at + 3]
    cut = _client(url).predict(ask, temperature=0.0, max_new_tokens=48, stop_strings=f"never\n{stop}", api_name="/chat")
    assert cut == full[:at]
    many = "\n".join(f"s{i}" for i in range(9))
    refused = _client(url).predict(ask, stop_strings=many, api_name="/chat")
    assert refused.startswith(ERROR_PREFIX) and "At most 8 stop strings" in refused


def test_streamed_updates_are_coalesced_and_the_last_text_is_whole(demo_app_server, monkeypatch) -> None:
    import time

    from qwen3vl_webui.ui import handlers as handlers_module
    from qwen3vl_webui.ui.handlers import Handlers

    app, _url = demo_app_server
    handlers = Handlers(app.service, app.settings)

    def run() -> list[tuple[float, str]]:
        kwargs = dict(temperature=0.0, repetition_penalty=1.0, max_new_tokens=96)
        return [
            (time.monotonic(), t) for t in handlers.chat({"text": "Describe a red ball", "files": []}, [], **kwargs)
        ]

    monkeypatch.setattr(handlers_module, "STREAM_INTERVAL_S", 0.0)
    every = run()  # one update per token
    monkeypatch.setattr(handlers_module, "STREAM_INTERVAL_S", 0.05)
    coalesced = run()
    assert len(every) >= 8, "the demo answer should stream many tokens"
    assert coalesced[-1][1] == every[-1][1]  # same greedy answer, delivered whole
    assert len(coalesced) < len(every)
    gaps = [b - a for (a, _), (b, _) in zip(coalesced[:-1], coalesced[1:-1])]
    assert all(g >= 0.045 for g in gaps), gaps  # all but the final update at least the interval apart
    texts = [t for _, t in coalesced]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each update extends the previous one


def test_many_streaming_answers_update_less_often_each(demo_app_server, monkeypatch) -> None:
    """QWEN3VL_STREAM_UPDATES_PER_S=250: past 12 answers streaming at once, each one's updates space out (all of them
    together about 250 a second); the count covers answers streaming, ended or abandoned."""
    from qwen3vl_webui.ui import handlers as handlers_module
    from qwen3vl_webui.ui.handlers import Handlers

    app, _url = demo_app_server
    handlers = Handlers(app.service, app.settings)
    handlers._streaming = 32
    assert handlers.stream_interval() == 0.05  # the default: QWEN3VL_STREAM_UPDATES_PER_S unset, fixed
    monkeypatch.setattr(handlers_module, "STREAM_UPDATES_PER_S", 250.0)  # QWEN3VL_STREAM_UPDATES_PER_S=250
    assert handlers.stream_interval() == pytest.approx(0.128)
    handlers._streaming = 12
    assert handlers.stream_interval() == 0.05
    handlers._streaming = 0
    seen = []
    answer = handlers.chat({"text": "Describe a red ball", "files": []}, [], max_new_tokens=32)
    for _text in answer:
        seen.append(handlers._streaming)
    assert seen and seen[-1] == 1 and handlers._streaming == 0
    abandoned = handlers.chat({"text": "Describe a red ball", "files": []}, [], max_new_tokens=64)
    assert next(t for t in abandoned if not t.startswith(WAIT_PREFIX))  # its first text (not a waiting line)
    assert handlers._streaming == 1
    abandoned.close()  # the client went away
    assert handlers._streaming == 0


def test_gradio_stops_searching_for_an_absent_matplotlib_on_every_event() -> None:
    import subprocess
    import sys

    script = """
import importlib.machinery, importlib.util, sys
if importlib.util.find_spec("matplotlib") is not None:
    print("installed"); raise SystemExit
from gradio.utils import MatplotlibBackendMananger
from qwen3vl_webui.ui.gradio_compat import skip_absent_matplotlib
searches = []
real = importlib.machinery.PathFinder.find_spec
importlib.machinery.PathFinder.find_spec = classmethod(lambda cls, name, *a, **k: searches.append(name) or real(name, *a, **k))
def event():
    with MatplotlibBackendMananger():  # what gradio does around every event, each streamed update included
        pass
event()
before = searches.count("matplotlib")
assert skip_absent_matplotlib()
searches.clear()
event()
print(before, searches.count("matplotlib"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ASSETS.parent)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "installed":
        pytest.skip("matplotlib is installed here: gradio's import succeeds and nothing is searched")
    before, after = map(int, out.stdout.split())
    assert before >= 2 and after == 0  # two sys.path searches per event before, none after
