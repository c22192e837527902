""""Whole video": a video longer than the frame budget at the chosen fps, read in time segments and merged.

Each segment is as long as the budget's frames last at the chosen fps (max frames / fps seconds), so each is sampled
at that rate; the decoder child seeks to the segment and decodes only its frames (never the whole video). Each
segment is described with times, then a merge pass answers the question citing them ("02:10–02:40: …"). Every step
is an ordinary `ChatService.chat` call (admission, slots, Stop), as for long documents (service/longdoc.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.documents import windows
from qwen3vl_webui.engine.request import RequestError
from qwen3vl_webui.media import MediaError, media_kind, probe_video
from qwen3vl_webui.service.longdoc import Heartbeat, Reading, _Totals
from qwen3vl_webui.service.prompt import ChatRequest

MAX_SEGMENTS = 720
DEFAULT_QUESTION = "Describe what happens in this video."


def long_video(request: ChatRequest) -> str | None:
    """The one video of a "whole video" request, or None (the ordinary path: several videos, or none)."""
    if not request.whole_video:
        return None
    videos = [f for f in request.message.files if _is_video(f)]
    return videos[0] if len(videos) == 1 else None


def _is_video(path: str) -> bool:
    try:
        return media_kind(path) == "video"
    except MediaError:
        return False


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def segments(duration: float, seconds_each: float) -> list[tuple[float, float]]:
    count = max(1, math.ceil(duration / seconds_each - 1e-6))
    return [(i * seconds_each, min(duration, (i + 1) * seconds_each)) for i in range(count)]


class LongVideos:
    def __init__(self, chat: Callable[..., Iterator[Any]], finished: type, count: Callable[[], Callable[[str], int]]):
        self._chat = chat
        self._finished = finished
        self._count = count  # a token counter (the loaded tokenizer's), for the merge's budget

    def answer(
        self, request: ChatRequest, video: str, cancel: threading.Event | None, report_waiting: bool,
        report_end: bool, **chat_kw: Any,
    ) -> Iterator[Any]:  # fmt: skip
        Finished = self._finished  # noqa: N806
        media = request.media
        try:
            duration = float(probe_video(video, media)["duration"])
        except MediaError as exc:
            raise RequestError(str(exc)) from exc
        seconds_each = media.frame_cap / media.video_fps  # the frames the budget allows, at the chosen rate
        plain = dataclasses.replace(request, whole_video=False)
        if duration <= seconds_each:  # it fits: the ordinary path samples it at the chosen rate
            yield from self._chat(plain, cancel, report_waiting=report_waiting, report_end=report_end, **chat_kw)
            return
        spans = segments(duration, seconds_each)
        if len(spans) > MAX_SEGMENTS:
            raise RequestError(
                f"The video is {clock(duration)} long: {len(spans)} segments of {seconds_each:g} s at {media.video_fps:g} "
                f"fps, over the {MAX_SEGMENTS} allowed. Lower the fps or raise max frames."
            )
        name = video.rsplit("/", 1)[-1]
        question = request.message.text.strip() or DEFAULT_QUESTION
        others = tuple(f for f in request.message.files if f != video)
        totals = _Totals()
        beat = Heartbeat(report_waiting)

        def step(text: str, sub_media: Any, files: tuple[str, ...], visible: bool) -> Iterator[Any]:
            sub = dataclasses.replace(plain, message=UserMessage(text, files), history=[], media=sub_media)
            stream = self._chat(sub, cancel, report_waiting=report_waiting, report_end=True, **chat_kw)
            with contextlib.closing(stream):
                for item in stream:
                    if isinstance(item, Finished):
                        totals.add(item.stats)
                        yield item
                    elif not isinstance(item, str) or visible:
                        if report_waiting or isinstance(item, str):
                            yield item
                    elif beat.due():  # hidden text: still a point where Stop can close this generator
                        yield beat.reading

        notes: list[tuple[str, str]] = []
        for n, (start, end) in enumerate(spans, 1):
            times = f"{clock(start)}–{clock(end)}"
            if report_waiting:
                yield beat.set(Reading(name, n, len(spans), verb="Watching", noun="segment", detail=times))
            text = (
                f"This clip is {times} of {name} (segment {n} of {len(spans)}). Describe what happens in it, with "
                f"times, in a few sentences, and note anything about: {question}"
            )
            out = ""
            for item in step(text, dataclasses.replace(media, segment=(start, end)), (video, *others), False):
                if isinstance(item, Finished):
                    out = item.text
                else:
                    yield item
            notes.append((times, out.strip()))
        if report_waiting:
            yield beat.set(Reading(name, len(spans) + 1, len(spans), verb="Watching", noun="segment"))
        answer = ""
        for item in self._merge(notes, name, question, request, step):
            if isinstance(item, str):
                answer = item
            yield item
        text = f"{answer}\n\n*Watched {name} ({clock(duration)}) in {len(spans)} segments of {seconds_each:g} s.*"
        yield text
        if report_end:
            yield Finished(text, totals.stats())

    def _merge(
        self, notes: list[tuple[str, str]], name: str, question: str, request: ChatRequest,
        step: Callable[..., Iterator[Any]],
    ) -> Iterator[Any]:  # fmt: skip
        Finished = self._finished  # noqa: N806
        count = self._count()
        budget = request.max_context - request.sampling.max_new_tokens - count(_merge_prompt(name, [], question)) - 64
        for _ in range(4):  # consecutive segments merged in groups while they do not fit
            costs = [min(count(f"[{t}] {x}\n"), max(1, budget // 2)) for t, x in notes]
            if sum(costs) <= budget or len(notes) == 1:
                break
            merged = []
            for group in windows(costs, budget // 2 + 1, 0):
                chunk = notes[group.start : group.end]
                out = ""
                for item in step(_merge_prompt(name, chunk, question, final=False), request.media, (), False):
                    if isinstance(item, Finished):
                        out = item.text
                    elif not isinstance(item, str):
                        yield item
                merged.append((f"{chunk[0][0].split('–')[0]}–{chunk[-1][0].split('–')[-1]}", out))
            notes = merged
        for item in step(_merge_prompt(name, notes, question), request.media, (), True):
            if not isinstance(item, Finished):
                yield item


def _merge_prompt(name: str, notes: list[tuple[str, str]], question: str, final: bool = True) -> str:
    body = "\n".join(f"[{times}] {text}" for times, text in notes)
    ask = (
        "Using these, answer the question. Cite the times you draw on, as 02:10–02:40."
        if final else "Combine these into one shorter description, keeping the times."
    )  # fmt: skip
    return f"Descriptions of consecutive segments of the video {name}:\n{body}\n\n{ask}\n\nQuestion: {question}"
