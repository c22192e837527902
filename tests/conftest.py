"""Shared fixtures: the tiny real Qwen3-VL checkpoint, loaded models, the app served in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _free_port() -> int:
    # Port 0 is not a valid --port value, so ask the OS for a free one and hand it over.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _quiet_gradio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Uploads land in a per-run folder, and gradio must not phone home from a closed network.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3-VL written by the project's generator (real classes, processor, template)."""
    from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint loaded through the app's own loader in fp32 on CPU."""
    from qwen3vl_webui.weights.loading import load_model

    return load_model(str(tiny_checkpoint), "fp32", "cpu")


def start_app(cache_dir: Path, *flags: str) -> tuple[Any, str]:
    """Builds the real app (demo model), launches it without blocking and waits for the model."""
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_app

    port = _free_port()
    settings = parse_settings(
        ["--demo", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache_dir), *flags]
    )
    app = build_app(settings)
    app.launch(prevent_thread_lock=True, quiet=True)
    app.service.manager.wait_ready(120)
    app.service.warmed.wait(120)  # the start-up warm-up has run (the API answers 503 until then)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def demo_app_server(tiny_checkpoint: Path) -> Iterator[tuple[Any, str]]:
    """Yields (app, url) for the --demo app with default flags; closed afterwards."""
    app, url = start_app(tiny_checkpoint.parent)
    try:
        yield app, url
    finally:
        app.close()


def wait_for(condition: Any, seconds: float) -> bool:
    """Polls `condition` every 50 ms for up to `seconds`; its last answer."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def run_interpreted(script: str, *args: str, timeout: float = 240) -> Any:
    """Runs `script` in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it at import: the test process has
    imported Triton already) and returns what it printed as `RESULTS <json>`."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=root
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS "))
