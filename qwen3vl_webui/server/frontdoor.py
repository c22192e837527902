"""The HTTP front door: our FastAPI app with gradio mounted in it, served by uvicorn; login rate limit, upload sweep.

gradio's own `launch()` owns its web server, so nothing can sit in front of its routes: its `auth` callable never
sees who is calling, so a password can be guessed as fast as the network allows. Mounting gradio in our own app
puts ASGI middleware in front of every route (and leaves room for our own routes on the same port).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen3vl_webui.service.metrics import ARRIVED

if TYPE_CHECKING:
    from qwen3vl_webui.config import Settings
    from qwen3vl_webui.server.uploads import UploadSweeper

log = logging.getLogger("qwen3vl_webui")

# Failed logins one client may make within the window; then 429 until the oldest of them leaves the window.
LOGIN_ATTEMPTS = 5
LOGIN_WINDOW_S = 60.0
# Clients remembered at once (oldest forgotten first): bounds the limiter's memory under address rotation.
LOGIN_CLIENTS = 10_000
# How long uvicorn waits for open connections (queue streams) once the server stops.
_GRACEFUL_S = 5
_START_TIMEOUT_S = 60.0
LAG_PROBE_S = 0.05  # the event loop's lag is read this often (/metrics: qwen3vl:frontend_event_loop_lag_seconds)


async def watch_loop_lag(report: Callable[[float], None], every: float = LAG_PROBE_S) -> None:
    """Reports, every `every` seconds, how late the running loop woke a timer: the time a callback ready now waits
    behind the loop's other work (and, with threads beside it, for the GIL). Runs until cancelled."""
    while True:  # time.monotonic, not loop.time: uvloop's is the pass's start time, to the millisecond
        due = time.monotonic() + every
        await asyncio.sleep(every)
        report(time.monotonic() - due)


class PortError(RuntimeError):
    """The address cannot be listened on; the message names the flag and the env var to change."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn (it listens on it); bound here so a busy port is one clear line, not a trace."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket says
    # TCP, and accepted sockets inherit the listener's proto. With Nagle on, each small SSE write after the first
    # waits for the client's delayed ACK (~40 ms on Linux): at 1 chat the gradio door's first token came ~35 ms late
    # (join to first message 48 -> 14 ms on CPU); at 32 chats on an H100 no change was measured (bench/RESULTS.md).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn does: no wait after a restart
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortError(
                f"port {port} on {host} is already in use: stop what listens there or pick another with "
                f"--port (or QWEN3VL_PORT)"
            ) from None
        raise PortError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host / --port "
            f"(or QWEN3VL_HOST / QWEN3VL_PORT)"
        ) from None
    sock.set_inheritable(False)
    return sock


def is_loopback(host: str) -> bool:
    bare = host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def open_warning(settings: Settings) -> str | None:
    """The one start-up line when the app is reachable beyond this machine without a login; else None."""
    if settings.credentials():
        return None
    where = f"{settings.host}:{settings.port}"
    if settings.share:
        where += " and a public gradio.live link"
    elif is_loopback(settings.host):
        return None
    return (
        f"warning: serving without a login on {where}: anyone who can reach it can chat and upload files; "
        "set QWEN3VL_AUTH=user:password or --auth-file PATH to require one"
    )


# ------------------------------------------------------------------------------- login limit


class LoginLimiter:
    """Failed logins per client in a sliding window. Attempts count when they start, so parallel guesses cannot
    slip past the limit while earlier ones are checked; a successful login clears that client's record."""

    def __init__(
        self,
        attempts: int = LOGIN_ATTEMPTS,
        window_s: float = LOGIN_WINDOW_S,
        max_clients: int = LOGIN_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self.refused = 0
        self._seen: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def begin(self, client: str) -> float:
        """Records an attempt and returns 0.0; over the limit, records nothing and returns the seconds to wait."""
        now = self.clock()
        with self._lock:
            times = self._seen.get(client)
            if times is None:
                times = self._seen[client] = collections.deque()
                while len(self._seen) > self.max_clients:
                    self._seen.popitem(last=False)
            self._seen.move_to_end(client)
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if len(times) >= self.attempts:
                self.refused += 1
                return times[0] + self.window_s - now
            times.append(now)
            return 0.0

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._seen.pop(client, None)


def client_key(scope: dict[str, Any]) -> str:
    """The caller's address; IPv6 by /64, the block one host usually holds."""
    host = (scope.get("client") or ("unknown", 0))[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 client
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _is_login(scope: dict[str, Any]) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/login")


class LoginRateLimit:
    """ASGI middleware: refuses a client's POST /login with 429 + Retry-After once it has failed too often."""

    def __init__(self, app: Any, limiter: LoginLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not _is_login(scope):
            return await self.app(scope, receive, send)
        client = client_key(scope)
        wait_s = self.limiter.begin(client)
        if wait_s > 0:
            return await _refuse(send, math.ceil(wait_s))
        status: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 200:  # gradio answers 200 and a cookie on success, 400 on a wrong password
            self.limiter.succeeded(client)


async def _refuse(send: Any, retry_after: int) -> None:
    body = b'{"detail": "Too many failed logins from your address; try again in ' + str(retry_after).encode() + b' s."}'
    await send({
        "type": "http.response.start", "status": 429,
        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(retry_after).encode()),
                    (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- event limit

# A client refused by the event limit waits this long for its 429: a loop of refused calls costs the server a
# sleeping coroutine per second and connection, not a request's worth of Python each time.
EVENT_TARPIT_S = 1.0
EVENT_BURST = 3.0  # the bucket holds this many seconds of the rate: a page load's burst of events fits


class EventLimiter:
    """A token bucket per client address over gradio's event routes (run, queue/join, call, upload).

    Every event the page uses can be called in a loop by anyone, by `fn_index`, hidden ones included; each costs
    the server its routing, validation and pre/post-processing in the one Python process that also serves every
    chat. A person's page makes a few events a second (the live panel's tick, a slider released, a message).
    """

    def __init__(self, rate: float, max_clients: int = LOGIN_CLIENTS, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = max(1.0, rate * EVENT_BURST)
        self.max_clients = max_clients
        self.clock = clock
        self.refused = 0
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if not allowed:
                self.refused += 1
            return allowed


def _is_event(scope: dict[str, Any]) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path = scope["path"].rstrip("/")
    return (
        path.endswith(("/queue/join", "/upload"))
        or "/run/" in path
        or "/call/" in path
        or "/api/" in path
        or path.startswith("/v1/")
    )


class EventRateLimit:
    """ASGI middleware: a client over its event rate waits EVENT_TARPIT_S, then gets 429 + Retry-After."""

    def __init__(self, app: Any, limiter: EventLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not _is_event(scope) or self.limiter.take(client_key(scope)):
            return await self.app(scope, receive, send)
        await asyncio.sleep(EVENT_TARPIT_S)
        body = b'{"detail": "Too many requests from your address; slow down."}'
        await send({
            "type": "http.response.start", "status": 429,
            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                        (b"content-length", str(len(body)).encode())],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------- unknown events

# gradio 6's routes that look an event up by the body's `fn_index` or the path's API name (gradio/routes.py): an
# unknown one is a KeyError inside gradio, answered HTTP 500 with a traceback in the log.
_EVENT_ROUTE = re.compile(r"/gradio_api/(?:(?P<join>queue/join)|(?P<kind>run|api|call/v2|call)/(?P<name>[^/]+))/?")
_LOGIN_CHECK = "/gradio_api/login_check"
# Bodies up to this size are checked. A longer one (a long chat's history) goes on unchecked: gradio reads it whole
# anyway, and holding megabytes twice to turn its 500 into a 404 is not worth it.
EVENT_CHECK_BYTES = 4 * 2**20


class UnknownEvents:
    """ASGI middleware: a call naming an event the app does not have (an unknown `fn_index` or API name) gets 404 and
    one sentence instead of gradio's 500. Behind a login only a logged-in caller is told (gradio's own `/login_check`
    decides): anyone else gets gradio's 401 as for any event, so the answer maps no events for a stranger."""

    def __init__(self, app: Any, gradio_app: Any, login: bool) -> None:
        from pydantic import TypeAdapter

        self.app = app
        self.gradio_app = gradio_app
        self.login = login
        self._fn_index = TypeAdapter(int | None)  # gradio's PredictBody.fn_index: what it accepts, it reads as we do

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = _EVENT_ROUTE.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        messages, body = await _read_body(receive, EVENT_CHECK_BYTES)
        problem = None if body is None else self._unknown(route, body)
        if problem is not None and (not self.login or await self._logged_in(scope)):
            return await _answer(send, 404, problem)
        pending = collections.deque(messages)

        async def replay() -> dict[str, Any]:  # what was read, then the rest of the connection
            return pending.popleft() if pending else await receive()

        await self.app(scope, replay, send)

    def _unknown(self, route: re.Match[str], body: bytes) -> str | None:
        """The sentence for an event this app does not have; None when it has it, or gradio refuses the body itself
        (not JSON, a field of the wrong type: 422; queue/join without fn_index: 400)."""
        from pydantic import ValidationError

        from qwen3vl_webui.ui import gradio_compat

        try:
            fields = json.loads(body)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        kind, name = route["kind"], route["name"]
        session = None if kind == "call/v2" else fields.get("session_hash")  # v2's body holds the event's arguments
        fn_index = None
        if kind not in ("call", "call/v2"):  # their bodies carry no fn_index: the name alone counts
            try:
                fn_index = self._fn_index.validate_python(fields.get("fn_index"))
            except ValidationError:
                return None
            if fn_index is None and route["join"]:
                return None
        if session is not None and not isinstance(session, str):
            return None
        public = kind == "call/v2"  # v2 finds only the API docs' events
        if gradio_compat.has_event(self.gradio_app, fn_index, name, session, default=True, public=public):
            return None
        if fn_index is not None:
            return f"This app has no event with fn_index {fn_index}."
        return f"This app has no API endpoint named {name!r}."

    async def _logged_in(self, scope: dict[str, Any]) -> bool:
        """Asks gradio's `/login_check` (what its page asks) with this request's cookies: 200 for a logged-in caller."""
        status: list[int] = []
        probe = {**scope, "method": "GET", "path": _LOGIN_CHECK, "raw_path": _LOGIN_CHECK.encode(), "query_string": b""}
        sent = False

        async def nothing() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def keep(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await self.app(probe, nothing, keep)
        return status == [200]


async def _read_body(receive: Any, cap: int) -> tuple[list[dict[str, Any]], bytes | None]:
    """The messages read and the whole body; None for the body once it passes `cap` or the client left."""
    messages: list[dict[str, Any]] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > cap:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


async def _answer(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class Arrival:
    """ASGI middleware, outermost: stamps each HTTP request's arrival into its scope's state, where a handler finds it
    through its request (`arrived_at`) to say how long the door took before and after it (service/metrics.DoorMetrics).
    gradio keeps the `/queue/join` request in the event, so the chat handler gets that request's stamp."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        await self.app(scope, receive, send)


class UploadNudge:
    """ASGI middleware: after each upload, asks the sweeper for a sweep (it runs at most once a second)."""

    def __init__(self, app: Any, sweeper: UploadSweeper) -> None:
        self.app = app
        self.sweeper = sweeper

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:  # an upload cut short may have left a partial file too
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload"):
                self.sweeper.nudge()


# ------------------------------------------------------------------------------- the server


class FrontDoor:
    """Our FastAPI app with the gradio Blocks mounted at /, served by uvicorn in a thread; `close` stops both."""

    def __init__(
        self,
        demo: Any,
        settings: Settings,
        session_capacity: int,
        css_paths: list,
        allowed: list,
        routers: tuple[Any, ...] = (),
        on_loop_lag: Callable[[float], None] | None = None,
    ) -> None:
        import fastapi
        import gradio as gr

        from qwen3vl_webui.server.uploads import UploadSweeper
        from qwen3vl_webui.ui import gradio_compat

        s = settings
        credentials = s.credentials()  # reads --auth-file once
        self.demo = demo
        self.settings = settings
        self.on_loop_lag = on_loop_lag
        demo.queue(max_size=s.queue_size, default_concurrency_limit=s.max_concurrency)
        # launch() takes this as an argument; mount_gradio_app reads it from the Blocks (gradio's StateHolder).
        gradio_compat.set_session_capacity(demo, session_capacity)
        # No docs or schema of our own: routes outside gradio's mount are not behind its login.
        self.http = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        for router in routers:  # before gradio's mount at /, which would take every path
            self.http.include_router(router)
        gr.mount_gradio_app(
            self.http, demo, path="/", server_name=s.host, server_port=s.port,
            auth=credentials or None,
            allowed_paths=allowed,
            max_file_size=s.max_file_mb * 1024 * 1024,
            css_paths=css_paths,
            # FastAPI's own schema of gradio's routes, outside gradio's login (gradio serves its API description
            # at /gradio_api/openapi.json, behind the login).
            app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None},
            # True would send str(exception) of any error escaping a handler to every client (gradio's
            # utils.error_payload); the chat's refusals are ordinary ⚠️ outputs and gr.Error still shows.
            show_error=False,
        )  # fmt: skip
        # Without this gradio accepts any server path a raw API call names, and the chat handler's own check is the
        # only guard left (tests/test_hostile.py case 9).
        gradio_compat.check_uploaded_paths(demo)
        self.gradio_app = gradio_compat.mounted_app(self.http)
        if os.environ.get("QWEN3VL_GRADIO_STOCK_SESSIONS") != "1":  # the benchmarks' A/B switch (bench/README.md)
            gradio_compat.lazy_session_configs(self.gradio_app)  # ~20 ms less of the event loop per new session
        if os.environ.get("QWEN3VL_GRADIO_INLINE") != "0":  # the benchmarks' A/B switch (process-wide once on)
            gradio_compat.inline_processing()  # the chat's 15 inputs converted on the loop, not in 15 threads
            gradio_compat.login_check_on_loop(self.gradio_app)  # and gradio's login check on every join
        self.sweeper = UploadSweeper(
            gradio_compat.upload_dir(self.gradio_app),
            s.upload_max_age_minutes * 60.0,
            s.upload_cache_mb * 1024 * 1024,
            keep=lambda: gradio_compat.kept_files(demo),  # the page's examples outlive any upload age
        )
        self.limiter = LoginLimiter()
        self.http.add_middleware(UnknownEvents, gradio_app=self.gradio_app, login=bool(credentials))
        self.http.add_middleware(UploadNudge, sweeper=self.sweeper)
        # Only this machine can reach a loopback-only app (its user is the operator): no limit there, so local
        # load tests and benchmarks measure the app, not the limiter.
        self.events = EventLimiter(s.event_rate_limit)
        if s.event_rate_limit and not s.local_only:
            self.http.add_middleware(EventRateLimit, limiter=self.events)
        if credentials:  # without a login, gradio's /login only redirects: nothing to guess
            self.http.add_middleware(LoginRateLimit, limiter=self.limiter)  # refused before anything runs
        self.http.add_middleware(Arrival)  # outermost: the door's own time counts from here
        self.server: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.share_url: str | None = None
        self._tunnels: list[Any] = []

    @property
    def upload_folder(self) -> str:
        from qwen3vl_webui.ui import gradio_compat

        return gradio_compat.upload_dir(self.gradio_app)

    def start(self, sock: socket.socket, quiet: bool = False) -> None:
        """Serves on `sock` from a thread; returns once the app (gradio's queue included) accepts requests."""
        import uvicorn

        trusted = self.settings.trusted_proxies
        config = uvicorn.Config(
            self.http, log_config=None, log_level="warning", access_log=False,
            timeout_graceful_shutdown=_GRACEFUL_S,
            # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: a local client could then pose as any
            # address to the login limit. Only the proxies named by --trusted-proxies are believed.
            proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
            # uvicorn's own defaults ("auto": uvloop and httptools where installed, else asyncio and h11); the
            # benchmarks' A/B of the event loop every chat update crosses: QWEN3VL_EVENT_LOOP, QWEN3VL_HTTP.
            loop=os.environ.get("QWEN3VL_EVENT_LOOP", "auto"), http=os.environ.get("QWEN3VL_HTTP", "auto"),
        )  # fmt: skip
        self.server = server = uvicorn.Server(config)  # not in the main thread: it installs no signal handlers
        switch_ms = os.environ.get("QWEN3VL_SWITCH_INTERVAL_MS")  # the benchmarks' A/B of the GIL's hand-over
        if switch_ms:
            sys.setswitchinterval(float(switch_ms) / 1000)

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()  # close() sets gradio's stop event on it
            if self.on_loop_lag is not None:
                probe = asyncio.create_task(watch_loop_lag(self.on_loop_lag))
            try:
                await server.serve(sockets=[sock])
            finally:
                if self.on_loop_lag is not None:
                    probe.cancel()

        def run() -> None:
            with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:  # what uvicorn.run does
                runner.run(serve())

        self._thread = threading.Thread(target=run, name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start (see the log above)")
            time.sleep(0.01)
        self.sweeper.start()
        url = f"http://{self.settings.host}:{self.settings.port}"
        if not quiet:
            print(f"* Running on local URL:  {url}", flush=True)
        if self.settings.share:
            self._open_share_link()

    @property
    def running(self) -> bool:
        server = self.server
        return server is not None and not server.should_exit and self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stops accepting connections, then ends the queue's streams and stops gradio's queue, then uvicorn finishes
        (lifespan shutdown included).

        In that order: a chat that reaches gradio's queue while the server closes is still run (and answered with
        the shutting-down message during a drain); a stopped queue would answer it HTTP 503, which gradio_client and
        the page show as "Queue is full".
        """
        from qwen3vl_webui.ui import gradio_compat

        if self.server is None:
            return
        self.server.should_exit = True  # uvicorn closes its listening socket on its next tick (0.1 s)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(s.is_serving() for s in list(getattr(self.server, "servers", []))):
            time.sleep(0.02)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:  # the heartbeat streams end on this event; it lives on uvicorn's loop
                loop.call_soon_threadsafe(gradio_compat.end_streams(self.gradio_app))
            except RuntimeError:  # the loop closed meanwhile
                pass
        gradio_compat.close_blocks(self.demo)
        if self._thread is not None:
            self._thread.join(timeout=_GRACEFUL_S + 10)
        self.sweeper.stop()
        for tunnel in self._tunnels:
            tunnel.kill()
        self.server = None

    def _open_share_link(self) -> None:
        from qwen3vl_webui.ui import gradio_compat

        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "[::]") else self.settings.host
        try:
            self.share_url, self._tunnels = gradio_compat.open_share_link(self.demo, host, self.settings.port)
        except Exception as exc:  # offline, blocked binary: the app still serves locally
            print(f"Could not create a share link: {exc}", flush=True)
            return
        print(f"* Running on public URL: {self.share_url}", flush=True)
