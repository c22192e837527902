"""Gradio event handlers: UI values -> engine requests, engine errors -> messages in the chat."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from qwen3vl_webui.config import Settings
from qwen3vl_webui.conversation import ERROR_PREFIX, parse_history, parse_message
from qwen3vl_webui.engine.generation import ChatRequest, RequestError, SamplingParams
from qwen3vl_webui.engine.manager import SwitchRefused
from qwen3vl_webui.engine.scheduler import Busy, Cancelled
from qwen3vl_webui.engine.service import ChatService
from qwen3vl_webui.media import MediaBudget
from qwen3vl_webui.ui.panels import format_panel, format_status

log = logging.getLogger(__name__)

MEGA = 1_000_000
BUSY_MESSAGE = "busy — try again: all GPU slots and the wait line are full."


class Handlers:
    """Bound to one ChatService; every method is safe to call from gradio's worker threads."""

    def __init__(self, service: ChatService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    def chat(
        self,
        message: dict[str, Any] | str,
        history: list[dict[str, Any]],
        system_prompt: str = "",
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int = 20,
        repetition_penalty: float = 1.05,
        seed: float = -1,
        max_context: int | None = None,
        max_new_tokens: int | None = None,
        image_megapixels: float = 0.92,
        video_fps: float = 2.0,
        video_max_frames: int = 32,
        video_megapixels: float = 7.4,
    ) -> Iterator[str]:
        """Streams the answer to `message` given `history`. Refusals come back as one chat message."""
        answered = False
        try:
            request = self._request(
                message, history, system_prompt, temperature, top_p, top_k, repetition_penalty, seed,
                max_context, max_new_tokens, image_megapixels, video_fps, video_max_frames, video_megapixels,
            )  # fmt: skip
            with contextlib.closing(self.service.chat(request)) as stream:
                for text in stream:
                    answered = True
                    yield text
            if not answered:
                yield "(the model returned an empty answer)"
        except (RequestError, ValueError) as exc:
            yield ERROR_PREFIX + str(exc)
        except Busy as exc:
            yield ERROR_PREFIX + (BUSY_MESSAGE if "full" in str(exc) else str(exc))
        except Cancelled:
            return
        except TimeoutError as exc:
            yield ERROR_PREFIX + str(exc)
        except Exception as exc:  # the server lives: report, log, keep the chat
            log.exception("generation failed")
            yield ERROR_PREFIX + f"Generation failed: {type(exc).__name__}: {exc}"

    def _request(
        self, message: Any, history: Any, system_prompt: str, temperature: float, top_p: float, top_k: int,
        repetition_penalty: float, seed: float, max_context: int | None, max_new_tokens: int | None,
        image_megapixels: float, video_fps: float, video_max_frames: int, video_megapixels: float,
    ) -> ChatRequest:  # fmt: skip
        cap = self.settings.max_context
        max_context = cap if max_context is None else int(max_context)
        if not 256 <= max_context <= cap:
            raise RequestError(f"max_context must be between 256 and the server's cap {cap}, got {max_context}.")
        max_new = min(512, self.settings.max_new_tokens) if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new <= self.settings.max_new_tokens:
            raise RequestError(
                f"max_new_tokens must be between 1 and the server's cap {self.settings.max_new_tokens}, got {max_new}."
            )
        _require("image_megapixels", image_megapixels, 0.01, 16.0)
        _require("video_fps", video_fps, 0.1, 8.0)
        _require("video_max_frames", video_max_frames, 2, 256)
        _require("video_megapixels", video_megapixels, 0.1, 64.0)
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
        )
        media = MediaBudget(
            max_image_pixels=int(image_megapixels * MEGA),
            video_fps=float(video_fps),
            video_max_frames=int(video_max_frames),
            video_total_pixels=int(video_megapixels * MEGA),
        )
        return ChatRequest(
            message=parse_message(message),
            history=parse_history(history),
            system_prompt=system_prompt or "",
            sampling=sampling,
            max_context=max_context,
            media=media,
            max_files_per_turn=self.settings.max_files_per_turn,
        )

    def panel(self) -> tuple[str, str]:
        snap = self.service.snapshot()
        return format_panel(snap), format_status(snap)

    def estimate(
        self, max_context: int, max_new: int, image_mp: float, fps: float, frames: int, video_mp: float
    ) -> str:
        del fps  # the frame count, not the rate, bounds a clip's tokens
        try:
            line = self.service.estimate(int(max_context), int(image_mp * MEGA), int(frames), int(video_mp * MEGA))
            return f"Prompt budget {int(max_context) - int(max_new):,} tokens · {line}"
        except Exception as exc:  # an estimate must never break the page
            return f"(no estimate: {exc})"

    def switch(self, precision: str) -> str:
        try:
            return self.service.switch_precision(precision).describe()
        except (SwitchRefused, Busy, TimeoutError) as exc:
            return f"Not switched: {exc}"

    def clear(self) -> None:
        self.service.release_memory()


def _require(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value!r}.")
