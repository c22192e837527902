"""Flags -> Settings, and the composition root: the only place objects are wired together."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_webui.config import (
    ATTENTION,
    DEFAULT_MODEL,
    PRECISIONS,
    RANDOM_WEIGHTS,
    WARMUP_MODES,
    Settings,
    SettingsError,
    env_default,
    env_name,
)
from qwen3vl_webui.config import rule_help as _rule

log = logging.getLogger("qwen3vl_webui")
SESSION_CAPACITY = 1000


def build_parser() -> argparse.ArgumentParser:
    d = Settings.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Qwen3-VL chat in the browser on one GPU. Every flag can also be set as an environment "
        "variable QWEN3VL_<NAME> (e.g. QWEN3VL_PRECISION=int4).",
    )

    def add(flag: str, name: str, help_text: str, **kw: Any) -> None:
        default = env_default(name, d[name].default)
        p.add_argument(
            flag, dest=name, default=default, help=f"{help_text} [env {env_name(name)}; default {default}]", **kw
        )

    add("--model", "model", f"Hugging Face id or local directory of a Qwen3-VL checkpoint (default {DEFAULT_MODEL})")
    add("--precision", "precision", _rule("precision"), choices=PRECISIONS)
    add("--device", "device", "auto, cpu, cuda or cuda:N")
    add("--attn", "attn", _rule("attn"), choices=ATTENTION)
    add("--engine", "engine", _rule("engine"), choices=("auto", "generate", "batch"))
    add("--max-concurrency", "max_concurrency", _rule("max_concurrency"), type=int, metavar="N")
    add("--queue-size", "queue_size", _rule("queue_size"), type=int, metavar="M")
    add("--max-context", "max_context", _rule("max_context"), type=int, metavar="TOKENS")
    add("--max-new-tokens", "max_new_tokens", _rule("max_new_tokens"), type=int, metavar="TOKENS")
    add("--max-files-per-turn", "max_files_per_turn", _rule("max_files_per_turn"), type=int, metavar="N")
    add("--max-file-mb", "max_file_mb", _rule("max_file_mb"), type=int, metavar="MB")
    add("--max-requests-per-client", "max_requests_per_client", _rule("max_requests_per_client"), type=int, metavar="N")
    add("--event-rate-limit", "event_rate_limit", _rule("event_rate_limit"), type=int, metavar="PER_S")
    add("--max-history-turns", "max_history_turns", _rule("max_history_turns"), type=int, metavar="N")
    add("--max-files-per-chat", "max_files_per_chat", _rule("max_files_per_chat"), type=int, metavar="N")
    add("--host", "host", "address to listen on (0.0.0.0 for the LAN / containers)")
    add("--port", "port", _rule("port"), type=int)
    add("--share", "share", "also open a public gradio.live link", action="store_true")
    add("--demo", "demo", "start the built-in tiny random-weight model (offline, no download)", action="store_true")
    add("--cache-dir", "cache_dir", "where the demo checkpoint is written (default ~/.cache/qwen3vl-webui/demo)")
    add("--request-timeout", "request_timeout", _rule("request_timeout"), type=int, metavar="SECONDS")
    add("--grace-seconds", "grace_seconds", _rule("grace_seconds"), type=int, metavar="SECONDS")
    add("--warmup", "warmup", _rule("warmup"), choices=WARMUP_MODES)
    add("--random-weights", "random_weights", _rule("random_weights"), choices=RANDOM_WEIGHTS)
    add("--upload-max-age-minutes", "upload_max_age_minutes", _rule("upload_max_age_minutes"), type=int, metavar="MIN")
    add("--upload-cache-mb", "upload_cache_mb", _rule("upload_cache_mb"), type=int, metavar="MB")
    add("--trusted-proxies", "trusted_proxies", "reverse proxies (IPs or networks, comma-separated) whose "
        "X-Forwarded-For names the client, e.g. for the login limit; default none", metavar="IPS")  # fmt: skip
    # Never echo a password into --help: these two show only where the value comes from.
    p.add_argument(
        "--auth", dest="auth", default=env_default("auth", None), metavar="USER:PASSWORD",
        help=f"require this login for the page and every API route [env {env_name('auth')}; "
        "a flag is visible in `ps`, prefer the env var or --auth-file]",
    )  # fmt: skip
    p.add_argument(
        "--auth-file", dest="auth_file", default=env_default("auth_file", None), metavar="PATH",
        help=f"file of user:password lines (# comments allowed) [env {env_name('auth_file')}]",
    )  # fmt: skip
    p.add_argument(
        "--admin-auth", dest="admin_auth", default=env_default("admin_auth", None), metavar="USER:PASSWORD",
        help=f"the operator's login: precision switch and memory release are theirs alone (without it, only when "
        f"the app listens on 127.0.0.1); it turns the login on for the whole page [env {env_name('admin_auth')}]",
    )  # fmt: skip
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags and env vars -> Settings; a bad value exits with code 2 and one line naming the valid range."""
    try:
        parser = build_parser()  # env values are parsed here
        args = parser.parse_args(argv)
        return Settings(**vars(args))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class App:
    """Everything `main` starts: the gradio Blocks, the service behind it, and the web server once launched."""

    demo: Any
    service: Any
    settings: Settings
    listener: socket.socket | None = None  # bound by main() before the model loads; else bound at launch
    front: Any = field(default=None, repr=False)  # frontdoor.FrontDoor while serving

    def launch(self, prevent_thread_lock: bool = False, quiet: bool = False) -> str:
        """Serves the app (our FastAPI app, gradio mounted at /) and returns its URL; blocks unless told not to.

        Raises frontdoor.PortError when the address is taken.
        """
        from qwen3vl_webui.frontdoor import FrontDoor, listen_socket
        from qwen3vl_webui.ui.layout import ASSETS

        s = self.settings
        sock = self.listener or listen_socket(s.host, s.port)
        self.listener = None
        # gradio keeps ~85 KB of state per session (the chat history lives there) for its 10,000 most recent
        # sessions: up to ~850 MB that API clients, which never disconnect, fill. A conversation idle while 1,000
        # newer ones started loses its server-side history.
        self.front = FrontDoor(
            self.demo, s, session_capacity=SESSION_CAPACITY, css_paths=[ASSETS / "style.css"], allowed=[str(ASSETS)]
        )
        self.front.start(sock, quiet=quiet)
        if not prevent_thread_lock:
            self.front.wait()
        return f"http://{s.host}:{s.port}/"

    @property
    def is_running(self) -> bool:
        return self.front is not None and self.front.running

    def close(self) -> None:
        """Stops the web server and gradio's queue (not the model: the service's threads are daemons)."""
        if self.front is not None:
            self.front.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def build_app(settings: Settings, load: bool = True) -> App:
    """The composition root: scheduler, model manager, service, handlers, UI."""
    from qwen3vl_webui.engine.faults import FaultInjector
    from qwen3vl_webui.engine.manager import ModelManager
    from qwen3vl_webui.engine.scheduler import Scheduler
    from qwen3vl_webui.engine.service import ChatService, Limits
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe
    from qwen3vl_webui.testing import random_weights
    from qwen3vl_webui.ui.handlers import IMAGE_MP_MAX, MEGA, Handlers
    from qwen3vl_webui.ui.layout import ASSETS, build_demo
    from qwen3vl_webui.zerogpu import on_zero_gpu

    scheduler = Scheduler(settings.max_concurrency, settings.queue_size)
    off = settings.random_weights == "off"  # else benchmarking only: random weights built in memory
    source = settings.model if off else random_weights.source_for(settings.random_weights)
    manager = ModelManager(
        source, settings.precision, settings.device, settings.attn, scheduler, demo_dir=settings.cache_dir,
        decoder=settings.engine, max_context=settings.max_context,
    )  # fmt: skip
    service = ChatService(
        manager, scheduler, GenerationStats(), GpuProbe(),
        faults=FaultInjector.from_env(),  # a no-op unless QWEN3VL_FAULTS is set (tests, device checks)
        request_timeout=float(settings.request_timeout),
        limits=Limits(settings.max_context, settings.max_new_tokens),
        max_per_client=settings.max_requests_per_client,
    )  # fmt: skip
    demo = build_demo(Handlers(service, settings, file_roots=[ASSETS]), settings)
    if load:
        # In the background: the page (with its status line) is up while weights download, load and
        # warm up. On ZeroGPU there is no GPU outside a request, so no warm-up there.
        warmup = "off" if on_zero_gpu() else settings.warmup
        service.start_in_background(settings.demo, warmup, int(IMAGE_MP_MAX * MEGA))
    return App(demo=demo, service=service, settings=settings)


def main(argv: list[str] | None = None) -> None:
    from qwen3vl_webui.frontdoor import PortError, listen_socket, open_warning
    from qwen3vl_webui.server import limit_malloc_arenas, serve, skip_absent_matplotlib

    limit_malloc_arenas()  # before any thread starts; see server.py for the measurement
    skip_absent_matplotlib()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(argv)
    warning = open_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:  # before the model loads: a busy port is one line and exit 2, at once
        listener = listen_socket(settings.host, settings.port)
    except PortError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        app = build_app(settings)
        app.listener = listener
    except Exception as exc:  # pragma: no cover - startup failures are printed, not traced
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    raise SystemExit(serve(app))
