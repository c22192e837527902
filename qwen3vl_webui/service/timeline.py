"""Start-up stages with their times since launch: logged at INFO as they happen, shown in the live panel."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("qwen3vl_webui")

# Stage names, in the order a start goes through them (a stage may be skipped: generate compiles nothing).
IMPORTED = "engine process imported"  # torch and the model's code, in the engine process (started at launch)
LOCATED = "checkpoint located"  # downloaded, or found in the Hugging Face cache or a local folder
LOADED = "weights loaded"
SERVING = "first-serving path ready"  # the decoder can answer (the batch engine: eager decode in CUDA graphs)
READY = "ready"  # warm-up done: chats are admitted (GET /ready answers 200)
FULL_SPEED = "fully compiled"  # every batch size decodes from its compiled graph


def process_start_time() -> float:
    """When this process started (wall clock): 'launch' as a user sees it, interpreter start-up included."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil or no /proc: from now on
        return time.time()


@dataclass(frozen=True)
class Stage:
    name: str
    at_s: float  # seconds since launch


class StartTimeline:
    """Stages of one start (a precision switch or an engine restart begins a new one), thread-safe.

    Stamps are wall-clock times so that the engine process's own stamps (sent as wall times) line up with ours.
    """

    def __init__(self, launched_at: float | None = None) -> None:
        self.launched_at = process_start_time() if launched_at is None else launched_at
        self._stages: list[Stage] = []
        self._lock = threading.Lock()

    def restart(self, why: str) -> None:
        """A new start (switch, restart): its stages count from now."""
        with self._lock:
            self.launched_at = time.time()
            self._stages = []
        log.info("start-up: %s; stage times from now", why)

    def mark(self, name: str, at: float | None = None, detail: str = "") -> Stage | None:
        """Records `name` at wall time `at` (now by default) once, and logs it; None if it was already recorded."""
        with self._lock:
            if any(stage.name == name for stage in self._stages):
                return None
            stage = Stage(name, round(max(0.0, (time.time() if at is None else at) - self.launched_at), 2))
            self._stages.append(stage)
            self._stages.sort(key=lambda s: s.at_s)
        log.info("start-up: %s at +%.1f s since launch%s", name, stage.at_s, f" ({detail})" if detail else "")
        return stage

    def stages(self) -> tuple[Stage, ...]:
        with self._lock:
            return tuple(self._stages)

    def at(self, name: str) -> float | None:
        return next((s.at_s for s in self.stages() if s.name == name), None)

    def describe(self) -> str:
        """One line for the panel: each stage and its time since launch."""
        return " · ".join(f"{_short(s.name)} {s.at_s:.1f} s" for s in self.stages()) or "—"


def _short(name: str) -> str:
    short = {IMPORTED: "imported", LOCATED: "located", LOADED: "loaded", SERVING: "serving", READY: "ready",
             FULL_SPEED: "full speed"}  # fmt: skip
    return short.get(name, name)


def decode_progress(snap: object) -> str:
    """How the batch engine decodes now and how far its background compile is, in words ('' without an engine)."""
    if snap is None or not getattr(snap, "decode_mode", ""):
        return ""
    mode = {"compiled graphs": "compiled CUDA graphs", "graphs": "eager CUDA graphs"}.get(snap.decode_mode, snap.decode_mode)
    state = getattr(snap, "compile_state", "none")
    done, total = getattr(snap, "compile_done", 0), getattr(snap, "compile_total", 0)
    if state in ("waiting", "compiling"):
        return f"decode: {mode}; compiling decode graphs: {done} of {total} batch sizes"
    if state == "done":
        return f"decode: {mode} (full speed)"
    if state == "failed":
        return f"decode: {mode} (compile failed; see the log)"
    if getattr(snap, "layers_path", "") == "fused kernels":  # every layer: faster than the compiled step
        return f"decode: {mode}, fused layers (full speed, nothing to compile)"
    return f"decode: {mode}"


def compile_stage(bucket: int) -> str:
    return f"batch size {bucket} compiled"
