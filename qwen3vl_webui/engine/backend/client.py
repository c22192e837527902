"""HTTP to an OpenAI-compatible backend: its model list, a streamed chat completion, its Prometheus text."""

from __future__ import annotations

import json
import queue
import socket
import threading
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
PROBE_TIMEOUT_S = 3.0  # /metrics and /v1/models: a backend that takes longer counts as unreachable
CANCEL_POLL_S = 0.05  # how often a streaming request looks at its cancel event while no bytes arrive


class BackendError(RuntimeError):
    """The backend failed a request; str() is the sentence for the chat, `status` and `code` are for /v1."""

    status = 502
    code = "backend_error"


class BackendUnavailable(BackendError):
    """The backend cannot be reached: refused, timed out, or gone mid-answer."""

    status = 503
    code = "backend_unavailable"


class BackendBusy(BackendError):
    """The backend answered 429: its own wait line is full."""

    status = 429
    code = "backend_busy"


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
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=False)
        # Chats get a connection each (never a pooled one): its socket is known from the connect on, so a Stop can
        # shut it down even while the backend has sent nothing yet, not even headers (a request in its wait line).
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
        reply = self._get("v1/models")
        try:
            return [str(item["id"]) for item in reply.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"The backend at {self.shown} answered /v1/models with no model list.") from None

    def metrics_text(self) -> str | None:
        """The backend's Prometheus text (GET /metrics), or None when it serves none (404, or not Prometheus)."""
        reply = self._get("metrics", ok=(200, 404))
        if reply.status_code == 404 or "text/html" in reply.headers.get("content-type", ""):
            return None
        return reply.text

    def not_ready(self) -> str:
        """Why the backend says it cannot serve yet ("" when it can, or has no such probe): GET /ready, which this app
        answers 503 while its model loads (vLLM and SGLang listen only once loaded, and answer 404 here)."""
        reply = self._get("ready", ok=(200, 404, 503))
        if reply.status_code != 503:
            return ""
        try:
            state = str(reply.json().get("state") or "not ready")
        except (ValueError, AttributeError):
            state = "not ready"
        return f"not ready yet ({state})"

    def _get(self, path: str, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        try:
            reply = self._http.get(path, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise unreachable(self.shown, exc) from None
        if reply.status_code not in ok:
            raise answered(self.shown, reply.status_code, _message(reply.text))
        return reply

    # -- a chat ---------------------------------------------------------------------------------
    def stream_chat(self, body: dict[str, Any], cancel: threading.Event) -> Iterator[Chunk]:
        """POST /v1/chat/completions with `stream: true`: the text pieces as they come, then one Chunk with the
        finish reason and usage. Setting `cancel` (or closing the iterator) closes the connection within
        CANCEL_POLL_S: the backend sees the client go and stops the request."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        state: dict[str, Any] = {}
        reader = threading.Thread(target=self._read, args=(body, events, state), name="backend-read", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    kind, value = events.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if cancel.is_set():
                        return
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
            if reader.is_alive():  # blocked on a backend that sends nothing (a request waiting in its queue)
                threading.Thread(target=_close, args=(state,), name="backend-close", daemon=True).start()

    def _read(self, body: dict[str, Any], events: queue.Queue[tuple[str, Any]], state: dict[str, Any]) -> None:
        try:

            def trace(event: str, info: dict[str, Any]) -> None:
                if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                    state["socket"] = info["return_value"].get_extra_info("socket")

            with self._chats.stream("POST", "v1/chat/completions", json=body, extensions={"trace": trace}) as response:
                state["response"] = response
                if state.get("closed"):
                    return
                if response.status_code != 200:
                    response.read()
                    raise answered(self.shown, response.status_code, _message(response.text))
                usage: dict[str, int] | None = None
                finish: str | None = None
                for line in response.iter_lines():
                    if state.get("closed"):
                        return  # Stop: leaving the `with` closes the connection, and the backend ends the request
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event or event.get("object") == "error":  # failed after the answer began
                        raise answered(self.shown, 500, _message(json.dumps(event)))
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        if text:
                            events.put(("chunk", Chunk(text)))
                events.put(("chunk", Chunk("", finish or "stop", usage)))
                events.put(("end", None))
        except BackendError as exc:
            events.put(("error", exc))
        except RequestError as exc:
            events.put(("error", exc))
        except (httpx.HTTPError, ValueError) as exc:
            if not state.get("closed"):
                events.put(("error", unreachable(self.shown, exc)))
        except Exception as exc:  # noqa: BLE001 - told to the chat; a closed response may raise anything
            if not state.get("closed"):
                events.put(("error", BackendError(f"The backend at {self.shown} failed: {exc}")))


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


def unreachable(shown: str, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        why = "did not answer in time"
    elif isinstance(exc, httpx.ConnectError):
        why = "refused the connection or cannot be reached"
    elif isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        why = "closed the connection mid-answer"
    else:
        why = f"failed ({type(exc).__name__})"
    return BackendUnavailable(f"The backend at {shown} {why}. Try again once it is back; this chat is kept.")


def answered(shown: str, status: int, message: str) -> Exception:
    """The exception for an HTTP error status from the backend."""
    said = f": {message}" if message else ""
    if status == 401 or status == 403:
        return BackendError(
            f"The backend at {shown} refused this app's key (HTTP {status}); set --backend-api-key "
            "(QWEN3VL_BACKEND_API_KEY) to the key it expects."
        )
    if status == 429:
        return BackendBusy(f"The backend at {shown} is busy (its wait line is full); try again shortly{said}")
    if status in (400, 413, 422):
        return BackendRefused(f"The backend refused this request{said}")
    if status in (502, 503, 504):
        return BackendUnavailable(f"The backend at {shown} is not serving now (HTTP {status}){said}")
    return BackendError(f"The backend at {shown} answered HTTP {status}{said}")


def _message(text: str) -> str:
    """The message of an OpenAI-shaped error body (vLLM's, SGLang's, this app's), else its first 200 characters."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or ""
        return str(message)[:500]
    return str(error)[:200]
