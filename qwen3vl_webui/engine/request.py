"""What every decode path takes: a prepared prompt and its sampling parameters; the error a request is refused with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Stop strings per request: a few short ones, so checking them costs next to nothing per token.
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 100


class RequestError(ValueError):
    """A request the server refuses; str() is the sentence shown to the user."""


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
class PreparedPrompt:
    inputs: dict[str, Any]
    tokens: int
    text_tokens: int
    image_tokens: int
    video_tokens: int
    turns_dropped: int
