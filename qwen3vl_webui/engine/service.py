"""The engine's face to the UI: chat streams under the scheduler, panel snapshots, precision switch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from qwen3vl_webui import planner
from qwen3vl_webui.engine.generation import ChatRequest, RequestError, _MediaCache, build_prompt, stream_generate
from qwen3vl_webui.engine.loading import LoadedModel
from qwen3vl_webui.engine.manager import ModelManager, SwitchReport
from qwen3vl_webui.engine.scheduler import QueueState, Scheduler
from qwen3vl_webui.media import MediaError
from qwen3vl_webui.telemetry import (
    GenerationStats,
    GpuProbe,
    GpuSnapshot,
    RequestStats,
    SystemSnapshot,
    format_bytes,
    read_system,
)

# How long a chat waits for the first model load before it is told to come back.
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PanelSnapshot:
    """Everything the live panel shows, as plain data (the UI formats it)."""

    status: str
    notice: str
    precision: str | None
    is_demo: bool
    device: str | None
    gpu: GpuSnapshot | None
    gpu_reason: str
    system: SystemSnapshot
    queue: QueueState
    last: RequestStats | None
    rolling_tokens_per_s: float | None
    rolling_ttft_s: float | None
    requests: int


class ChatService:
    def __init__(self, manager: ModelManager, scheduler: Scheduler, stats: GenerationStats, probe: GpuProbe) -> None:
        self.manager = manager
        self.scheduler = scheduler
        self.stats = stats
        self.probe = probe
        self._media = _MediaCache()
        self._shape_cache: tuple[int, planner.ModelShape] | None = None

    def chat(self, request: ChatRequest, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yields the growing answer. Raises RequestError (user's fault) or Busy; closing it stops the GPU work."""
        cancel = cancel or threading.Event()
        self.manager.wait_ready(READY_TIMEOUT_S)
        with self.scheduler.slot(cancel):
            loaded = self.manager.wait_ready(0)  # after the slot: a precision switch may have happened
            try:
                prompt = build_prompt(loaded, request, self._media)
            except MediaError as exc:
                raise RequestError(str(exc)) from exc
            for text, stats in stream_generate(loaded, prompt, request.sampling, cancel, self.stats.record):
                if stats is not None:
                    self.stats.record(stats)
                else:
                    yield text

    def estimate(self, max_context: int, image_pixels: int, video_frames: int, video_total_pixels: int) -> str:
        """One line for beside the sliders: visual tokens per file and the KV cache these caps allow."""
        loaded = self.manager.current()
        if loaded is None:
            return "The estimate appears once the model has loaded."
        shape = self._shape(loaded)
        # A 16:9 source at the cap is the common worst case for a photo or a screen recording.
        width = int((image_pixels * 16 / 9) ** 0.5)
        image = planner.image_tokens(width, int(width * 9 / 16), image_pixels, shape)
        frame_px = max(1, video_total_pixels // max(1, video_frames))
        fw = int((frame_px * 16 / 9) ** 0.5)
        video = planner.video_tokens(video_frames, fw, int(fw * 9 / 16), shape, max_pixels=video_total_pixels)
        kv = planner.kv_bytes_per_token(shape) * max_context
        slots = self.scheduler.max_concurrency
        return (
            f"≈ {image:,} tokens per image · ≈ {video:,} per video · KV cache ≤ {format_bytes(kv)} per chat "
            f"({max_context:,} tokens), ≤ {format_bytes(kv * slots)} for {slots} concurrent"
        )

    def _shape(self, loaded: LoadedModel) -> planner.ModelShape:
        key = id(loaded.model)
        if self._shape_cache is None or self._shape_cache[0] != key:
            self._shape_cache = (key, planner.ModelShape.from_config(loaded.model.config))
        return self._shape_cache[1]

    def switch_precision(self, precision: str) -> SwitchReport:
        return self.manager.switch(precision)

    def release_memory(self) -> None:
        self.manager.release_memory()

    def snapshot(self) -> PanelSnapshot:
        loaded = self.manager.current()
        return PanelSnapshot(
            status=self.manager.status,
            notice=self.manager.notice,
            precision=loaded.label if loaded else None,
            is_demo=bool(loaded and loaded.is_demo),
            device=loaded.device if loaded else None,
            gpu=self.probe.read(),
            gpu_reason=self.probe.reason,
            system=read_system(),
            queue=self.scheduler.state(),
            last=self.stats.last,
            rolling_tokens_per_s=self.stats.rolling_tokens_per_s,
            rolling_ttft_s=self.stats.rolling_ttft_s,
            requests=self.stats.count,
        )
