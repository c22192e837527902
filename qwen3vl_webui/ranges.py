"""The range of every per-request value, in one table: the sliders, the API's checks, SamplingParams and the warm-up.

A value the sliders cannot reach is refused on every route: gradio checks its sliders' ranges on API calls too, the
chat handler checks what gradio does not (NaN, a seed), and SamplingParams checks again for in-process callers. The
warm-up runs the largest image allowed here, so no request can ask for more than it tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MEGA = 1_000_000  # pixels per megapixel, as the sliders count them


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float  # the most any request may ask for; `capped_by` names the flag whose value lowers it further
    default: float
    step: float
    capped_by: str | None = None


REQUEST: dict[str, Range] = {
    # Prompt + answer; the flag --max-context is the top (and the warm-up may lower it: service.limits).
    "max_context": Range(256, 262144, 16384, 256, capped_by="max_context"),
    "max_new_tokens": Range(1, 32768, 512, 1, capped_by="max_new_tokens"),
    "temperature": Range(0.0, 2.0, 0.7, 0.05),  # 0 = greedy
    "top_p": Range(0.01, 1.0, 0.8, 0.01),
    "top_k": Range(0, 200, 20, 1),  # 0 = off
    "repetition_penalty": Range(0.5, 2.0, 1.05, 0.01),
    "seed": Range(0, 2**32 - 1, -1, 1),  # the default -1 (any negative) = random
    # The largest image is also the start-up warm-up's worst case (service/warmup.py).
    "image_megapixels": Range(0.05, 4.0, 0.92, 0.01),
    "video_fps": Range(0.25, 4.0, 2.0, 0.25),  # the default is qwen-vl-utils' FPS
    "video_max_frames": Range(2, 128, 32, 2),  # in pairs: qwen-vl-utils' FRAME_FACTOR
    "video_megapixels": Range(0.5, 32.0, 7.4, 0.1),
}


def check(name: str, value: Any, cap: float | None = None, error: type[Exception] = ValueError) -> float:
    """`value` as a float if it is a finite number in `name`'s range (its top lowered to `cap` if given); otherwise
    `error` with one sentence naming the range."""
    r = REQUEST[name]
    hi = r.hi if cap is None else min(r.hi, cap)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not r.lo <= value <= hi:
        raise error(f"{name} must be between {_plain(r.lo)} and {_plain(hi)}, got {value!r}.")
    return float(value)


def largest_image_pixels() -> int:
    """The most pixels any image may keep: the image slider's top, and the size the warm-up tests."""
    return int(REQUEST["image_megapixels"].hi * MEGA)


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
