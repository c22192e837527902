"""Load test: N concurrent chats through the app's front doors, closed loop; TTFT and tokens/s percentiles.

    python -m bench.load_test --chats 1,32 --doors gradio,openai --mixed 32 --seconds 30 --json $OUT/load_test.json \\
        -- --random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 \\
        --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache
    python -m bench.load_test --url http://127.0.0.1:7860/ --tokenizer Qwen/Qwen3-VL-4B-Instruct --chats 8

Without --url it starts `python app.py FLAGS` itself (the flags after `--`) on 127.0.0.1 and a free port, waits for
the first answer (model load, compile, warm-up) and stops it with SIGTERM at the end. Loopback only: the app's
per-client cap (--max-requests-per-client) and event rate limit do not apply to a client on the app's own machine
(the operator's exemption), so N chats from one address are not capped; a capped request would fail the run.

For each value of --chats and each door in --doors it runs that many chats, each with its own connection (a
connection keeps the chat history, so each request starts a new conversation unless --turns says otherwise),
sending requests until --requests were issued or --seconds passed; requests in flight then finish. Each chat runs
in a client process of its own, as each user has an interpreter of their own (--chats-per-process packs more into
one, as threads; a scenario of one chat runs on a thread of this process). Packing misleads: gradio_client builds an
SSL context for each request, and with 8 chats per process the busiest client process was 0.74 cores busy and the
gradio door 0.82 of the engine, against 0.86 with `ssl_verify=False` (H100, session 20). Each request is a text of
--prompt-tokens tokens (distinct per request). Then each value of --mixed runs a mixed scenario: that many chats,
of which --image-share (default a quarter) also send a 1280x720 JPEG with each request (distinct pictures from a
pool, so no request reuses another's image prefix until the pool is used up: `images_distinct` says). Then each
value of --profile runs a text scenario of that many chats per door while py-spy samples the app's processes (the
front end and the engine process) for --profile-seconds: collapsed stacks into --profile-out (speedscope and
flamegraph.pl read them), the top functions per process into the report.
- TTFT: from the send to the first partial answer the client receives (queue, upload, prompt building, prefill
  and the network hop included); the OpenAI door: the first non-empty content delta;
- tokens: what the door reports (the OpenAI door: usage.completion_tokens), else the final text re-tokenized with
  the checkpoint's tokenizer. With `--random-weights` the app only emits tokens that its tokenizer splits back the
  same way, so that is exact, and no end-of-turn token can be drawn (`short_answers` counts answers shorter than
  asked: 0 for both doors there);
- per-chat tokens/s: a request's tokens after its first output over the time from first to last output;
- total tokens/s: all answered tokens over the scenario's wall time (first send to last answer);
- client gap: a chat's answer received to its next request sent (`client_gap_s`): the client's own turnaround, time
  an app's slot idles in this closed loop. Answers a door does not count are re-tokenized after a chat's last request,
  not in this gap;
- CPU cores busy: the app's process (the front end), its engine process (`qwen3vl_webui.engine.remote.worker`, with
  `--engine batch`), its other child processes, and the client processes, over the scenario.
In a mixed run the figures are also given per kind (`by_kind`: text, image). --budget-s shortens the scenarios
(down to --min-seconds, then drops the last ones) so that the whole run, start-up included, ends in time.

Doors: `gradio` (gradio_client on `/chat`, the endpoint the browser UI drives), `gradio-noverify` (the same with
`Client(url, ssl_verify=False)`, as the README advises for a plain http:// URL), `gradio-raw` (the same `/chat` event
over gradio's queue protocol with plain httpx, as the browser's page speaks it: `POST /queue/join`, then the event
stream of `/queue/data`, one keep-alive connection per chat; gradio_client instead opens new connections, each with a
new TLS context of ~30 ms of CPU, for the join, the stream and the heartbeat of every request) and `openai` (`POST
/v1/chat/completions` over httpx, streamed with `stream_options.include_usage`, `ignore_eos: true`, images as data:
URIs; a 429 is a busy refusal; the key from $QWEN3VL_API_KEY if the app wants one). A door is a class with `name`
and `connect() -> Chat`; a Chat has `new_conversation()`, `stream(text, image, new_tokens, temperature, timeout)`
that yields the answer's text so far and raises `Refused` for an answer that is a refusal, and `usage` (the
answer's token count if the door reports one, else None). Register a new one in DOORS.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import mimetypes
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.common import WARNING, gpu_name, percentile, start_server, wait_until_serving, write_image

WAITING = "⏳ "
_WORDS = (
    "the quick brown fox jumps over a lazy dog while a red circle and a blue square sit on a white "
    "background and a green triangle moves from left to right in the video describe what you see count "
    "the objects read the text in the picture and tell me a short story about the colours numbers and shapes"
).split()
STATUSES = ("ok", "refused_busy", "refused_per_client", "refused", "error")


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds since the scenario started."""

    chat: int
    index: int
    status: str  # one of STATUSES: ok; refused as busy; refused by the per-client cap; another refusal; error
    submitted_s: float
    kind: str = "text"  # text, or image (the text and a picture)
    ttft_s: float | None = None
    duration_s: float | None = None  # send to last output
    decode_s: float | None = None  # first to last output
    prompt_tokens: int = 0  # the text's, before the chat template (and any image)
    tokens: int = 0
    outputs: int = 0  # partial answers received
    detail: str = ""
    image: str = ""  # the picture's file name (image requests)
    stages: dict[str, float] = field(default_factory=dict)  # the protocol's milestones (first text, end), s


class Refused(Exception):
    """The app answered with a refusal; `status` says which kind (see STATUSES)."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def refusal_status(text: str) -> str:
    """The kind of refusal an answer that starts with ⚠️ is."""
    if "You already have" in text:
        return "refused_per_client"
    return "refused_busy" if "busy" in text else "refused"


class Chat(Protocol):
    usage: int | None

    def new_conversation(self) -> None: ...

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]: ...  # fmt: skip


class Door(Protocol):
    name: str

    def connect(self) -> Chat: ...


class GradioChat:
    """One gradio_client connection: a Client keeps its session's chat history until `reset_session`."""

    def __init__(self, client: Any, poll_s: float) -> None:
        self.client, self.poll_s = client, poll_s
        self.usage: int | None = None  # the gradio API returns text only

    def new_conversation(self) -> None:
        self.client.reset_session()

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]:  # fmt: skip
        from gradio_client import handle_file

        message = {"text": text, "files": [handle_file(image)] if image else []}
        started = time.monotonic()
        job = self.client.submit(message, api_name="/chat", max_new_tokens=new_tokens, temperature=temperature)
        seen, last = 0, ""
        # Not `for item in job`: a job refused at the queue (HTTP 503) never reports FINISHED, and that loop spins.
        while True:
            done = job.done()  # read before the outputs, so no output lands unseen after the last look
            outputs = job.outputs()
            for item in outputs[seen:]:
                if isinstance(item, str) and item and not item.startswith((WAITING, WARNING)):
                    last = item
                    yield item
            seen = len(outputs)
            if done:
                break
            if time.monotonic() - started > timeout:
                job.cancel()
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            time.sleep(self.poll_s)
        try:
            final = job.result(timeout=0)  # raises what the job raised (e.g. "Queue is full")
        except Exception as exc:
            if "Queue is full" in str(exc):
                raise Refused("refused_busy", f"{type(exc).__name__}: {exc}") from exc
            raise
        if isinstance(final, str) and final.startswith(WARNING):
            raise Refused(refusal_status(final), final)
        if isinstance(final, str) and final and final != last:
            yield final


class GradioDoor:
    """gradio_client on the `/chat` endpoint (the one the browser UI drives)."""

    name = "gradio"

    def __init__(self, url: str, poll_s: float) -> None:
        self.url, self.poll_s = url, poll_s

    def connect(self) -> GradioChat:
        from gradio_client import Client

        return GradioChat(Client(self.url, verbose=False), self.poll_s)


class GradioNoVerifyDoor(GradioDoor):
    """gradio_client as the README advises for a plain http:// URL: `Client(url, ssl_verify=False)`. The client
    builds new httpx clients for every request (the join, the event stream, a new session's heartbeat); with
    verification on, each loads the CA bundle (20-40 ms of CPU on the 2-core VM, bench/RESULTS.md "CPU, session
    14"), which an http:// URL never uses."""

    name = "gradio-noverify"

    def connect(self) -> GradioChat:
        from gradio_client import Client

        return GradioChat(Client(self.url, verbose=False, ssl_verify=False), self.poll_s)


_TEXT, _TOKENS, _TEMPERATURE = "\x00sentinel text\x00", 4321, 0.123  # values no default has, found in the captured body


def join_template(url: str) -> dict[str, Any]:
    """What gradio_client would POST to `/queue/join` for one `/chat` message, captured before it is sent (nothing
    reaches the server): the body, with `message_at`, `tokens_at` and `temperature_at` saying which inputs carry the
    message, max_new_tokens and temperature, and the `join`, `data` and `upload` URLs."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    captured: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def send_data(data: dict[str, Any], hash_data: dict[str, Any], protocol: str, request_headers: Any) -> str:
        captured.update(data, **hash_data)
        raise Captured

    client.send_data = send_data  # type: ignore[method-assign]
    message = {"text": _TEXT, "files": []}
    job = client.submit(message, api_name="/chat", max_new_tokens=_TOKENS, temperature=_TEMPERATURE)
    try:
        job.result(timeout=60)
    except Captured:
        pass
    finally:
        client.close()
    values = captured.get("data") or []
    where = {
        "message_at": [i for i, v in enumerate(values) if v == message],
        "tokens_at": [i for i, v in enumerate(values) if v == _TOKENS],
        "temperature_at": [i for i, v in enumerate(values) if v == _TEMPERATURE],
    }
    if any(len(found) != 1 for found in where.values()):
        raise RuntimeError(f"cannot find /chat's inputs in the body gradio_client builds: {where} in {captured}")
    body = {k: v for k, v in captured.items() if k != "session_hash"}
    urls = {"join": client.sse_data_url, "data": client.sse_url, "upload": client.upload_url}
    return {"body": body, **{k: found[0] for k, found in where.items()}, **urls}


def apply_text_diff(text: str | None, diff: Any) -> str | None:
    """A text output after one `process_generating` message: the full value, or gradio's diff of the earlier one
    (a list of [action, path, value]; for a text only `replace` and `append` at the root occur)."""
    if not isinstance(diff, list):
        return diff
    for action, path, value in diff:
        if path:
            raise ValueError(f"a diff inside a text output: {action} at {path}")
        if action == "replace":
            text = value
        elif action == "append":
            text = (text or "") + value
        else:
            raise ValueError(f"unknown diff action for a text output: {action!r}")
    return text


class GradioRawChat:
    """One keep-alive HTTP connection speaking gradio's queue protocol as the browser's page does, without
    gradio_client: POST `/queue/join` with the session's hash, then read `/queue/data` (server-sent events) to the
    event's end. A session keeps the chat history on the server, so a new conversation is a new session hash."""

    def __init__(self, http: Any, template: dict[str, Any]) -> None:
        self.http, self.template = http, template
        self.usage: int | None = None  # the gradio API returns text only
        self.stages: dict[str, float] = {}
        self.new_conversation()

    def new_conversation(self) -> None:
        self.session = uuid.uuid4().hex[:11]

    def close(self) -> None:
        self.http.close()

    def _upload(self, path: str) -> dict[str, Any]:
        """The picture sent to `/upload` as the page does; the FileData the message then carries."""
        with open(path, "rb") as f:
            reply = self.http.post(self.template["upload"], files=[("files", (Path(path).name, f))])
        reply.raise_for_status()
        return {"path": reply.json()[0], "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]:  # fmt: skip
        t = self.template
        data = list(t["body"]["data"])
        data[t["message_at"]] = {"text": text, "files": [self._upload(image)] if image else []}
        data[t["tokens_at"]], data[t["temperature_at"]] = new_tokens, temperature
        started = time.monotonic()
        self.stages = stages = {}
        reply = self.http.post(t["join"], json={**t["body"], "data": data, "session_hash": self.session})
        stages["joined"] = time.monotonic() - started  # gradio queued the event
        if reply.status_code != 200:
            detail = f"HTTP {reply.status_code}: {reply.text[:300]}"
            if reply.status_code == 503 and "Queue is full" in reply.text:
                raise Refused("refused_busy", detail)
            raise RuntimeError(detail)
        event_id = reply.json()["event_id"]
        answer: str | None = None
        last = ""
        with self.http.stream("GET", t["data"], params={"session_hash": self.session}) as events:
            stages["stream_open"] = time.monotonic() - started  # /queue/data's headers: the stream's route ran
            if events.status_code != 200:
                raise RuntimeError(f"HTTP {events.status_code} from /queue/data: {events.read()[:300]!r}")
            completed = False
            lines = events.iter_lines()  # one iterator: read on past the event's end below
            for line in lines:
                if not line.startswith("data:"):
                    continue
                stages.setdefault("first_message", time.monotonic() - started)  # gradio's `estimation`, queued at the join
                if time.monotonic() - started > timeout:  # heartbeats arrive every 15 s even while nothing else does
                    raise TimeoutError(f"no full answer within {timeout:.0f} s")
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                if kind == "close_stream":
                    break
                if msg.get("event_id") not in (None, event_id):
                    continue
                if kind == "unexpected_error":
                    raise RuntimeError(f"unexpected_error: {msg.get('message')}")
                if kind == "process_starts":  # a worker took the event: the handler runs from here
                    stages.setdefault("started", time.monotonic() - started)
                if kind == "process_generating":
                    stages.setdefault("first_update", time.monotonic() - started)  # maybe a ⏳ status
                    stages["last_update"] = time.monotonic() - started
                    answer = apply_text_diff(answer, msg["output"]["data"][0])
                elif kind == "process_completed":
                    # The stream's end as the client learns it, after its last text (the handler's end, gradio's).
                    stages["end_gap"] = time.monotonic() - started - stages.get("last_update", 0.0)
                    if not msg.get("success", True):
                        raise RuntimeError(f"the event failed: {msg['output'].get('error')}")
                    answer = msg["output"]["data"][0]
                else:
                    continue
                if isinstance(answer, str) and answer and answer != last and not answer.startswith((WAITING, WARNING)):
                    last = answer
                    yield answer
                if kind == "process_completed":
                    # The stream's own end (`close_stream`, sent right after) is read too, as the page's client reads
                    # it: a response left unread closes its connection, and the chat's next join would open another.
                    completed = True
                    break
            if completed:
                for _ in lines:  # close_stream, then the response's end: the server returns right after it
                    pass
        if isinstance(answer, str) and answer.startswith(WARNING):
            raise Refused(refusal_status(answer), answer)


class GradioRawDoor:
    """The `/chat` event over gradio's queue protocol with plain httpx (`gradio-raw`): what the browser's page
    sends, one keep-alive connection per chat, without gradio_client's per-request connections (a new httpx client,
    so a new TLS context of ~30 ms, for the join, the event stream and the heartbeat of every request). The body is
    the one gradio_client builds for `/chat` (captured once, never sent); no heartbeat stream is held, so the server
    keeps a session's state until its own expiry."""

    name = "gradio-raw"

    def __init__(self, url: str, poll_s: float) -> None:
        self.url = url
        self.template: dict[str, Any] | None = None

    def connect(self) -> GradioRawChat:
        import httpx

        if self.template is None:
            self.template = join_template(self.url)
        http = httpx.Client(
            trust_env=False, timeout=httpx.Timeout(600.0, connect=30.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )  # fmt: skip
        return GradioRawChat(http, self.template)


@functools.lru_cache(maxsize=512)
def data_uri(path: str) -> str:
    """The file as a base64 data: URI (cached: the pool's pictures are encoded before the clock starts)."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


class OpenAIChat:
    """One keep-alive connection to `/v1/chat/completions`, streamed; the conversation is kept here (the API is
    stateless), so --turns > 1 sends the earlier turns back as messages."""

    def __init__(self, client: Any, model: str) -> None:
        self.client, self.model = client, model
        self.usage: int | None = None
        self.messages: list[dict[str, Any]] = []
        self.stages: dict[str, float] = {}

    def new_conversation(self) -> None:
        self.messages = []

    def close(self) -> None:
        self.client.close()

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]:  # fmt: skip
        self.usage = None
        content: Any = text
        if image:
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_uri(image)}}]
        user = {"role": "user", "content": content}
        body = {
            "model": self.model, "messages": [*self.messages, user], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": new_tokens, "temperature": temperature,
            "ignore_eos": True,  # every answer exactly `new_tokens` long, as with vLLM's benchmarks
        }  # fmt: skip
        started = time.monotonic()
        self.stages = stages = {}
        answer = ""
        with self.client.stream("POST", "v1/chat/completions", json=body) as response:
            stages["headers"] = time.monotonic() - started  # the app answers once the first text is ready
            if response.status_code != 200:
                detail = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}"
                if response.status_code == 429:
                    raise Refused("refused_busy" if "queue_full" in detail else "refused_per_client", detail)
                if response.status_code == 503:
                    raise Refused("refused", detail)
                raise RuntimeError(detail)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    stages["end_gap"] = time.monotonic() - started - stages.get("last_text", 0.0)
                    break
                event = json.loads(data)
                if "error" in event:  # failed after the answer began
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("usage"):
                    self.usage = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        answer += piece
                        stages["last_text"] = time.monotonic() - started
                        yield answer
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"no full answer within {timeout:.0f} s")
        self.messages += [user, {"role": "assistant", "content": answer}]


class OpenAIDoor:
    """The OpenAI-compatible API: one httpx client (one connection) per chat; the model name from /v1/models."""

    name = "openai"

    def __init__(self, url: str, poll_s: float) -> None:
        self.url = url
        key = os.environ.get("QWEN3VL_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model: str | None = None

    def connect(self) -> OpenAIChat:
        import httpx

        client = httpx.Client(
            base_url=self.url, headers=self.headers, trust_env=False, timeout=httpx.Timeout(600.0, connect=30.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )  # fmt: skip
        if self.model is None:
            reply = client.get("v1/models")
            reply.raise_for_status()
            self.model = reply.json()["data"][0]["id"]
        return OpenAIChat(client, self.model)


DOORS: dict[str, Any] = {
    "gradio": GradioDoor, "gradio-noverify": GradioNoVerifyDoor, "gradio-raw": GradioRawDoor, "openai": OpenAIDoor
}  # fmt: skip


def load_tokenizer(name: str) -> Any:
    """'tiny': the project's generated tokenizer (--demo, --random-weights); else a Hugging Face id or directory."""
    if name == "tiny":
        from qwen3vl_webui.weights.tiny_model import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class BackendTokenizer:
    """A fast tokenizer's own backend (the `tokenizers` library) with the two calls the chat loops make of it: what a
    client process needs, without importing transformers and torch (1.8 s here, 3-4 s per process on an H100 host,
    32 processes per 32-chat scenario)."""

    def __init__(self, serialized: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(serialized)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def client_tokenizer(tokenizer: Any, name: str) -> tuple[str, str]:
    """How a client process gets the tokenizer: its serialized backend when it has one ("backend"), else its name
    to load ("name")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return ("backend", backend.to_str()) if backend is not None else ("name", name)


def _tokenizer_from(spec: tuple[str, str]) -> Any:
    kind, value = spec
    return BackendTokenizer(value) if kind == "backend" else load_tokenizer(value)


def tokenizer_for(app_flags: list[str]) -> str:
    """The tokenizer of the checkpoint the app flags select."""
    if "--demo" in app_flags or any(f.startswith("--random-weights") for f in app_flags):
        return "tiny"
    if "--model" in app_flags:
        return app_flags[app_flags.index("--model") + 1]
    from qwen3vl_webui.config import DEFAULT_MODEL

    return os.environ.get("QWEN3VL_MODEL", DEFAULT_MODEL)


def make_prompt(tokenizer: Any, tokens: int, seed: int) -> tuple[str, int]:
    """A text of about `tokens` tokens (distinct per seed) and its token count."""
    rng = random.Random(seed)
    words = [f"Request {seed}:"]
    ids: list[int] = []
    while len(ids) < tokens:
        words += rng.choices(_WORDS, k=max(8, tokens // 2))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    text = tokenizer.decode(ids[:tokens]).strip()
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


def image_chats(chats: int, share: float) -> set[int]:
    """Which chats send an image: `share` of them (at least one if share > 0), spread evenly (0.25 of 32: 0, 4, ...)."""
    count = min(chats, max(1, round(chats * share))) if share > 0 else 0
    return {k * chats // count for k in range(count)}


def image_pool(folder: Path, count: int, picture: str | None = None) -> list[str]:
    """`count` distinct 1280x720 JPEGs (or the one `picture` given), made before any clock starts."""
    if picture:
        return [picture]
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write_image(folder / f"picture_{k}.jpg", seed=k)) for k in range(count)]


def shorten_client_polling(ms: float) -> None:
    """gradio_client sleeps 50 ms between looks at its message queue; cap that sleep at `ms` (this process only)."""
    import gradio_client.utils as client_utils

    class _Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            time.sleep(min(seconds, ms / 1000))

    client_utils.time = _Clock()  # type: ignore[assignment]


class _Tickets:
    """Hands out request numbers until `limit` were issued or `stop_at` passed (threads of one process)."""

    def __init__(self, limit: int, stop_at: float) -> None:
        self.limit, self.stop_at, self.issued = limit, stop_at, 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self.issued >= self.limit or time.monotonic() >= self.stop_at:
                return None
            self.issued += 1
            return self.issued - 1


class _SharedTickets:
    """The same across client processes (shared memory; time.monotonic is one clock for every process here)."""

    def __init__(self, ctx: Any, limit: int) -> None:
        self.limit = limit
        self.count = ctx.Value("q", 0)
        self.stop = ctx.Value("d", float("inf"))

    @property
    def issued(self) -> int:
        return int(self.count.value)

    def take(self) -> int | None:
        with self.count.get_lock():
            if self.count.value >= self.limit or time.monotonic() >= self.stop.value:
                return None
            self.count.value += 1
            return int(self.count.value) - 1


def one_request(chat: Chat, text: str, image: str | None, options: dict[str, Any], out: Outcome, t0: float,
                timeout: float) -> str:  # fmt: skip
    """Sends one message through `chat` and fills `out` with what the client saw; returns the answer. An answer whose
    door reports no count is left uncounted (`out.tokens` 0): count_answers counts it later, off the turnaround."""
    started = time.monotonic()
    out.submitted_s = started - t0
    first = last = None
    answer = ""
    try:
        for partial in chat.stream(text, image, options["max_new_tokens"], options["temperature"], timeout):
            answer = partial
            now = time.monotonic()
            first = first or now
            last = now
            out.outputs += 1
    except Refused as exc:
        out.status, out.detail = exc.status, str(exc)[:300]
        return ""
    except Exception as exc:
        out.status, out.detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        return ""
    if not answer:
        out.status, out.detail = "error", "empty answer"
        return ""
    out.status = "ok"
    out.stages = dict(getattr(chat, "stages", None) or {})
    if chat.usage is not None:
        out.tokens = chat.usage
    out.ttft_s = first - started if first else None
    out.duration_s = (last or time.monotonic()) - started
    out.decode_s = (last - first) if first and last else None
    return answer


def count_answers(tokenizer: Any, answers: list[tuple[Outcome, str]]) -> None:
    """The answers no door counted, re-tokenized after the chat's last request: counting between two requests would
    add the client's own CPU (and its threads' wait for the GIL) to every turnaround, time the app's slot sits idle
    in a closed loop (session 19: 16-49 ms per request through the gradio doors, 4 ms through `/v1`)."""
    for out, answer in answers:
        if out.status == "ok" and out.tokens == 0:
            out.tokens = count_tokens(tokenizer, answer)


@dataclass
class _Work:
    """What every chat loop of a scenario needs; crosses to the client processes."""

    url: str
    door: str
    poll_s: float
    prompt_tokens: int
    new_tokens: int
    temperature: float
    turns: int
    request_timeout: float
    seed: int
    first_wave: int  # requests whose prompts are made before the clock starts
    images: list[str]
    image_rank: dict[int, int]  # chat -> its rank among the chats that send an image
    picture_offset: int = 0  # pictures earlier scenarios used: this one starts after them


def _chat_threads(work: _Work, connections: dict[int, Chat], tokenizer: Any, tickets: Any, go: Any,
                  t0: Any) -> tuple[list[threading.Thread], list[Outcome]]:  # fmt: skip
    """One thread per connection, each waiting for `go`, then sending requests until `tickets` runs out; `t0()` is the
    scenario's start. Returns the threads (started) and the list their outcomes land in."""
    prompts = {k: make_prompt(tokenizer, work.prompt_tokens, work.seed * 100_003 + k) for k in range(work.first_wave)}
    options = {"max_new_tokens": work.new_tokens, "temperature": work.temperature}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    shown = max(len(work.image_rank), 1)

    def chat_loop(i: int) -> None:
        chat, done_turns, pictures = connections[i], 0, 0
        answers: list[tuple[Outcome, str]] = []
        go.wait()
        start = t0()
        while (k := tickets.take()) is not None:
            if done_turns == work.turns:
                chat.new_conversation()  # the server forgets this connection's history
                done_turns = 0
            text, length = prompts[k] if k in prompts else make_prompt(tokenizer, work.prompt_tokens, work.seed * 100_003 + k)  # fmt: skip
            image = None
            if i in work.image_rank and work.images:  # image chat r's m-th picture: r + m * (image chats), cycled
                image = work.images[(work.picture_offset + work.image_rank[i] + pictures * shown) % len(work.images)]
                pictures += 1
            out = Outcome(chat=i, index=k, status="error", submitted_s=0.0, kind="image" if image else "text",
                          prompt_tokens=length, image=Path(image).name if image else "")  # fmt: skip
            answers.append((out, one_request(chat, text, image, options, out, start, work.request_timeout)))
            done_turns += 1
        count_answers(tokenizer, answers)  # before the outcomes are seen: the thread's join comes after this
        with lock:
            outcomes.extend(out for out, _ in answers)

    threads = [threading.Thread(target=chat_loop, args=(i,), daemon=True) for i in connections]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _connect(work: _Work, chats: list[int]) -> dict[int, Chat]:
    entrance = DOORS[work.door](work.url, work.poll_s)
    if work.door == "openai":
        for image in work.images:
            data_uri(image)  # encoded before the clock starts
    return {i: entrance.connect() for i in chats}  # not timed: connecting is not a request


def _close(connections: dict[int, Chat]) -> None:
    for chat in connections.values():
        close = getattr(chat, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass


def _client_process(work: _Work, chats: list[int], tokenizer_spec: tuple[str, str], poll_ms: float,
                    tickets: _SharedTickets, ready: Any, go: Any, start: Any, results: Any) -> None:  # fmt: skip
    """A client process: its share of the chats on threads; sends back (pid, CPU seconds, outcomes)."""
    try:
        if work.door == "gradio" and poll_ms > 0:
            shorten_client_polling(poll_ms)
        tokenizer = _tokenizer_from(tokenizer_spec)
        connections = _connect(work, chats)
        threads, outcomes = _chat_threads(work, connections, tokenizer, tickets, go, lambda: start.value)
    except BaseException as exc:
        ready.abort()
        results.put((os.getpid(), 0.0, [], f"{type(exc).__name__}: {exc}"))
        return
    ready.wait()
    go.wait()
    cpu0 = time.process_time()
    for thread in threads:
        thread.join(work.request_timeout * 4 + 600)
    cpu = time.process_time() - cpu0
    _close(connections)
    results.put((os.getpid(), cpu, [asdict(o) for o in outcomes], None))


ENGINE_COMMAND = "qwen3vl_webui.engine.remote.worker"  # how the app starts its engine process (--engine batch)


def app_processes(server_pid: int | None) -> dict[str, Any]:
    """The app's processes: `frontend` (pid), `engine` (pid or None), `others` (pids of other children)."""
    import psutil

    found: dict[str, Any] = {"frontend": server_pid, "engine": None, "others": []}
    if not server_pid:
        return found
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if ENGINE_COMMAND in command and found["engine"] is None:
            found["engine"] = child.pid
        else:
            found["others"].append(child.pid)
    return found


class _CpuClock:
    """CPU seconds of this process, the app's process (the front end), its engine process and its other children."""

    def __init__(self, server_pid: int | None) -> None:
        import psutil

        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None
        self.start = self._read()

    def _read(self) -> dict[str, Any]:
        def spent(p: Any) -> float:
            t = p.cpu_times()
            return t.user + t.system

        read: dict[str, Any] = {"client": spent(self.me)}
        if self.server is not None:
            read["server"] = spent(self.server)
            read["children"] = {}
            read["engine"] = set()
            for child in self.server.children(recursive=True):
                try:
                    read["children"][child.pid] = spent(child)
                    if ENGINE_COMMAND in " ".join(child.cmdline()):
                        read["engine"].add(child.pid)
                except Exception:  # gone meanwhile
                    pass
        return read

    def shares(self, wall: float, client_cpu_s: float = 0.0) -> dict[str, Any]:
        """Cores busy over `wall` seconds (1.0 = one core); `client_cpu_s`: what client processes reported."""
        end, wall = self._read(), max(wall, 1e-9)
        out: dict[str, Any] = {"client": round((end["client"] - self.start["client"] + client_cpu_s) / wall, 2)}
        if "server" in end:
            before = self.start["children"]
            spent = {pid: t - before.get(pid, 0.0) for pid, t in end["children"].items()}
            engines = end["engine"] | self.start["engine"]
            out["server"] = round((end["server"] - self.start["server"]) / wall, 2)
            out["server_children"] = round(sum(spent.values()) / wall, 2)
            out["engine"] = round(sum(t for pid, t in spent.items() if pid in engines) / wall, 2) if engines else None
            out["other_children"] = round(sum(t for pid, t in spent.items() if pid not in engines) / wall, 2)
            out["engine_pids"] = sorted(end["engine"])
        return out


def find_py_spy() -> str | None:
    """py-spy on PATH, or in a `bin` beside an entry of sys.path (`pip install --target DIR` puts it in DIR/bin)."""
    found = shutil.which("py-spy")
    if found:
        return found
    for entry in sys.path:
        candidate = Path(entry or ".") / "bin" / "py-spy"
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                try:
                    candidate.chmod(0o755)
                except OSError:
                    continue
            return str(candidate)
    return None


class Profiler:
    """py-spy on the app's processes during one scenario: `record` (every busy thread, and the GIL holder only) of
    the front end and the engine process for `seconds`, `lead_s` after the scenario starts, and one `dump` of each
    midway. Non-blocking (py-spy reads the processes' memory without stopping them). Collapsed stacks are appended
    to `out` with `label/role[/gil];` in front of each stack."""

    def __init__(self, exe: str, server_pid: int, label: str, seconds: float, lead_s: float, rate: int, out: Path) -> None:  # fmt: skip
        self.exe, self.server_pid, self.label = exe, server_pid, label
        self.seconds, self.lead_s, self.rate, self.out = seconds, lead_s, rate, out
        self.result: dict[str, Any] = dict(label=label, seconds=seconds, lead_s=lead_s, rate_hz=rate, py_spy=exe)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="profiler", daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def _run(self) -> None:
        time.sleep(self.lead_s)
        processes = app_processes(self.server_pid)
        roles = {"frontend": processes["frontend"], "engine": processes["engine"]}
        roles = {role: pid for role, pid in roles.items() if pid}
        work = Path(tempfile.mkdtemp(prefix="qwen3vl-pyspy-"))
        records = []
        for role, pid in roles.items():
            for gil in (False, True):
                path = work / f"{role}{'_gil' if gil else ''}.txt"
                command = [self.exe, "record", "--pid", str(pid), "--duration", str(round(self.seconds)), "--rate",
                           str(self.rate), "--nonblocking", "--threads", "--format", "raw", "--output", str(path)]  # fmt: skip
                if gil:
                    command.append("--gil")
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                records.append((role, pid, gil, path, proc))
        time.sleep(self.seconds / 2)
        dumps = {}
        for role, pid in roles.items():
            try:
                done = subprocess.run([self.exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                                      text=True, timeout=30)  # fmt: skip
                dumps[role] = (done.stdout + done.stderr)[-20_000:]
            except (OSError, subprocess.TimeoutExpired) as exc:
                dumps[role] = f"{type(exc).__name__}: {exc}"
        report: dict[str, Any] = {}
        for role, pid, gil, path, proc in records:
            try:
                output, _ = proc.communicate(timeout=self.seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            key = role + ("_gil" if gil else "")
            stacks = path.read_text(errors="replace").splitlines() if path.exists() else []
            entry: dict[str, Any] = dict(pid=pid, exit_code=proc.returncode, output=(output or "")[-600:].strip())
            entry.update(summarize_stacks(stacks))
            report[key] = entry
            if stacks:
                prefix = f"{self.label}/{role}{'/gil' if gil else ''};"
                with open(self.out, "a") as sink:
                    sink.writelines(prefix + line + "\n" for line in stacks if line.strip())
        for role in roles:
            report.setdefault(role, {})["dump"] = dumps.get(role, "")
        self.result.update(processes=processes, profiles=report, file=str(self.out))
        shutil.rmtree(work, ignore_errors=True)


_LINE = re.compile(r":\d+\)$")


def summarize_stacks(lines: list[str], top: int = 25) -> dict[str, Any]:
    """From py-spy's collapsed stacks (`thread (tid): name;frame;...;frame count`, frames `func (file:line)`): samples,
    samples per thread, and the functions (lines merged) with the most samples on top of the stack (self) and
    anywhere in it (total), each with its share of the samples."""
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            thread, frames = frames[0], frames[1:]
            threads[thread] = threads.get(thread, 0) + n
        frames = [_LINE.sub(")", f) for f in frames]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n

    def ranked(counts: dict[str, int], k: int) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
        return [[name, n, round(n / samples, 3)] for name, n in best]

    return dict(samples=samples, threads=ranked(threads, 12), self=ranked(own, top), total=ranked(total, top)) if samples else dict(samples=0)  # fmt: skip


def run_scenario(
    url: str,
    chats: int,
    tokenizer: Any,
    *,
    requests: int,
    seconds: float,
    prompt_tokens: int,
    new_tokens: int,
    door: str = "gradio",
    image_share: float = 0.0,
    images: list[str] | None = None,
    temperature: float = 0.7,
    turns: int = 1,
    request_timeout: float = 600.0,
    seed: int = 0,
    server_pid: int | None = None,
    poll_s: float = 0.005,
    processes: int = 1,
    tokenizer_name: str | None = None,
    profiler: Profiler | None = None,
    picture_offset: int = 0,
    server_metrics: bool = False,
) -> dict[str, Any]:
    """`chats` chats through `door` against `url`, bounded by `requests` and `seconds`: on threads of this process
    (`processes` 1), or spread over `processes` client processes (which load `tokenizer_name` themselves).
    `server_metrics`: the app's own figures over the scenario too (GET /metrics before and after: `server`)."""
    with_image = image_chats(chats, image_share) if images else set()
    work = _Work(
        url=url, door=door, poll_s=poll_s, prompt_tokens=prompt_tokens, new_tokens=new_tokens, temperature=temperature,
        turns=turns, request_timeout=request_timeout, seed=seed, first_wave=min(requests, chats), images=list(images or []),
        image_rank={c: r for r, c in enumerate(sorted(with_image))}, picture_offset=picture_offset,
    )  # fmt: skip
    processes = max(1, min(processes, chats))
    client_cpu = 0.0
    if processes == 1:
        connections = _connect(work, list(range(chats)))
        go, t0 = threading.Event(), [0.0]
        tickets = _Tickets(requests, float("inf"))
        threads, outcomes = _chat_threads(work, connections, tokenizer, tickets, go, lambda: t0[0])
        before = _scrape(url) if server_metrics else None
        cpu = _CpuClock(server_pid)
        t0[0] = time.monotonic()
        tickets.stop_at = t0[0] + seconds
        go.set()
        if profiler:
            profiler.start()
        for thread in threads:
            thread.join(seconds + request_timeout + 30)
        wall = time.monotonic() - t0[0]
        _close(connections)
        issued = tickets.issued
    else:
        if not tokenizer_name:
            raise ValueError("client processes need tokenizer_name")
        tokenizer_spec = client_tokenizer(tokenizer, tokenizer_name)
        ctx = multiprocessing.get_context("spawn")
        shared = _SharedTickets(ctx, requests)
        ready, go, start, results = ctx.Barrier(processes + 1), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
        poll_ms = poll_s * 1000
        workers = [
            ctx.Process(target=_client_process, args=(work, list(range(p, chats, processes)), tokenizer_spec, poll_ms,
                                                      shared, ready, go, start, results), daemon=True)
            for p in range(processes)
        ]  # fmt: skip
        for worker in workers:
            worker.start()
        try:
            ready.wait(timeout=300)
        except threading.BrokenBarrierError:
            failures = [results.get(timeout=5)[3] for _ in range(results.qsize())] if results.qsize() else []
            for worker in workers:
                worker.kill()
            raise RuntimeError(f"a client process failed to start: {failures or 'timed out'}") from None
        before = _scrape(url) if server_metrics else None
        cpu = _CpuClock(server_pid)
        t0_now = time.monotonic()
        start.value = t0_now
        shared.stop.value = t0_now + seconds
        go.set()
        if profiler:
            profiler.start()
        outcomes, failures, spents = [], [], []
        for _ in workers:
            _pid, spent, rows, failure = results.get(timeout=seconds + request_timeout * 4 + 660)
            spents.append(spent)
            outcomes += [Outcome(**row) for row in rows]
            if failure:
                failures.append(failure)
        wall = time.monotonic() - t0_now
        for worker in workers:
            worker.join(30)
        if failures:
            raise RuntimeError(f"client processes failed: {failures}")
        issued = shared.issued
        client_cpu = sum(spents)
    result = summarize(outcomes, chats, wall, prompt_tokens, new_tokens, issued, cpu.shares(wall, client_cpu))
    if server_metrics:
        result["server"] = server_figures(before, _scrape(url), wall)
    if processes > 1:
        result["cpu_cores_busy"]["client_process_max"] = round(max(spents, default=0.0) / max(wall, 1e-9), 2)
    image_requests = [o.image for o in outcomes if o.kind == "image"]
    result.update(door=door, image_chats=len(with_image), client_processes=processes, profiled=profiler is not None,
                  image_requests=len(image_requests), images_distinct=len(set(image_requests)))  # fmt: skip
    if with_image:
        result["by_kind"] = {
            kind: {k: v for k, v in summarize([o for o in outcomes if o.kind == kind], chats, wall, prompt_tokens,
                                              new_tokens).items() if k not in ("requests", "cpu_cores_busy")}
            for kind in ("text", "image")
        }  # fmt: skip
    if profiler:
        result["profile"] = profiler.finish()
    return result


def _scrape(url: str) -> Any:
    """The app's /metrics samples (bench.metrics_scrape), or the error's text: a scenario never fails on it."""
    from bench.metrics_scrape import scrape

    try:
        return scrape(url, os.environ.get("QWEN3VL_API_KEY"))[1]
    except Exception as exc:  # noqa: BLE001 - reported in the result
        return f"{type(exc).__name__}: {exc}"[:200]


def server_figures(before: Any, after: Any, wall: float) -> dict[str, Any]:
    """What the app measured over a scenario: its TTFT (the service's arrival to the first token), the wait for a GPU
    slot (the prompt's building included), the engine's steps, and the door's own times from the HTTP request's
    arrival (`door_start`: to the handler's start; `door_first_text`: to the first text handed to the door); set
    beside the client's TTFT, the rest is the network and the client's."""
    from bench.metrics_scrape import summarize as from_metrics

    for samples in (before, after):
        if isinstance(samples, str):
            return {"error": samples}
    from bench.metrics_scrape import quantile

    full = from_metrics(before, after, wall, [], None)
    for key, name in (("door_start", "qwen3vl:frontdoor_handler_start_seconds"),
                      ("door_first_text", "qwen3vl:frontdoor_first_text_seconds")):  # fmt: skip
        for q in (0.5, 0.9):  # one door runs a scenario: the sum over the door label is that door's
            value = quantile(before, after, name, q)
            full[f"{key}_p{int(q * 100)}_s"] = None if value is None else round(value, 4)
    for q in (0.5, 0.9, 0.99):  # how late the front end's event loop ran its timers over the scenario
        value = quantile(before, after, "qwen3vl:frontend_event_loop_lag_seconds", q)
        full[f"loop_lag_p{int(q * 100)}_s"] = None if value is None else round(value, 4)
    keep = ("output_tokens_per_s", "requests", "engine", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "queue_p50_s",
            "queue_p90_s", "itl_p50_s", "e2e_p50_s", "door_start_p50_s", "door_start_p90_s", "door_first_text_p50_s",
            "door_first_text_p90_s", "loop_lag_p50_s", "loop_lag_p90_s", "loop_lag_p99_s")  # fmt: skip
    return {k: full[k] for k in keep if k in full}


def summarize(
    outcomes: list[Outcome],
    chats: int,
    wall: float,
    prompt_tokens: int,
    new_tokens: int,
    issued: int | None = None,
    cpu: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The scenario's figures; `issued` (requests handed out) minus outcomes = requests that never finished."""
    ok = [o for o in outcomes if o.status == "ok"]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    rates = [(o.tokens - 1) / o.decode_s for o in ok if o.decode_s and o.tokens > 1]
    end_to_end = [o.tokens / o.duration_s for o in ok if o.duration_s]
    tokens = sum(o.tokens for o in ok)
    span = max((o.submitted_s + (o.duration_s or 0) for o in ok), default=wall)
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}

    def pct(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
        return {f"p{q}": _round(percentile(values, q)) for q in qs}

    names = sorted({name for o in ok for name in o.stages})
    stages = {name: pct([o.stages[name] for o in ok if name in o.stages], (50, 95)) for name in names}
    gaps = client_gaps(outcomes)
    return {
        "chats": chats,
        "issued": len(outcomes) if issued is None else issued,
        **counts,
        "unfinished": 0 if issued is None else issued - len(outcomes),
        "wall_s": round(wall, 2),
        "prompt_tokens_target": prompt_tokens,
        "prompt_tokens_mean": _round(sum(o.prompt_tokens for o in outcomes) / len(outcomes) if outcomes else None),
        "new_tokens_asked": new_tokens,
        "answer_tokens": tokens,
        "answer_tokens_mean": _round(tokens / len(ok) if ok else None),
        "short_answers": sum(o.tokens < new_tokens for o in ok),  # ended before the tokens asked (eos, stop)
        "ttft_s": {
            **pct(ttft, (50, 95, 99)),
            "min": _round(min(ttft, default=None)),
            "max": _round(max(ttft, default=None)),
        },
        # Where the client's wait for its first text went, door by door (GradioRawChat, OpenAIChat: `stages`).
        **({"stages_s": stages} if stages else {}),
        # The client's own turnaround: a chat's answer received to its next request sent (the slot idles meanwhile).
        "client_gap_s": pct(gaps, (50, 95)),
        "chat_tok_s": pct(rates, (5, 50, 95)),
        "chat_end_to_end_tok_s": pct(end_to_end, (5, 50, 95)),
        "total_tok_s": _round(tokens / span if span > 0 else None),
        "cpu_cores_busy": cpu or {},
        "errors": sorted({o.detail for o in outcomes if o.status not in ("ok", "refused_busy")})[:10],
        "requests": [asdict(o) for o in sorted(outcomes, key=lambda o: o.index)],
    }


def client_gaps(outcomes: list[Outcome]) -> list[float]:
    """Per chat, the seconds from each answered request's end (its last output) to the chat's next send."""
    by_chat: dict[int, list[Outcome]] = {}
    for o in outcomes:
        by_chat.setdefault(o.chat, []).append(o)
    gaps = []
    for chat in by_chat.values():
        chat.sort(key=lambda o: o.submitted_s)
        gaps += [b.submitted_s - a.submitted_s - a.duration_s for a, b in zip(chat, chat[1:]) if a.duration_s is not None]
    return gaps


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def first_answer(url: str, timeout: float, server: subprocess.Popen | None, log_path: Path | None) -> float:
    """Sends a short chat until one is answered (model loaded, compiled, warmed up); returns the seconds it took."""
    from gradio_client import Client

    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode}; see {log_path}")
        try:
            reply = Client(url, verbose=False).predict(
                {"text": "Hello.", "files": []}, max_new_tokens=16, api_name="/chat"
            )
            if isinstance(reply, str) and reply and not reply.startswith(WARNING):
                return time.monotonic() - started
            last = str(reply)
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(2)
    raise RuntimeError(f"no answer within {timeout:.0f} s (last: {last[:200]}); see {log_path}")


def wait_full_speed(url: str, timeout: float, launched: float) -> float | None:
    """Seconds from `launched` until GET /ready says decode runs at full compiled speed; None if it did not within
    `timeout` or the app has no /ready (an older one)."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            reply = httpx.get(url + "ready", timeout=5, trust_env=False)
            if reply.status_code == 404:
                return None
            if reply.json().get("full_speed"):
                return round(time.monotonic() - launched, 1)
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return None


def _server_lines(log_path: Path) -> list[str]:
    """The start-up lines worth keeping: what loaded, how long the decoder and warm-up took."""
    keep = re.compile(r"Ready:|warm-up|Benchmarking only|Starting the decoder|compil|batch engine|engine:|error", re.I)
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return [line[:300] for line in lines if keep.search(line)][:40]


def print_table(report: dict[str, Any]) -> None:
    print(f"{'door':>10} {'chats':>5} {'img':>3} {'ok':>5} {'busy':>4} {'err':>4} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
          f"{'chat tok/s p5':>13} {'p50':>6} {'p95':>6} {'total tok/s':>11} {'cores fe+eng+oth/cli':>20}")  # fmt: skip
    for s in report.get("scenarios", []):
        t, r, cpu = s["ttft_s"], s["chat_tok_s"], s["cpu_cores_busy"]
        bad = s["error"] + s["refused"] + s["refused_per_client"]
        cores = f"{cpu.get('server', '-')}+{cpu.get('engine', '-')}+{cpu.get('other_children', '-')}/{cpu.get('client', '-')}"
        print(f"{s['door']:>10} {s['chats']:>5} {s['image_chats']:>3} {s['ok']:>5} {s['refused_busy']:>4} {bad:>4} "
              f"{_f(t['p50'], 3):>9} {_f(t['p95'], 3):>7} {_f(t['p99'], 3):>7} {_f(r['p5'], 1):>13} "
              f"{_f(r['p50'], 1):>6} {_f(r['p95'], 1):>6} {_f(s['total_tok_s'], 0):>11} {cores:>20}"
              + ("  (py-spy)" if s.get("profiled") else ""))  # fmt: skip
        for kind, k in s.get("by_kind", {}).items():
            print(f"{'':>10} {kind:>9} {k['ok']:>5} TTFT p50 {_f(k['ttft_s']['p50'], 3)} p95 {_f(k['ttft_s']['p95'], 3)}"
                  f" chat tok/s p50 {_f(k['chat_tok_s']['p50'], 1)}")  # fmt: skip
    for s in report.get("skipped", []):
        print(f"skipped: {s}")


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


SHUTDOWN_RESERVE_S = 20.0  # SIGTERM to exit (drain, the engine process stopped), kept out of --budget-s


@dataclass
class Scenario:
    chats: int
    door: str
    share: float = 0.0  # of chats that send an image
    profile: bool = False

    @property
    def label(self) -> str:
        return f"{self.door}-{self.chats}" + ("-mixed" if self.share else "") + ("-profiled" if self.profile else "")


def scenarios_of(args: argparse.Namespace) -> list[Scenario]:
    """In order, which is also the order of priority when --budget-s drops scenarios (the last go first)."""
    plain = [Scenario(n, door) for n in args.chats for door in args.doors]
    mixed = [Scenario(n, door, args.image_share) for n in args.mixed for door in args.doors]
    profiled = [Scenario(n, door, profile=True) for n in args.profile for door in args.doors]
    return plain + mixed + profiled


def fit_seconds(args: argparse.Namespace, left: float, todo: list[Scenario]) -> tuple[float, int]:
    """(seconds of traffic for the next scenario, how many of `todo` still fit) within `left` seconds: each scenario
    costs its traffic + --scenario-overhead-s (connecting, the last answers, spawning client processes); the traffic
    shrinks toward --min-seconds first (a profiled one keeps its profile's length), then the last ones are dropped."""

    def least(s: Scenario) -> float:
        floor = min(args.min_seconds, args.seconds)
        return max(floor, args.profile_lead_s + args.profile_seconds + 2) if s.profile else floor

    count = len(todo)
    while count and sum(least(s) + args.scenario_overhead_s for s in todo[:count]) > left:
        count -= 1
    if not count:
        return 0.0, 0
    spare = left - sum(least(s) + args.scenario_overhead_s for s in todo[:count])
    share = min(args.seconds, least(todo[0]) + spare / count)
    return max(share, least(todo[0])), count


def run(args: argparse.Namespace, app_flags: list[str]) -> dict[str, Any]:
    if args.client_poll_ms > 0:
        shorten_client_polling(args.client_poll_ms)
    poll_s = (args.client_poll_ms or 50) / 1000
    tokenizer_name = args.tokenizer if args.tokenizer != "auto" else tokenizer_for(app_flags)
    tokenizer = load_tokenizer(tokenizer_name)
    launched = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qwen3vl-load-"))
    work.mkdir(parents=True, exist_ok=True)
    images: list[str] | None = None
    server = log_path = None
    py_spy = find_py_spy() if args.profile else None
    report: dict[str, Any] = {
        "url": args.url, "app_flags": app_flags, "doors": args.doors, "tokenizer": tokenizer_name,
        "token_count": "the door's count if it reports one (openai: usage.completion_tokens), else the final answer "
        "text re-tokenized with the tokenizer above", "client_poll_ms": args.client_poll_ms,
        "chats_per_process": args.chats_per_process, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "mixed": args.mixed, "image_share": args.image_share, "image": args.image or (
            f"{args.image_pool} generated 1280x720 JPEGs" if args.mixed else None),
        "temperature": args.temperature, "turns": args.turns, "seconds": args.seconds, "requests": args.requests,
        "budget_s": args.budget_s, "profile": args.profile, "py_spy": py_spy,
        "per_client_cap": "not applied: the app listens on 127.0.0.1 (operator exemption)" if not args.url else "as the app at --url says",  # fmt: skip
        "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "skipped": [],
    }  # fmt: skip
    if args.profile_out:
        Path(args.profile_out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        if args.json:  # after each scenario: a run cut short still leaves what it measured
            Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    try:
        url = args.url
        startup_timeout = args.startup_timeout
        if args.budget_s:  # a start-up that eats the budget fails here, not at the caller's timeout
            startup_timeout = min(startup_timeout, max(30.0, args.budget_s - SHUTDOWN_RESERVE_S))
        if not url:
            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
            server, url, log_path = start_server(app_flags, work)
        if args.mixed:  # made while the app starts (its compile takes minutes on a GPU)
            images = image_pool(work / "pictures", args.image_pool, args.image)
        if server is not None:
            wait_until_serving(url, server, log_path, startup_timeout)
        report["page_up_s"] = round(time.monotonic() - launched, 1)
        left = startup_timeout - (time.monotonic() - launched)
        report["first_answer_s"] = round(first_answer(url, max(left, 10.0), server, log_path), 1)
        # The app answers from eager decode graphs and swaps the compiled ones in as they are built (issue 14): the
        # figures are the compiled engine's, so wait for /ready to say so.
        left = startup_timeout - (time.monotonic() - launched)
        report["full_speed_s"] = wait_full_speed(url, max(left, 10.0), launched)
        report["startup_s"] = round(time.monotonic() - launched, 1)
        report["app_processes"] = app_processes(server.pid if server else None)
        print(f"app answering after {report['startup_s']} s; processes {report['app_processes']}", flush=True)
        shared = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, temperature=args.temperature,
                      poll_s=poll_s, images=images, tokenizer_name=tokenizer_name)  # fmt: skip
        used = 0  # pictures sent so far: no scenario reuses another's (the engine would reuse its prefix)
        for door in args.doors:  # first use of the prompt's shapes (and of an image), not measured
            for k in range(args.warm_requests):
                share = 1.0 if images and k == args.warm_requests - 1 else 0.0
                warm = run_scenario(url, 1, tokenizer, requests=1, seconds=600, door=door, image_share=share,
                                    seed=999 + k, picture_offset=used, **shared)  # fmt: skip
                used += warm["image_requests"]
        report["warm_s"] = round(time.monotonic() - launched, 1)
        report["scenarios"] = []
        todo = scenarios_of(args)
        ordinal = 0  # each scenario's prompts differ from every other's (else a door would reuse the last one's KV)
        while todo:
            scenario, seconds = todo[0], args.seconds
            if args.budget_s:
                left = args.budget_s - (time.monotonic() - launched) - (SHUTDOWN_RESERVE_S if server else 0)
                seconds, fit = fit_seconds(args, left, todo)
                for dropped in todo[fit:]:
                    report["skipped"].append(f"{dropped.label}: over --budget-s ({left:.0f} s left)")
                todo = todo[:fit]
                if not todo:
                    break
            todo = todo[1:]
            profiler = None
            if scenario.profile:
                if not (py_spy and server and args.profile_out):
                    report["skipped"].append(f"{scenario.label}: needs py-spy ({py_spy}), the app started here and --profile-out")  # fmt: skip
                    continue
                layout = app_flags[app_flags.index("--engine") + 1] if "--engine" in app_flags[:-1] else "app"
                profiler = Profiler(py_spy, server.pid, f"{layout}/{scenario.label}", args.profile_seconds, args.profile_lead_s,
                                    args.profile_rate, Path(args.profile_out))  # fmt: skip
            n, share = scenario.chats, scenario.share
            result = run_scenario(
                url, n, tokenizer, requests=args.requests, seconds=seconds, door=scenario.door, image_share=share,
                turns=args.turns, request_timeout=args.request_timeout, seed=1 + ordinal,
                server_pid=server.pid if server else None, processes=math.ceil(n / args.chats_per_process),
                profiler=profiler, picture_offset=used, server_metrics=True, **shared,
            )  # fmt: skip
            used += result["image_requests"]
            ordinal += 1
            result["seconds"] = round(seconds, 1)
            report["scenarios"].append(result)
            brief = {k: v for k, v in result.items() if k not in ("requests", "errors", "by_kind", "profile")}
            print(json.dumps(brief), flush=True)
            save()
    finally:
        if server is not None:
            stopping = time.monotonic()
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    report["exit_code"] = server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    report["exit_code"] = server.wait()
            report["shutdown_s"] = round(time.monotonic() - stopping, 1)
            report["server_log"] = _server_lines(log_path) if log_path else []
        report["wall_s"] = round(time.monotonic() - launched, 1)
    return report


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the load test's options, the app's flags: what follows `--`)."""
    argv = sys.argv[1:] if argv is None else argv
    app_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Flags after -- go to app.py.")
    parser.add_argument("--url", help="an app already running (default: start `python app.py FLAGS` on loopback)")
    parser.add_argument("--doors", default="gradio", help=f"front doors, comma-separated: {', '.join(DOORS)}")
    parser.add_argument("--chats", default="4", help="concurrent chats; a comma list runs one scenario each (1,16,32)")
    parser.add_argument("--mixed", default="", help="chats of mixed scenarios (text and image chats), comma list")
    parser.add_argument("--profile", default="", help="chats of text scenarios profiled with py-spy, comma list")
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario at most (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop issuing after this long (default 60)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="the whole run (start-up, warm requests, scenarios, shut-down) within this many seconds: scenarios shorten, then the last ones are dropped (0: no budget)")  # fmt: skip
    parser.add_argument("--min-seconds", type=float, default=10.0, help="with --budget-s: traffic per scenario at least (default 10)")  # fmt: skip
    parser.add_argument("--scenario-overhead-s", type=float, default=10.0, help="with --budget-s: seconds a scenario takes beyond its traffic (default 10)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens of each prompt's text (default 512)")
    parser.add_argument("--new-tokens", type=int, default=256, help="max new tokens per answer (default 256)")
    parser.add_argument(
        "--image-share", type=float, default=0.25, help="in mixed scenarios: the share of chats that send an image"
    )
    parser.add_argument("--image", help="the picture image chats send (default: generated 1280x720 JPEGs)")
    parser.add_argument("--image-pool", type=int, default=64, help="distinct generated pictures (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--turns", type=int, default=1, help="requests per conversation before a new one (default 1)")
    parser.add_argument("--tokenizer", default="auto", help="tiny, a HF id or a directory (auto: from the app flags)")
    parser.add_argument("--warm-requests", type=int, default=2, help="unmeasured requests per door before the first scenario")  # fmt: skip
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the first answer")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="client-side limit per request")
    parser.add_argument("--client-poll-ms", type=float, default=5.0, help="gradio_client's queue poll (stock 50)")
    parser.add_argument("--chats-per-process", type=int, default=1, help="chats per client process (default 1: each chat in its own interpreter, as each user has one; a scenario of at most this many runs on threads of this process)")  # fmt: skip
    parser.add_argument("--profile-seconds", type=float, default=10.0, help="py-spy's recording per profiled scenario")
    parser.add_argument(
        "--profile-lead-s", type=float, default=3.0, help="seconds into a profiled scenario py-spy starts"
    )
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument(
        "--profile-out", help="collapsed stacks of every profile, appended (label/role[/gil]; in front)"
    )
    parser.add_argument("--workdir", help="server log, uploads and pictures (default: a temp dir)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(own)
    try:
        args.chats = [int(n) for n in str(args.chats).split(",") if n.strip()]
        args.mixed = [int(n) for n in str(args.mixed).split(",") if n.strip()]
        args.profile = [int(n) for n in str(args.profile).split(",") if n.strip()]
    except ValueError:
        parser.error(f"--chats, --mixed and --profile must be integers separated by commas, got {args.chats!r} "
                     f"{args.mixed!r} {args.profile!r}")  # fmt: skip
    args.doors = [d.strip() for d in args.doors.split(",") if d.strip()]
    if not args.doors or not set(args.doors) <= set(DOORS):
        parser.error(f"--doors must name doors among {', '.join(DOORS)}, got {','.join(args.doors)!r}")
    every = args.chats + args.mixed + args.profile
    if not every or not all(1 <= n <= 256 for n in every):
        parser.error("--chats, --mixed and --profile must be 1..256 each, at least one scenario")
    if not 1 <= args.requests <= 1_000_000:
        parser.error("--requests must be 1..1000000")
    if not 0 < args.seconds <= 24 * 3600 or args.prompt_tokens < 1 or not 16 <= args.new_tokens <= 32768:
        parser.error("--seconds must be 1..86400, --prompt-tokens >= 1 and --new-tokens 16..32768 (the slider's floor)")
    if not 0 < args.image_share <= 1 or args.image_pool < 1:
        parser.error("--image-share must be in (0, 1] and --image-pool >= 1")
    if args.budget_s < 0 or args.min_seconds <= 0 or args.scenario_overhead_s < 0 or args.chats_per_process < 1:
        parser.error("--budget-s >= 0, --min-seconds > 0, --scenario-overhead-s >= 0, --chats-per-process >= 1")
    if args.profile_seconds <= 0 or args.profile_lead_s < 0 or not 1 <= args.profile_rate <= 1000:
        parser.error("--profile-seconds > 0, --profile-lead-s >= 0, --profile-rate 1..1000")
    if args.url and app_flags:
        parser.error("give either --url or app flags after --, not both")
    return args, app_flags


def main(argv: list[str] | None = None) -> int:
    args, app_flags = parse_args(argv)
    report = run(args, app_flags)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_table(report)
    scenarios = report.get("scenarios", [])
    if not scenarios and report.get("skipped") and args.budget_s:
        return 3  # nothing fitted --budget-s
    failed = sum(s["error"] + s["refused_per_client"] + s["unfinished"] for s in scenarios)
    return 1 if failed or not scenarios or not all(s["ok"] for s in scenarios) else 0


if __name__ == "__main__":
    raise SystemExit(main())
