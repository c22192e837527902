"""Questions about documents longer than the context: sent whole when they fit, else sliding windows + summary merge.

Each window is asked the question with a running summary of the parts before it (NOTES), and answers for its own
part (ANSWER, or "none"); a final pass merges the parts' answers (in groups, if even they do not fit) and streams the
merged answer, which ends by saying which parts it drew on. Every step is an ordinary `ChatService.chat` call: the
same admission, slots, deadline and Stop (closing this generator closes the step in flight at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.documents import (
    PAGE_IMAGE_PIXELS,
    Document,
    DocumentError,
    Unit,
    Window,
    fit_units,
    is_document,
    read_document,
    windows,
)
from qwen3vl_webui.engine.request import RequestError
from qwen3vl_webui.media import media_kind
from qwen3vl_webui.service.prompt import ChatRequest
from qwen3vl_webui.telemetry import RequestStats

# Tokens of the chat template around a message (system + user turn markers, the generation prompt) and some slack.
TEMPLATE_TOKENS = 32
DEFAULT_QUESTION = "Summarize this document."
# Tokens a unit costs beyond its text: the blank line that joins it to the next, a "[page N]" label now and then.
UNIT_SLACK = 4
MAX_WINDOWS = 400
MAX_MERGE_LEVELS = 4
HEARTBEAT_S = 0.25
NONE_ANSWERS = {"", "none", "none.", "nothing", "n/a", "not mentioned", "not mentioned."}


@dataclass(frozen=True)
class Reading:
    """Yielded (with report_waiting) while a long document is read: which step runs now."""

    name: str
    part: int  # 1-based; part == parts + 1 while the parts' answers are merged
    parts: int
    verb: str = "Reading"
    noun: str = "part"
    detail: str = ""  # e.g. the segment's times

    def describe(self) -> str:
        if self.part > self.parts:
            return f"Merging what the {self.parts} {self.noun}s of {self.name} say…"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.verb} {self.noun} {self.part} of {self.parts} of {self.name}{extra}…"


@dataclass(frozen=True)
class Plan:
    """How a document is read: whole (one window) or in windows of `window_tokens` overlapping by `overlap`."""

    units: list[Unit]
    costs: list[int]
    windows: list[Window]
    window_tokens: int
    overlap: int
    summary_tokens: int

    @property
    def whole(self) -> bool:
        return len(self.windows) == 1


@dataclass
class _Part:
    window: Window
    labels: str
    answer: str
    relevant: bool


def has_documents(message: UserMessage) -> bool:
    return any(is_document(f) for f in message.files)


class LongDocuments:
    """Answers chats whose message carries documents, through `chat` (ChatService.chat) step by step."""

    def __init__(
        self, chat: Callable[..., Iterator[Any]], tokenizer: Callable[[], Any], finished: type,
        image_dir: str | None = None,
    ) -> None:  # fmt: skip
        self._chat = chat
        self._finished = finished  # ChatService's Finished (passed in: the service imports this module)
        self._tokenizer = tokenizer  # the loaded processor's tokenizer (waits for the model)
        self.image_dir = Path(image_dir or Path(tempfile.gettempdir()) / f"qwen3vl-pages-{os.getuid()}")

    # -- planning ---------------------------------------------------------------------------
    def plan(self, document: Document, request: ChatRequest, extra_files: int = 0) -> Plan:
        """Windows that fit `request`'s budget: max context - max new tokens - the question and instructions - the
        running summary (an eighth of what is left); the overlap is an eighth of a window."""
        count = self.counter()
        budget = request.max_context - request.sampling.max_new_tokens
        question = request.message.text.strip() or DEFAULT_QUESTION
        fixed = count(f"Document: {document.name}\n\n{question}") + count(request.system_prompt) + TEMPLATE_TOKENS
        fixed += extra_files * self._image_cost(request)
        page_cost = self._image_cost(request)
        total = sum(_cost(count, u, page_cost) for u in document.units)
        images = sum(1 for u in document.units if u.image)
        if total + fixed <= budget and images + extra_files <= request.max_files_per_turn:
            costs = [_cost(count, u, page_cost) for u in document.units]
            return Plan(list(document.units), costs, [Window(0, 0, len(costs), total)], total, 0, 0)
        # Each part's prompt: our instructions around it (measured with this tokenizer), the notes so far, the part.
        fixed += count(_window_prompt(document, Window(MAX_WINDOWS, 0, 0, 0), MAX_WINDOWS, [], "", question, 9999))
        summary = max(32, (budget - fixed) // 8)
        window = budget - fixed - summary
        if window < max(64, page_cost if images else 0):
            raise RequestError(
                f"{document.name} needs reading in parts, but max context {request.max_context:,} minus "
                f"{request.sampling.max_new_tokens:,} new tokens leaves too little room for a part; raise max context "
                "or lower max new tokens."
            )
        units, costs = fit_units(document.units, count, window - UNIT_SLACK)
        costs = [c + UNIT_SLACK + (page_cost if u.image else 0) for u, c in zip(units, costs, strict=True)]
        overlap = window // 8
        found = windows(costs, window, overlap)
        if len(found) > MAX_WINDOWS:
            raise RequestError(
                f"{document.name} would take {len(found)} parts at this max context (at most {MAX_WINDOWS}); raise "
                "max context or send a shorter document."
            )
        return Plan(units, costs, found, window, overlap, summary)

    def counter(self) -> Callable[[str], int]:
        """Token counts of plain text by the loaded model's tokenizer."""
        tokenizer = self._tokenizer()

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

        return count

    @staticmethod
    def _image_cost(request: ChatRequest) -> int:
        # 16-px patches merged 2x2: one token per 32x32 pixels, plus the vision start/end markers.
        return min(PAGE_IMAGE_PIXELS, request.media.max_image_pixels) // (32 * 32) + 2

    # -- answering --------------------------------------------------------------------------
    def answer(
        self, request: ChatRequest, cancel: threading.Event | None, report_waiting: bool, report_end: bool,
        **chat_kw: Any,
    ) -> Iterator[Any]:  # fmt: skip
        Finished = self._finished  # noqa: N806

        docs = [f for f in request.message.files if is_document(f)]
        media = tuple(f for f in request.message.files if not is_document(f))
        for path in media:  # an unsupported file is refused as in any chat
            media_kind(path)
        try:
            document = _combine([read_document(p, self.image_dir) for p in docs])
        except DocumentError as exc:
            raise RequestError(str(exc)) from exc
        plan = self.plan(document, request, len(media))
        question = request.message.text.strip() or DEFAULT_QUESTION
        totals = _Totals()
        beat = Heartbeat(report_waiting)

        def step(text: str, files: tuple[str, ...], part: int, visible: bool) -> Iterator[Any]:
            sub = dataclasses.replace(request, message=UserMessage(text, files), history=[])
            stream = self._chat(sub, cancel, report_waiting=report_waiting, report_end=True, **chat_kw)
            with contextlib.closing(stream):
                for item in stream:
                    if isinstance(item, Finished):
                        totals.add(item.stats)
                        yield item
                    elif isinstance(item, str):
                        if visible:
                            yield item
                        elif beat.due():  # a step's own text is not shown, but the chat can be stopped meanwhile
                            yield beat.reading
                    elif report_waiting:
                        yield item

        if plan.whole:
            text = f"{_render(document, plan.units)}\n\n{question}"
            final = None
            for item in step(text, (*media, *_images(plan.units)), 1, True):
                if isinstance(item, Finished):
                    final = item
                else:
                    yield item
            if report_end and final is not None:
                yield final
            return
        parts: list[_Part] = []
        summary = ""
        for window in plan.windows:
            if report_waiting:
                yield beat.set(Reading(document.name, window.index + 1, len(plan.windows)))
            units = plan.units[window.start : window.end]
            text = _window_prompt(document, window, len(plan.windows), units, summary, question, plan.summary_tokens)
            out = ""
            for item in step(text, (*media, *_images(units)), window.index + 1, False):
                if isinstance(item, Finished):
                    out = item.text
                else:
                    yield item
            notes, said = _parse(out)
            summary = self._truncate(notes or summary, plan.summary_tokens)
            labels = window.labels(document)
            parts.append(_Part(window, labels, said, said.strip().lower() not in NONE_ANSWERS))
        if report_waiting:
            yield beat.set(Reading(document.name, len(plan.windows) + 1, len(plan.windows)))
        used = [p for p in parts if p.relevant] or parts
        answer = ""
        for item in self._merge(used, document, question, request, summary, step):
            if isinstance(item, str):
                answer = item
            yield item
        footer = _footer(document, parts, used)
        text = f"{answer}\n\n{footer}"
        yield text
        if report_end:
            yield Finished(text, totals.stats())

    def _merge(
        self, parts: list[_Part], document: Document, question: str, request: ChatRequest, summary: str,
        step: Callable[..., Iterator[Any]],
    ) -> Iterator[Any]:  # fmt: skip
        """The final pass: the parts' answers (merged in groups first while they do not fit) -> one answer, streamed."""
        Finished = self._finished  # noqa: N806
        count = self.counter()
        instructions = count(_merge_prompt(document, [], "", question, final=False)) + TEMPLATE_TOKENS
        budget = request.max_context - request.sampling.max_new_tokens - instructions - count(request.system_prompt)
        notes = [(f"part {p.window.index + 1}" + (f", {p.labels}" if p.labels else ""), p.answer) for p in parts]
        for _ in range(MAX_MERGE_LEVELS):
            costs = [count(f"[{label}] {text}\n") for label, text in notes]
            if sum(costs) + count(summary) <= budget or len(notes) == 1:
                break
            capped = [min(c, budget // 2) for c in costs]
            groups = windows(capped, budget // 2 + 1, 0)
            merged = []
            for group in groups:
                chunk = notes[group.start : group.end]
                text = _merge_prompt(document, chunk, "", question, final=False)
                out = ""
                for item in step(text, (), 0, False):
                    if isinstance(item, Finished):
                        out = item.text
                    elif not isinstance(item, str):
                        yield item
                merged.append((f"{chunk[0][0]} to {chunk[-1][0]}", out))
            notes = merged
        if sum(count(f"[{label}] {text}\n") for label, text in notes) + count(summary) > budget:
            summary = ""  # still too long after the merge levels: each part's answer gets an equal share
            share = max(8, budget // len(notes) - 8)
            notes = [(label, self._truncate(text, share)) for label, text in notes]
        text = _merge_prompt(document, notes, summary, question, final=True)
        for item in step(text, (), 0, True):
            if not isinstance(item, Finished):
                yield item

    def _truncate(self, text: str, tokens: int) -> str:
        tokenizer = self._tokenizer()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def _cost(count: Callable[[str], int], unit: Unit, page_cost: int) -> int:
    return count(unit.text) + UNIT_SLACK + (page_cost if unit.image else 0)


class Heartbeat:
    """The step in progress, repeated at most every HEARTBEAT_S while a step's hidden text streams: each yield is a
    point where the caller can close the generator (gradio's Stop), so Stop never waits for a whole step."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.reading: Reading | None = None
        self._last = 0.0

    def set(self, reading: Reading) -> Reading:
        self.reading, self._last = reading, time.monotonic()
        return reading

    def due(self) -> bool:
        if not self.enabled or self.reading is None or time.monotonic() - self._last < HEARTBEAT_S:
            return False
        self._last = time.monotonic()
        return True


class _Totals:
    def __init__(self) -> None:
        self.prompt = [0, 0, 0]
        self.new = 0
        self.ttft: float | None = None
        self.decode = 0.0

    def add(self, stats: RequestStats) -> None:
        self.prompt = [self.prompt[0] + stats.prompt_text_tokens, self.prompt[1] + stats.prompt_image_tokens,
                       self.prompt[2] + stats.prompt_video_tokens]  # fmt: skip
        self.new += stats.new_tokens
        self.ttft = stats.ttft_s if self.ttft is None else self.ttft
        self.decode += stats.decode_s

    def stats(self) -> RequestStats:
        return RequestStats(*self.prompt, self.new, self.ttft or 0.0, self.decode)


def _combine(documents: list[Document]) -> Document:
    if len(documents) == 1:
        return documents[0]
    units = tuple(
        Unit(u.text, f"{d.name}, {u.label}" if u.label else d.name, u.image) for d in documents for u in d.units
    )
    return Document(", ".join(d.name for d in documents), units)


def _images(units: list[Unit]) -> tuple[str, ...]:
    return tuple(u.image for u in units if u.image)


def _render(document: Document, units: list[Unit]) -> str:
    lines: list[str] = [f"Document: {document.name}"]
    label = None
    for u in units:
        if u.label and u.label != label:
            lines.append(f"[{u.label}]")
            label = u.label
        lines.append(u.text if not u.image else "(this page is the attached image)")
    return "\n\n".join(lines)


def _window_prompt(
    document: Document, window: Window, parts: int, units: list[Unit], summary: str, question: str, words: int
) -> str:
    where = window.labels(document)
    return (
        f"You are reading {document.name} in {parts} parts. This is part {window.index + 1} of {parts}"
        f"{f' ({where})' if where else ''}.\n\nNotes from the earlier parts: {summary or '(none yet)'}\n\n"
        f"--- part {window.index + 1} ---\n{_render(document, units)}\n--- end of part {window.index + 1} ---\n\n"
        f"Question: {question}\n\nReply in two sections. NOTES: at most {max(20, words * 3 // 4)} words keeping what "
        "matters for the question from the earlier notes and this part. ANSWER: what this part says about the "
        "question, or 'none' if it says nothing about it."
    )


def _merge_prompt(document: Document, notes: list[tuple[str, str]], summary: str, question: str, final: bool) -> str:
    body = "\n".join(f"[{label}] {text.strip()}" for label, text in notes)
    head = f"Answers found in the parts of {document.name}:\n{body}\n\n"
    if summary:
        head += f"Notes on the whole document: {summary}\n\n"
    if final:
        return head + f"Using these, answer the question, citing the parts you use as [part N].\n\nQuestion: {question}"
    return head + f"Combine these into one short answer to the question, keeping the [part N] citations.\n\nQuestion: {question}"


_SECTION = re.compile(r"(?is)notes\s*:(.*?)answer\s*:(.*)")


def _parse(out: str) -> tuple[str, str]:
    """(notes, answer) from a window's reply; a reply without the sections is all answer."""
    found = _SECTION.search(out)
    if found:
        return found.group(1).strip(), found.group(2).strip()
    return "", out.strip()


def _footer(document: Document, parts: list[_Part], used: list[_Part]) -> str:
    cited = _ranges([p.window.index + 1 for p in used])
    where = list(dict.fromkeys(p.labels for p in used if p.labels))[:12]
    detail = f" ({'; '.join(where)})" if where else ""
    return f"*Read {document.name} in {len(parts)} parts; drew on part{'s' if len(used) != 1 else ''} {cited}{detail}.*"


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1–3, 5'."""
    out: list[str] = []
    for n in numbers:
        if out and out[-1].split("–")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('–')[0]}–{n}"
        else:
            out.append(str(n))
    return ", ".join(out)
