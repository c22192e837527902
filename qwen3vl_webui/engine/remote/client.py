"""The front end's side of the engine process: start it, send it prompts, stream its tokens as text, restart it.

The engine core (scheduler, model runner, CUDA graphs, KV cache, sampling) runs in its own process: before, gradio,
the handlers, prompt building, detokenizing and the engine's loop shared one GIL, and the whole app made 17% of the
engine's tokens at 32 chats on an H200 (bench/RESULTS.md). Here the engine sends one message per step for all its
requests; this side routes each request's tokens to its reader, which detokenizes, cuts stop strings and streams.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3vl_webui.engine.batch.requests import RequestStreams, TokenStream, coalesced, text_events, token_events
from qwen3vl_webui.engine.remote.protocol import Channel, EngineDied, EngineInfo, EngineStats, to_wire
from qwen3vl_webui.telemetry import RequestStats

log = logging.getLogger(__name__)

# How often the reader wakes up without news, to pass on cancels (Stop, a closed tab, a timeout) and notice a
# dead process: a stop reaches the engine within this plus one step.
POLL_S = 0.02
# A reader takes the tokens that arrived at most this often (see `submit`): the chat page streams every 50 ms.
COALESCE_S = 0.05
# How long a stopping engine gets to exit after "shutdown" before it is killed.
STOP_WAIT_S = 30.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])


_prespawned: subprocess.Popen | None = None
_prespawn_lock = threading.Lock()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _spawn_worker(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen3vl_webui.engine.remote.worker", *flags], stdin=subprocess.PIPE, env=_worker_env()
    )


def prespawn() -> None:
    """Starts the first engine process at launch, before the front end imports gradio: it imports torch and the
    model's code (~12 s on the H200 device, 8 s on a CPU VM) beside the front end's own start, then waits on its
    stdin for the model the first `EngineProcess.start` gives it. Unused, it is killed at exit; if this process
    dies, its stdin closes and it exits."""
    global _prespawned
    import atexit

    with _prespawn_lock:
        if _prespawned is None:
            _prespawned = _spawn_worker("--prewarm")
            atexit.register(_kill_prespawned)


def _take_prespawned() -> subprocess.Popen | None:
    global _prespawned
    with _prespawn_lock:
        proc, _prespawned = _prespawned, None
    if proc is not None and proc.poll() is not None:
        return None
    return proc


def _kill_prespawned() -> None:
    proc = _take_prespawned()
    if proc is not None:
        proc.kill()
        proc.wait()


class EngineStartFailed(RuntimeError):
    """The engine process could not load the model or start the engine; str() says why."""


@dataclass
class _Tracker:
    """What this side saw of one request: for the stats of a request stopped before its end."""

    prompt: Any  # the PreparedPrompt sent
    submitted: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def see(self, new: int) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.tokens += new

    def stats(self) -> RequestStats:
        first = self.first or time.perf_counter()
        return RequestStats(
            prompt_text_tokens=self.prompt.text_tokens,
            prompt_image_tokens=self.prompt.image_tokens,
            prompt_video_tokens=self.prompt.video_tokens,
            new_tokens=self.tokens,
            ttft_s=first - self.submitted,
            decode_s=(self.last or first) - first,
        )


class EngineProcess:
    """One engine process and the socket to it. `start` blocks until it serves; a reader thread then routes its
    messages. `on_death(exit_code)` is called (from a thread of its own) if it exits without being asked to."""

    _ids = itertools.count(1)

    def __init__(
        self,
        spec: dict[str, Any],
        on_progress: Callable[[str], None] = lambda text: None,
        on_death: Callable[[int | None], None] = lambda code: None,
    ) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.on_death = on_death
        self.info: EngineInfo | None = None
        self.stats: EngineStats | None = None
        self.steps = 0
        self._streams = RequestStreams()
        self._inflight: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dead = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EngineInfo:
        from multiprocessing.connection import Listener

        folder = tempfile.mkdtemp(prefix="qwen3vl-engine-")  # 0700: only this user can connect
        address = os.path.join(folder, "socket")
        authkey = secrets.token_bytes(32)
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        try:
            self._proc = _take_prespawned() or _spawn_worker()
            assert self._proc.stdin is not None
            # the environment as of now: a prespawned process started with the launch's
            spec = {**self.spec, "address": address, "authkey": authkey, "env": _worker_env()}
            try:
                self._proc.stdin.write(pickle.dumps(spec))
            except OSError:  # it died before reading its spec (a prespawned one, killed meanwhile)
                self._proc.kill()
                code = self._proc.wait()
                raise EngineStartFailed(f"the engine process exited before it started (exit code {code})") from None
            self._proc.stdin.close()
            self._channel = Channel(self._accept(listener))
        finally:
            listener.close()
            shutil.rmtree(folder, ignore_errors=True)
        while True:
            try:
                message = self._channel.recv()
            except (EOFError, OSError):
                code = self._proc.wait()
                raise EngineStartFailed(f"the engine process exited while starting (exit code {code})") from None
            if message[0] == "progress":
                self.on_progress(message[1])
            elif message[0] == "failed":
                self._proc.wait(STOP_WAIT_S)
                raise EngineStartFailed(message[1])
            elif message[0] == "ready":
                self.info = message[1]
                break
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()
        return self.info

    def _accept(self, listener: Any) -> Any:
        accepted: list[Any] = []
        failure: list[BaseException] = []

        def accept() -> None:
            try:
                accepted.append(listener.accept())
            except BaseException as exc:  # closed below, or a wrong key
                failure.append(exc)

        thread = threading.Thread(target=accept, name="engine-accept", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if self._proc is not None and self._proc.poll() is not None and thread.is_alive():
                listener.close()
                raise EngineStartFailed(f"the engine process exited while starting (exit code {self._proc.returncode})")
        if not accepted:
            raise EngineStartFailed(f"the engine process did not connect ({failure[0] if failure else 'unknown'})")
        return accepted[0]

    @property
    def alive(self) -> bool:
        return not self._dead.is_set() and self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """Asks the engine to exit (its requests end with EngineDied here), waits, kills it if it does not."""
        self._stopping.set()
        if self._channel is not None:
            try:
                self._channel.send(("shutdown",))
            except (OSError, EOFError):
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the engine process did not exit in %.0f s: killing it", timeout)
                self._proc.kill()
                self._proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        self._fail_all("The engine was stopped (a precision switch or shutdown).")

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: Any,
        sampling: Any,
        tokenizer: Any,
        cancel: threading.Event,
        on_cancel: Callable[[RequestStats], None] | None = None,
    ) -> Iterator[tuple[str, RequestStats | None]]:
        """Like BatchEngine.submit: (text so far, None) as tokens arrive, then (full text, stats)."""
        if not self.alive or self._channel is None:
            raise EngineDied("The engine process is not running; it is being restarted. Please try again.")
        rid = next(self._ids)
        sent = to_wire(prompt)
        tracker = _Tracker(prompt)
        mailbox = self._streams.open(rid)
        with self._lock:
            self._inflight[rid] = cancel
        try:
            self._channel.send(("add", rid, sent, sampling))
        except (OSError, EOFError) as exc:
            self._forget(rid)
            raise EngineDied("The engine process is not running; it is being restarted. Please try again.") from exc

        def events() -> Iterator[tuple[list[int], RequestStats | None]]:
            # The readers (the chat page, the API) send text at most every COALESCE_S: waking for every step's token
            # would cost 32 threads x ~170 wake-ups a second at 32 chats, all on the front end's one core. Tokens
            # wait in the mailbox meanwhile; the first one is never held back, nor the end (the client's next
            # request waits for it: 25 ms on average, ~1.5% of a 32-chat closed loop's throughput).
            tokens = token_events(mailbox, lambda: not self._dead.is_set(), POLL_S * 10)
            for new, stats in coalesced(tokens, mailbox.ended, COALESCE_S):
                tracker.see(len(new))
                yield new, stats

        texts = text_events(events(), tokenizer, sampling.stop, cancel, tracker.stats, on_cancel)
        return TokenStream(texts, cancel)

    def send(self, message: tuple[Any, ...]) -> None:
        if self._channel is not None and self.alive:
            self._channel.send(message)

    def _forget(self, rid: int) -> None:
        self._streams.discard(rid)
        with self._lock:
            self._inflight.pop(rid, None)

    # ------------------------------------------------------------------ the reader thread

    def _read(self) -> None:
        channel, proc = self._channel, self._proc
        assert channel is not None and proc is not None
        while not self._dead.is_set():
            try:
                if channel.poll(POLL_S):
                    self._handle(channel.recv())
            except (EOFError, OSError):
                break
            self._pass_on_cancels(channel)
            if proc.poll() is not None:
                break
        code = proc.wait()
        if not self._stopping.is_set():
            # the streams in flight get the reason before they can see the process dead: one that woke in between
            # ended with "The generation engine stopped." instead (a server error at the API; CI saw it under load)
            self._fail_all("The engine stopped unexpectedly while answering; it is being restarted. Please send your "
                           "message again.")  # fmt: skip
        self._dead.set()
        if self._stopping.is_set():
            return
        log.error("the engine process stopped unexpectedly (exit code %s)", code)
        threading.Thread(target=self.on_death, args=(code,), name="engine-restart", daemon=True).start()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "out":
            outputs = message[1]
            self.steps = outputs.steps
            ended = [o.request_id for o in outputs.outputs if o.finished is not None or o.error is not None]
            self._streams.deliver(outputs)
            if ended:
                with self._lock:
                    for rid in ended:
                        self._inflight.pop(rid, None)
        elif kind == "stats":
            self.stats = message[1]
        elif kind == "progress":
            self.on_progress(message[1])

    def _pass_on_cancels(self, channel: Channel) -> None:
        with self._lock:
            cancelled = tuple(rid for rid, event in self._inflight.items() if event.is_set())
            for rid in cancelled:
                del self._inflight[rid]
        if cancelled:
            channel.send(("abort", cancelled))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._inflight.clear()
        self._streams.fail_all(EngineDied(message))
