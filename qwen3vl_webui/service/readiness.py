"""Readiness for orchestrators (GET /ready) and the start-up stages that come after the decoder serves.

Plain data only: which phase the app is in, whether chats are admitted, and whether decode runs at its full compiled
speed. Nothing in it names a file, a model path or an error text, since probes ask without credentials.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from qwen3vl_webui.service.timeline import FULL_SPEED, READY, compile_stage

# How often the start watcher looks at the service (it stamps "ready", each compiled bucket and "fully compiled").
WATCH_S = 0.2


@dataclass(frozen=True)
class Readiness:
    """What GET /ready answers: `ready` (HTTP 200) only while chats are admitted and the model serves."""

    ready: bool
    # starting, loading, warming up, serving, switching precision, resizing, restarting engine, draining, failed,
    # refusing chats (the warm-up found that nothing fits), backend unreachable (--backend-url), closing
    state: str
    full_speed: bool  # decode runs from its compiled graphs (or there is nothing to compile)
    decode: str  # "compiled graphs", "graphs", "compiled", "eager", "generate", "backend" or "" before it serves
    compile: str  # the decode step's compile: none, waiting, compiling, done, failed
    compiled_batch_sizes: int
    batch_sizes: int  # to compile (0: nothing to compile)
    since_launch_s: float

    def body(self) -> dict[str, Any]:
        return asdict(self)


_PHASES = {
    "starting": "starting",
    "loading": "loading",
    "switching": "switching precision",
    "resizing": "resizing",
    "restarting": "restarting engine",
    "failed": "failed",
    "closing": "closing",
}


def readiness(service: Any) -> Readiness:
    """The service's readiness now (ChatService; read-only, cheap: the engine's last report, no GPU call)."""
    manager = service.manager
    decoder = manager.decoder
    snap = decoder.snapshot() if decoder is not None else None
    loaded = manager.current()
    if service.draining:
        state = "draining"
    elif manager.phase != "serving" or loaded is None:
        state = _PHASES.get(manager.phase, manager.phase)
    elif not service.warmed.is_set():
        state = "warming up"
    elif manager.backend is not None and manager.backend.problem:  # a front end whose backend cannot serve now
        state = manager.backend.ready_state  # unreachable, refused this app's key, not ready, failing
    elif getattr(service, "_fatal", None):  # the warm-up found that even the smallest context does not fit
        state = "refusing chats"
    else:
        state = "serving"
    if snap is not None:
        decode, compile_state = snap.decode_mode, snap.compile_state
        done, total, full = snap.compile_done, snap.compile_total, snap.full_speed
    elif decoder is not None and decoder.name in ("generate", "backend") and loaded is not None:
        decode, compile_state, done, total, full = decoder.name, "none", 0, 0, True
    else:  # nothing serves yet, or the engine process has not reported yet (it does every half second)
        decode, compile_state, done, total, full = "", "none", 0, 0, False
    since = round(time.time() - manager.timeline.launched_at, 2)
    return Readiness(state == "serving", state, full, decode, compile_state, done, total, since)


def watch_start(service: Any, period_s: float = WATCH_S) -> threading.Thread:
    """Stamps the stages after the decoder serves: ready (chats admitted), each compiled bucket (at the engine's own
    time) and fully compiled. A daemon thread that ends when the manager closes."""

    def watch() -> None:
        manager = service.manager
        while manager.phase != "closing":
            state = readiness(service)
            timeline = manager.timeline
            if state.ready:
                timeline.mark(READY)
                snap = manager.decoder.snapshot() if manager.decoder is not None else None
                for bucket, at in getattr(snap, "compiled_at", ()):
                    timeline.mark(compile_stage(bucket), at=at)
                if state.full_speed and state.batch_sizes:
                    last = max((at for _, at in getattr(snap, "compiled_at", ())), default=None)
                    timeline.mark(FULL_SPEED, at=last)
            time.sleep(period_s)

    thread = threading.Thread(target=watch, name="start-watch", daemon=True)
    thread.start()
    return thread
