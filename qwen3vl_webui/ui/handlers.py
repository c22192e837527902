"""Gradio event handlers: UI values -> engine requests, engine errors -> messages in the chat."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qwen3vl_webui.config import PRECISIONS, Settings
from qwen3vl_webui.conversation import ERROR_PREFIX, WAIT_PREFIX, Turn, UserMessage, parse_history, parse_message
from qwen3vl_webui.engine.generation import ChatRequest, RequestError, RequestTimedOut, SamplingParams
from qwen3vl_webui.engine.manager import SwitchRefused
from qwen3vl_webui.engine.scheduler import Busy, Cancelled
from qwen3vl_webui.engine.service import ChatService, ShuttingDown, Waiting
from qwen3vl_webui.engine.stops import parse_stop_lines
from qwen3vl_webui.media import MediaBudget
from qwen3vl_webui.ui.panels import format_panel, format_status

log = logging.getLogger(__name__)

MEGA = 1_000_000
BUSY_MESSAGE = "busy — try again: all GPU slots and the wait line are full."
# Streamed answers reach gradio at most this often (the last text always): each update is a message to every
# browser and ~1 ms of the server's single Python core, which at 32 chats x 150 tok/s capped the whole app near
# 1,000 tok/s on an H100 (bench/RESULTS.md, gradio_client load test).
STREAM_INTERVAL_S = 0.05
# The image slider's top, in megapixels: also the image size the start-up warm-up uses.
IMAGE_MP_MAX = 4.0


class Handlers:
    """Bound to one ChatService; every method is safe to call from gradio's worker threads."""

    def __init__(self, service: ChatService, settings: Settings, file_roots: Sequence[Path] = ()) -> None:
        self.service = service
        self.settings = settings
        # Files may come only from gradio's upload folder (checked per call: GRADIO_TEMP_DIR) and these.
        self.file_roots = tuple(Path(p).resolve() for p in file_roots)

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
        stop_strings: str = "",
    ) -> Iterator[str]:
        """Streams the answer to `message` given `history`. Refusals come back as one chat message.

        `stop_strings`: one a line (`\\n` for a line break); the answer ends before the first that appears.
        It comes last so that API clients sending the inputs by position keep working.
        """
        answered = False
        try:
            request = self._request(
                message, history, system_prompt, temperature, top_p, top_k, repetition_penalty, seed,
                max_context, max_new_tokens, image_megapixels, video_fps, video_max_frames, video_megapixels,
                stop_strings,
            )  # fmt: skip
            with contextlib.closing(self.service.chat(request, report_waiting=True)) as stream:
                held, last = None, 0.0
                for item in stream:
                    if isinstance(item, Waiting):
                        # Also lets gradio close this generator if the client has gone.
                        yield WAIT_PREFIX + _waiting_text(item)
                        continue
                    answered = True
                    now = time.monotonic()
                    if now - last < STREAM_INTERVAL_S:
                        held = item  # a newer text replaces it before the browser would have drawn it
                        continue
                    held, last = None, now
                    yield item
                if held is not None:
                    yield held
            if not answered:
                yield "(the model returned an empty answer)"
        except RequestTimedOut as exc:
            yield ERROR_PREFIX + str(exc) + (f"\n\nThe answer so far:\n\n{exc.partial}" if exc.partial else "")
        except (RequestError, ValueError) as exc:
            yield ERROR_PREFIX + str(exc)
        except ShuttingDown as exc:
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
        stop_strings: str | None = "",
    ) -> ChatRequest:  # fmt: skip
        # The flags' caps (the sliders' tops); the service holds requests to the warm-up's lower
        # limits, if it set any, and the status line says so.
        cap, new_cap = self.settings.max_context, self.settings.max_new_tokens
        max_context = cap if max_context is None else int(_require("max_context", max_context, 256, cap))
        if max_new_tokens is None:
            max_new_tokens = min(512, new_cap)
        max_new = int(_require("max_new_tokens", max_new_tokens, 1, new_cap))
        _require("image_megapixels", image_megapixels, 0.01, 16.0)
        _require("video_fps", video_fps, 0.1, 8.0)
        _require("video_max_frames", video_max_frames, 2, 256)
        _require("video_megapixels", video_megapixels, 0.1, 64.0)
        if seed is not None and seed >= 0:
            seed = _require("seed", seed, 0, 2**32 - 1)
        if not isinstance(stop_strings, (str, type(None))):
            raise RequestError("stop_strings must be text: one stop string a line.")
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=_require("temperature", temperature, 0.0, 2.0),
            top_p=_require("top_p", top_p, 0.01, 1.0),
            top_k=int(_require("top_k", top_k, 0, 1000)),
            repetition_penalty=_require("repetition_penalty", repetition_penalty, 0.5, 2.0),
            seed=None if seed is None or seed < 0 else int(seed),
            stop=parse_stop_lines(stop_strings or ""),
        )
        if not isinstance(system_prompt, (str, type(None))):
            raise RequestError("system_prompt must be text.")
        user, turns = parse_message(message), parse_history(history)
        self._check_files(user, turns)
        media = MediaBudget(
            max_image_pixels=int(image_megapixels * MEGA),
            video_fps=float(video_fps),
            video_max_frames=int(video_max_frames),
            video_total_pixels=int(video_megapixels * MEGA),
        )
        return ChatRequest(
            message=user,
            history=turns,
            system_prompt=system_prompt or "",
            sampling=sampling,
            max_context=max_context,
            media=media,
            max_files_per_turn=self.settings.max_files_per_turn,
        )

    def panel(self) -> tuple[str, str]:
        snap = self.service.snapshot()
        return format_panel(snap, self.queued()), format_status(snap)

    def queued(self) -> int:
        """Requests waiting in gradio's queue; set by the layout once the Blocks exist."""
        return 0

    def estimate(
        self, max_context: int, max_new: int, image_mp: float, fps: float, frames: int, video_mp: float
    ) -> str:
        del fps  # the frame count, not the rate, bounds a clip's tokens
        try:
            line = self.service.estimate(int(max_context), int(image_mp * MEGA), int(frames), int(video_mp * MEGA))
            return f"Prompt budget {int(max_context) - int(max_new):,} tokens · {line}"
        except Exception as exc:  # an estimate must never break the page
            return f"(no estimate: {exc})"

    def _check_files(self, user: UserMessage, turns: list[Turn]) -> None:
        """Refuses any file that gradio did not receive as an upload (defence in depth: gradio checks too)."""
        roots = (Path(_upload_folder()).resolve(), *self.file_roots)
        for path in (*user.files, *(f for t in turns for f in t.user.files)):
            resolved = Path(os.path.abspath(path)).resolve()
            if not any(resolved.is_relative_to(root) for root in roots):
                raise RequestError(
                    f"{Path(path).name} was not uploaded to this server; attach the file instead of naming a path."
                )

    def switch(self, precision: str) -> str:
        if precision not in PRECISIONS:
            return f"Not switched: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}."
        try:
            report = self.service.switch_precision(precision, self.settings.warmup, int(IMAGE_MP_MAX * MEGA))
            return report.describe()
        except (SwitchRefused, Busy, TimeoutError) as exc:
            return f"Not switched: {exc}"

    def context_sliders(self) -> tuple[Any, Any]:
        """On page load: lowers the context sliders' tops if the warm-up lowered the limits."""
        import gradio as gr

        limits, settings = self.service.limits, self.settings
        if limits.max_context >= settings.max_context and limits.max_new_tokens >= settings.max_new_tokens:
            return gr.skip(), gr.skip()
        return (
            gr.update(maximum=limits.max_context, value=limits.max_context),
            gr.update(maximum=limits.max_new_tokens, value=min(512, limits.max_new_tokens)),
        )

    def clear(self) -> None:
        self.service.release_memory()


def _require(name: str, value: Any, lo: float, hi: float) -> float:
    """`value` as a float if it is a finite number in [lo, hi]; otherwise a RequestError naming the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise RequestError(f"{name} must be between {_plain(lo)} and {_plain(hi)}, got {value!r}.")
    return float(value)


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _waiting_text(item: Waiting) -> str:
    if item.reason == "the model to load":
        return "Waiting for the model to load…"
    return f"Waiting for {item.reason} ({item.running} running, {item.waiting} waiting)…"


def _upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()
