"""The whole app with the batch engine in its own process (CPU, tiny model): death, restart, SIGTERM, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gradio_client import Client

from qwen3vl_webui.conversation import ERROR_PREFIX
from tests.conftest import _free_port, start_app, wait_for

ROOT = Path(__file__).resolve().parents[1]
LONG = {"max_tokens": 1000, "temperature": 0, "ignore_eos": True}


def _long_chat(url: str, result: list[Any]) -> None:
    """A streamed /v1 chat that would run for minutes: records when its stream ended and how."""
    body = {"model": "qwen3vl-demo", "messages": [{"role": "user", "content": "tell a story"}], "stream": True, **LONG}
    try:
        with httpx.stream("POST", f"{url}v1/chat/completions", json=body, timeout=120) as reply:
            text = "".join(reply.iter_lines())
        result.append((time.monotonic(), text))
    except Exception as exc:  # the test reads it
        result.append((time.monotonic(), repr(exc)))


def _ui_chat_in_flight(ui: Client, pid: int) -> Any:
    """A /chat answer that is streaming now, with the engine process frozen (SIGSTOP) under it, so that it cannot end
    before the kill. The page has no ignore_eos, and the tiny model's sampled answer can end at an end-of-sequence token
    after a few words, even between a check that it still streams and the kill (CI saw that twice): so the engine is
    frozen first, the answers already sent are left to arrive, and only an answer still open then is taken; one that
    ended is replaced by another after the engine is let go on (SIGCONT)."""
    for _ in range(10):
        job = ui.submit({"text": "a long story please", "files": []}, max_new_tokens=1000, api_name="/chat")
        assert wait_for(lambda job=job: job.done() or len(job.outputs()) > 3, 60)
        if job.done():
            continue
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.0)  # whatever the engine sent before it froze reaches the client
        if not job.done():
            return job
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("ten /chat answers in a row ended after a few tokens")


def test_a_killed_engine_fails_chats_in_flight_within_2_s_and_comes_back(tiny_checkpoint: Path) -> None:
    app, url = start_app(tiny_checkpoint.parent, "--engine", "batch", "--max-concurrency", "2", "--max-context", "4096")
    manager = app.service.manager
    try:
        pid = manager.decoder.pid
        ui = Client(url, verbose=False)
        api: list[Any] = []
        threading.Thread(target=_long_chat, args=(url, api), daemon=True).start()
        assert wait_for(lambda: manager.decoder.process is not None and manager.decoder.process.steps > 20, 60)
        ui_job = _ui_chat_in_flight(ui, pid)
        os.kill(pid, signal.SIGKILL)  # the engine is frozen: every chat in flight is still in flight
        killed = time.monotonic()
        assert wait_for(lambda: bool(api), 10)
        ended, text = api[0]
        assert ended - killed < 2.0 and "stopped unexpectedly" in text, text[-300:]
        answer = ui_job.result(timeout=10)
        assert answer.startswith(ERROR_PREFIX) and "stopped unexpectedly" in answer, answer
        # The status line says so, and the engine comes back on its own.
        assert wait_for(lambda: "restarting" in manager.status or manager.decoder.pid not in (None, pid), 5)
        assert wait_for(lambda: manager.current() is not None and manager.decoder.pid not in (None, pid), 120)
        assert manager.engine_restarts == 1 and manager.status.startswith("Ready:")
        again = Client(url, verbose=False).predict({"text": "hello", "files": []}, max_new_tokens=16, api_name="/chat")
        assert again and not again.startswith(ERROR_PREFIX)
    finally:
        app.close()


def test_a_crash_loop_backs_off_and_says_so(tiny_checkpoint: Path, monkeypatch, caplog) -> None:
    from qwen3vl_webui.engine.remote.client import EngineStartFailed
    from qwen3vl_webui.service import manager as manager_module
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.limits import Limits

    monkeypatch.setattr(manager_module, "RESTART_FIRST_DELAY_S", 0.05)
    manager = manager_module.ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(1, 1), decoder="batch", limits=Limits(1024, 256)
    )
    manager.load()
    real_attach = manager.decoder.attach
    failures = [2]

    def flaky(loaded: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise EngineStartFailed("CUDA error: an illegal memory access was encountered")
        real_attach(loaded)

    manager.decoder.attach = flaky
    try:
        os.kill(manager.decoder.pid, signal.SIGKILL)
        assert wait_for(lambda: manager.current() is not None and manager.engine_restarts == 1, 60)
        said = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
        assert len(said) == 3, said
        assert "stopped (exit code -9); restarting it in 0.05 s…" in said[0]  # then 0.1 s, 0.2 s: backing off
        assert "could not start (CUDA error" in said[1] and "in 0.1 s (crash loop: 2 restarts in a row)" in said[1]
        assert "in 0.2 s (crash loop: 3 restarts in a row)" in said[2]
        assert manager.status.startswith("Ready:")
    finally:
        manager.close()


def test_sigterm_drains_exits_0_and_leaves_no_engine_process(tiny_checkpoint: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--demo", "--engine", "batch", "--port", str(port), "--cache-dir",
         str(tiny_checkpoint.parent), "--max-context", "2048", "--grace-seconds", "20"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        assert wait_for(lambda: _answers(url), 120), "the app did not come up"

        def engines() -> list[psutil.Process]:
            children = psutil.Process(proc.pid).children(recursive=True)
            return [p for p in children if "engine.remote.worker" in " ".join(p.cmdline())]

        assert wait_for(lambda: len(engines()) == 1, 120)
        engine = engines()[0]
        assert "--prewarm" in engine.cmdline()  # the process started at launch is the one that serves
        assert wait_for(lambda: _ready(url), 120)
        running = Client(url, verbose=False).submit({"text": "Hello there", "files": []}, max_new_tokens=64, api_name="/chat")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        answer = running.result(timeout=60)
        assert answer and not answer.startswith(ERROR_PREFIX), answer
        assert proc.wait(timeout=60) == 0
        assert wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "shut down cleanly" in output, output[-2000:]


def _ready(url: str) -> bool:
    """The model is loaded and warmed up: /v1 stops answering 503."""
    body = {"model": "qwen3vl-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        return httpx.post(url + "v1/chat/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_engine_started_early_serves_its_model_and_another_model_replaces_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The engine process starts while the front end loads the processor (`start_early`): `attach` with the same
    model waits for that process rather than starting a second; with another model it stops it and starts one."""
    from qwen3vl_webui.engine.remote.decoder import RemoteDecoder
    from qwen3vl_webui.weights import loading

    decoder = RemoteDecoder(2, 512, str(tmp_path))
    started: list[int] = []
    start = decoder.start

    def counted(*args: Any) -> Any:
        info = start(*args)
        started.append(info.pid)
        return info

    decoder.start = counted  # type: ignore[method-assign]
    source = str(tiny_checkpoint)
    try:
        decoder.start_early(source, "fp32", "cpu")
        decoder.attach(loading.load_front(source, "fp32", "cpu"))
        assert started == [decoder.pid] and decoder.info.source == source
        assert 0 < decoder.info.imported_at <= decoder.info.loaded_at <= decoder.info.serving_at  # issue 14's stages
        decoder.start_early("random-weights:tiny", "fp32", "cpu")  # not the model attach loads next
        assert not psutil.pid_exists(started[0]) or psutil.Process(started[0]).status() == psutil.STATUS_ZOMBIE
        decoder.attach(loading.load_front(source, "fp32", "cpu"))
        early, last = started[1:]
        assert decoder.pid == last != early and decoder.info.source == source
        assert wait_for(lambda: not psutil.pid_exists(early) or psutil.Process(early).status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        decoder.detach()


def test_a_prespawned_engine_process_left_unused_exits_with_its_front_end() -> None:
    """`client.prespawn` (at launch, before the model is known): a process the front end never gives a model exits
    when its stdin closes (the front end exited, however), and is killed at a clean exit (atexit)."""
    from qwen3vl_webui.engine.remote import client

    client.prespawn()
    proc = client._take_prespawned()
    assert proc is not None and client._take_prespawned() is None  # taken once
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    client.prespawn()
    waiting = client._prespawned
    assert waiting is not None and waiting.poll() is None
    client._kill_prespawned()
    assert waiting.poll() is not None and client._prespawned is None


def test_the_launch_prespawns_an_engine_process_only_where_the_model_will_load_in_one() -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import engine_process_expected

    def expected(*flags: str) -> bool:
        return engine_process_expected(parse_settings(list(flags)))

    assert expected("--engine", "batch") and expected("--engine", "batch", "--device", "cpu")
    assert not expected("--engine", "generate") and not expected("--engine", "batch-inproc")
    assert not expected("--device", "cpu")  # auto on a CPU: generate in-process
    assert not expected("--engine", "batch", "--backend-url", "http://127.0.0.1:8000")
    assert expected() == Path("/dev/nvidiactl").exists()  # auto: where an NVIDIA driver is


def test_an_early_engine_that_dies_before_attach_is_started_again_and_close_stops_one_still_starting(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """An engine process started early that dies while the front end still loads is replaced at attach (not taken
    dead, which would leave the app "Ready" with no engine); close() during an early start stops that process."""
    from qwen3vl_webui.engine.remote.decoder import RemoteDecoder
    from qwen3vl_webui.weights import loading

    source = str(tiny_checkpoint)
    deaths: list[int | None] = []
    decoder = RemoteDecoder(2, 512, str(tmp_path), on_death=deaths.append)
    try:
        decoder.start_early(source, "fp32", "cpu")
        assert decoder._early is not None
        first = decoder._early[1].result(timeout=120).pid
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: bool(deaths), 10)
        decoder.attach(loading.load_front(source, "fp32", "cpu"))
        assert decoder.process is not None and decoder.process.alive and decoder.pid != first
    finally:
        decoder.detach()
    closing = RemoteDecoder(2, 512, str(tmp_path))
    closing.start_early(source, "fp32", "cpu")
    assert closing._early is not None
    future = closing._early[1]
    closing.close()  # while it starts
    with pytest.raises(Exception, match="shutting down"):
        future.result(timeout=120)
    assert closing.process is None
    workers = [p for p in psutil.Process().children(recursive=True) if "engine.remote.worker" in " ".join(p.cmdline())]
    assert wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in workers), 30)


def test_a_prespawned_engine_process_imports_what_its_start_needs_while_it_waits() -> None:
    """`worker.prewarm` (the process started at launch, before the model is known): transformers' Qwen3-VL is
    imported before the spec comes, not on the first answer's path; inductor's compile_fx is not (the weights would
    wait for it when the spec comes first; the background compile thread imports it, after the engine serves)."""
    wanted = ("transformers.models.qwen3_vl.modeling_qwen3_vl", "torch._inductor.compile_fx")
    code = (
        "import sys; from qwen3vl_webui.engine.remote import worker; "
        f"names = {wanted!r}; before = [n in sys.modules for n in names]; worker.prewarm(); "
        "print(before, [n in sys.modules for n in names])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, False] [True, False]", out.stdout
