"""BackendDecoder: the Decoder whose model runs on an OpenAI-compatible server (--backend-url), watched every second."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qwen3vl_webui.engine.backend.client import (
    SERVER,
    BackendClient,
    BackendError,
    BackendKeyRefused,
    BackendTooLarge,
    BackendUnavailable,
    Chunk,
)
from qwen3vl_webui.engine.backend.metrics import BackendLoad, LoadTracker, parse_metrics
from qwen3vl_webui.engine.faults import FaultInjector
from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
from qwen3vl_webui.telemetry import RequestStats
from qwen3vl_webui.weights.model import LoadedModel

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # the panel's figures and /ready follow the backend this closely
CHARS_PER_TOKEN = 3  # the backend's tokenizer is not here: documents are measured at this many characters a token


@dataclass(frozen=True)
class BackendStatus:
    """What the panel and /ready show of the backend (plain data)."""

    url: str  # the operator's (the log); the panel and the status line say SERVER
    model: str | None
    reachable: bool | None  # None: not probed yet
    problem: str  # "" while it serves; else why chats cannot reach it now (no address: every visitor sees it)
    metrics: bool | None  # it serves /metrics (None: not known yet)
    load: BackendLoad | None


class ApproximateTokenizer:
    """Stands in for the backend's tokenizer where text must be measured here (long documents' windows): one
    "token" per CHARS_PER_TOKEN characters, which overcounts real text (about 4 a token) so windows stay in bounds."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[str]]:
        del add_special_tokens
        return {"input_ids": [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]}

    def decode(self, ids: list[str]) -> str:
        return "".join(ids)


@dataclass(frozen=True)
class BackendProcessor:
    """The front end's `processor` with a backend: no chat template or image processor here, a measuring tokenizer."""

    tokenizer: ApproximateTokenizer


class BackendDecoder:
    """Streams each chat from the backend's /v1/chat/completions; a watcher thread reads its /metrics (and, where it
    serves none, /v1/models) every PROBE_EVERY_S for the panel and /ready. Nothing of the model is loaded here."""

    name = "backend"
    remote = True  # the model is elsewhere
    pid: int | None = None
    max_context = 0  # nothing to size here

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 probe_every_s: float = PROBE_EVERY_S) -> None:  # fmt: skip
        self.client = BackendClient(url, api_key)
        self.url = self.client.shown
        self.model = model or None  # --backend-model, else the first of its /v1/models once it answers
        self.probe_every_s = probe_every_s
        self.tracker = LoadTracker()
        self._reachable: bool | None = None
        self._problem = ""
        self._metrics: bool | None = None
        self._error: BackendError | None = None  # the last probe's failure, told to a chat that cannot start
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._logged: dict[str, str] = {}

    # -- the Decoder protocol -----------------------------------------------------------------------
    def attach(self, loaded: Any) -> None:
        """Probes the backend once (an unreachable one is a state the watcher follows, not an error) and starts
        the watcher."""
        del loaded
        self.probe()
        if self._watcher is None or not self._watcher.is_alive():
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="backend-watch", daemon=True)
            self._watcher.start()

    def detach(self) -> None:
        self._stop.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)

    def close(self) -> None:
        self.detach()
        self.client.close()

    def loaded_view(self, loaded: Any = None) -> LoadedModel:
        """What the service holds as "the loaded model": no weights, no processor but a measuring tokenizer."""
        del loaded
        return LoadedModel(
            model=None, processor=BackendProcessor(ApproximateTokenizer()), precision="backend", device="backend",
            source="backend", load_seconds=0.0, weights_bytes=0, is_demo=False,
        )  # fmt: skip

    def stream(
        self,
        loaded: Any,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        cancel: threading.Event,
        on_cancel: Callable[[RequestStats], None] | None = None,
        faults: FaultInjector | None = None,
    ) -> Iterator[tuple[str, RequestStats | None]]:
        del loaded, faults
        return self._stream(prompt, sampling, cancel, on_cancel)

    def describe(self) -> str:
        model = self.model or "model not known yet"
        return f"remote backend ({model})"

    def snapshot(self) -> Any:
        return None

    def engine_figures(self) -> tuple[int, int] | None:
        return None

    def memory(self) -> Any:
        return None

    def release(self) -> None:
        pass  # the backend's memory is its own

    # -- the backend's state ------------------------------------------------------------------------
    @property
    def problem(self) -> str:
        """Why chats cannot reach the backend now ("" while they can)."""
        if self._reachable is None:
            return "not reached yet: connecting"
        return self._problem

    @property
    def ready_state(self) -> str:
        """/ready's state while the backend cannot serve: what is wrong, in a few words."""
        if self._reachable is False or self._reachable is None:
            return "backend unreachable"
        if isinstance(self._error, BackendKeyRefused):
            return "backend refused this app's key"
        if self._problem.startswith("not ready"):
            return "backend not ready"
        return "backend failing"

    def status(self) -> BackendStatus:
        return BackendStatus(self.url, self.model, self._reachable, self.problem, self._metrics, self.tracker.load())

    def status_line(self) -> str:
        """Every visitor's: the model server, never its address."""
        model = f" · model {_plain(self.model)}" if self.model else ""
        if self._reachable is None:
            return f"Front end for {SERVER}: connecting…"
        if self._problem:
            return f"⚠️ Front end for {SERVER}{model}: {self._problem}"
        return f"Ready: front end for {SERVER}{model}"

    def probe(self) -> None:
        """Reads /metrics (the panel's figures), and /v1/models where it serves no metrics or the model is not known."""
        try:
            try:
                text = self.client.metrics_text()
            except BackendTooLarge as exc:  # this scrape is skipped; the chat path does not depend on it
                self._log_once("metrics", exc.detail)
                text = ""
            else:
                with self._lock:
                    self._metrics = text is not None
            if text:
                try:
                    self.tracker.add(parse_metrics(text))
                except ValueError as exc:  # not Prometheus text: the figures stay blank, the chat works
                    log.debug("backend /metrics unreadable: %s", exc)
                    self._metrics = False
            if text is None or self.model is None:
                names = self.client.models()
                if self.model is None and names:
                    self.model = names[0][:200]
                    log.info("backend %s serves %s", self.url, self.model)
            waiting = self.client.not_ready()
            self._error = (
                BackendUnavailable(f"{SERVER[:1].upper()}{SERVER[1:]} is {waiting}; try again shortly.",
                                   f"the backend at {self.url} is {waiting}") if waiting else None
            )  # fmt: skip
            self._mark(True, waiting)
        except BackendUnavailable as exc:
            self._error = exc
            self._mark(False, _short(exc))
        except BackendError as exc:  # it answered, but not as a server we can use (a wrong key, a 500)
            self._error = exc
            self._mark(True, _short(exc))

    def _log_once(self, what: str, detail: str) -> None:
        if self._logged.get(what) != detail:
            self._logged[what] = detail
            log.warning("%s", detail)

    def _mark(self, reachable: bool, problem: str, detail: str = "") -> None:
        """`detail`: the operator's words for the log (the address, what to set); else the last probe's error's."""
        with self._lock:
            changed = (reachable, problem) != (self._reachable, self._problem)
            self._reachable, self._problem = reachable, problem
        if changed:
            if problem:
                error = self._error
                detail = detail or (error.detail if error is not None else f"the backend at {self.url}: {problem}")
                log.warning("%s", detail)
            elif reachable:
                log.info("backend %s reachable", self.url)
        if not reachable:
            self.tracker.clear()

    def _watch(self) -> None:
        while not self._stop.wait(self.probe_every_s):
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad answer
                log.exception("backend probe failed")

    # -- one chat -----------------------------------------------------------------------------------
    def _stream(
        self, prompt: PreparedPrompt, sampling: SamplingParams, cancel: threading.Event,
        on_cancel: Callable[[RequestStats], None] | None,
    ) -> Iterator[tuple[str, RequestStats | None]]:  # fmt: skip
        started = time.perf_counter()
        first: float | None = None
        last = started
        text = ""
        pieces = 0
        end: Chunk | None = None
        try:
            model = self.model
            if model is None:  # no probe here: this thread holds a slot; the watcher fills it in when it can
                error = self._error
                raise error.fresh() if error is not None else BackendUnavailable(
                    f"{SERVER[:1].upper()}{SERVER[1:]} names no model yet; try again shortly.",
                    f"the backend at {self.url} lists no model at /v1/models; set --backend-model",
                )
            body = request_body(model, prompt, sampling)
            for chunk in self.client.stream_chat(body, cancel):
                if chunk.usage is not None or chunk.finish_reason is not None:
                    end = chunk
                    break
                now = time.perf_counter()
                first = first or now
                last, pieces, text = now, pieces + 1, text + chunk.text
                yield text, None
                if cancel.is_set():  # Stop, the deadline, a preemption: closing the stream closes the connection
                    break
            if end is not None and not cancel.is_set():
                self._mark(True, "")
                yield text, _stats(prompt, end.usage, pieces, started, first, last)
            else:
                end = None
        except BackendUnavailable as exc:  # not kept: its traceback holds this prompt's frames
            self._mark(False, _short(exc), exc.detail)
            raise
        except BackendError as exc:  # the visitor's sentence says "the model server"; the operator's names it
            log.warning("a chat failed: %s", exc.detail)
            raise
        finally:
            if end is None and on_cancel is not None:  # stopped (or failed) before the end: what it did so far
                on_cancel(_stats(prompt, None, pieces, started, first, last))


def _plain(text: str) -> str:
    """Backend-given text for the status line (Markdown and HTML there): letters, digits and harmless marks only."""
    return re.sub(r"[^\w .,/:()+=@-]", "?", text)[:200]


def _short(exc: BaseException) -> str:
    """The first clause of a backend error, for the status line and the panel ("refused the connection…")."""
    return str(exc).split(". ")[0].split("; ")[0].removeprefix(f"{SERVER[:1].upper()}{SERVER[1:]} ")


def request_body(model: str, prompt: PreparedPrompt, sampling: SamplingParams) -> dict[str, Any]:
    """The chat completion the backend is sent. top_k, repetition_penalty and ignore_eos are vLLM's and SGLang's
    extra sampling parameters (and this app's)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": prompt.inputs["messages"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.top_k > 0:
        body["top_k"] = sampling.top_k
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    return body


def _stats(
    prompt: PreparedPrompt, usage: dict[str, int] | None, pieces: int, started: float, first: float | None, last: float
) -> RequestStats:
    """The backend's token counts where it sent them (else our estimate and the pieces seen), our own timings."""
    visual = prompt.image_tokens + prompt.video_tokens
    prompt_tokens = int(usage.get("prompt_tokens") or 0) if usage else 0
    new = int(usage.get("completion_tokens") or 0) if usage else 0
    return RequestStats(
        prompt_text_tokens=max(0, prompt_tokens - visual) if prompt_tokens else prompt.text_tokens,
        prompt_image_tokens=prompt.image_tokens,
        prompt_video_tokens=prompt.video_tokens,
        new_tokens=new or pieces,
        ttft_s=(first or last) - started,
        decode_s=last - (first or last),
    )
