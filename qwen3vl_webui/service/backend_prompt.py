"""A chat request -> OpenAI `messages` for a remote backend (--backend-url): images and videos as data: URIs, whole
old turns dropped to fit an estimate of max context (the backend's tokenizer is not here; it counts exactly)."""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from qwen3vl_webui import planner
from qwen3vl_webui.documents import is_document
from qwen3vl_webui.engine.request import PreparedPrompt, RequestError
from qwen3vl_webui.media import MediaBudget, MediaError, load_image, media_kind
from qwen3vl_webui.service.prompt import ChatRequest, RequestTimedOut, as_plain_text, check_message

# Text is counted at 3 characters a token (real text averages about 4): an estimate that errs long, so that the
# backend rarely refuses a prompt this side let through; the backend's usage gives the exact count afterwards.
TEXT_CHARS_PER_TOKEN = 3
TURN_OVERHEAD_TOKENS = 8  # a turn's role markers in the chat template
VIDEO_MIME = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska"}
JPEG_QUALITY = 92
WHOLE_VIDEO_REFUSED = (
    "Whole video reads a video here in time segments, but with --backend-url the backend is sent each video whole "
    "and samples its frames itself. Uncheck Whole video (or leave out whole_video) and ask again."
)


class MediaParts:
    """Files as content parts by (path, budget), up to `max_bytes` of base64: earlier turns' files are not read and
    encoded again on every turn."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, MediaBudget], tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, budget: MediaBudget) -> tuple[dict[str, Any], int]:
        """(content part, estimated visual tokens) of an image or video file; MediaError if it cannot be read."""
        key = (path, budget)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = _image_part(path, budget) if media_kind(path) == "image" else _video_part(path, budget)
        size = len(item[0].get("image_url", item[0].get("video_url", {})).get("url", ""))
        with self._lock:
            if key not in self._items:
                self._items[key] = item
                self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (part, _) = self._items.popitem(last=False)
                self._bytes -= len(part.get("image_url", part.get("video_url", {})).get("url", ""))
        return item


def _image_part(path: str, budget: MediaBudget) -> tuple[dict[str, Any], int]:
    """The image under the pixel budget (media.load_image: headers checked, resized, RGB) as a JPEG data: URI."""
    image = load_image(path, budget)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    tokens = planner.image_tokens(image.width, image.height, budget.max_image_pixels, _SHAPE)
    return {"type": "image_url", "image_url": {"url": url}}, tokens


def _video_part(path: str, budget: MediaBudget) -> tuple[dict[str, Any], int]:
    """The video file as it was uploaded (the backend samples its frames) as a data: URI."""
    mime = VIDEO_MIME.get(Path(path).suffix.lower())
    if mime is None:
        raise MediaError(f"{Path(path).name}: not a video type the backend is sent (mp4, webm, mov, mkv).")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MediaError(f"{Path(path).name} cannot be read ({exc.strerror}).") from None
    url = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    side = int(math.sqrt(max(1, budget.video_total_pixels // max(1, budget.frame_cap)) * 16 / 9))
    tokens = planner.video_tokens(budget.frame_cap, side, side * 9 // 16, _SHAPE, max_pixels=budget.video_total_pixels)
    return {"type": "video_url", "video_url": {"url": url}}, tokens


_SHAPE = planner.ModelShape.qwen3vl_4b()  # the estimate's shape: Qwen3-VL's patches; the backend counts exactly


def build_messages(
    request: ChatRequest, parts: MediaParts | None = None, deadline: float | None = None
) -> PreparedPrompt:
    """The request as OpenAI `messages` in `PreparedPrompt.inputs["messages"]`, with estimated token counts.

    The same checks as the local prompt (service/prompt.build_prompt): the message must fit max context minus max
    new tokens, and earlier turns are dropped, oldest first, until the estimate fits."""
    if request.whole_video or request.media.segment is not None:
        raise RequestError(WHOLE_VIDEO_REFUSED)
    parts = parts or MediaParts()
    budget = check_message(request)
    try:
        current, (text, image, video) = _user(request.message, request.media, parts, deadline)
    except MediaError as exc:
        raise RequestError(str(exc)) from exc
    text += _text_tokens(request.system_prompt) if request.system_prompt.strip() else 0
    if text + image + video > budget:
        raise RequestError(
            f"This message needs about {text + image + video:,} prompt tokens, but max context "
            f"{request.max_context:,} minus {request.sampling.max_new_tokens:,} new tokens leaves {budget:,}. Shorten "
            "it, attach less, lower the image/video budget or raise max context."
        )
    kept: list[list[dict[str, Any]]] = []
    for turn in reversed(request.history):
        _check_deadline(deadline)
        try:
            user, (t, i, v) = _user(turn.user, request.media, parts, deadline)
        except MediaError:  # an earlier turn's file is gone (uploads expire) or unreadable: the chat starts after it
            break
        t += _text_tokens(turn.assistant)
        if text + image + video + t + i + v > budget:
            break
        text, image, video = text + t, image + i, video + v
        kept.append([user, {"role": "assistant", "content": as_plain_text(turn.assistant)}])
    messages: list[dict[str, Any]] = []
    if request.system_prompt.strip():
        messages.append({"role": "system", "content": as_plain_text(request.system_prompt)})
    for pair in reversed(kept):
        messages += pair
    messages.append(current)
    tokens = text + image + video
    dropped = len(request.history) - len(kept)
    return PreparedPrompt({"messages": messages}, tokens, text, image, video, dropped)


def _user(
    message: Any, media: MediaBudget, parts: MediaParts, deadline: float | None
) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """One user message as content parts (files first, then the text, as the local template puts them) and its
    estimated (text, image, video) tokens. Documents are read by service/longdoc.py, not sent."""
    content: list[dict[str, Any]] = []
    image = video = 0
    for path in message.files:
        if is_document(path):
            continue
        _check_deadline(deadline)
        part, tokens = parts.get(path, media)
        content.append(part)
        if part["type"] == "image_url":
            image += tokens
        else:
            video += tokens
    if message.text:
        content.append({"type": "text", "text": as_plain_text(message.text)})
    return {"role": "user", "content": content}, (_text_tokens(message.text), image, video)


def _text_tokens(text: str) -> int:
    return TURN_OVERHEAD_TOKENS + math.ceil(len(text) / TEXT_CHARS_PER_TOKEN)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise RequestTimedOut(
            "Stopped while building the prompt: the request ran past the server's per-request limit (--request-timeout)."
        )
