"""Gradio event handlers: UI values -> engine requests, engine errors -> messages in the chat."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from qwen3vl_webui import precisions, ranges
from qwen3vl_webui.config import Settings
from qwen3vl_webui.conversation import (
    ERROR_PREFIX,
    WAIT_PREFIX,
    ConversationStore,
    History,
    Turn,
    UserMessage,
    parse_history,
    parse_message,
)
from qwen3vl_webui.engine.backend.client import BackendError, BackendRefused
from qwen3vl_webui.engine.remote.protocol import EngineDied
from qwen3vl_webui.engine.request import RequestError, SamplingParams
from qwen3vl_webui.engine.stops import parse_stop_lines
from qwen3vl_webui.media import MediaBudget
from qwen3vl_webui.service.admission import Busy, Cancelled, Client
from qwen3vl_webui.service.chat import ChatService, ShuttingDown, Waiting
from qwen3vl_webui.service.longdoc import Reading
from qwen3vl_webui.service.manager import SwitchRefused
from qwen3vl_webui.service.metrics import arrived_at
from qwen3vl_webui.service.prompt import ChatRequest, RequestTimedOut
from qwen3vl_webui.ui import gradio_compat
from qwen3vl_webui.ui.panels import format_panel, format_status, plain_markdown
from qwen3vl_webui.ui.streaming import current_cancel

log = logging.getLogger(__name__)
_DEFAULT = ranges.REQUEST

BUSY_MESSAGE = "busy — try again: all GPU slots and the wait line are full."
# Streamed answers reach gradio at most this often (the last text always): each update is a message to every
# browser and ~1 ms of the server's single Python core (1.1 ms at 32 chats, a ceiling near 1,300 a second on a 2-core
# VM: bench/results/cpu/gradio_updates.json), which at 32 chats x 150 tok/s capped the whole app near 1,000 tok/s on
# an H100 (bench/RESULTS.md, gradio_client load test).
STREAM_INTERVAL_S = 0.05
# ... and, with QWEN3VL_STREAM_UPDATES_PER_S=N, all streaming chats together at most about N a second: past
# N x STREAM_INTERVAL_S chats, each chat's interval grows with their number (N=250, 32 chats: 128 ms, 8 updates a
# second each), so the page's updates stop growing with the load. Off (0) by default: on a 2-core CPU it measured no
# gain (bench/results/cpu/ab_stream_updates.json: the front end is not the limit there); the H200 A/B decides.
STREAM_UPDATES_PER_S = float(os.environ.get("QWEN3VL_STREAM_UPDATES_PER_S", "0"))
EMPTY_ANSWER = "(the model returned an empty answer)"
FAILED_MESSAGE = "Generation failed on the server; the error was logged. Please try again."
OPERATOR_ONLY = (
    "only the operator can do this: log in as the --admin-auth user (QWEN3VL_ADMIN_AUTH), or run the app on "
    "127.0.0.1 without --share."
)
# Server-wide actions, at most this often whoever asks: a reload takes ~20 s of GPU on a warm cache.
SWITCH_INTERVAL_S = 10.0
RELEASE_INTERVAL_S = 5.0
# Every open tab polls the panel once a second, and anyone can call its event in a loop: one snapshot
# (NVML, psutil, the engine's figures) serves all callers for this long.
PANEL_CACHE_S = 0.5


class Handlers:
    """Bound to one ChatService; every method is safe to call from gradio's worker threads."""

    def __init__(
        self,
        service: ChatService,
        settings: Settings,
        file_roots: Sequence[Path] = (),
        conversations: ConversationStore | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        # Files may come only from gradio's upload folder (checked per call: GRADIO_TEMP_DIR) and these.
        self.file_roots = tuple(Path(p).resolve() for p in file_roots)
        self.conversations = conversations or ConversationStore(settings.max_history_turns, settings.max_files_per_chat)
        self._panel: tuple[float, tuple[str, str]] | None = None
        self._plots: tuple[float, Any] | None = None
        self._last_release = -1e9
        self._operator_lock = threading.Lock()
        self._streaming = 0  # chat answers streaming to the page now
        self._streaming_lock = threading.Lock()

    def stream_interval(self) -> float:
        """Seconds between two updates of one streamed answer: STREAM_INTERVAL_S, longer when many stream at once."""
        if STREAM_UPDATES_PER_S <= 0:
            return STREAM_INTERVAL_S
        return max(STREAM_INTERVAL_S, self._streaming / STREAM_UPDATES_PER_S)

    @contextlib.contextmanager
    def _counted_stream(self) -> Iterator[Callable[[], None]]:
        """Counts this answer among those streaming once `start()` is called (its first text: not while it waits)."""
        counted = False

        def start() -> None:
            nonlocal counted
            if not counted:
                with self._streaming_lock:
                    self._streaming += 1
                counted = True

        try:
            yield start
        finally:
            if counted:
                with self._streaming_lock:
                    self._streaming -= 1

    def chat(
        self,
        message: dict[str, Any] | str,
        history: list[dict[str, Any]],
        system_prompt: str = "",
        temperature: float = _DEFAULT["temperature"].default,
        top_p: float = _DEFAULT["top_p"].default,
        top_k: int = int(_DEFAULT["top_k"].default),
        repetition_penalty: float = _DEFAULT["repetition_penalty"].default,
        seed: float = _DEFAULT["seed"].default,
        max_context: int | None = None,
        max_new_tokens: int | None = None,
        image_megapixels: float = _DEFAULT["image_megapixels"].default,
        video_fps: float = _DEFAULT["video_fps"].default,
        video_max_frames: int = int(_DEFAULT["video_max_frames"].default),
        video_megapixels: float = _DEFAULT["video_megapixels"].default,
        stop_strings: str = "",
        whole_video: bool = False,
        request: gr.Request | None = None,
    ) -> Iterator[str]:
        """Streams the answer to `message`. Refusals come back as one chat message.

        `history` is what the client shows; only the turns this server answered in this session are used
        (`ConversationStore`). `stop_strings`: one a line (`\\n` for a line break); the answer ends before the
        first that appears. It comes last so that API clients sending the inputs by position keep working.
        `request` is filled in by gradio (the session, the client's address, the logged-in user).
        """
        session = getattr(request, "session_hash", None)
        arrived = arrived_at(request)  # the /queue/join's arrival: gradio's queue and plumbing took the time since
        doors = self.service.door_metrics
        doors.started("gradio", arrived)
        context: History | None = None
        chat: ChatRequest | None = None
        shown: str | None = None  # the last answer text streamed: what the client will show
        failed = False
        try:
            chat, context = self._request(
                message, history, system_prompt, temperature, top_p, top_k, repetition_penalty, seed,
                max_context, max_new_tokens, image_megapixels, video_fps, video_max_frames, video_megapixels,
                stop_strings, session,
            )  # fmt: skip
            if whole_video:  # a video longer than the frame budget: read in time segments (service/longvideo.py)
                chat = dataclasses.replace(chat, whole_video=True)
            # On ui.streaming's thread, its closing (Stop, a client gone) cancels the request at the engine's next step.
            stream = self.service.chat(chat, current_cancel(), report_waiting=True, client=self._client(request))
            with contextlib.closing(stream), self._counted_stream() as streaming:
                held, last = None, 0.0
                for item in stream:
                    if isinstance(item, Waiting):
                        # Also lets gradio close this generator if the client has gone.
                        yield WAIT_PREFIX + _waiting_text(item)
                        continue
                    if isinstance(item, Reading):  # a long document, part by part (service/longdoc.py)
                        yield WAIT_PREFIX + item.describe()
                        continue
                    streaming()
                    now = time.monotonic()
                    if now - last < self.stream_interval():
                        held = item  # a newer text replaces it before the browser would have drawn it
                        continue
                    if shown is None:
                        doors.first("gradio", arrived)
                    held, last, shown = None, now, item
                    yield item
                if held is not None:
                    shown = held
                    yield held
            if shown is None:
                shown = EMPTY_ANSWER
                yield EMPTY_ANSWER
        except RequestTimedOut as exc:
            failed = True
            yield ERROR_PREFIX + str(exc) + (f"\n\nThe answer so far:\n\n{exc.partial}" if exc.partial else "")
        except (BackendError, BackendRefused) as exc:  # they may quote the backend's words: text, never Markdown
            failed = True
            yield ERROR_PREFIX + plain_markdown(str(exc))
        except (RequestError, ValueError, ShuttingDown, TimeoutError, EngineDied) as exc:
            failed = True
            yield ERROR_PREFIX + str(exc)
        except Busy as exc:
            failed = True
            yield ERROR_PREFIX + (BUSY_MESSAGE if "full" in str(exc) else str(exc))
        except Cancelled:
            return
        except Exception:  # the server lives: a sentence for the user, the details in the log only
            failed = True
            log.exception("generation failed")
            yield ERROR_PREFIX + FAILED_MESSAGE
        finally:
            # A finished answer, or one the user stopped, is part of the conversation from now on.
            if session and context is not None and chat is not None and shown is not None and not failed:
                self.conversations.record(session, context, Turn(chat.message, shown))

    def _request(
        self, message: Any, history: Any, system_prompt: str, temperature: float, top_p: float, top_k: int,
        repetition_penalty: float, seed: float, max_context: int | None, max_new_tokens: int | None,
        image_megapixels: float, video_fps: float, video_max_frames: int, video_megapixels: float,
        stop_strings: str | None = "", session: str | None = None,
    ) -> tuple[ChatRequest, History]:  # fmt: skip
        # The configured caps (the sliders' tops); the service holds requests to the warm-up's lower
        # limits, if it set any, and the status line says so.
        caps = self.service.configured_limits
        cap, new_cap = caps.max_context, caps.max_new_tokens
        max_context = cap if max_context is None else int(_require("max_context", max_context, cap))
        if max_new_tokens is None:
            max_new_tokens = min(int(_DEFAULT["max_new_tokens"].default), new_cap)
        max_new = int(_require("max_new_tokens", max_new_tokens, new_cap))
        for name, value in (
            ("image_megapixels", image_megapixels), ("video_fps", video_fps),
            ("video_max_frames", video_max_frames), ("video_megapixels", video_megapixels),
        ):  # fmt: skip
            _require(name, value)
        if seed is not None and seed >= 0:
            seed = _require("seed", seed)
        if not isinstance(stop_strings, (str, type(None))):
            raise RequestError("stop_strings must be text: one stop string a line.")
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=_require("temperature", temperature),
            top_p=_require("top_p", top_p),
            top_k=int(_require("top_k", top_k)),
            repetition_penalty=_require("repetition_penalty", repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
            stop=parse_stop_lines(stop_strings or ""),
        )
        if not isinstance(system_prompt, (str, type(None))):
            raise RequestError("system_prompt must be text.")
        user, claimed = parse_message(message), parse_history(history)
        if session:
            context = self.conversations.trusted(session, claimed)
            if context.untrusted:
                log.info(
                    "session %s: %d history turn(s) the server did not answer were left out",
                    session[:8],
                    context.untrusted,
                )
        else:  # an in-process caller (tests, benchmarks): its history is its own
            context = History(claimed)
        turns = context.turns
        self._check_files(user, turns)
        media = MediaBudget(
            max_image_pixels=int(image_megapixels * ranges.MEGA),
            video_fps=float(video_fps),
            video_max_frames=int(video_max_frames),
            video_total_pixels=int(video_megapixels * ranges.MEGA),
        )
        chat = ChatRequest(
            message=user,
            history=turns,
            system_prompt=system_prompt or "",
            sampling=sampling,
            max_context=max_context,
            media=media,
            max_files_per_turn=self.settings.max_files_per_turn,
        )
        return chat, context

    def panel(self) -> tuple[str, str]:
        now = time.monotonic()
        cached = self._panel
        if cached is not None and now - cached[0] < PANEL_CACHE_S:
            return cached[1]
        snap = self.service.snapshot()
        text = format_panel(snap, self.queued()), format_status(snap)
        self._panel = (now, text)
        return text

    def plots(self) -> tuple[Any, Any, Any, Any]:
        """The live plots' frames (ui/plots.py) from the service's load history; shared by all callers for 1 s."""
        from qwen3vl_webui.ui.plots import frames

        now = time.monotonic()
        cached = self._plots
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        result = frames(self.service.history.samples())
        self._plots = (now, result)
        return result

    def queued(self) -> int:
        """Requests waiting in gradio's queue; set by the layout once the Blocks exist."""
        return 0

    def estimate(
        self, max_context: int, max_new: int, image_mp: float, fps: float, frames: int, video_mp: float
    ) -> str:
        del fps  # the frame count, not the rate, bounds a clip's tokens
        try:
            line = self.service.estimate(int(max_context), int(image_mp * ranges.MEGA), int(frames), int(video_mp * ranges.MEGA))
            return f"Prompt budget {int(max_context) - int(max_new):,} tokens · {line}"
        except Exception as exc:  # an estimate must never break the page
            return f"(no estimate: {exc})"

    def _check_files(self, user: UserMessage, turns: list[Turn]) -> None:
        """Refuses any file that gradio did not receive as an upload (defence in depth: gradio checks too)."""
        roots = (Path(gradio_compat.upload_folder()).resolve(), *self.file_roots)
        for path in (*user.files, *(f for t in turns for f in t.user.files)):
            resolved = Path(os.path.abspath(path)).resolve()
            if not any(resolved.is_relative_to(root) for root in roots):
                raise RequestError(
                    f"{Path(path).name} was not uploaded to this server; attach the file instead of naming a path."
                )

    def switch(self, precision: str, request: gr.Request | None = None) -> str:
        """Reloads the model in `precision`: the operator's action alone, at most once per SWITCH_INTERVAL_S."""
        if not self.is_operator(request):
            return f"Not switched: {OPERATOR_ONLY}"
        if precision not in precisions.CHOICES:
            return f"Not switched: unknown precision {precision!r}; choose one of {', '.join(precisions.CHOICES)}."
        try:
            report = self.service.switch_precision(
                precision, self.settings.warmup, ranges.largest_image_pixels(), min_interval_s=SWITCH_INTERVAL_S
            )
            return report.describe()
        except (SwitchRefused, Busy, TimeoutError) as exc:
            return f"Not switched: {exc}"

    def release(self, request: gr.Request | None = None) -> str:
        """Gives cached GPU memory back to the driver (a garbage collection and the allocator's cache)."""
        if not self.is_operator(request):
            return f"Not released: {OPERATOR_ONLY}"
        wait = self._take_turn("_last_release", RELEASE_INTERVAL_S)
        if wait:
            return f"Not released: memory was released under {RELEASE_INTERVAL_S:g} s ago; try again in {wait:.0f} s."
        self.service.release_memory()
        return "Released cached memory."

    def _take_turn(self, attr: str, interval: float) -> float:
        """0 and the action's clock started if `interval` has passed since the last one, else seconds to wait."""
        with self._operator_lock:
            now = time.monotonic()
            wait = getattr(self, attr) + interval - now
            if wait > 0:
                return wait
            setattr(self, attr, now)
            return 0.0

    def is_operator(self, request: gr.Request | None) -> bool:
        """The --admin-auth user when one is set; otherwise anyone, if the app can only be reached from this machine."""
        admin = self.settings.admin_user()
        if admin is not None:
            return getattr(request, "username", None) == admin
        return self.settings.local_only

    def loaded_precision(self) -> Any:
        """On page load (and after a switch): the reload menu shows the precision loaded now, not a default."""
        loaded = self.service.manager.current()
        if loaded is None:
            return gr.update(value=None)
        menu = list(precisions.MENU)
        if loaded.precision not in {name for _, name in menu}:  # fp32 on a CPU is not offered, but it is loaded
            menu.append((precisions.label(loaded.precision), loaded.precision))
        return gr.update(choices=[(f"{label} (loaded)" if name == loaded.precision else label, name)
                                  for label, name in menu], value=loaded.precision)  # fmt: skip

    def operator_view(self, request: gr.Request) -> Any:
        """On page load: the server-wide controls are shown to the operator only (and refused to others); a front end
        (--backend-url) has no local model to switch or memory to release, so nobody sees them."""
        return gr.update(visible=self.is_operator(request) and self.service.manager.backend is None)

    def _client(self, request: gr.Request | None) -> Client | None:
        if request is None:
            return None
        client = getattr(request, "client", None)
        address = getattr(client, "host", None) or "unknown"
        return Client(address, exempt=self.is_operator(request))

    def context_sliders(self) -> tuple[Any, Any]:
        """On page load: lowers the context sliders' tops if the warm-up lowered the limits."""
        limits, caps = self.service.limits, self.service.configured_limits
        if limits.max_context >= caps.max_context and limits.max_new_tokens >= caps.max_new_tokens:
            return gr.skip(), gr.skip()
        return (
            gr.update(maximum=limits.max_context, value=limits.max_context),
            gr.update(maximum=limits.max_new_tokens, value=min(int(_DEFAULT["max_new_tokens"].default), limits.max_new_tokens)),
        )

    def clear(self, request: gr.Request | None = None) -> None:
        """The chat was cleared: this session's conversation starts again (nothing server-wide happens)."""
        session = getattr(request, "session_hash", None)
        if session:
            self.conversations.forget(session)


def _require(name: str, value: Any, cap: float | None = None) -> float:
    """`value` as a float if it is a finite number in its range (ranges.REQUEST, the top lowered to `cap`)."""
    return ranges.check(name, value, cap, error=RequestError)


def _waiting_text(item: Waiting) -> str:
    if item.reason == "the model to load":
        return "Waiting for the model to load…"
    return f"Waiting for {item.reason} ({item.running} running, {item.waiting} waiting)…"
