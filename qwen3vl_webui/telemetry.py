"""GPU, system and generation-speed snapshots as plain data (no gradio, no torch import)."""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuSnapshot:
    """One reading of a GPU: NVML figures for the whole card, torch figures for this process."""

    name: str
    index: int  # the CUDA (torch) device index the probe was built for
    memory_used: int  # bytes, NVML: every process on the card
    memory_total: int  # bytes
    utilization_pct: float | None  # None where NVML reports NotSupported (e.g. MIG slices)
    temperature_c: float | None
    power_w: float | None
    torch_allocated: int  # bytes, this process; 0 when torch/CUDA is not in use
    torch_reserved: int
    torch_peak: int


@dataclass(frozen=True)
class SystemSnapshot:
    """Host CPU and RAM, plus this process's resident memory."""

    cpu_pct: float
    ram_used: int  # bytes: total minus available, so page cache does not count as used
    ram_total: int
    process_rss: int


@dataclass(frozen=True)
class RequestStats:
    """Token counts and timings of one finished generation request."""

    prompt_text_tokens: int
    prompt_image_tokens: int
    prompt_video_tokens: int
    new_tokens: int
    ttft_s: float  # request start to first new token (includes prefill)
    decode_s: float  # first new token to last new token

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_text_tokens + self.prompt_image_tokens + self.prompt_video_tokens

    @property
    def tokens_per_s(self) -> float:
        # decode_s starts at the first token, so it spans new_tokens - 1 decode steps.
        steps = self.new_tokens - 1
        if steps <= 0 or self.decode_s <= 0:
            return 0.0
        return steps / self.decode_s


class GenerationStats:
    """Thread-safe rolling statistics over the last `window` finished requests."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._recent: deque[RequestStats] = deque(maxlen=window)
        self._count = 0
        # Requests finish on generation threads while the UI timer reads: guard both.
        self._lock = threading.Lock()

    def record(self, s: RequestStats) -> None:
        with self._lock:
            self._recent.append(s)
            self._count += 1

    @property
    def last(self) -> RequestStats | None:
        with self._lock:
            return self._recent[-1] if self._recent else None

    @property
    def count(self) -> int:
        """Requests recorded since creation (not limited to the window)."""
        with self._lock:
            return self._count

    @property
    def rolling_tokens_per_s(self) -> float | None:
        """Decode steps over decode seconds summed across the window.

        A ratio of sums, not a mean of per-request rates: a 3-token reply with a noisy
        rate should not weigh as much as a 500-token one.
        """
        with self._lock:
            timed = [s for s in self._recent if s.decode_s > 0 and s.new_tokens > 1]
        if not timed:
            return None
        return sum(s.new_tokens - 1 for s in timed) / sum(s.decode_s for s in timed)

    @property
    def rolling_ttft_s(self) -> float | None:
        """Mean time to first token across the window."""
        with self._lock:
            recent = list(self._recent)
        if not recent:
            return None
        return sum(s.ttft_s for s in recent) / len(recent)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _visible_device(device_index: int) -> int | str | None:
    """Map a CUDA device index to what NVML knows: an NVML index, a UUID, or None if hidden.

    CUDA renumbers the devices listed in CUDA_VISIBLE_DEVICES from 0, while NVML always
    sees every card in the machine, so CUDA device 0 may be NVML device 3.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return device_index
    entries = [e.strip() for e in env.split(",") if e.strip()]
    # CUDA stops reading the list at the first invalid entry (e.g. "-1").
    if device_index >= len(entries):
        return None
    entry = entries[device_index]
    if entry.isdigit():
        return int(entry)
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    return None


class GpuProbe:
    """Reads one GPU through NVML; `read()` never raises and returns None without a GPU."""

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self.reason: str | None = None  # why the last read() returned None; None after success
        self._nvml: Any = None  # the pynvml module once initialised
        self._handle: Any = None
        self._init_done = False
        self._closed = False
        # A probe may be shared by several UI sessions' timers.
        self._lock = threading.Lock()

    def _init(self) -> None:
        # Runs once: a missing driver does not appear between two reads, and retrying
        # nvmlInit on every timer tick would cost a dlopen attempt each second.
        self._init_done = True
        try:
            import pynvml
        except Exception as exc:  # nvidia-ml-py missing or broken
            self.reason = f"no GPU (pynvml unavailable: {_one_line(exc)})"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # LibraryNotFound, DriverNotLoaded, ...
            self.reason = f"no GPU (NVML: {_one_line(exc)})"
            return
        self._nvml = pynvml
        target = _visible_device(self.device_index)
        try:
            if target is None:
                raise LookupError(
                    f"CUDA device {self.device_index} is not in "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
                )
            if isinstance(target, str):
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(target.encode())
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(target)
        except Exception as exc:
            self.reason = f"no GPU {self.device_index} ({_one_line(exc)})"
            self._shutdown()

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass  # shutting down a half-broken NVML must not raise either
        self._nvml = None
        self._handle = None

    def read(self) -> GpuSnapshot | None:
        with self._lock:
            if self._closed:
                self.reason = "probe closed"
                return None
            if not self._init_done:
                self._init()
            if self._handle is None:
                return None
            try:
                snap = self._read_handle()
            except Exception as exc:  # e.g. GPU fell off the bus: report, keep serving
                self.reason = f"GPU read failed ({_one_line(exc)})"
                return None
            self.reason = None
            return snap

    def _read_handle(self) -> GpuSnapshot:
        nv, h = self._nvml, self._handle
        name = nv.nvmlDeviceGetName(h)
        if isinstance(name, bytes):  # older bindings return bytes
            name = name.decode(errors="replace")
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = _optional(lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        temp = _optional(lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        power = _optional(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)  # NVML gives mW
        allocated, reserved, peak = torch_memory(self.device_index)
        return GpuSnapshot(
            name=str(name),
            index=self.device_index,
            memory_used=int(mem.used),
            memory_total=int(mem.total),
            utilization_pct=util,
            temperature_c=temp,
            power_w=power,
            torch_allocated=allocated,
            torch_reserved=reserved,
            torch_peak=peak,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._shutdown()


def _optional(fn: Any) -> float | None:
    # MIG slices and some boards answer NotSupported for utilization, temperature or power;
    # any NVML error on these extras should blank that field, not the whole snapshot.
    try:
        return fn()
    except Exception:
        return None


def read_system() -> SystemSnapshot:
    """CPU percentage since the previous call (0.0 on the first), RAM and this process's RSS."""
    import psutil  # imported here so GPU-only callers work where psutil is absent

    vm = psutil.virtual_memory()
    return SystemSnapshot(
        cpu_pct=float(psutil.cpu_percent(interval=None)),
        ram_used=int(vm.total - vm.available),
        ram_total=int(vm.total),
        process_rss=int(psutil.Process().memory_info().rss),
    )


def torch_memory(device_index: int = 0) -> tuple[int, int, int]:
    """(allocated, reserved, peak allocated) bytes of this process on a CUDA device.

    Zeros unless torch is already imported and CUDA already initialised: the UI must not pay
    for importing torch, and initialising CUDA from a telemetry thread would break ZeroGPU,
    where CUDA may only be touched inside @spaces.GPU calls.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return (0, 0, 0)
    try:
        if not torch.cuda.is_initialized() or device_index >= torch.cuda.device_count():
            return (0, 0, 0)
        return (
            int(torch.cuda.memory_allocated(device_index)),
            int(torch.cuda.memory_reserved(device_index)),
            int(torch.cuda.max_memory_allocated(device_index)),
        )
    except Exception:
        return (0, 0, 0)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int) -> str:
    """Binary units with three significant digits: "8.32 GiB", "45.5 MiB", "512 MiB", "0 B"."""
    if n < 0:
        return "-" + format_bytes(-n)
    value = float(n)
    unit = 0
    # Move up a unit before rounding could print "1024 KiB".
    while unit < len(_UNITS) - 1 and round(value, _decimals(value)) >= 1024:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n} B"
    return f"{value:.{_decimals(value)}f} {_UNITS[unit]}"


def _decimals(value: float) -> int:
    if value < 9.995:
        return 2
    if value < 99.95:
        return 1
    return 0
