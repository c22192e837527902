"""Owns the loaded model: first load (with demo fallback), precision switch, the decoder and the context caps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.engine.decoders import Decoder, make_decoder
from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.limits import ContextLimits, Limits
from qwen3vl_webui.service.timeline import IMPORTED, LOADED, LOCATED, SERVING, StartTimeline, decode_progress
from qwen3vl_webui.telemetry import format_bytes
from qwen3vl_webui.weights import checkpoints, loading, random_weights
from qwen3vl_webui.weights.loading import ModelUnavailable
from qwen3vl_webui.weights.model import LoadedModel, release_cached_memory

log = logging.getLogger(__name__)

DEFAULT_LIMITS = Limits(16384, 1024)  # Settings' defaults: --max-context, --max-new-tokens

# An engine process that died is restarted after 1 s, then 2, 4, ... up to a minute while it keeps dying; a minute
# of serving forgives the count.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 60.0
RESTART_FORGIVE_S = 60.0

# Fraction of free VRAM a new precision's weights may take; the rest is for KV cache and activations.
_SWITCH_HEADROOM = 0.9


class SwitchRefused(RuntimeError):
    """The new precision does not fit (or cannot load); the old model stays loaded."""


@dataclass(frozen=True)
class SwitchReport:
    old: str
    new: str
    vram_before: int
    vram_after: int
    seconds: float

    def describe(self) -> str:
        if self.old == self.new:
            return f"Already loaded in {self.new}."
        switched = f"Switched {self.old} → {self.new} in {self.seconds:.1f} s"
        if not self.vram_before and not self.vram_after:  # on a CPU: there is no GPU memory to compare
            return f"{switched}."
        return f"{switched}; GPU memory in use {format_bytes(self.vram_before)} → {format_bytes(self.vram_after)}."


class ModelManager:
    """The one place that loads and unloads; readers get the current `LoadedModel` via `current()`."""

    def __init__(
        self,
        source: str,
        precision: str,
        device: str,
        attn: str,
        scheduler: Scheduler,
        demo_dir: str | None = None,
        free_memory: Callable[[str], int] | None = None,
        decoder: str | Decoder = "generate",
        limits: Limits = DEFAULT_LIMITS,
        launched_at: float | None = None,
        compile_mode: str = "background",
    ) -> None:
        self.source = source
        self.requested_precision = precision
        self.device_request = device
        self.attn = attn
        self.scheduler = scheduler
        self.demo_dir = demo_dir
        self.free_memory = free_memory or free_memory_bytes  # injectable: tests choose how much is free
        # A kind (made at the first load) or a decoder built already: a remote backend's (--backend-url).
        self.decoder_kind = decoder if isinstance(decoder, str) else decoder.name
        self.compile_mode = compile_mode  # the batch engine's decode compile: background, before-serving, off
        self.limits = ContextLimits(limits)  # the one owner of the context caps; the service holds requests to it
        self.decoder: Decoder | None = None if isinstance(decoder, str) else decoder  # else made at the first load
        self._status = "starting"
        # What it is doing, for GET /ready: starting, loading, serving, switching, resizing, restarting, failed, closing.
        self.phase = "starting"
        self.timeline = StartTimeline(launched_at)  # start-up stages since launch (logged, shown in the status)
        self.notice = ""  # one sentence shown above the chat, e.g. why the demo model runs
        self._loaded: LoadedModel | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._restarts = 0  # engine process restarts in a row (a crash loop backs off)
        self.engine_restarts = 0  # engine processes restarted after dying, since start
        self._closing = False

    @property
    def status(self) -> str:
        """The status line; once serving, with how decode runs (and how far its compile is) and the start-up times."""
        text = self._status
        if self.phase != "serving":
            return text
        decoder = self.decoder
        if self.backend is not None:
            return self.backend.status_line()
        snap = decoder.snapshot() if decoder is not None else None
        progress = decode_progress(snap)
        if progress:
            text += f" · {progress}"
        return f"{text} · start-up: {self.timeline.describe()}"

    @status.setter
    def status(self, text: str) -> None:
        self._status = text

    @property
    def backend(self) -> Any:
        """The remote backend's decoder (engine/backend/decoder.py) when this app is its front end, else None."""
        decoder = self.decoder
        return decoder if decoder is not None and decoder.name == "backend" else None

    # -- first load -------------------------------------------------------------------------
    def load(self, use_demo: bool = False) -> LoadedModel:
        self.phase = "loading"
        if self.backend is not None:
            return self._connect()
        try:
            device = loading.resolve_device(self.device_request)
            if use_demo:
                return self._load_demo(device)
            if random_weights.is_random_source(self.source):
                self.notice = random_weights.notice(self.source)
                log.warning("\n%s\n%s\n%s", "!" * 100, self.notice.replace("**", "").replace("`", ""), "!" * 100)
            try:
                return self._set(self._load(self.source, self.resolve_precision(device), device))
            except ModelUnavailable as exc:
                self.notice = str(exc)
                log.warning("%s", exc)
                return self._load_demo(device)
        except BaseException as exc:
            self._error = exc
            self.phase = "failed"
            self.status = f"Model failed to load: {exc}"
            self._ready.set()
            raise

    def _connect(self) -> LoadedModel:
        """A front end: nothing loads here. The backend is probed once (unreachable is a state its watcher follows,
        which the status line and /ready show), and chats are admitted from now on."""
        backend = self.backend
        log.info("connecting to the backend at %s", backend.url)  # the address: the log's alone
        self._progress("Connecting to the model server…")
        backend.attach(None)
        loaded = backend.loaded_view(None)
        self.timeline.mark(SERVING, detail="remote backend")
        self._loaded = loaded
        self.phase = "serving"
        self._ready.set()
        log.info("%s", backend.status_line())
        return loaded

    def _load_demo(self, device: str) -> LoadedModel:
        from qwen3vl_webui.weights import lean
        from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

        lean.skip(*lean.NEVER_USED)  # writing the demo imports the model's code here: before it, as load_front does
        self._progress("Writing the demo model (random weights)…")
        path = ensure_demo_checkpoint(self.demo_dir)
        precision = self.requested_precision
        if precision == "auto":
            precision = "fp32" if device == "cpu" else "bf16"
        return self._set(self._load(str(path), precision, device))

    def _decoder_for(self, device: str) -> Decoder:
        if self.decoder is None:
            configured = self.limits.configured.max_context
            self.decoder = make_decoder(
                self.decoder_kind, device, self.scheduler.max_concurrency, configured, self.demo_dir,
                self.attn, self._progress, self._engine_died, self.compile_mode,
            )  # fmt: skip
        return self.decoder

    def _load(self, source: str, precision: str, device: str) -> LoadedModel:
        """`source` in `precision`: loaded here, or, for a decoder that runs the model in its own process, only its
        processor and config here (the weights load there when the decoder attaches)."""
        decoder = self._decoder_for(device)
        if decoder.remote:
            if random_weights.is_random_source(source) or loading.cached_checkpoint(source) is not None:
                # Nothing to download: the engine process starts now, beside the processor's load (a download
                # happens here first, once, so the engine process then finds the checkpoint in the cache). Its
                # slots are sized as `_set` sizes them before attaching, so that attach takes this very process.
                if decoder.max_context:
                    decoder.max_context = self.limits.configured.max_context
                decoder.start_early(source, precision, device)
            try:
                front = loading.load_front(source, precision, device, self._progress)
            except BaseException:
                decoder.cancel_early()  # the model will not be this one: no engine process left behind for it
                raise
            self.timeline.mark(LOCATED)
            return front
        loaded = loading.load_model(source, precision, device, self.attn, self._progress)
        self.timeline.mark(LOADED, detail=f"{loaded.load_seconds:.1f} s to load")
        return loaded

    def _set(self, loaded: LoadedModel) -> LoadedModel:
        configured = self.limits.configured.max_context  # the warm-up that follows tests these caps first
        decoder = self._decoder_for(loaded.device)
        if decoder.max_context:  # 0: a decoder with nothing to size (generate's cache grows per request)
            decoder.max_context = configured
        note = " (decode steps in CUDA graphs)" if (
            decoder.name == "batch" and loaded.device.startswith("cuda")
        ) else ""
        self._progress(f"Starting the decoder: {decoder.name}…{note}")
        decoder.attach(loaded)  # before "Ready": CUDA graphs are captured here, not on a first chat
        info = getattr(decoder, "info", None)  # the engine process's own stamps (wall clock)
        if info is not None and getattr(info, "imported_at", 0.0):
            self.timeline.mark(IMPORTED, at=info.imported_at)
        if info is not None and getattr(info, "loaded_at", 0.0):
            self.timeline.mark(LOADED, at=info.loaded_at, detail=f"{info.load_seconds:.1f} s in the engine process")
        self.timeline.mark(SERVING, at=getattr(info, "serving_at", 0.0) or None, detail=decoder.name)
        loaded = decoder.loaded_view(loaded)
        self._loaded = loaded
        self._restarts = 0
        name = "demo model (tiny Qwen3-VL)" if loaded.is_demo else loaded.source
        where = f" · engine process {decoder.pid}" if decoder.pid is not None else ""
        self.status = (
            f"Ready: {name} · {loaded.label} on {loaded.device} · loaded in {loaded.load_seconds:.1f} s{where}"
        )
        self.phase = "serving"
        self._ready.set()
        log.info("%s", self._status)
        return loaded

    def _engine_died(self, code: int | None) -> None:
        """The engine process exited by itself: requests in flight already failed; restart it, backing off."""
        loaded = self._loaded
        if loaded is None or self._closing:
            return
        self._ready.clear()  # new chats wait for the restart instead of failing
        self._loaded = None
        self.phase = "restarting"
        self._restarts += 1
        delay = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** (self._restarts - 1))
        reason = f"stopped (exit code {code})"
        while not self._closing:
            self.status = (
                f"The engine process {reason}; restarting it in {delay:g} s"
                + (f" (crash loop: {self._restarts} restarts in a row)" if self._restarts > 1 else "")
                + "…"
            )
            log.error("%s", self.status)
            time.sleep(delay)
            restarts = self._restarts
            try:
                self.timeline.restart("restarting the engine process")
                self._set(loaded)  # starts a new engine process
                break
            except Exception as exc:
                self._restarts = restarts + 1
                delay = min(RESTART_MAX_DELAY_S, delay * 2)
                reason = f"could not start ({exc})"
        if self._closing:
            return
        self._restarts = restarts  # a crash soon after this restart counts as the loop going on
        self.engine_restarts += 1
        forgive = threading.Timer(RESTART_FORGIVE_S, self._forgive, args=(restarts,))
        forgive.daemon = True
        forgive.start()

    def _forgive(self, restarts: int) -> None:
        if self._restarts == restarts and self._loaded is not None:
            self._restarts = 0

    def close(self) -> None:
        """Stops what the decoder started (the engine process); the app is shutting down."""
        self._closing = True
        self.phase = "closing"
        if self.backend is not None:
            self.backend.close()  # its watcher and both HTTP clients' connections
        elif self.decoder is not None:
            getattr(self.decoder, "close", self.decoder.detach)()

    def release_memory(self) -> None:
        """Gives cached memory back to the driver, wherever the model runs."""
        if self.decoder is not None:
            self.decoder.release()
        else:
            release_cached_memory()

    def _progress(self, message: str) -> None:
        self.status = message
        log.info("%s", message)

    def resolve_precision(self, device: str) -> str:
        """`auto`: the fastest precision (precisions.AUTO_ORDER, measured) whose weights fit the free VRAM with room
        for the cache and that this GPU and this install can run; the smallest as a last resort."""
        if self.requested_precision != "auto":
            return self.requested_precision
        if not random_weights.is_random_source(self.source):  # a pre-quantized checkpoint loads in its own precision
            own = checkpoints.auto_precision(loading.locate_checkpoint(self.source, self._progress), device)
            if own is not None:
                return own
        if device == "cpu":
            return "fp32"
        import importlib.util

        from qwen3vl_webui import planner

        free = self.free_memory(device)
        shape = planner.ModelShape.qwen3vl_4b()
        capability = device_capability(device)
        random = random_weights.is_random_source(self.source)
        usable = [
            p
            for p in precisions.AUTO_ORDER
            if precisions.capability_blocker(p, capability) is None
            and not (precisions.needs_bitsandbytes(p) and (random or importlib.util.find_spec("bitsandbytes") is None))
        ]
        for precision in usable:
            if planner.weight_bytes(shape, precision) < free * 0.75:
                return precision
        return min(usable, key=lambda p: planner.weight_bytes(shape, p))

    # -- readers ----------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> LoadedModel:
        if not self._ready.wait(timeout):
            raise TimeoutError("The model is still loading; try again in a moment.")
        if self._loaded is None:
            raise RuntimeError(self.status)
        return self._loaded

    def current(self) -> LoadedModel | None:
        return self._loaded

    # -- switching --------------------------------------------------------------------------
    def switch(self, precision: str, timeout: float | None = 600.0) -> SwitchReport:
        """Waits for running generations, unloads, frees VRAM, reloads; refuses when it won't fit."""
        if self.backend is not None:
            raise SwitchRefused("the model runs on the backend (--backend-url); its precision is set there.")
        old = self.wait_ready(timeout)
        if precision == "auto":
            precision = self.resolve_precision(old.device)
        if precision == old.precision:
            used = _used_vram(old.device)
            return SwitchReport(old.precision, precision, used, used, 0.0)
        if random_weights.is_random_source(old.source) and precision not in precisions.IN_MEMORY:
            raise SwitchRefused(f"--random-weights does not build {precision}; kept {old.precision}.")
        if not random_weights.is_random_source(old.source):  # a pre-quantized checkpoint: its own precision or 16-bit
            refused = checkpoints.precision_blocker(loading.locate_checkpoint(old.source), precision)
            if refused:
                raise SwitchRefused(f"{refused} Kept {old.precision}.")
        if precisions.needs_bitsandbytes(precision):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise SwitchRefused(f"{precision} needs the bitsandbytes package, which is not installed.") from exc
        self._check_fits(old, precision)
        previous = old.precision
        started = time.perf_counter()
        with self.scheduler.exclusive(timeout):
            before = _used_vram(old.device)
            self.phase = "switching"
            self.timeline.restart(f"switching to {precision}")
            self.status = f"Switching to {precision}: unloading {old.precision}…"
            source, device = old.source, old.device
            if self.decoder is not None:
                self.decoder.detach()  # its KV cache and graphs hold GPU memory and the old weights
            self._loaded = None
            del old
            release_cached_memory()
            try:
                self._set(self._load(source, precision, device))
            except Exception as exc:
                log.exception("switch to %s failed; reloading the previous precision", precision)
                release_cached_memory()
                self._set(self._load(source, previous, device))
                raise SwitchRefused(f"Loading {precision} failed ({exc}); kept {previous}.") from exc
            return SwitchReport(previous, precision, before, _used_vram(device), time.perf_counter() - started)

    def _check_fits(self, old: LoadedModel, precision: str) -> None:
        from qwen3vl_webui import planner

        shape = planner.ModelShape.from_config(old.config)
        need = planner.weight_bytes(shape, precision)
        # The old weights are freed before the new ones load, so they count as available (an engine process gives
        # back all it holds when it exits: its KV cache and graphs too).
        stats = self.decoder.memory() if self.decoder is not None else None
        held = max(old.weights_bytes, stats.reserved if stats is not None else 0)
        available = self.free_memory(old.device) + held
        if need > available * _SWITCH_HEADROOM:
            raise SwitchRefused(
                f"{precision} needs about {format_bytes(need)} for weights, but only {format_bytes(available)} "
                f"would be free; kept {old.precision}."
            )

    def fit_decoder(self) -> None:
        """Re-sizes the decoder's KV slots for the current caps (after a warm-up lowered them): the memory the
        configured caps reserved beyond them goes back. Call while no chat runs (the scheduler's exclusive section)."""
        loaded, decoder = self._loaded, self.decoder
        target = self.limits.current.max_context
        if loaded is None or decoder is None or not decoder.max_context or decoder.max_context == target:
            return
        ready = self._status
        self.phase = "resizing"
        self._progress(f"Resizing the decoder's KV cache to {target:,} tokens a slot…")
        try:
            decoder.detach()
            decoder.max_context = target
            decoder.attach(loaded)
        finally:
            self.phase = "serving"
        self.status = ready


def free_memory_bytes(device: str) -> int:
    """Free memory where the weights live: the GPU's, or the machine's available RAM.

    Read through NVML, not torch: the front end of an engine process must not create a CUDA context of its own
    (~500 MiB of the GPU)."""
    if device.startswith("cuda"):
        free, _total = device_memory(device)
        return free
    import psutil

    return int(psutil.virtual_memory().available)


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, by NVML (torch's figures only where NVML cannot say)."""
    from qwen3vl_webui.telemetry import GpuProbe

    index = int(device.split(":")[1]) if ":" in device else 0
    probe = GpuProbe(index)
    try:
        snap = probe.read()
    finally:
        probe.close()
    if snap is not None:
        return snap.memory_total - snap.memory_used, snap.memory_total
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(free), int(total)


def device_capability(device: str) -> tuple[int, int] | None:
    """A CUDA device's compute capability by NVML (no CUDA context here, as above); None if NVML cannot say."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.split(":")[1]) if ":" in device else 0)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML: the engine process's load refuses what the GPU cannot run
        return None
    return int(major), int(minor)


def _used_vram(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    free, total = device_memory(device)
    return total - free
