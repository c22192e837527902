""""Whole video": a video longer than the frame budget is watched in time segments (each decoded alone) and merged,
on the tiny model through the real ChatService."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.media import MediaBudget, load_video, probe_video
from qwen3vl_webui.service.prompt import ChatRequest

BUDGET = MediaBudget(video_fps=1.0, video_max_frames=4, video_total_pixels=4 * 64 * 64 * 4)  # 4 frames: 4 s at 1 fps


def _video(path: Path, seconds: int = 12, fps: int = 4, size: int = 64) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            frame = np.full((size, size, 3), (i * 5) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_segment_is_decoded_alone_and_the_probe_reads_only_headers(tmp_path: Path) -> None:
    video = _video(tmp_path / "v.mp4")
    assert probe_video(str(video), BUDGET) == {"fps": 4.0, "total_num_frames": 48, "duration": 12.0}
    clip = load_video(str(video), dataclasses.replace(BUDGET, segment=(4.0, 8.0)))
    assert clip.frames.shape[0] == 4 and all(16 <= i < 32 for i in clip.metadata["frames_indices"])
    with pytest.raises(ValueError, match="start < end"):
        dataclasses.replace(BUDGET, segment=(5.0, 5.0))


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[Any]:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_service

    settings = parse_settings(["--demo", "--cache-dir", str(tiny_checkpoint.parent), "--warmup", "off",
                               "--max-context", "2048", "--max-new-tokens", "16"])  # fmt: skip
    svc = build_service(settings)
    svc.start_in_background(True, "off", 1_000_000)
    svc.manager.wait_ready(120)
    yield svc
    svc.close()
    svc.manager.close()


def test_a_long_video_is_watched_in_segments_with_times_and_merged(service: Any, tmp_path: Path) -> None:
    from qwen3vl_webui.service.chat import Finished
    from qwen3vl_webui.service.longdoc import Reading

    video = _video(tmp_path / "harbour.mp4")
    calls: list[ChatRequest] = []
    inner = service.chat

    def spy(request: ChatRequest, *args: Any, **kw: Any) -> Any:
        calls.append(request)
        return inner(request, *args, **kw)

    service.videos._chat = spy
    request = ChatRequest(UserMessage("When does it get brighter?", (str(video),)), media=BUDGET, max_context=2048,
                          sampling=SamplingParams(max_new_tokens=16, temperature=0), whole_video=True)  # fmt: skip
    try:
        events = list(service.chat(request, report_waiting=True, report_end=True))
        assert [(e.part, e.parts, e.detail) for e in dict.fromkeys(e for e in events if isinstance(e, Reading))] == [
            (1, 3, "00:00–00:04"), (2, 3, "00:04–00:08"), (3, 3, "00:08–00:12"), (4, 3, "")]  # fmt: skip
        assert [c.media.segment for c in calls[:3]] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]  # never the whole video
        assert all("This clip is" in c.message.text and not c.whole_video for c in calls[:3])
        assert len(calls) == 4 and calls[3].message.files == () and "[00:04–00:08]" in calls[3].message.text
        final = events[-1]
        assert isinstance(final, Finished) and "Watched harbour.mp4 (00:12) in 3 segments of 4 s." in final.text
        assert final.stats.prompt_video_tokens > 0
        calls.clear()  # off (the default): one ordinary request, sampled within the budget
        plain = list(service.chat(dataclasses.replace(request, whole_video=False), report_end=True))
        assert calls == [] and isinstance(plain[-1], Finished) and "segments" not in plain[-1].text
    finally:
        service.videos._chat = inner
