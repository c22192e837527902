"""Process lifecycle: serve, wait for SIGTERM or Ctrl-C, let running chats finish within the grace period, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qwen3vl_webui.config import Settings
    from qwen3vl_webui.service.chat import ChatService

log = logging.getLogger("qwen3vl_webui")

# After the grace period, chats still running are stopped; this is how long they get to notice.
_STOP_WAIT_S = 10.0
# How long gradio gets to deliver the last messages (final answers, refusals) before the port closes.
_FLUSH_WAIT_S = 3.0


class Served(Protocol):
    """What `serve` runs (wiring.App): the web server with the service behind it."""

    settings: Settings
    service: ChatService

    def launch(self, prevent_thread_lock: bool = False, quiet: bool = False) -> str: ...

    @property
    def is_running(self) -> bool: ...

    def queue_busy(self) -> bool: ...

    def close(self) -> None: ...


def serve(app: Served) -> int:
    """Launches the app and blocks until SIGTERM/SIGINT; then drains and returns the exit code (0)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        del frame
        if stop.is_set():  # a second signal: the operator does not want to wait
            log.warning("%s again: exiting without waiting", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: draining (grace %d s)", signal.Signals(signum).name, app.settings.grace_seconds)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    app.launch(prevent_thread_lock=True)
    # Event.wait returns early when a signal handler sets it; the timeout keeps an eye on the server.
    while not stop.wait(0.5):
        if not app.is_running:  # closed some other way
            return 0
    stopped = drain(app.service, app.queue_busy, float(app.settings.grace_seconds))
    app.close()
    log.info("shut down cleanly%s", f" ({stopped} chat(s) stopped at the grace limit)" if stopped else "")
    return 0


def drain(service: ChatService, busy: Callable[[], bool], grace_s: float, poll_s: float = 0.1) -> int:
    """Refuses new chats, waits up to `grace_s` for running ones, then stops the rest; returns how many.

    `busy`: whether the web front end still has events waiting or running (gradio's queue), whose last messages
    (final answers, refusals) are worth delivering before the port closes.
    """
    service.begin_drain()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (service.in_flight() or busy()):
        time.sleep(poll_s)
    stopped = service.stop_all("shutdown") if service.in_flight() else 0
    _wait(lambda: service.in_flight() == 0, _STOP_WAIT_S, poll_s)
    _wait(lambda: not busy(), _FLUSH_WAIT_S, poll_s)
    return stopped


def _wait(done: Any, seconds: float, poll_s: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not done():
        time.sleep(poll_s)
