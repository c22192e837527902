"""What every decode path takes: a prepared prompt and its sampling parameters; the error a request is refused with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen3vl_webui import ranges

# Stop strings per request: a few short ones, so checking them costs next to nothing per token.
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 100
_DEFAULT = ranges.REQUEST


class RequestError(ValueError):
    """A request the server refuses; str() is the sentence shown to the user."""


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is sampled; every value within its range in ranges.REQUEST (RequestError otherwise)."""

    max_new_tokens: int = int(_DEFAULT["max_new_tokens"].default)
    temperature: float = _DEFAULT["temperature"].default
    top_p: float = _DEFAULT["top_p"].default
    top_k: int = int(_DEFAULT["top_k"].default)
    repetition_penalty: float = _DEFAULT["repetition_penalty"].default
    seed: int | None = None  # None: random
    # The answer ends at the token that completes any of these; the returned text stops before it.
    stop: tuple[str, ...] = ()
    # Generate max_new_tokens whatever the model says (benchmarks and load tests; vLLM's `ignore_eos`).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
            ranges.check(name, getattr(self, name), error=RequestError)
        if self.seed is not None:
            ranges.check("seed", self.seed, error=RequestError)
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



@dataclass(frozen=True)
class PreparedPrompt:
    inputs: dict[str, Any]
    tokens: int
    text_tokens: int
    image_tokens: int
    video_tokens: int
    turns_dropped: int
