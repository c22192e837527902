"""One table of per-request ranges: the sliders, the API's checks, SamplingParams and the warm-up agree with it."""

from __future__ import annotations

from typing import Any

import pytest

from qwen3vl_webui import ranges
from qwen3vl_webui.cli import parse_settings
from qwen3vl_webui.config import _RULES
from qwen3vl_webui.engine.request import RequestError, SamplingParams
from qwen3vl_webui.ranges import REQUEST

SLIDERS = {  # elem_id or label -> the table's name
    "max-context": "max_context",
    "max-new-tokens": "max_new_tokens",
    "image-mp": "image_megapixels",
    "video-fps": "video_fps",
    "video-frames": "video_max_frames",
    "video-mp": "video_megapixels",
    "Temperature (0 = greedy)": "temperature",
    "Top-p": "top_p",
    "Top-k (0 = off)": "top_k",
    "Repetition penalty": "repetition_penalty",
}
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from qwen3vl_webui.wiring import build_app

    cache = tmp_path_factory.mktemp("cache")
    settings = parse_settings(["--demo", "--cache-dir", str(cache), "--max-context", "4096", "--max-new-tokens", "1024"])
    return build_app(settings, load=False)


def test_every_slider_is_its_range_in_the_table(app: Any) -> None:
    import gradio as gr

    seen = set()
    for block in app.demo.blocks.values():
        if not isinstance(block, gr.Slider):
            continue
        name = SLIDERS.get(block.elem_id or "") or SLIDERS[block.label]
        r, cap = REQUEST[name], getattr(app.settings, name, None)
        top = r.hi if cap is None else min(r.hi, cap)
        assert (block.minimum, block.maximum, block.step) == (r.lo, top, r.step), name
        assert block.value == (top if name == "max_context" else min(r.default, top)), name
        seen.add(name)
    assert seen == set(SLIDERS.values())


def _request(app: Any, **values: Any) -> Any:
    from qwen3vl_webui.ui.handlers import Handlers

    handlers = Handlers(app.service, app.settings)
    args = dict(
        message={"text": "hi", "files": []}, history=[], system_prompt="", temperature=0.7, top_p=0.8, top_k=20,
        repetition_penalty=1.05, seed=-1, max_context=None, max_new_tokens=None, image_megapixels=0.92,
        video_fps=2.0, video_max_frames=32, video_megapixels=7.4,
    )  # fmt: skip
    args.update(values)
    return handlers._request(**args)[0]


@pytest.mark.parametrize("name", [n for n in REQUEST if n != "seed"])
def test_the_api_check_takes_the_ends_of_the_range_and_refuses_past_them(app: Any, name: str) -> None:
    r, cap = REQUEST[name], getattr(app.settings, name, None)
    top = r.hi if cap is None else min(r.hi, cap)
    _request(app, **{name: r.lo})
    _request(app, **{name: top})
    for bad in (r.lo - r.step, top + r.step):
        with pytest.raises(RequestError, match=f"^{name} must be between "):
            _request(app, **{name: bad})


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_params_check_the_same_ranges(name: str) -> None:
    r = REQUEST[name]
    SamplingParams(**{name: r.lo})
    SamplingParams(**{name: r.hi})
    for bad in (r.lo - r.step, r.hi + r.step, float("nan")):
        with pytest.raises(RequestError, match=f"^{name} must be between "):
            SamplingParams(**{name: bad})
    assert getattr(SamplingParams(), name) == r.default  # and start from the table's defaults


def test_the_warmup_tests_the_largest_image_a_request_may_send() -> None:
    assert ranges.largest_image_pixels() == int(REQUEST["image_megapixels"].hi * ranges.MEGA) == 4_000_000
    import inspect

    from qwen3vl_webui import wiring
    from qwen3vl_webui.ui import handlers

    # Both warm-ups (start-up, and after a precision switch) are given this size.
    assert "ranges.largest_image_pixels()" in inspect.getsource(wiring.build_app)
    assert "ranges.largest_image_pixels()" in inspect.getsource(handlers.Handlers.switch)


def test_the_flags_that_cap_a_request_value_take_its_whole_range() -> None:
    for name in ("max_context", "max_new_tokens"):
        assert _RULES[name][0] == (REQUEST[name].lo, REQUEST[name].hi)


def test_defaults_follow_qwen_vl_utils() -> None:
    from qwen3vl_webui.vision_rules import rules

    assert REQUEST["video_fps"].default == rules().FPS
    assert REQUEST["video_max_frames"].lo == REQUEST["video_max_frames"].step == rules().FRAME_FACTOR
