"""GET /health and GET /ready over raw HTTP on the real app (tiny demo model, in-process), before, during and after
loading, during a precision switch and while draining; outside the login; the start-up stages in the status line."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
from conftest import _free_port, wait_for

from qwen3vl_webui import ranges


def _gate(manager: Any) -> threading.Event:
    """Holds ModelManager._set (the decoder attaching, after the weights loaded) until the event is set."""
    gate = threading.Event()
    real = manager._set

    def held(loaded: Any) -> Any:
        assert gate.wait(60)
        return real(loaded)

    manager._set = held
    return gate


def test_health_and_ready_answer_before_during_and_after_loading(tiny_checkpoint: Path) -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.service.readiness import watch_start
    from qwen3vl_webui.wiring import build_app

    port = _free_port()
    settings = parse_settings([
        "--demo", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(tiny_checkpoint.parent),
        "--auth", "probe-user:a-long-secret", "--warmup", "quick",
    ])  # fmt: skip
    app = build_app(settings, load=False)
    url = f"http://127.0.0.1:{port}"
    app.launch(prevent_thread_lock=True, quiet=True)
    service, manager = app.service, app.service.manager
    try:
        http = httpx.Client(base_url=url, timeout=10)
        # Before anything loads: alive, not ready; the page itself asks for the login, the probes do not.
        assert http.get("/health").json() == {"status": "alive"}
        before = http.get("/ready")
        assert before.status_code == 503 and before.json()["state"] == "starting" and not before.json()["ready"]
        assert before.headers["cache-control"] == "no-store"
        assert http.get("/config").status_code == 401

        # While loading (held after the weights loaded, before the decoder serves).
        gate = _gate(manager)
        service.start_in_background(True, "quick", ranges.largest_image_pixels())
        watch_start(service)
        assert wait_for(lambda: manager.phase == "loading", 30)
        during = http.get("/ready")
        assert during.status_code == 503 and during.json()["state"] == "loading"
        assert http.get("/health").status_code == 200
        gate.set()

        # Loaded and warmed up: ready, at full speed (generate on a CPU compiles nothing).
        assert wait_for(lambda: http.get("/ready").status_code == 200, 60)
        body = http.get("/ready").json()
        assert body["ready"] and body["state"] == "serving" and body["full_speed"] and body["decode"] == "generate"
        assert body["since_launch_s"] > 0 and set(body) == {
            "ready", "state", "full_speed", "decode", "compile", "compiled_batch_sizes", "batch_sizes", "since_launch_s"
        }  # fmt: skip
        text = http.get("/ready").text
        assert str(tiny_checkpoint) not in text and "qwen" not in text.lower()
        # The start-up stages: logged and in the status line the page shows.
        assert wait_for(lambda: manager.timeline.at("ready") is not None, 10)
        status = manager.status
        assert "start-up: loaded" in status and "serving" in status and " ready " in status, status
        assert manager.timeline.at("weights loaded") <= manager.timeline.at("ready")

        # A precision switch: not ready until the new precision serves.
        gate = _gate(manager)
        switch = threading.Thread(target=service.switch_precision, args=("bf16",), daemon=True)
        switch.start()
        assert wait_for(lambda: manager.phase == "switching", 30)
        assert http.get("/ready").json()["state"] == "switching precision"
        assert http.get("/ready").status_code == 503
        gate.set()
        switch.join(60)
        assert http.get("/ready").status_code == 200 and manager.current().precision == "bf16"

        # Draining for shutdown: alive, not ready.
        service.begin_drain()
        drained = http.get("/ready")
        assert drained.status_code == 503 and drained.json()["state"] == "draining"
        assert http.get("/health").status_code == 200
    finally:
        app.close()
