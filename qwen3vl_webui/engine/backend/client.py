"""HTTP to an OpenAI-compatible backend: its model list, a streamed chat completion, its Prometheus text."""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from qwen3vl_webui.engine.request import RequestError

CONNECT_TIMEOUT_S = 5.0
# Between two bytes of an answer. A busy backend (vLLM, or this app's wait line) sends nothing while the request
# waits for a slot, so this is long; Stop, a closed tab and --request-timeout end a request sooner.
READ_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 3.0  # /metrics, /v1/models, /ready: in all, not between bytes; longer counts as unreachable
CANCEL_POLL_S = 0.05  # how often a streaming request looks at its cancel event while no bytes arrive
# Caps on what the backend may send, checked while reading (a wrong or hostile server must not fill this memory).
MAX_METRICS_BYTES = 4 * 2**20  # /metrics: a larger one is skipped (one log line); vLLM's is some 100 KiB
MAX_PROBE_BYTES = 2**20  # /v1/models and /ready
MAX_ERROR_BYTES = 64 * 2**10  # an error's body
MAX_LINE_BYTES = 2**20  # one server-sent event's line
ANSWER_BYTES_BASE = 2**20  # a whole streamed answer: this + ANSWER_BYTES_PER_TOKEN x max_tokens
ANSWER_BYTES_PER_TOKEN = 4 * 2**10  # vLLM's event for one token is ~300 bytes
ANSWER_CHARS_BASE = 4096  # its text: this + ANSWER_CHARS_PER_TOKEN x max_tokens (Qwen's longest tokens are ~60)
ANSWER_CHARS_PER_TOKEN = 64
SERVER = "the model server"  # what visitors and /v1 clients are told; the URL is the operator's (the log)


class BackendError(RuntimeError):
    """The backend failed a request; str() is the sentence for the chat and /v1 (no address, no hint at flags),
    `detail` the operator's (the log: the address and what to set), `status` and `code` are for /v1."""

    status = 502
    code = "backend_error"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message

    def fresh(self) -> BackendError:
        """A new exception saying the same: one instance raised in many threads would gather their tracebacks (and
        the prompts in their frames)."""
        return type(self)(str(self), self.detail)


class BackendUnavailable(BackendError):
    """The backend cannot be reached: refused, timed out, or gone mid-answer."""

    status = 503
    code = "backend_unavailable"


class BackendBusy(BackendError):
    """The backend answered 429: its own wait line is full."""

    status = 429
    code = "backend_busy"


class BackendKeyRefused(BackendError):
    """The backend refused this app's key (401/403): a setup problem, not the visitor's."""

    code = "backend_auth"


class BackendTooLarge(BackendError):
    """The backend sent more than this app reads (one line, an answer, an error body)."""


class BackendRefused(RequestError):
    """The backend refused the request itself (400: e.g. prompt + max tokens over its context length)."""


@dataclass(frozen=True)
class Chunk:
    """One event of a streamed completion: new text, or the end with the backend's token counts."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


def display_url(url: str) -> str:
    """`url` without any user:password part (safe for the status line and the log)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class BackendClient:
    """One connection pool to the backend at `url` (its root: `/v1/...` and `/metrics` are under it)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        root = url.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root  # an OpenAI client's base URL names /v1 too
        self.url = root + "/"
        self.shown = display_url(self.url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        # Probes and chats get a connection each (never a pooled one): its socket is known from the connect on, so a
        # probe's deadline and a chat's Stop can shut it down in any phase, even before the backend sent headers (a
        # request in its wait line, or a server that trickles them a byte at a time).
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )  # fmt: skip
        self._chats = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )  # fmt: skip

    def close(self) -> None:
        self._http.close()
        self._chats.close()

    # -- probes ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The ids the backend serves (GET /v1/models), first as it lists them."""
        _, body = self._get("v1/models", MAX_PROBE_BYTES)
        try:
            return [str(item["id"]) for item in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise BackendError(
                f"{_cap(SERVER)} answered its model list with none.",
                f"the backend at {self.shown} answered /v1/models with no model list",
            ) from None

    def metrics_text(self) -> str | None:
        """The backend's Prometheus text (GET /metrics), or None when it serves none (404, or not Prometheus).
        Raises BackendTooLarge for a text over MAX_METRICS_BYTES (the caller skips that scrape)."""
        reply, body = self._get("metrics", MAX_METRICS_BYTES, ok=(200, 404))
        if reply.status_code == 404 or "text/html" in reply.headers.get("content-type", ""):
            return None
        return body.decode("utf-8", "replace")

    def not_ready(self) -> str:
        """Why the backend says it cannot serve yet ("" when it can, or has no such probe): GET /ready, which this app
        answers 503 while its model loads (vLLM and SGLang listen only once loaded, and answer 404 here)."""
        reply, body = self._get("ready", MAX_PROBE_BYTES, ok=(200, 404, 503))
        if reply.status_code != 503:
            return ""
        try:
            state = re.sub(r"[^\w .,:-]", "?", str(json.loads(body).get("state") or "not ready"))[:80]
        except (ValueError, AttributeError):
            state = "not ready"
        return f"not ready yet ({state})"

    def _get(self, path: str, limit: int, ok: tuple[int, ...] = (200,)) -> tuple[httpx.Response, bytes]:
        """GET `path` within PROBE_TIMEOUT_S in all (httpx's timeout is per read: a byte a second would never end
        it) and at most `limit` bytes of body."""
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        body = bytearray()
        state: dict[str, Any] = {}

        def trace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                state["socket"] = info["return_value"].get_extra_info("socket")

        # The headers too may come a byte at a time: at the deadline the socket is shut down, whatever the phase.
        def expire() -> None:
            state["expired"] = True
            _close(state)

        watchdog = threading.Timer(PROBE_TIMEOUT_S, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            with self._http.stream("GET", path, timeout=PROBE_TIMEOUT_S, extensions={"trace": trace}) as reply:
                limit = limit if reply.status_code in ok else MAX_ERROR_BYTES
                for piece in reply.iter_bytes():
                    body += piece
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the probe's deadline passed")
                    if len(body) > limit:
                        break
        except httpx.HTTPError as exc:
            late = state.get("expired") or time.monotonic() >= deadline  # shut down by the watchdog: late, not gone
            raise unreachable(self.shown, httpx.ReadTimeout("deadline") if late else exc) from None
        finally:
            watchdog.cancel()
        if state.get("expired"):  # a body ended by the watchdog's shutdown reads as complete: it is not
            raise unreachable(self.shown, httpx.ReadTimeout("deadline"))
        if reply.status_code not in ok:
            raise answered(self.shown, reply.status_code, _message(bytes(body[:MAX_ERROR_BYTES])))
        if len(body) > limit:
            raise BackendTooLarge(
                f"{_cap(SERVER)} sent an over-long answer.",
                f"the backend at {self.shown} sent more than {limit // 2**10:,} KiB at /{path}; skipped",
            )
        return reply, bytes(body)

    # -- a chat ---------------------------------------------------------------------------------
    def stream_chat(self, body: dict[str, Any], cancel: threading.Event) -> Iterator[Chunk]:
        """POST /v1/chat/completions with `stream: true`: the text pieces as they come, then one Chunk with the
        finish reason and usage. Setting `cancel` (or closing the iterator) closes the connection within
        CANCEL_POLL_S, whether the backend is streaming, silent or still being connected to: the backend sees the
        client go and stops the request."""
        if cancel.is_set():  # stopped before it began (the deadline passed while it waited for a slot)
            return
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        state: dict[str, Any] = {"cancel": cancel}
        tokens = int(body.get("max_tokens") or 1)
        budget = (ANSWER_BYTES_BASE + ANSWER_BYTES_PER_TOKEN * tokens, ANSWER_CHARS_BASE + ANSWER_CHARS_PER_TOKEN * tokens)
        reader = threading.Thread(
            target=self._read, args=(body, events, state, budget), name="backend-read", daemon=True
        )
        reader.start()
        try:
            while not cancel.is_set():  # after every event too: a backend streaming fast never leaves the queue empty
                try:
                    kind, value = events.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    continue
                if kind == "chunk":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            state["closed"] = True  # the reader stops at its next line and closes the connection itself
            reader.join(timeout=CANCEL_POLL_S)
            if reader.is_alive():  # blocked on a backend that sends nothing, or still connecting
                threading.Thread(target=_close_until_gone, args=(state, reader), name="backend-close",
                                 daemon=True).start()  # fmt: skip

    def _read(
        self, body: dict[str, Any], events: queue.Queue[tuple[str, Any]], state: dict[str, Any],
        budget: tuple[int, int],
    ) -> None:
        """`budget`: the most bytes and characters of text this answer may take."""
        try:

            def trace(event: str, info: dict[str, Any]) -> None:
                if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                    state["socket"] = info["return_value"].get_extra_info("socket")
                    if _stopped(state):  # stopped while connecting: send nothing
                        _close(state)
                        raise _Stopped
                elif event.startswith("http11.send_request_headers") and _stopped(state):
                    raise _Stopped

            with self._chats.stream("POST", "v1/chat/completions", json=body, extensions={"trace": trace}) as response:
                state["response"] = response
                if state.get("closed"):
                    return
                if response.status_code != 200:
                    raise answered(self.shown, response.status_code, _message(_read_capped(response, MAX_ERROR_BYTES)))
                usage: dict[str, int] | None = None
                finish: str | None = None
                chars = 0
                for line in _lines(response, budget[0], self.shown):
                    if state.get("closed"):
                        return  # Stop: leaving the `with` closes the connection, and the backend ends the request
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finish = finish or "stop"
                        break
                    try:
                        event = json.loads(data)
                        if not isinstance(event, dict):
                            raise ValueError("not an object")
                    except ValueError:  # it answers, but not as an OpenAI server: its failure, not a lost connection
                        raise BackendError(
                            f"{_cap(SERVER)} sent an answer this app cannot read.",
                            f"the backend at {self.shown} sent an event that is not JSON: {data[:200]!r}",
                        ) from None
                    if "error" in event or event.get("object") == "error":  # failed after the answer began
                        raise answered(self.shown, 500, _message(json.dumps(event).encode()))
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            chars += len(text)
                            if chars > budget[1]:
                                raise _too_much(self.shown, f"over {budget[1]:,} characters")
                            events.put(("chunk", Chunk(text)))
                if finish is None:  # the stream ended with neither [DONE] nor a finish reason: cut off, not finished
                    if state.get("closed"):
                        return
                    raise httpx.RemoteProtocolError("the answer ended without [DONE]")
                events.put(("chunk", Chunk("", finish, usage)))
                events.put(("end", None))
        except _Stopped:
            pass
        except BackendError as exc:
            events.put(("error", exc))
        except RequestError as exc:
            events.put(("error", exc))
        except httpx.HTTPError as exc:
            if not state.get("closed"):
                events.put(("error", unreachable(self.shown, exc)))
        except Exception as exc:  # noqa: BLE001 - told to the chat; a closed response may raise anything
            if not state.get("closed"):
                events.put(("error", BackendError(f"{_cap(SERVER)} failed.", f"the backend at {self.shown} failed: "
                                                  f"{type(exc).__name__}: {exc}")))  # fmt: skip


def _stopped(state: dict[str, Any]) -> bool:
    cancel = state.get("cancel")
    return bool(state.get("closed")) or (cancel is not None and cancel.is_set())


class _Stopped(Exception):
    """Raised from httpcore's trace hook: Stop came while the request was being connected."""


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    for piece in response.iter_bytes():
        body += piece
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _lines(response: httpx.Response, budget: int, shown: str) -> Iterator[str]:
    """The lines of a server-sent event stream, each at most MAX_LINE_BYTES, all of them at most `budget` bytes."""
    pending = b""
    total = 0
    for piece in response.iter_bytes():
        pending += piece
        *whole, pending = pending.replace(b"\r\n", b"\n").split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            raise BackendTooLarge(
                f"{_cap(SERVER)} sent an event line over {MAX_LINE_BYTES // 2**20} MiB; the answer was stopped.",
                f"the backend at {shown} sent an event line over {MAX_LINE_BYTES // 2**20} MiB",
            )
        total += len(piece)
        if total > budget:
            raise _too_much(shown, f"over {budget / 2**20:,.1f} MiB")
        for line in whole:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


def _too_much(shown: str, what: str) -> BackendTooLarge:
    return BackendTooLarge(
        f"{_cap(SERVER)} sent far more than the answer's max tokens allow; it was stopped.",
        f"the backend at {shown} sent {what} for one answer",
    )


def _close(state: dict[str, Any]) -> None:
    """Closes a streaming response under a reader blocked on it (from a thread of its own: it may wait on a lock).

    Shutting the socket down is what reaches the backend: closing the response alone waits for the blocked read."""
    sock = state.get("socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass
    response = state.get("response")
    if response is not None:
        try:
            response.close()
        except Exception:  # noqa: BLE001 - the reader may be closing it too
            pass


def _close_until_gone(state: dict[str, Any], reader: threading.Thread) -> None:
    """Closes the connection under a reader that is blocked (connecting, or waiting for a byte), again every
    CANCEL_POLL_S until it has left: its socket may not exist yet at the first try."""
    while reader.is_alive():
        _close(state)
        reader.join(CANCEL_POLL_S)


def unreachable(shown: str, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        why = "did not answer in time"
    elif isinstance(exc, httpx.ConnectError):
        why = "refused the connection or cannot be reached"
    elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        why = "closed the connection mid-answer"
    else:
        why = f"failed ({type(exc).__name__})"
    return BackendUnavailable(
        f"{_cap(SERVER)} {why}. Try again once it is back; this chat is kept.", f"the backend at {shown} {why}"
    )


def answered(shown: str, status: int, message: str) -> Exception:
    """The exception for an HTTP error status from the backend. The backend's own message is passed on only where
    it is about the request (400s); other statuses' bodies go to the log."""
    said = f": {message}" if message else ""
    where = f"the backend at {shown}"
    if status == 401 or status == 403:
        return BackendKeyRefused(
            f"{_cap(SERVER)} refused this app's credentials; the server is misconfigured. Try again later.",
            f"{where} refused this app's key (HTTP {status}); set --backend-api-key (QWEN3VL_BACKEND_API_KEY) to the "
            "key it expects",
        )
    if status == 429:
        return BackendBusy(f"{_cap(SERVER)} is busy (its wait line is full); try again shortly.",
                           f"{where} is busy (HTTP 429){said}")  # fmt: skip
    if status in (400, 413, 422):
        return BackendRefused(f"The model server refused this request{said}")
    if status in (502, 503, 504):
        return BackendUnavailable(f"{_cap(SERVER)} is not serving now (HTTP {status}); try again shortly.",
                                  f"{where} is not serving now (HTTP {status}){said}")  # fmt: skip
    return BackendError(f"{_cap(SERVER)} failed (HTTP {status}){said}", f"{where} answered HTTP {status}{said}")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _message(raw: bytes) -> str:
    """The message of an OpenAI-shaped error body (vLLM's, SGLang's, this app's), else its first 200 characters."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or ""
        return str(message)[:500]
    return str(error)[:200]
