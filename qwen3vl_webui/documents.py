"""Documents attached to a chat (.txt .md .json .csv .pdf) -> units of text or page images, and windows over them.

A unit is a paragraph (text files), a page's paragraphs (a PDF's text layer, read with pypdf) or a whole page
rendered to an image (a PDF page without text, rendered with pypdfium2). `windows` packs units into windows of at
most a token budget, each starting `overlap` tokens before the previous one ended, always at a unit boundary.
No torch here: token counts come from a `count` callable (the model's tokenizer, in service/longdoc.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DOCUMENT_EXTENSIONS = (".txt", ".md", ".json", ".csv", ".pdf")
MAX_DOCUMENT_BYTES = 64 * 2**20
MAX_PDF_PAGES = 2000
# A page whose text layer has fewer characters than this is read as an image (a scan, a chart, a slide).
MIN_PAGE_TEXT = 20
# Pages rendered as images: at most this many pixels each (about 1 MP, ~1,000 visual tokens).
PAGE_IMAGE_PIXELS = 1024 * 1024
# The PDF reader child's limits (pypdf's text layer and pdfium's rendering of the pages without one).
PDF_TIMEOUT_S = 120.0
PDF_MEMORY_BYTES = 2 * 2**30


class DocumentError(ValueError):
    """A document that cannot be read; str() is one sentence naming the file."""


@dataclass(frozen=True)
class Unit:
    """A paragraph of text, or a page image (`image` holds its PNG path); `label` says where it is ("page 3")."""

    text: str
    label: str
    image: str | None = None


@dataclass(frozen=True)
class Document:
    name: str
    units: tuple[Unit, ...]

    @property
    def pages(self) -> int:
        return len({u.label for u in self.units})


@dataclass(frozen=True)
class Window:
    """Units [start, end) of a document; `tokens` their cost."""

    index: int
    start: int
    end: int
    tokens: int

    def labels(self, document: Document) -> str:
        labels = list(dict.fromkeys(u.label for u in document.units[self.start : self.end] if u.label))
        if not labels:
            return ""
        return labels[0] if len(labels) == 1 else f"{labels[0]}–{labels[-1]}"


def is_document(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in DOCUMENT_EXTENSIONS


def read_document(path: str, image_dir: str | os.PathLike[str] | None = None) -> Document:
    """The file's units. PDF pages without a text layer are rendered to PNGs in `image_dir` (required for them)."""
    name = os.path.basename(path) or "the document"
    if not os.path.isfile(path):
        raise DocumentError(f"{name} was not found.")
    size = os.path.getsize(path)
    if size == 0:
        raise DocumentError(f"{name} is empty.")
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{name} is over {MAX_DOCUMENT_BYTES // 2**20} MB; split it first.")
    if path.lower().endswith(".pdf"):
        units = _read_pdf(path, name, image_dir)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DocumentError(f"{name} is not UTF-8 text.") from None
        units = [Unit(p, "") for p in split_paragraphs(text, line_units=path.lower().endswith((".csv", ".json")))]
    if not units:
        raise DocumentError(f"{name} holds no text.")
    return Document(name, tuple(units))


def split_paragraphs(text: str, line_units: bool = False) -> list[str]:
    """Paragraphs (blank-line separated); for CSV / JSON, lines (a row or a line of JSON is the natural cut)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = text.split("\n") if line_units else re.split(r"\n\s*\n", text)
    return [p.strip("\n") for p in parts if p.strip()]


def _read_pdf(path: str, name: str, image_dir: str | os.PathLike[str] | None) -> list[Unit]:
    """pypdf and pdfium parse untrusted bytes: in a fresh interpreter with a time and a memory limit, no secrets in
    its environment (as the video decoder child, media.py), so a PDF bomb or a parser bug costs one child."""
    import json
    import subprocess
    import sys

    from qwen3vl_webui.media import decoder_env

    job = {"path": os.path.abspath(path), "name": name, "image_dir": str(image_dir) if image_dir else None}
    bootstrap = (
        "import importlib.util as u, sys\n"
        "s = u.spec_from_file_location('_qwen3vl_documents', sys.argv[1])\n"
        "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
        "m._child_main(sys.argv[2])\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", bootstrap, os.path.abspath(__file__), json.dumps(job)], stdin=subprocess.DEVNULL,
            capture_output=True, timeout=PDF_TIMEOUT_S, env=decoder_env(), start_new_session=True, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise DocumentError(f"{name} could not be read within {PDF_TIMEOUT_S:g} s.") from None
    try:
        result = json.loads(done.stdout.decode("utf-8"))
    except ValueError:
        detail = "out of memory" if b"MemoryError" in done.stderr else f"the reader stopped (exit status {done.returncode})"
        raise DocumentError(f"{name} could not be read: {detail}.") from None
    if "error" in result:
        raise DocumentError(result["error"])
    return [Unit(text, label, image) for text, label, image in result["units"]]


def _child_main(job_json: str) -> None:
    """The PDF reader child: limits first, then the units as JSON on stdout (or one sentence of error)."""
    import json
    import resource
    import sys

    job = json.loads(job_json)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (PDF_MEMORY_BYTES, PDF_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        units = _read_pdf_here(job["path"], job["name"], job["image_dir"])
        result: dict = {"units": [[u.text, u.label, u.image] for u in units]}
    except DocumentError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {"error": f"{job['name']} needs more than {PDF_MEMORY_BYTES // 2**30} GB of memory to read."}
    sys.stdout.write(json.dumps(result))


def _read_pdf_here(path: str, name: str, image_dir: str | os.PathLike[str] | None) -> list[Unit]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise DocumentError(f"{name} is encrypted; send an unlocked copy.")
        pages = reader.pages
        if len(pages) > MAX_PDF_PAGES:
            raise DocumentError(f"{name} has {len(pages)} pages; at most {MAX_PDF_PAGES} are read.")
        units: list[Unit] = []
        for number, page in enumerate(pages, 1):
            text = (page.extract_text() or "").strip()
            if len(text) >= MIN_PAGE_TEXT:
                units += [Unit(p, f"page {number}") for p in split_paragraphs(text)]
            else:
                if image_dir is None:
                    raise DocumentError(f"{name}: page {number} has no text layer and no folder was given to render it.")
                units.append(Unit("", f"page {number}", _render_page(path, number, image_dir)))
        return units
    except DocumentError:
        raise
    except (PdfReadError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DocumentError(f"{name} is not a readable PDF ({type(exc).__name__}).") from None


def _render_page(path: str, number: int, image_dir: str | os.PathLike[str]) -> str:
    import pypdfium2 as pdfium

    folder = Path(image_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{Path(path).stem}-page{number:04d}.png"
    if out.exists():
        return str(out)
    pdf = pdfium.PdfDocument(path)
    try:
        page = pdf[number - 1]
        width, height = page.get_size()  # points, 1/72 inch
        scale = min(4.0, (PAGE_IMAGE_PIXELS / max(1.0, width * height)) ** 0.5)
        page.render(scale=scale).to_pil().convert("RGB").save(out)
    finally:
        pdf.close()
    return str(out)


def windows(costs: Sequence[int], budget: int, overlap: int) -> list[Window]:
    """Windows over units of these token `costs`: each holds at most `budget` tokens (a unit over the budget must be
    split first, `fit_units`), starts at a unit boundary and repeats the previous window's last units worth at most
    `overlap` tokens (never all of it: every window moves forward)."""
    if budget <= 0:
        raise ValueError(f"window budget must be positive, got {budget}")
    out: list[Window] = []
    start = 0
    while start < len(costs):
        end, tokens = start, 0
        while end < len(costs) and tokens + costs[end] <= budget:
            tokens += costs[end]
            end += 1
        if end == start:
            raise ValueError(f"unit {start} costs {costs[start]} tokens, over the window budget {budget}")
        out.append(Window(len(out), start, end, tokens))
        if end == len(costs):
            break
        back, carried = end, 0
        while back - 1 > start and carried + costs[back - 1] <= overlap:
            back -= 1
            carried += costs[back]
        start = back
    return out


def fit_units(units: Sequence[Unit], count: Callable[[str], int], budget: int) -> tuple[list[Unit], list[int]]:
    """Units whose text is over `budget` tokens split into line groups, then into character slices; with their
    costs. Image units keep the cost `count` gives their empty text (the caller adds the image's)."""
    out: list[Unit] = []
    costs: list[int] = []
    for unit in units:
        cost = count(unit.text)
        if cost <= budget or unit.image is not None:
            out.append(unit)
            costs.append(cost)
            continue
        for piece in _split_text(unit.text, count, budget):
            out.append(Unit(piece, unit.label))
            costs.append(count(piece))
    return out, costs


def _split_text(text: str, count: Callable[[str], int], budget: int) -> list[str]:
    lines = text.split("\n")
    if len(lines) > 1:
        pieces, current = [], ""
        for line in lines:
            candidate = f"{current}\n{line}" if current else line
            if current and count(candidate) > budget:
                pieces.append(current)
                current = line
            else:
                current = candidate
        pieces.append(current)
        return [q for p in pieces for q in (_split_text(p, count, budget) if count(p) > budget else [p])]
    # One long line: slices of a length the tokenizer puts under the budget.
    size = max(1, len(text) * budget // max(1, count(text)) * 9 // 10)
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return [q for p in pieces for q in (_split_text_hard(p, count, budget))]


def _split_text_hard(text: str, count: Callable[[str], int], budget: int) -> list[str]:
    if count(text) <= budget or len(text) <= 1:
        return [text]
    half = len(text) // 2
    return _split_text_hard(text[:half], count, budget) + _split_text_hard(text[half:], count, budget)
