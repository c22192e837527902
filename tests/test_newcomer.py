"""What a newcomer tripped over (issue 15, item 7), each tried as they tried it: the precision menu, the API page, the
console after a bad API value and after a failed download, the switch report on a CPU."""

from __future__ import annotations

import logging
from typing import Any

import pytest


def test_an_out_of_range_api_value_is_refused_without_a_console_traceback(demo_app_server: Any, capfd: Any) -> None:
    from gradio_client import Client

    _, url = demo_app_server
    client = Client(url, verbose=False)
    capfd.readouterr()
    with pytest.raises(Exception, match="greater than maximum value 2.0"):
        client.predict({"text": "hi", "files": []}, temperature=99.0, api_name="/chat")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "raise_if_out_of_bounds" not in out + err


def test_the_api_page_names_every_output(demo_app_server: Any) -> None:
    from gradio_client import Client

    _, url = demo_app_server
    api = Client(url, verbose=False).view_api(return_format="str", print_info=False)
    assert "/switch_precision" in api and "/release_memory" in api
    assert "value_" not in api, [line for line in api.splitlines() if "value_" in line]


def test_the_precision_menu_shows_the_loaded_precision(demo_app_server: Any) -> None:
    from qwen3vl_webui.ui.handlers import Handlers

    app, _ = demo_app_server
    update = Handlers(app.service, app.settings).loaded_precision()
    assert update["value"] == "fp32" == app.service.manager.current().precision  # not the old default, int4
    labels = dict((name, label) for label, name in update["choices"])
    assert labels["fp32"] == "FP32 (CPU) (loaded)"
    assert all("(loaded)" not in label for name, label in labels.items() if name != "fp32")


def test_a_switch_on_a_cpu_reports_no_gpu_memory() -> None:
    from qwen3vl_webui.service.manager import SwitchReport

    assert SwitchReport("fp32", "bf16", 0, 0, 1.25).describe() == "Switched fp32 → bf16 in 1.2 s."
    gpu = SwitchReport("bf16", "int4", 9 * 1024**3, 4 * 1024**3, 20.0).describe()
    assert "GPU memory in use 9.00 GiB → 4.00 GiB" in gpu


def test_a_failed_download_is_one_sentence_in_the_console(tmp_path: Any, caplog: Any, monkeypatch: Any) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qwen3vl_webui.weights import loading
    from qwen3vl_webui.weights.loading import ModelUnavailable, locate_checkpoint

    def offline(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelUnavailable):
        locate_checkpoint("nobody/no-such-model")
    shown = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(loading.__name__)]
    assert not shown, [r.getMessage() for r in shown]  # the detail stays at DEBUG; the manager logs the sentence


def test_a_video_turn_prints_no_frame_cap_notice(tiny_loaded: Any) -> None:
    from pathlib import Path

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.service.prompt import ChatRequest, MediaCache, TurnCounts, build_prompt

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    keep = Keep()
    root = logging.getLogger("transformers")  # it does not propagate to the root logger: listen on it directly
    root.addHandler(keep)
    logging.Logger.warning_once.cache_clear()  # transformers says it once a process: an earlier test may have
    try:
        video = Path(__file__).resolve().parents[1] / "assets" / "example.mp4"
        prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("What happens?", (str(video),))), MediaCache(),
                              TurnCounts(), None)  # fmt: skip
    finally:
        root.removeHandler(keep)
    assert prompt.tokens > 0
    assert not [m for m in keep.messages if "cap_pixels_per_frame" in m], keep.messages


def test_closing_stops_new_connections_before_the_queue(tiny_checkpoint: Any, monkeypatch: Any) -> None:
    """A chat arriving as the server closes after a drain must not meet a stopped gradio queue (HTTP 503, shown as
    "Queue is full"): by the time the queue stops, the port takes no new connection."""
    import socket

    from qwen3vl_webui.ui import gradio_compat
    from tests.conftest import start_app

    app, url = start_app(tiny_checkpoint.parent)
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    seen: list[str] = []
    original = gradio_compat.close_blocks

    def recording(demo: Any) -> None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            seen.append("accepted")
        except OSError:
            seen.append("refused")
        original(demo)

    monkeypatch.setattr(gradio_compat, "close_blocks", recording)
    app.service.begin_drain()
    app.close()
    assert seen == ["refused"]
