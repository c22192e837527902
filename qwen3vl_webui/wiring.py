"""The composition root: the only module that imports every layer and wires one object of each into the next."""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3vl_webui import ranges
from qwen3vl_webui.config import Settings

log = logging.getLogger("qwen3vl_webui")
# gradio keeps ~85 KB of state per session (the chat history lives there) for its 10,000 most recent sessions: up to
# ~850 MB that API clients, which never disconnect, fill. A conversation idle while 1,000 newer ones started loses its
# server-side history.
SESSION_CAPACITY = 1000


@dataclass
class App:
    """Everything `main` starts: the gradio Blocks, the service behind it, and the web server once launched."""

    demo: Any
    service: Any
    settings: Settings
    listener: socket.socket | None = None  # bound by main() before the model loads; else bound at launch
    front: Any = field(default=None, repr=False)  # frontdoor.FrontDoor while serving
    jobs: Any = None  # the page's batch jobs (service.jobs.JobBoard): closed with the app, resumed at the next start

    def launch(self, prevent_thread_lock: bool = False, quiet: bool = False) -> str:
        """Serves the app (our FastAPI app, gradio mounted at /) and returns its URL; blocks unless told not to.

        Raises frontdoor.PortError when the address is taken.
        """
        from qwen3vl_webui.server.frontdoor import FrontDoor, listen_socket
        from qwen3vl_webui.ui.layout import ASSETS

        s = self.settings
        sock = self.listener or listen_socket(s.host, s.port)
        self.listener = None
        self.front = FrontDoor(
            self.demo, s, session_capacity=SESSION_CAPACITY, css_paths=[ASSETS / "style.css"], allowed=[str(ASSETS)],
            routers=(self._openai_router(), self._metrics_router(), self._health_router()),
            on_loop_lag=self.service.door_metrics.lagged,
        )  # fmt: skip
        self.front.start(sock, quiet=quiet)
        if not prevent_thread_lock:
            self.front.wait()
        return f"http://{s.host}:{s.port}/"

    def _model_names(self) -> tuple[str, ...]:
        s = self.settings
        names = [s.served_model_name] if s.served_model_name else []
        names += ["qwen3vl-demo"] if s.demo else [s.model if s.random_weights == "off" else f"random-{s.random_weights}"]
        return tuple(dict.fromkeys(names))

    def _metrics_router(self) -> Any:
        from qwen3vl_webui.server.metrics import MetricsConfig, build_router

        s = self.settings
        name: Any = self._backend_metrics_name if s.backend_url else self._model_names()[0]
        config = MetricsConfig(name, s.metrics_public, s.api_key, tuple(s.credentials()))
        return build_router(self.service, config, front=lambda: self.front)

    def _health_router(self) -> Any:
        from qwen3vl_webui.server.health import build_router

        return build_router(self.service)  # GET /health and /ready, outside the login

    def _openai_router(self) -> Any:
        from qwen3vl_webui.server.openai_api import ApiConfig, build_router
        from qwen3vl_webui.ui import gradio_compat

        s = self.settings
        config = ApiConfig(
            model_names=self._model_names(),
            api_key=s.api_key,
            closed=bool(s.credentials()) and not s.api_key and not s.open_api,
            # A body holds the messages and their files in base64 (4 bytes for 3): one file at the cap, and text.
            max_body_bytes=s.max_file_mb * 2**20 * 4 // 3 + 2**20,
            max_file_bytes=s.max_file_mb * 2**20,
            max_files_per_turn=s.max_files_per_turn,
            max_files_per_chat=s.max_files_per_chat,
            max_turns=s.max_history_turns,
            allowed_media_domains=frozenset(d.strip().lower() for d in s.allowed_media_domains.split(",") if d.strip()),
            local_only=s.local_only,
            live_names=self._backend_names if s.backend_url else None,
        )
        return build_router(self.service, config, lambda: Path(gradio_compat.upload_folder()) / "openai")

    def _backend_metrics_name(self) -> str:
        """A front end's model_name label: --served-model-name, else the backend's model once known (read lazily)."""
        backend = self.service.manager.backend
        return self.settings.served_model_name or (backend.model if backend is not None else None) or "backend"

    def _backend_names(self) -> tuple[str, ...]:
        """A front end answers to --served-model-name and the backend's model (once known)."""
        model = self.service.manager.backend.model
        return tuple(dict.fromkeys(n for n in (self.settings.served_model_name, model) if n))

    def queue_busy(self) -> bool:
        """Events waiting in or being processed by gradio's queue (0 if its internals change: shutdown goes on)."""
        from qwen3vl_webui.ui import gradio_compat

        return gradio_compat.queue_busy(self.demo, default=False)

    @property
    def is_running(self) -> bool:
        return self.front is not None and self.front.running

    def close(self) -> None:
        """Stops the web server and gradio's queue, then the engine process if there is one."""
        if self.front is not None:
            self.front.close()
        if self.jobs is not None:
            self.jobs.close()
        self.service.close()
        self.service.manager.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def build_service(settings: Settings) -> Any:
    """Scheduler, model manager and the ChatService over them (nothing loaded yet): the app's, and the batch-job
    CLI's (`python -m qwen3vl_webui.jobs`), built the same way."""
    from qwen3vl_webui.engine.faults import FaultInjector
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.service.limits import Limits
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe
    from qwen3vl_webui.weights import random_weights

    scheduler = Scheduler(settings.max_concurrency, settings.queue_size)
    decoder: Any = settings.engine
    if settings.backend_url:  # a front end: the model runs on that server (engine/backend/)
        from qwen3vl_webui.engine.backend.decoder import BackendDecoder

        decoder = BackendDecoder(settings.backend_url, settings.backend_api_key, settings.backend_model)
    off = settings.random_weights == "off"  # else benchmarking only: random weights built in memory
    source = settings.model if off else random_weights.source_for(settings.random_weights)
    manager = ModelManager(
        source, settings.precision, settings.device, settings.attn, scheduler, demo_dir=settings.cache_dir,
        decoder=decoder, limits=Limits(settings.max_context, settings.max_new_tokens),
        compile_mode=settings.compile,
    )  # fmt: skip
    service = ChatService(
        manager, scheduler, GenerationStats(), GpuProbe(),
        faults=FaultInjector.from_env(),  # a no-op unless QWEN3VL_FAULTS is set (tests, device checks)
        request_timeout=float(settings.request_timeout),
        max_per_client=settings.max_requests_per_client,
        gpu_hourly_cost=settings.gpu_hourly_cost,
    )  # fmt: skip
    return service


def build_app(settings: Settings, load: bool = True) -> App:
    """The composition root: scheduler, model manager, service, handlers, UI."""
    from qwen3vl_webui.service.readiness import watch_start
    from qwen3vl_webui.zerogpu import on_zero_gpu

    service = build_service(settings)
    if load:
        # In the background, before gradio is even imported: the engine process starts (and its weights load)
        # while this process builds the page; the page (with its status line) is up while weights download, load
        # and warm up. On ZeroGPU there is no GPU outside a request, so no warm-up there.
        warmup = "off" if on_zero_gpu() or settings.backend_url else settings.warmup
        service.start_in_background(settings.demo, warmup, ranges.largest_image_pixels())
        watch_start(service)  # stamps "ready", each compiled batch size and "fully compiled" (service/readiness.py)
    from qwen3vl_webui.ui.handlers import Handlers
    from qwen3vl_webui.ui.jobs_tab import JobsTab
    from qwen3vl_webui.ui.layout import ASSETS, build_demo

    handlers = Handlers(service, settings, file_roots=[ASSETS])
    board = _job_board(service, settings)
    service.refuse_switch_while(board.switch_refusal)  # a running job's answers come from one precision
    demo = build_demo(handlers, settings, jobs=JobsTab(board, handlers.is_operator))
    if load:
        board.resume_interrupted()  # jobs a crash or shutdown left unfinished; their items wait for the model
    return App(demo=demo, service=service, settings=settings, jobs=board)


def _job_board(service: Any, settings: Settings) -> Any:
    """The page's batch jobs: cold requests beside the chats, each job in <cache dir>/jobs/<id>/."""
    from qwen3vl_webui.service.jobs import JobBoard, JobDefaults

    defaults = JobDefaults(
        max_context=settings.max_context,
        max_new_tokens=min(settings.max_new_tokens, int(ranges.REQUEST["max_new_tokens"].default)),
        max_files_per_turn=settings.max_files_per_turn,
    )
    root = Path(settings.cache_dir or Path.home() / ".cache" / "qwen3vl-webui") / "jobs"
    return JobBoard(service, root, defaults, workers=2 * settings.max_concurrency)


def prespawn_engine(settings: Settings) -> bool:
    """Starts the first engine process now, when the model will load in one (`engine.remote.client.prespawn`)."""
    if not engine_process_expected(settings):
        return False
    from qwen3vl_webui.engine.remote.client import prespawn

    prespawn()
    return True


def engine_process_expected(settings: Settings) -> bool:
    """Whether the first model will load in an engine process (engine/decoders.make_decoder's choice), judged
    without importing torch: `--engine batch`, or `auto` where an NVIDIA driver is present and not on ZeroGPU."""
    from qwen3vl_webui.zerogpu import on_zero_gpu

    if settings.backend_url:
        return False
    if settings.engine == "batch":
        return True
    gpu = settings.device != "cpu" and Path("/dev/nvidiactl").exists()
    return settings.engine == "auto" and gpu and not on_zero_gpu()


def run(settings: Settings) -> int:
    """Starts everything for `settings` and serves until SIGTERM / Ctrl-C; returns the exit code (SystemExit(2) for a
    busy port, before any model loads)."""
    from qwen3vl_webui.heap import limit_malloc_arenas
    from qwen3vl_webui.server.frontdoor import PortError, listen_socket, open_warning
    from qwen3vl_webui.server.lifecycle import serve
    from qwen3vl_webui.ui.gradio_compat import skip_absent_matplotlib

    limit_malloc_arenas()  # before any thread starts; see heap.py for the measurement
    skip_absent_matplotlib()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO (the share tunnel's, gradio's own checks): noise in the app's console.
    logging.getLogger("httpx").setLevel(logging.WARNING)
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
    return serve(app)
