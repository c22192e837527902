"""qwen-vl-utils' vision budget rules, compiled from its source: the same answers as the library, none of its imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from qwen3vl_webui import media_child
from qwen3vl_webui.vision_rules import CONSTANTS, FUNCTIONS, rules


def test_rules_load_without_torch_requests_or_the_package_itself() -> None:
    code = textwrap.dedent(
        """
        import sys
        from qwen3vl_webui.vision_rules import rules
        r = rules()
        assert r.smart_resize(720, 1280, 32, 65536, 16777216) == (704, 1280)
        heavy = [m for m in ("torch", "torchvision", "requests", "qwen_vl_utils") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rules_answer_as_the_library_does() -> None:
    """The library itself (imported here, torch and all) against the compiled functions, on many inputs."""
    code = textwrap.dedent(
        """
        import itertools
        import qwen_vl_utils.vision_process as lib
        from qwen3vl_webui.vision_rules import CONSTANTS, rules

        r = rules()
        assert all(getattr(r, name) == getattr(lib, name) for name in CONSTANTS)
        sides = [7, 31, 32, 48, 100, 333, 720, 1080, 1920, 3840]
        for h, w in itertools.product(sides, sides):
            if max(h, w) / min(h, w) <= 200:
                for budget in (65536, 921600, 16777216):
                    args = (h, w, 32, min(65536, budget), budget)
                    assert r.smart_resize(*args) == lib.smart_resize(*args), args
        for total, fps, want, cap in itertools.product((2, 9, 90, 54000), (10.0, 29.97, 30.0), (0.5, 2.0, 4.0), (2, 32)):
            ele = {"fps": want, "min_frames": 2, "max_frames": cap}
            assert r.smart_nframes(ele, total, fps) == lib.smart_nframes(ele, total, fps), (total, fps, want, cap)
        print("same")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stderr[-3000:]


def test_every_rule_named_is_there() -> None:
    r = rules()
    assert all(callable(getattr(r, name)) for name in FUNCTIONS)
    assert (r.FPS, r.FRAME_FACTOR, r.MAX_RATIO) == (2.0, 2, 200)
    assert set(vars(r)) == {*FUNCTIONS, *CONSTANTS}


def test_the_decoder_child_samples_frames_by_smart_nframes() -> None:
    """The PyAV child's frame count: the library's rule in pairs, capped by the budget, never padded past the clip."""
    job = {"fps": 2.0, "frame_cap": 32}
    assert media_child._frame_count(30.0, 90, job) == 6  # 3 s at 2 fps
    assert media_child._frame_count(30.0, 87, job) == 4  # 2.9 s: 5.8 frames, in pairs
    assert media_child._frame_count(15.0, 54_000, job) == 32  # an hour, capped
    assert media_child._frame_count(10.0, 10, {"fps": 4.0, "frame_cap": 32}) == 4  # 1 s at 4 fps
    assert media_child._frame_count(30.0, 3, job) == 2  # fewer frames than wanted: what there is, in pairs
    assert media_child._frame_count(30.0, 1, job) == 2  # one frame: repeated to fill the pair
