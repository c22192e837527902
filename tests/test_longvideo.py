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


def test_whole_video_through_the_openai_api_is_watched_in_segments(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import base64

    import openai

    from tests.conftest import start_app

    video = _video(tmp_path / "harbour.mp4", seconds=40, fps=2)  # the API's budget: 32 frames at 2 fps = 16 s
    part = {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()},
    }
    messages = [{"role": "user", "content": [{"type": "text", "text": "When does it get brighter?"}, part]}]
    app, url = start_app(tiny_checkpoint.parent, "--max-context", "2048", "--max-new-tokens", "16", "--warmup", "off")
    calls: list[ChatRequest] = []
    inner = app.service.videos._chat

    def spy(request: ChatRequest, *args: Any, **kw: Any) -> Any:
        calls.append(request)
        return inner(request, *args, **kw)

    app.service.videos._chat = spy
    try:
        client = openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0, timeout=120)
        ask = {"model": "qwen3vl-demo", "messages": messages, "max_tokens": 16, "temperature": 0}
        reply = client.chat.completions.create(**ask, extra_body={"whole_video": True})
        answer = reply.choices[0].message.content
        assert answer.endswith("(00:40) in 3 segments of 16 s.*"), answer
        assert [c.media.segment for c in calls[:3]] == [(0.0, 16.0), (16.0, 32.0), (32.0, 40.0)]
        assert [c.message.text.split(" of ")[0] for c in calls[:3]] == [
            "This clip is 00:00–00:16", "This clip is 00:16–00:32", "This clip is 00:32–00:40"]  # fmt: skip
        assert len(calls) == 4 and "[00:16–00:32]" in calls[3].message.text  # the merge cites the segments' times
        assert reply.usage.prompt_tokens > 3 * 8  # every step's prompt counted
        calls.clear()
        chunks = client.chat.completions.create(**ask, stream=True, extra_body={"whole_video": True})
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.endswith("(00:40) in 3 segments of 16 s.*") and len(calls) == 4, streamed
        calls.clear()  # without it (the default): one ordinary request, sampled within the budget
        plain = client.chat.completions.create(**ask).choices[0].message.content
        assert "segments" not in plain and len(calls) == 0
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, extra_body={"whole_video": "yes"})
        assert refused.value.status_code == 400 and "whole_video must be true or false" in str(refused.value)
        assert refused.value.body["type"] == "invalid_request_error"
    finally:
        app.service.videos._chat = inner
        app.close()
