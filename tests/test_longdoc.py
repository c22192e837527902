"""Long documents: reading (.txt, .pdf text layer and image pages), windows with overlap, the sliding-window answer
with its merge pass and Stop, on the tiny model through the real ChatService; a document through /chat."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.documents import Unit, fit_units, read_document, windows
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.service.prompt import ChatRequest


def test_windows_fit_the_budget_overlap_at_unit_boundaries_and_always_move_on() -> None:
    costs = [10] * 20 + [45, 10, 10]
    found = windows(costs, budget=50, overlap=20)
    assert all(w.tokens <= 50 and w.tokens == sum(costs[w.start : w.end]) for w in found)
    assert found[0].start == 0 and found[-1].end == len(costs)
    for a, b in zip(found, found[1:], strict=False):
        assert a.start < b.start < a.end or b.start == a.end  # overlaps the previous one, or follows a big unit
        assert sum(costs[b.start : a.end]) <= 20  # the overlap is at most 20 tokens
    assert (found[0].start, found[0].end, found[1].start) == (0, 5, 3)  # two 10-token units repeated
    with pytest.raises(ValueError, match="over the window budget"):
        windows([60], budget=50, overlap=10)


def test_an_oversized_paragraph_is_split_by_lines_then_characters() -> None:
    def count(text: str) -> int:
        return len(text.split())

    units, costs = fit_units([Unit("a b c\nd e f g h i\nj", "page 1"), Unit("x " * 25, "")], count, 4)
    assert all(c <= 4 for c in costs) and costs == [count(u.text) for u in units]
    assert " ".join(u.text.replace("\n", " ") for u in units[:4]).split() == list("abcdefghij")
    assert {u.label for u in units[:4]} == {"page 1"}


def _pdf(path: Path, pages: list[str | None]) -> Path:
    """A small PDF written by hand: a Helvetica text line per page, or (None) a page with only a drawn box."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        content = f"BT /F1 14 Tf 40 700 Td ({text}) Tj ET" if text else "0.2 0.4 0.8 rg 100 300 300 200 re f"
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content}\nendstream")
        stream = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {stream} 0 R "
                       "/Resources << /Font << /F1 FONT 0 R >> >> >>")  # fmt: skip
        kids.append(len(objects))
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    font = len(objects)
    objects = [o.replace("FONT", str(font)) for o in objects]
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


def test_a_pdf_is_read_from_its_text_layer_and_pages_without_text_become_images(tmp_path: Path) -> None:
    pdf = _pdf(tmp_path / "report.pdf", ["The harbour held forty two boats on Monday.", None, "Tide tables follow on the next pages."])
    document = read_document(str(pdf), tmp_path / "pages")
    assert [u.label for u in document.units] == ["page 1", "page 2", "page 3"]
    assert "forty two boats" in document.units[0].text and "Tide tables" in document.units[2].text
    image = document.units[1].image
    assert image is not None and Path(image).stat().st_size > 0
    from PIL import Image

    with Image.open(image) as im:  # rendered at about a megapixel, the drawn box in blue
        assert 0.5e6 < im.width * im.height <= 1.1e6
        assert im.getpixel((im.width // 2, im.height // 2))[2] > 150
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    from qwen3vl_webui.documents import DocumentError

    with pytest.raises(DocumentError, match="not a readable PDF"):
        read_document(str(tmp_path / "broken.pdf"), tmp_path / "pages")


# ----------------------------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[Any]:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_service

    settings = parse_settings(["--demo", "--cache-dir", str(tiny_checkpoint.parent), "--warmup", "off",
                               "--max-context", "1024", "--max-new-tokens", "16", "--max-concurrency", "2"])  # fmt: skip
    svc = build_service(settings)
    svc.start_in_background(True, "off", 1_000_000)
    svc.manager.wait_ready(120)
    yield svc
    svc.close()
    svc.manager.close()


def _long_text(path: Path, paragraphs: int) -> Path:
    path.write_text("\n\n".join(f"Paragraph {n}: the harbour master counted {n * 7} boats at {n} o'clock."
                                for n in range(paragraphs)))  # fmt: skip
    return path


def _request(path: Path, question: str = "How many boats at 12?") -> ChatRequest:
    return ChatRequest(UserMessage(question, (str(path),)), sampling=SamplingParams(max_new_tokens=16, temperature=0),
                       max_context=1024)  # fmt: skip


class _Spy:
    """Counts the steps (chat calls) the long-document path makes, and what each asked."""

    def __init__(self, svc: Any) -> None:
        self.inner = svc.chat
        self.prompts: list[str] = []

    def __call__(self, request: ChatRequest, *args: Any, **kw: Any) -> Any:
        self.prompts.append(request.message.text)
        return self.inner(request, *args, **kw)


def test_a_document_several_times_the_context_is_read_in_windows_and_merged(service: Any, tmp_path: Path) -> None:
    from qwen3vl_webui.documents import read_document
    from qwen3vl_webui.service.chat import Finished
    from qwen3vl_webui.service.longdoc import Reading

    doc = _long_text(tmp_path / "harbour.txt", 120)
    request = _request(doc)
    plan = service.documents.plan(read_document(str(doc)), request)
    total = sum(plan.costs)
    assert total > 3 * 1024 and not plan.whole  # several times the context
    n = len(plan.windows)
    assert n >= 4 and all(w.tokens <= plan.window_tokens for w in plan.windows)
    assert plan.window_tokens + plan.summary_tokens < 1024 - 16  # the sliders' budget, with room for the notes
    assert plan.overlap == plan.window_tokens // 8
    assert all(b.start < a.end for a, b in zip(plan.windows, plan.windows[1:], strict=False))  # they overlap
    spy = _Spy(service)
    service.documents._chat = spy
    try:
        events = list(service.chat(request, report_waiting=True, report_end=True))
    finally:
        service.documents._chat = service.chat
    reading = list(dict.fromkeys(e for e in events if isinstance(e, Reading)))  # heartbeats repeat one
    assert [(r.part, r.parts) for r in reading] == [(k, n) for k in range(1, n + 2)]  # each part, then the merge
    assert len(spy.prompts) == n + 1
    assert all(f"This is part {k + 1} of {n}" in p for k, p in enumerate(spy.prompts[:n]))
    assert "Paragraph 0:" in spy.prompts[0] and "Paragraph 119:" in spy.prompts[n - 1]
    assert spy.prompts[1].count("Notes from the earlier parts:") == 1
    assert "Using these, answer the question" in spy.prompts[n] and "[part 1" in spy.prompts[n]
    final = events[-1]
    assert isinstance(final, Finished) and f"Read harbour.txt in {n} parts; drew on part" in final.text
    assert final.stats.new_tokens > 0 and final.stats.prompt_tokens > total  # every step's tokens counted


def test_stop_ends_a_long_document_at_once_and_frees_the_slot(service: Any, tmp_path: Path, monkeypatch: Any) -> None:
    import dataclasses

    from qwen3vl_webui.service import longdoc
    from qwen3vl_webui.service.chat import Finished
    from qwen3vl_webui.service.longdoc import Reading

    monkeypatch.setattr(longdoc, "HEARTBEAT_S", 0.0)  # the tiny model answers a part faster than the 0.25 s beat

    doc = _long_text(tmp_path / "long.txt", 120)
    ends: list[str] = []

    def spy(request: ChatRequest, *args: Any, **kw: Any) -> Any:
        def wrapped() -> Any:
            ended = "closed"
            try:
                for item in service.chat(request, *args, **kw):
                    if isinstance(item, Finished):
                        ended = "finished"
                    yield item
            finally:
                ends.append(ended)

        return wrapped()

    service.documents._chat = spy
    request = _request(doc)  # each part answers 200 tokens: long enough to be stopped in the middle of one
    request = dataclasses.replace(request, sampling=SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
    try:
        stream = service.chat(request, threading.Event(), report_waiting=True)
        seen: list[Any] = []
        for event in stream:
            if isinstance(event, Reading):
                seen.append(event)
                if len(seen) == 2:  # part 1 again: its step is generating (a heartbeat)
                    break
        started = time.monotonic()
        stream.close()  # Stop
        closed_in = time.monotonic() - started
    finally:
        service.documents._chat = service.chat
    assert seen[0] == seen[1] and seen[0].part == 1
    assert ends == ["closed"]  # part 1 was stopped mid-answer, and no other part began
    assert closed_in < 2.0
    assert _until_idle(service)


def test_the_request_timeout_bounds_the_whole_answer_not_each_part(service: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from qwen3vl_webui.documents import read_document
    from qwen3vl_webui.service.prompt import RequestTimedOut

    doc = _long_text(tmp_path / "slow.txt", 120)
    parts = len(service.documents.plan(read_document(str(doc)), _request(doc)).windows)
    deadlines: list[float | None] = []

    def slow(request: ChatRequest, *args: Any, **kw: Any) -> Any:
        deadlines.append(kw.get("deadline"))
        time.sleep(0.6)  # each part well under the limit, all of them over it: --request-timeout covers them all
        return service.chat(request, *args, **kw)

    monkeypatch.setattr(service, "request_timeout", 3.0)
    service.documents._chat = slow
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimedOut, match="covers every part of a long document") as stopped:
            list(service.chat(_request(doc), report_end=True))
    finally:
        service.documents._chat = service.chat
    assert parts * 0.6 > 7.0 and time.monotonic() - started < 3.0 + 2.0  # unbounded, it took parts * 0.6 s and more
    assert 1 <= len(deadlines) < parts and len(set(deadlines)) == 1  # one deadline, the whole answer's
    assert stopped.value.partial == ""  # a part's own notes are never shown as the answer
    assert _until_idle(service)


def _until_idle(service: Any) -> bool:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if service.scheduler.state().running == 0 and service.in_flight() == 0:
            return True
        time.sleep(0.02)
    return False


def test_a_document_that_fits_is_sent_whole(service: Any, tmp_path: Path) -> None:
    from qwen3vl_webui.service.chat import Finished

    doc = _long_text(tmp_path / "short.md", 3)
    spy = _Spy(service)
    service.documents._chat = spy
    try:
        events = list(service.chat(_request(doc, "Summarize."), report_end=True))
    finally:
        service.documents._chat = service.chat
    assert len(spy.prompts) == 1 and "Paragraph 2:" in spy.prompts[0] and spy.prompts[0].endswith("Summarize.")
    assert isinstance(events[-1], Finished) and "parts" not in events[-1].text


def test_a_document_through_the_chat_api(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from conftest import start_app
    from gradio_client import Client, handle_file

    app, url = start_app(tiny_checkpoint.parent, "--max-context", "1024", "--max-new-tokens", "16", "--warmup", "off")
    try:
        doc = _long_text(tmp_path / "log.txt", 60)
        answer = Client(url, verbose=False).predict(
            {"text": "How many boats at 12?", "files": [handle_file(str(doc))]}, max_new_tokens=16, temperature=0,
            api_name="/chat",
        )  # fmt: skip
        assert "Read log.txt in " in answer and "parts; drew on part" in answer, answer
        bad = tmp_path / "bad.pdf"
        bad.write_bytes(b"not a pdf at all")
        refused = Client(url, verbose=False).predict({"text": "?", "files": [handle_file(str(bad))]}, api_name="/chat")
        assert refused.startswith("⚠️") and "not a readable PDF" in refused
        import base64

        import httpx

        data = "data:text/plain;base64," + base64.b64encode(doc.read_bytes()).decode()
        body = {"model": "qwen3vl-demo", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "How many boats at 12?"},
            {"type": "file", "file": {"filename": "harbour log.txt", "file_data": data}}]}]}  # fmt: skip
        reply = httpx.post(f"{url}v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
        assert "Read harbour log.txt in " in answer and "parts; drew on part" in answer, answer
        assert reply.json()["usage"]["prompt_tokens"] > 1024  # every part's prompt counted
        body["messages"][0]["content"][1]["file"] = {"filename": "x.exe", "file_data": "data:application/x-msdownload;base64,AAAA"}
        refused = httpx.post(f"{url}v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "not accepted" in refused.json()["error"]["message"]
    finally:
        app.close()
