"""Process lifecycle: serve, wait for SIGTERM or Ctrl-C, let running chats finish within the grace period, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen3vl_webui.cli import App
    from qwen3vl_webui.engine.service import ChatService

log = logging.getLogger("qwen3vl_webui")

# After the grace period, chats still running are stopped; this is how long they get to notice.
_STOP_WAIT_S = 10.0
# How long gradio gets to deliver the last messages (final answers, refusals) before the port closes.
_FLUSH_WAIT_S = 3.0


# glibc gives every thread that allocates its own arena (up to 8 per core) and keeps each arena's
# high-water mark; gradio's worker threads and the generate threads all touch pixels, so RSS
# climbed by ~0.7 GB in a minute of image traffic before levelling off. Two arenas keep it flat
# (bench/soak.py: +78 MB instead of +660 MB) at no measurable cost to throughput.
_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = _MALLOC_ARENAS) -> bool:
    """Caps glibc's malloc arenas (call before threads start); an explicit MALLOC_ARENA_MAX wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False


def skip_absent_matplotlib() -> bool:
    """Marks matplotlib absent for good when it is not installed; True if it did.

    gradio imports matplotlib around every event it processes, each streamed update included, to switch its
    plotting backend (`gradio.utils.MatplotlibBackendMananger`). Without matplotlib every attempt searches
    sys.path again: 10.2% of the server process's py-spy samples with 32 streaming chats (CPU, `--random-weights
    tiny`), 0.1% after this. `None` in sys.modules makes the import fail at once.
    """
    import importlib.util
    import sys

    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        return False
    sys.modules["matplotlib"] = None  # type: ignore[assignment]
    return True


def serve(app: App) -> int:
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
    stopped = drain(app.service, app.demo, float(app.settings.grace_seconds))
    app.close()
    log.info("shut down cleanly%s", f" ({stopped} chat(s) stopped at the grace limit)" if stopped else "")
    return 0


def drain(service: ChatService, demo: Any, grace_s: float, poll_s: float = 0.1) -> int:
    """Refuses new chats, waits up to `grace_s` for running ones, then stops the rest; returns how many."""
    service.begin_drain()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (service.in_flight() or _gradio_busy(demo)):
        time.sleep(poll_s)
    stopped = service.stop_all("shutdown") if service.in_flight() else 0
    _wait(lambda: service.in_flight() == 0, _STOP_WAIT_S, poll_s)
    _wait(lambda: not _gradio_busy(demo), _FLUSH_WAIT_S, poll_s)
    return stopped


def _gradio_busy(demo: Any) -> bool:
    """Events waiting in or being processed by gradio's queue (its private state, read defensively)."""
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return False
    try:
        return len(queue) > 0 or any(job is not None for job in queue.active_jobs)
    except Exception:  # a gradio version with other internals: do not block shutdown on it
        return False


def _wait(done: Any, seconds: float, poll_s: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not done():
        time.sleep(poll_s)
