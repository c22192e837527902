"""Request -> streamed tokens: prompt building under the context cap, generate thread, stop, stats."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_webui.conversation import Turn, UserMessage, keep_recent_chars
from qwen3vl_webui.engine.faults import FaultInjector
from qwen3vl_webui.engine.loading import LoadedModel
from qwen3vl_webui.engine.stops import StopMatcher, StopText, TokenBytes
from qwen3vl_webui.media import MediaBudget, MediaError, load_image, load_video, media_kind
from qwen3vl_webui.telemetry import RequestStats

# Seconds the stream reader waits for the next token before giving up on a dead generate thread.
TOKEN_TIMEOUT_S = 600.0
# Real text averages about 4 characters per Qwen token; no realistic text packs 16. A message longer
# than 16 characters per token of max context cannot fit, so it is refused before the tokenizer
# reads it (a 1 MB paste costs nothing), and older turns beyond that many characters are not encoded.
CHARS_PER_TOKEN = 16
# Stop strings per request: a few short ones, so checking them costs next to nothing per token.
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 100


class RequestError(ValueError):
    """A request the server refuses; str() is the sentence shown to the user."""


class RequestTimedOut(RequestError):
    """The request ran past the server's per-request wall-clock limit; carries the partial answer."""

    def __init__(self, message: str, partial: str = "") -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    seed: int | None = None
    # The answer ends at the token that completes any of these; the returned text stops before it.
    stop: tuple[str, ...] = ()
    # Generate max_new_tokens whatever the model says (benchmarks and load tests; vLLM's `ignore_eos`).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.01, 1.0)
        _check_range("top_k", self.top_k, 0, 1000)
        _check_range("repetition_penalty", self.repetition_penalty, 0.5, 2.0)
        _check_range("max_new_tokens", self.max_new_tokens, 1, 262144)
        if self.seed is not None:
            _check_range("seed", self.seed, 0, 2**32 - 1)
        object.__setattr__(self, "stop", _check_stop(self.stop))


def _check_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
        raise RequestError(f"stop must be a list of strings, got {type(stop).__name__}.")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"At most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}.")
    for item in stop:
        if not isinstance(item, str):
            raise RequestError(f"Stop strings must be text, got {type(item).__name__}.")
        if not item:
            raise RequestError("A stop string must not be empty.")
        if len(item) > MAX_STOP_CHARS:
            raise RequestError(f"A stop string may be at most {MAX_STOP_CHARS} characters long, got {len(item)}.")
    return tuple(stop)


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value!r}.")


@dataclass(frozen=True)
class ChatRequest:
    message: UserMessage
    history: list[Turn] = field(default_factory=list)
    system_prompt: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_context: int = 16384
    media: MediaBudget = field(default_factory=MediaBudget)
    max_files_per_turn: int = 8


@dataclass(frozen=True)
class PreparedPrompt:
    inputs: dict[str, Any]
    tokens: int
    text_tokens: int
    image_tokens: int
    video_tokens: int
    turns_dropped: int


class _MediaCache:
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

    def get(self, processor: Any, turn: Turn, request: ChatRequest, cache: _MediaCache) -> int:
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


def build_prompt(
    loaded: LoadedModel,
    request: ChatRequest,
    media_cache: _MediaCache | None = None,
    counts: TurnCounts | None = None,
    deadline: float | None = None,
) -> PreparedPrompt:
    """Model inputs for the request, whole old turns dropped (oldest first) to fit the context cap.

    One pass: the current message is encoded, then earlier turns are counted newest first (each turn's count
    cached in `counts`) until the budget is spent, and the kept turns are encoded once. Files of turns that do
    not fit are never decoded. `deadline` (time.monotonic) bounds the work: past it, RequestTimedOut.
    """
    cache = media_cache or _MediaCache()
    counts = counts or TurnCounts()
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
    config = loaded.model.config
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
    cache: _MediaCache,
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
    return processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=generation_prompt,
        processor_kwargs=kwargs,
    )


def stream_generate(
    loaded: LoadedModel,
    prompt: PreparedPrompt,
    sampling: SamplingParams,
    cancel: threading.Event,
    on_cancel: Callable[[RequestStats], None] | None = None,
    faults: FaultInjector | None = None,
) -> Iterator[tuple[str, RequestStats | None]]:
    """Yields (text so far, None) as tokens arrive, then (full text, stats).

    Closing the iterator (or setting `cancel`) stops generation within one decode step; `on_cancel`
    then gets the stats of what was generated before the stop. An exception in `generate` (a CUDA
    OOM, say) is re-raised here, in the reader's thread. `faults` stages failures for tests.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    # A class made per call sits in a reference cycle until the cyclic GC runs, and so does all it
    # closes over: it must not reach the prompt's tensors (pixels!), only small values.
    prompt_tokens = prompt.tokens
    processor, model = loaded.processor, loaded.model
    matcher = StopMatcher(sampling.stop, TokenBytes(processor.tokenizer)) if sampling.stop else None
    stops = StopText(sampling.stop) if sampling.stop else None

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if faults is not None:
                faults.fire("decode", prompt_tokens)
            # Checked once per new token: a stop frees the slot within one step; a stop string ends the
            # answer at the token that completes it.
            stop = cancel.is_set()
            if matcher is not None and not stop:
                stop = matcher.push(int(input_ids[0, -1]))
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    class _CountingStreamer(TextIteratorStreamer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.new_tokens = 0
            self.first_token_at: float | None = None
            self.last_token_at: float | None = None

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                now = time.perf_counter()
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
                self.new_tokens += int(value.numel())
            super().put(value)

    streamer = _CountingStreamer(
        processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=TOKEN_TIMEOUT_S
    )
    do_sample = sampling.temperature > 0
    kwargs: dict[str, Any] = dict(
        **{k: v.to(model.device) if hasattr(v, "to") else v for k, v in prompt.inputs.items()},
        max_new_tokens=sampling.max_new_tokens,
        do_sample=do_sample,
        repetition_penalty=sampling.repetition_penalty,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stop()]),
    )
    if sampling.ignore_eos:  # end-of-sequence is suppressed until the length is reached
        kwargs.update(min_new_tokens=sampling.max_new_tokens)
    if do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:  # greedy: silence the checkpoint's sampling defaults instead of warning about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if faults is not None:
                faults.fire("prefill", prompt_tokens)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # reported to the reader below
            failure.append(exc)
        finally:
            streamer.end()  # always unblock the reader, also when generate raised

    started = time.perf_counter()

    def stats() -> RequestStats:
        first = streamer.first_token_at or time.perf_counter()
        return RequestStats(
            prompt_text_tokens=prompt.text_tokens,
            prompt_image_tokens=prompt.image_tokens,
            prompt_video_tokens=prompt.video_tokens,
            new_tokens=streamer.new_tokens,
            ttft_s=first - started,
            decode_s=(streamer.last_token_at or first) - first,
        )

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    text, shown = "", ""
    finished = False
    try:
        for piece in streamer:
            if piece:
                text += piece
                visible = stops.visible(text) if stops is not None else text
                if visible != shown:
                    shown = visible
                    yield shown, None
        thread.join()
        if failure:
            raise failure[0]
        finished = True
        yield (stops.cut(text)[0] if stops is not None else text), stats()
    finally:
        stopped_early = not finished and not failure
        cancel.set()
        thread.join()
        if stopped_early and on_cancel is not None:
            on_cancel(stats())
