"""A chat request -> model inputs: media loaded (and cached), the chat template applied, whole old turns dropped to fit."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_webui.conversation import Turn, UserMessage, keep_recent_chars
from qwen3vl_webui.documents import is_document
from qwen3vl_webui.engine.request import PreparedPrompt, RequestError, SamplingParams
from qwen3vl_webui.media import MediaBudget, MediaError, load_image, load_video, media_kind
from qwen3vl_webui.weights.model import LoadedModel

# Real text averages about 4 characters per Qwen token; no realistic text packs 16. A message longer
# than 16 characters per token of max context cannot fit, so it is refused before the tokenizer
# reads it (a 1 MB paste costs nothing), and older turns beyond that many characters are not encoded.
CHARS_PER_TOKEN = 16


class RequestTimedOut(RequestError):
    """The request ran past the server's per-request wall-clock limit; carries the partial answer."""

    def __init__(self, message: str, partial: str = "") -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class ChatRequest:
    message: UserMessage
    history: list[Turn] = field(default_factory=list)
    system_prompt: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_context: int = 16384
    media: MediaBudget = field(default_factory=MediaBudget)
    max_files_per_turn: int = 8
    whole_video: bool = False  # a video longer than the frame budget is read in time segments (service/longvideo.py)


class MediaCache:
    """Decoded media by (path, budget), up to `max_bytes` of pixels: earlier turns' files are not decoded again.

    Bounded by bytes, not items: a conversation may hold up to --max-files-per-chat files, and a cache that holds
    fewer than that decodes the oldest again on every turn.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, MediaBudget], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, budget: MediaBudget) -> tuple[str, Any]:
        kind = media_kind(path)
        key = (path, budget)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return kind, self._items[key][0]
        value = load_image(path, budget) if kind == "image" else load_video(path, budget)
        size = _pixel_bytes(value)
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, size)
                self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return kind, value


def _pixel_bytes(value: Any) -> int:
    frames = getattr(value, "frames", None)
    if frames is not None:
        return int(frames.nbytes)
    width, height = value.size
    return width * height * len(value.getbands())


class TurnCounts:
    """Prompt tokens of each earlier turn, counted once: trimming a long chat re-encodes nothing it counted.

    Turns are additive in Qwen's chat template (each is `<|im_start|>…<|im_end|>`, special tokens that no
    merge crosses), so a prompt's length is its current message's plus its earlier turns' own counts; the one
    final encode checks it.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[tuple[int, Turn, MediaBudget], int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, processor: Any, turn: Turn, request: ChatRequest, cache: MediaCache) -> int:
        key = (id(processor), turn, request.media)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        count = int(
            _encode(processor, [turn], request, cache, generation_prompt=False, system=False)["input_ids"].shape[1]
        )
        with self._lock:
            self._items[key] = count
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return count


def check_message(request: ChatRequest) -> int:
    """What every prompt builder refuses before any work (this one and the remote backend's); the prompt-token budget:
    max context minus max new tokens."""
    budget = request.max_context - request.sampling.max_new_tokens
    if budget <= 0:
        raise RequestError(
            f"max new tokens ({request.sampling.max_new_tokens}) must be below max context ({request.max_context})."
        )
    if request.message.is_empty:
        raise RequestError("The message is empty: type a question or attach an image or video.")
    if len(request.message.files) > request.max_files_per_turn:
        raise RequestError(
            f"{len(request.message.files)} files were attached; at most {request.max_files_per_turn} per message."
        )
    max_chars = request.max_context * CHARS_PER_TOKEN
    chars = len(request.message.text) + len(request.system_prompt)
    if chars > max_chars:
        raise RequestError(
            f"The message is {chars:,} characters long, but max context {request.max_context:,} tokens holds "
            f"at most about {max_chars:,} characters, so it was not read. Shorten it or attach it in parts."
        )
    return budget


def build_prompt(
    loaded: LoadedModel,
    request: ChatRequest,
    media_cache: MediaCache | None = None,
    counts: TurnCounts | None = None,
    deadline: float | None = None,
) -> PreparedPrompt:
    """Model inputs for the request, whole old turns dropped (oldest first) to fit the context cap.

    One pass: the current message is encoded, then earlier turns are counted newest first (each turn's count
    cached in `counts`) until the budget is spent, and the kept turns are encoded once. Files of turns that do
    not fit are never decoded. `deadline` (time.monotonic) bounds the work: past it, RequestTimedOut.
    """
    cache = media_cache or MediaCache()
    counts = counts or TurnCounts()
    budget = check_message(request)
    max_chars = request.max_context * CHARS_PER_TOKEN
    chars = len(request.message.text) + len(request.system_prompt)
    processor = loaded.processor
    current = Turn(request.message, "")
    # The current message first: a bad file is reported before any earlier turn is looked at.
    for path in request.message.files:
        _check_deadline(deadline)
        cache.get(path, request.media)
    _check_deadline(deadline)
    inputs = _encode(processor, [current], request, cache)
    tokens = int(inputs["input_ids"].shape[1])
    if tokens > budget:
        raise RequestError(
            f"This message needs {tokens:,} prompt tokens, but max context {request.max_context:,} minus "
            f"{request.sampling.max_new_tokens:,} new tokens leaves {budget:,}. Shorten it, attach less, "
            "lower the image/video budget or raise max context."
        )
    history = keep_recent_chars(request.history, max_chars - chars)
    kept = 0
    total = tokens
    for turn in reversed(history):
        _check_deadline(deadline)
        try:
            cost = counts.get(processor, turn, request, cache)
        except MediaError:  # an earlier turn's file is gone (uploads expire) or unreadable: the chat starts after it
            break
        if total + cost > budget:
            break
        total += cost
        kept += 1
    while kept:
        _check_deadline(deadline)
        inputs = _encode(processor, [*history[len(history) - kept :], current], request, cache)
        tokens = int(inputs["input_ids"].shape[1])
        if tokens <= budget:
            break
        kept -= 1  # the counts were not additive after all (a template change): drop one more and check again
    if not kept:
        inputs = _encode(processor, [current], request, cache) if tokens > budget else inputs
        tokens = int(inputs["input_ids"].shape[1])
    ids = inputs["input_ids"][0]
    config = loaded.config
    image = int((ids == config.image_token_id).sum())
    video = int((ids == config.video_token_id).sum())
    dropped = len(request.history) - kept
    return PreparedPrompt(inputs, tokens, tokens - image - video, image, video, dropped)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise RequestTimedOut(
            "Stopped while building the prompt: the request ran past the server's per-request limit (--request-timeout)."
        )


def as_plain_text(text: str) -> str:
    """Typed text stays text: `<|im_start|>`, `<|image_pad|>` and the like lose their special meaning.

    The chat template renders to a string that is then tokenized, so without this a user could
    open a fake system turn or add image placeholders without an image. A zero-width space after
    `<` makes each such marker ordinary characters; nothing else in the text changes.
    """
    return text.replace("<|", "<\u200b|")


def _encode(
    processor: Any,
    turns: list[Turn],
    request: ChatRequest,
    cache: MediaCache,
    generation_prompt: bool = True,
    system: bool = True,
) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if system and request.system_prompt.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": as_plain_text(request.system_prompt)}]})
    metadata: list[dict[str, Any]] = []
    for turn in turns:
        content: list[dict[str, Any]] = []
        for path in turn.user.files:
            if is_document(path):  # read for its own turn (service/longdoc.py); later turns keep its answer
                continue
            kind, value = cache.get(path, request.media)
            if kind == "image":
                content.append({"type": "image", "image": value})
            else:
                content.append({"type": "video", "video": value.frames})
                metadata.append(dict(value.metadata))
        if turn.user.text:
            content.append({"type": "text", "text": as_plain_text(turn.user.text)})
        messages.append({"role": "user", "content": content})
        if turn.assistant:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": as_plain_text(turn.assistant)}]})
    kwargs: dict[str, Any] = {
        "images_kwargs": {"size": {"longest_edge": request.media.max_image_pixels, "shortest_edge": 32 * 32}},
    }
    if metadata:
        kwargs.update(video_metadata=metadata, do_sample_frames=False)
        if _takes_frame_cap(processor):
            # The frames are already within the media budget (media.py) and the planner counts the processor's
            # whole-clip budget: keep that behaviour, said once here instead of transformers' notice on every start.
            kwargs["cap_pixels_per_frame"] = False
    return processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=generation_prompt,
        processor_kwargs=kwargs,
    )


def _takes_frame_cap(processor: Any) -> bool:
    """Whether this transformers' Qwen3-VL video processor has `cap_pixels_per_frame` (5.2x; 5.17 has none)."""
    import inspect

    video = getattr(processor, "video_processor", None)
    preprocess = getattr(video, "_preprocess", None)
    try:
        return preprocess is not None and "cap_pixels_per_frame" in inspect.signature(preprocess).parameters
    except (TypeError, ValueError):
        return False
