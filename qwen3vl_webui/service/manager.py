"""Owns the loaded model: first load (with demo fallback), precision switch, the decoder and the context caps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qwen3vl_webui import precisions
from qwen3vl_webui.engine.decoders import Decoder, make_decoder
from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.limits import ContextLimits, Limits
from qwen3vl_webui.telemetry import format_bytes
from qwen3vl_webui.weights import loading, random_weights
from qwen3vl_webui.weights.loading import ModelUnavailable
from qwen3vl_webui.weights.model import LoadedModel, release_cached_memory

log = logging.getLogger(__name__)

DEFAULT_LIMITS = Limits(16384, 1024)  # Settings' defaults: --max-context, --max-new-tokens

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
        return (
            f"Switched {self.old} → {self.new} in {self.seconds:.1f} s; GPU memory in use "
            f"{format_bytes(self.vram_before)} → {format_bytes(self.vram_after)}."
        )


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
        decoder: str = "generate",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.source = source
        self.requested_precision = precision
        self.device_request = device
        self.attn = attn
        self.scheduler = scheduler
        self.demo_dir = demo_dir
        self.free_memory = free_memory or free_memory_bytes  # injectable: tests choose how much is free
        self.decoder_kind = decoder
        self.limits = ContextLimits(limits)  # the one owner of the context caps; the service holds requests to it
        self.decoder: Decoder | None = None  # made at the first load, once the device is known
        self.status = "starting"
        self.notice = ""  # one sentence shown above the chat, e.g. why the demo model runs
        self._loaded: LoadedModel | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- first load -------------------------------------------------------------------------
    def load(self, use_demo: bool = False) -> LoadedModel:
        try:
            device = loading.resolve_device(self.device_request)
            if use_demo:
                return self._load_demo(device)
            if random_weights.is_random_source(self.source):
                self.notice = random_weights.notice(self.source)
                log.warning("\n%s\n%s\n%s", "!" * 100, self.notice.replace("**", "").replace("`", ""), "!" * 100)
            try:
                precision = self.resolve_precision(device)
                return self._set(loading.load_model(self.source, precision, device, self.attn, self._progress))
            except ModelUnavailable as exc:
                self.notice = str(exc)
                log.warning("%s", exc)
                return self._load_demo(device)
        except BaseException as exc:
            self._error = exc
            self.status = f"Model failed to load: {exc}"
            self._ready.set()
            raise

    def _load_demo(self, device: str) -> LoadedModel:
        from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

        self._progress("Writing the demo model (random weights)…")
        path = ensure_demo_checkpoint(self.demo_dir)
        precision = self.requested_precision
        if precision == "auto":
            precision = "fp32" if device == "cpu" else "bf16"
        return self._set(loading.load_model(str(path), precision, device, self.attn, self._progress))

    def _set(self, loaded: LoadedModel) -> LoadedModel:
        configured = self.limits.configured.max_context  # the warm-up that follows tests these caps first
        if self.decoder is None:
            self.decoder = make_decoder(
                self.decoder_kind, loaded.device, self.scheduler.max_concurrency, configured, self.demo_dir
            )
        if self.decoder.max_context:  # 0: a decoder with nothing to size (generate's cache grows per request)
            self.decoder.max_context = configured
        note = " (compiling the decode step: about a minute per batch size on a first start)" if (
            self.decoder.name == "batch" and loaded.device.startswith("cuda")
        ) else ""
        self._progress(f"Starting the decoder: {self.decoder.name}…{note}")
        self.decoder.attach(loaded)  # before "Ready": CUDA graphs are captured here, not on a first chat
        self._loaded = loaded
        name = "demo model (tiny Qwen3-VL)" if loaded.is_demo else loaded.source
        self.status = f"Ready: {name} · {loaded.label} on {loaded.device} · loaded in {loaded.load_seconds:.1f} s"
        self._ready.set()
        log.info("%s", self.status)
        return loaded

    def _progress(self, message: str) -> None:
        self.status = message
        log.info("%s", message)

    def resolve_precision(self, device: str) -> str:
        """`auto`: bf16 when it fits the free VRAM with room for the cache, else int8, else int4."""
        if self.requested_precision != "auto":
            return self.requested_precision
        if device == "cpu":
            return "fp32"
        if random_weights.is_random_source(self.source):
            return "bf16"  # built in memory: no quantized path
        from qwen3vl_webui import planner

        free = self.free_memory(device)
        shape = planner.ModelShape.qwen3vl_4b()
        for precision in ("bf16", "int8", "int4"):
            if planner.weight_bytes(shape, precision) < free * 0.75:
                return precision
        return "int4"

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
        old = self.wait_ready(timeout)
        if precision == "auto":
            precision = self.resolve_precision(old.device)
        if precision == old.precision:
            used = _used_vram(old.device)
            return SwitchReport(old.precision, precision, used, used, 0.0)
        if random_weights.is_random_source(old.source) and precision not in precisions.IN_MEMORY:
            raise SwitchRefused(f"--random-weights does not build {precision}; kept {old.precision}.")
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
            self.status = f"Switching to {precision}: unloading {old.precision}…"
            source, device = old.source, old.device
            if self.decoder is not None:
                self.decoder.detach()  # its KV cache and graphs hold GPU memory and the old weights
            self._loaded = None
            del old
            release_cached_memory()
            try:
                loaded = loading.load_model(source, precision, device, self.attn, self._progress)
            except Exception as exc:
                log.exception("switch to %s failed; reloading the previous precision", precision)
                release_cached_memory()
                self._set(loading.load_model(source, previous, device, self.attn, self._progress))
                raise SwitchRefused(f"Loading {precision} failed ({exc}); kept {previous}.") from exc
            self._set(loaded)
            return SwitchReport(previous, precision, before, _used_vram(device), time.perf_counter() - started)

    def _check_fits(self, old: LoadedModel, precision: str) -> None:
        from qwen3vl_webui import planner

        shape = planner.ModelShape.from_config(old.model.config)
        need = planner.weight_bytes(shape, precision)
        # The old weights are freed before the new ones load, so they count as available.
        available = self.free_memory(old.device) + old.weights_bytes
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
        ready = self.status
        self._progress(f"Resizing the decoder's KV cache to {target:,} tokens a slot…")
        decoder.detach()
        decoder.max_context = target
        decoder.attach(loaded)
        self.status = ready


def free_memory_bytes(device: str) -> int:
    """Free memory where the weights live: the GPU's (CUDA driver) or the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _used_vram(device: str) -> int:
    import torch

    if not device.startswith("cuda"):
        return 0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total - free)
