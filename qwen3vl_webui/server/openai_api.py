"""OpenAI-compatible API on the app's port: `GET /v1/models`, `POST /v1/chat/completions` (streamed or not).

It goes through the same ChatService admission as the chat page and `/chat`: the concurrency cap, the wait line
and the per-client cap hold across all front doors together. Errors have OpenAI's shape,
`{"error": {"message", "type", "code"}}`: 400 bad input, 401 key missing or wrong, 404 unknown model, 413 body too
large, 429 (with Retry-After) wait line full, 503 while the model loads or the server drains.

Beyond OpenAI's fields, as vLLM's extra body fields (the openai client's `extra_body=`): `"whole_video": true` watches
a video longer than the frame budget in time segments and merges them (service/longvideo.py), as the page's
*Whole video* box does. A document or a whole video is answered in several steps; the answer (or its stream) starts
with the final pass, as no progress lines are sent (they would be content to an OpenAI client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastapi
from fastapi.responses import JSONResponse, StreamingResponse

from qwen3vl_webui.conversation import Turn, UserMessage
from qwen3vl_webui.server.media_urls import MediaRefused, save_media
from qwen3vl_webui.service.metrics import arrived_at
from qwen3vl_webui.workers import Workers

log = logging.getLogger(__name__)

# Streamed deltas leave at most this often (the last always): what the chat page does, for the same reason
# (each message is Python on the front end's one core).
STREAM_INTERVAL_S = 0.05
_WORKERS = Workers("api-chat")
MEGA = 1_000_000


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.code, self.headers = status, kind, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}


@dataclass(frozen=True)
class ApiConfig:
    """What the API needs to know of the settings."""

    model_names: tuple[str, ...]  # the first is what /v1/models lists and answers carry
    api_key: str | None
    closed: bool  # a UI login is set and no key: the API stays shut (401) unless the operator opened it
    max_body_bytes: int
    max_file_bytes: int
    max_files_per_turn: int
    max_files_per_chat: int
    max_turns: int
    allowed_media_domains: frozenset[str]
    local_only: bool  # everyone is the operator (no per-client cap)
    # A front end (--backend-url): the names it answers to now (the backend's model is known once it answered);
    # () while it is not known, when any name is passed on and the backend answers.
    live_names: Callable[[], tuple[str, ...]] | None = None

    def names(self) -> tuple[str, ...]:
        return self.live_names() if self.live_names is not None else self.model_names


def build_router(service: Any, config: ApiConfig, media_folder: Callable[[], Path]) -> Any:
    """The /v1 routes, bound to `service`; mount them on the front door's FastAPI app."""
    router = fastapi.APIRouter()

    def refuse(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def authorize(request: fastapi.Request) -> None:
        if config.api_key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
                raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' (--api-key).",
                               "invalid_request_error", "invalid_api_key")  # fmt: skip
        elif config.closed:
            raise ApiError(401, "The API is closed on this server: a login protects the page, and no --api-key is set "
                                "(or start it with --open-api).", "invalid_request_error", "invalid_api_key")  # fmt: skip

    @router.get("/v1/models")
    async def models(request: fastapi.Request) -> Any:
        try:
            authorize(request)
        except ApiError as exc:
            return refuse(exc)
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "qwen3vl-webui"} for name in config.names()]
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions")
    async def completions(request: fastapi.Request) -> Any:
        try:
            authorize(request)
            body = await _read_json(request, config.max_body_bytes)
            model, names = body.get("model"), config.names()
            if names and model not in names:
                raise ApiError(404, f"The model {model!r} does not exist; this server serves {names[0]!r}.",
                               "invalid_request_error", "model_not_found")  # fmt: skip
            _ready(service)
            chat, options = await asyncio.to_thread(to_chat_request, body, service, config, media_folder())
        except ApiError as exc:
            return refuse(exc)
        from qwen3vl_webui.service.admission import Client

        client = Client(request.client.host if request.client else "unknown", exempt=config.local_only)
        arrived = arrived_at(request)
        service.door_metrics.started("api", arrived)  # the body read, parsed and its media checked
        run = _Run(service, chat, client)
        # Until a stream's first chunk (its response watches the connection from then on) or a whole answer, nothing
        # else reads the connection: a client that gives up (a timeout, Ctrl-C) would keep its GPU slot to the end.
        watch = asyncio.create_task(run.stop_when_gone(request.receive))
        try:
            first = await run.first()
            name, rid, created = (names or (str(model),))[0], f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if not options["stream"]:
                text, stats = await run.rest_joined(first)
                return _completion(rid, created, name, text, stats, chat.sampling.max_new_tokens)
        except ApiError as exc:  # a refusal, or failed or timed out after the first piece: OpenAI-shaped
            return refuse(exc)
        finally:
            watch.cancel()
        if first[0] == "text":  # the first chunks go out now (a stream's; a whole answer's first text is not sent)
            service.door_metrics.first("api", arrived)
        chunks = _stream(run, first, rid, created, name, options["include_usage"], chat.sampling.max_new_tokens)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return router


def _ready(service: Any) -> None:
    if service.draining:
        raise ApiError(503, "The server is shutting down; try again in a minute.", "server_error", "draining",
                       {"Retry-After": "60"})  # fmt: skip
    if service.manager.current() is None or not service.warmed.is_set():
        raise ApiError(503, "The model is still loading; try again shortly.", "server_error", "loading",
                       {"Retry-After": "10"})  # fmt: skip


async def _read_json(request: Any, cap: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"The request body is over {cap // 2**20} MB.", "invalid_request_error", "body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise ApiError(413, f"The request body is over {cap // 2**20} MB.", "invalid_request_error", "body_too_large")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


# ------------------------------------------------------------------------------ request -> ChatRequest


def to_chat_request(body: dict[str, Any], service: Any, config: ApiConfig, folder: Path) -> tuple[Any, dict[str, Any]]:
    """The body of a chat completion as the service's ChatRequest, every value checked; ApiError(400) if not."""
    from qwen3vl_webui.engine.request import RequestError, SamplingParams
    from qwen3vl_webui.media import MediaBudget
    from qwen3vl_webui.service.prompt import ChatRequest

    system, turns, message = _conversation(body.get("messages"), config, folder)
    limits = service.limits
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: this server returns one choice.")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = limits.max_new_tokens if given is None else _int("max_tokens", given, 1, limits.max_new_tokens)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object.")
    seed = body.get("seed")
    try:
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=_number("temperature", body.get("temperature", 0.7)),
            top_p=_number("top_p", body.get("top_p", 0.8)),
            top_k=int(_number("top_k", body.get("top_k", 20))),
            repetition_penalty=_number("repetition_penalty", body.get("repetition_penalty", 1.05)),
            seed=None if seed is None else _int("seed", seed, 0, 2**32 - 1),
            stop=tuple(stop) if isinstance(stop, list) else stop,
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
    except RequestError as exc:
        raise ApiError(400, str(exc)) from None
    whole_video = body.get("whole_video")  # our extension, as vLLM's extra body fields (`extra_body=`); null: off
    whole_video = False if whole_video is None else whole_video
    if not isinstance(whole_video, bool):
        raise ApiError(400, f"whole_video must be true or false, got {whole_video!r}.")
    chat = ChatRequest(
        message=message, history=turns, system_prompt=system, sampling=sampling, max_context=limits.max_context,
        media=MediaBudget(), max_files_per_turn=config.max_files_per_turn, whole_video=whole_video,
    )  # fmt: skip
    options = {"stream": bool(body.get("stream", False)), "include_usage": bool(stream_options.get("include_usage"))}
    return chat, options


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}.")
    return float(value)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer from {lo} to {hi}, got {value!r}.")
    return value


def _conversation(messages: Any, config: ApiConfig, folder: Path) -> tuple[str, list[Turn], UserMessage]:
    """(system prompt, earlier turns, the last user message) of OpenAI `messages`."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list.")
    system: list[str] = []
    turns: list[Turn] = []
    texts: list[str] = []
    files: list[str] = []
    total_files = 0
    for number, item in enumerate(messages):
        if not isinstance(item, dict) or item.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{number}] must be an object with role system, user or assistant.")
        role = item["role"]
        text, media = _content(item.get("content"), number, role)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            texts.append(text)
            for kind, url in media:
                total_files += 1
                if total_files > config.max_files_per_chat:
                    raise ApiError(400, f"At most {config.max_files_per_chat} images and videos per conversation.")
                try:
                    files.append(save_media(url, kind, folder, config.max_file_bytes, config.allowed_media_domains))
                except MediaRefused as exc:
                    raise ApiError(exc.status, f"messages[{number}]: {exc}") from None
        else:
            if not texts and not files:
                raise ApiError(400, f"messages[{number}]: an assistant message must follow a user message.")
            turns.append(Turn(UserMessage("\n".join(t for t in texts if t), tuple(files)), text))
            texts, files = [], []
            if len(turns) > config.max_turns:
                raise ApiError(400, f"At most {config.max_turns} earlier turns per request (--max-history-turns).")
    if not texts and not files:
        raise ApiError(400, "The last message must be the user's.")
    if len(files) > config.max_files_per_turn:
        raise ApiError(400, f"{len(files)} files in the last message; at most {config.max_files_per_turn} per message.")
    return "\n\n".join(t for t in system if t), turns, UserMessage("\n".join(t for t in texts if t), tuple(files))


def _content(content: Any, number: int, role: str) -> tuple[str, list[tuple[str, str]]]:
    if content is None and role == "assistant":
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{number}].content must be a string or a list of parts.")
    texts: list[str] = []
    media: list[tuple[str, str]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url") and role == "user":
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, f"messages[{number}]: {kind} needs a url.")
            media.append((kind.removesuffix("_url"), url))
        elif kind == "file" and role == "user":  # OpenAI's file part: a document, read whole or in windows
            ref = part.get("file")
            data = ref.get("file_data") if isinstance(ref, dict) else None
            if not isinstance(data, str):
                raise ApiError(400, f"messages[{number}]: a file part needs file.file_data (a base64 data: URI).")
            media.append((f"document:{ref.get('filename') or ''}", data))
        else:
            raise ApiError(
                400, f"messages[{number}]: unsupported content part {kind!r} (text, image_url, video_url, file)."
            )
    return "\n".join(texts), media


# ------------------------------------------------------------------------------ running and answering


class _Run:
    """One chat through the service, iterated on a thread of its own; its events reach the event loop."""

    def __init__(self, service: Any, chat: Any, client: Any) -> None:
        self.cancel = threading.Event()
        self.gone = False  # the client closed the connection: whatever the run ends with, nobody reads it
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stream = service.chat(chat, self.cancel, client=client, report_end=True)
        _WORKERS.run(self._pump)  # a pooled thread: Thread.start would hold the event loop until it ran (workers.py)

    def _pump(self) -> None:
        from qwen3vl_webui.service.chat import Finished

        put = self._loop.call_soon_threadsafe
        held, last = None, 0.0
        try:
            for item in self._stream:
                if isinstance(item, Finished):
                    if held is not None:
                        put(self._queue.put_nowait, ("text", held))
                    put(self._queue.put_nowait, ("end", item))
                    return
                now = time.monotonic()
                if now - last < STREAM_INTERVAL_S and last:
                    held = item
                    continue
                held, last = None, now
                put(self._queue.put_nowait, ("text", item))
            put(self._queue.put_nowait, ("end", None))
        except BaseException as exc:  # told to the client as an error
            if not self._loop.is_closed():  # else the server stopped under the stream (its closing ends the chat)
                put(self._queue.put_nowait, ("error", exc))
        finally:
            self._stream.close()

    async def next(self) -> tuple[str, Any]:
        return await self._queue.get()

    async def first(self) -> tuple[str, Any]:
        """The first event; a refusal before any text (bad input, busy) is raised as its ApiError."""
        kind, value = await self.next()
        if kind == "error":
            raise self._error(value)
        return kind, value

    async def rest_joined(self, first: tuple[str, Any]) -> tuple[str, Any]:
        text, event = "", first
        while True:
            kind, value = event
            if kind == "text":
                text = value
            elif kind == "end":
                return (value.text if value is not None else text), (value.stats if value is not None else None)
            else:
                raise self._error(value)
            event = await self.next()

    async def stop_when_gone(self, receive: Callable[[], Any]) -> None:
        """Stops the run when the client disconnects, as a stream's response does once it runs. The body was read
        whole, so the server's next message is `http.disconnect` (uvicorn's, when the connection closes; polling
        `request.is_disconnected()` would find the same later): the request leaves the engine at its next step, or
        the wait line at once, and frees its place."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.stop()

    def _error(self, exc: BaseException) -> ApiError:
        if self.gone:  # our own cancel (Cancelled while waiting for a slot): not the server's error to log
            return ApiError(499, "The client closed the connection.", "invalid_request_error", "client_closed")
        return _api_error(exc)

    def stop(self) -> None:
        self.cancel.set()


def _api_error(exc: BaseException) -> ApiError:
    from qwen3vl_webui.engine.backend.client import BackendError
    from qwen3vl_webui.engine.remote.protocol import EngineDied
    from qwen3vl_webui.engine.request import RequestError
    from qwen3vl_webui.service.admission import Busy, TooManyRequests
    from qwen3vl_webui.service.chat import ShuttingDown
    from qwen3vl_webui.service.prompt import RequestTimedOut

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestTimedOut):
        return ApiError(504, str(exc), "timeout", "request_timeout")
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc))
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), "server_error", "draining", {"Retry-After": "60"})
    if isinstance(exc, TooManyRequests):
        return ApiError(429, str(exc), "rate_limit_error", "too_many_requests", {"Retry-After": "1"})
    if isinstance(exc, Busy):
        return ApiError(429, "The server is busy: all GPU slots and the wait line are full. Try again shortly.",
                        "rate_limit_error", "queue_full", {"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, TimeoutError):
        return ApiError(503, str(exc), "server_error", "loading", {"Retry-After": "10"})
    if isinstance(exc, BackendError):  # a front end's backend is down, busy or failed (--backend-url)
        retry = {"Retry-After": "10" if exc.status == 503 else "1"} if exc.status in (429, 503) else None
        return ApiError(exc.status, str(exc), "server_error", exc.code, retry)
    if isinstance(exc, EngineDied):
        return ApiError(503, str(exc), "server_error", "engine_restarting", {"Retry-After": "10"})
    log.error("chat completion failed", exc_info=exc)
    return ApiError(500, "Generation failed on the server; the error was logged.", "server_error", "internal_error")


def _finish_reason(stats: Any, max_new: int) -> str:
    return "length" if stats is not None and stats.new_tokens >= max_new else "stop"


def _usage(stats: Any) -> dict[str, int]:
    prompt = stats.prompt_tokens if stats is not None else 0
    completion = stats.new_tokens if stats is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(rid: str, created: int, model: str, text: str, stats: Any, max_new: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": _finish_reason(stats, max_new), "logprobs": None}],
        "usage": _usage(stats),
    }  # fmt: skip


def _chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(
    run: _Run, first: tuple[str, Any], rid: str, created: int, model: str, usage: bool, max_new: int
) -> AsyncIterator[str]:
    sent = ""
    event = first
    try:
        yield _chunk(rid, created, model, {"role": "assistant", "content": ""}, None)
        while True:
            kind, value = event
            if kind == "text":
                if value.startswith(sent) and len(value) > len(sent):
                    yield _chunk(rid, created, model, {"content": value[len(sent) :]}, None)
                    sent = value
            elif kind == "end":
                final = value.text if value is not None else sent
                if final.startswith(sent) and len(final) > len(sent):  # the last words before a stop string
                    yield _chunk(rid, created, model, {"content": final[len(sent) :]}, None)
                stats = value.stats if value is not None else None
                yield _chunk(rid, created, model, {}, _finish_reason(stats, max_new))
                if usage:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(stats)}  # fmt: skip
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:  # failed after the answer began: OpenAI-style error event, then the end
                yield f"data: {json.dumps(_api_error(value).body())}\n\n"
                break
            event = await run.next()
        yield "data: [DONE]\n\n"
    finally:
        run.stop()  # the client left (or we are done): the request ends at its next step

