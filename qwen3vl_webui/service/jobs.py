"""Batch jobs: items read from JSONL or a folder, run through ChatService as cold requests, state in a JobStore.

The runner keeps `workers` items in flight: each worker claims one item, builds its request and streams it through
`ChatService.chat(cold=True)`, so items batch together in the engine (a worker builds its prompt while the others
decode) and yield their slots to interactive chats (service/admission.py). Item errors the user can fix (a missing
file, a corrupt image, a prompt over the context) fail that item with the reason; the job goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.remote.protocol import EngineDied
from qwen3vl_webui.engine.request import RequestError, SamplingParams
from qwen3vl_webui.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaBudget, MediaError
from qwen3vl_webui.service.admission import Busy, Cancelled, Preempted
from qwen3vl_webui.service.chat import ChatService, Finished
from qwen3vl_webui.service.jobstore import Claimed, Counts, JobError, JobItem, JobStore
from qwen3vl_webui.service.prompt import ChatRequest

log = logging.getLogger(__name__)

# Per-item keys a JSONL line may carry besides id, prompt and files.
ITEM_OPTIONS = {"system": str, "max_new_tokens": int, "temperature": (int, float), "seed": int}
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
# Waits before an item whose engine went away is tried again (the model manager restarts it meanwhile).
RETRY_DELAY_S = 1.0


# ----------------------------------------------------------------------------------- input


def read_jsonl(path: str | Path) -> list[JobItem]:
    """Items from JSON lines `{"id", "prompt", "files": [...], ...}`. Relative file paths are relative to the file's
    folder. A bad line becomes an item that is failed at once with the reason (id `line-N` if it has none); two
    lines with one id are refused (JobError): the output could not tell them apart."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobError(f"--input {source} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise JobError(f"--input {source} is not UTF-8 text") from None
    items: list[JobItem] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            items.append(_parse_line(line, number, source.parent))
    _check_unique(items, str(source))
    return items


def _parse_line(line: str, number: int, base: Path) -> JobItem:
    fallback = f"line-{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return JobItem(fallback, "", error=f"line {number} is not JSON ({exc.msg})")
    if not isinstance(record, dict):
        return JobItem(fallback, "", error=f"line {number} is not a JSON object")
    raw_id = record.get("id", fallback)
    item_id = str(raw_id) if isinstance(raw_id, (str, int)) and str(raw_id) else fallback
    prompt, files = record.get("prompt", ""), record.get("files", [])
    if not isinstance(prompt, str):
        return JobItem(item_id, "", error="prompt must be a string")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return JobItem(item_id, prompt, error="files must be a list of paths")
    if not prompt.strip() and not files:
        return JobItem(item_id, prompt, error="the item has neither a prompt nor files")
    options: dict[str, Any] = {}
    for key, kind in ITEM_OPTIONS.items():
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                return JobItem(item_id, prompt, error=f"{key} must be a {getattr(kind, '__name__', 'number')}")
            options[key] = value
    paths = tuple(str((base / f).resolve()) if not Path(f).is_absolute() else f for f in files)
    return JobItem(item_id, prompt, paths, options)


def folder_items(folder: str | Path, prompt: str) -> list[JobItem]:
    """One item per image or video under `folder` (sorted, subfolders included), id = its path inside the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise JobError(f"--folder {root} is not a folder")
    if not prompt.strip():
        raise JobError("--folder needs --prompt: the question asked of every file")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
    if not files:
        raise JobError(f"--folder {root} holds no image or video ({', '.join(MEDIA_EXTENSIONS)})")
    return [JobItem(str(p.relative_to(root)), prompt, (str(p.resolve()),)) for p in files]


def _check_unique(items: list[JobItem], where: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise JobError(f"{where}: id {it.id!r} appears twice; every item needs its own id")
        seen.add(it.id)


# ----------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class JobDefaults:
    """What an item asks when it says nothing else: greedy answers (a job is reproducible), the caps' budget."""

    max_context: int = 16384
    max_new_tokens: int = 512
    temperature: float = 0.0
    system: str = ""
    media: MediaBudget = field(default_factory=MediaBudget)
    max_files_per_turn: int = 8


@dataclass(frozen=True)
class Progress:
    """Where a run stands: the store's counts, and this run's rate (items and generated tokens per second)."""

    counts: Counts
    finished_now: int  # items this run finished
    tokens_now: int  # tokens this run generated
    elapsed_s: float
    preempted: int = 0

    @property
    def items_per_s(self) -> float:
        return self.finished_now / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_now / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.counts.pending + self.counts.running
        return left / self.items_per_s if self.items_per_s > 0 else None


class JobRunner:
    """Runs one job's pending items through the service with `workers` in flight; `run()` returns when none is left
    or `stop()` was called (items in flight then go back to pending)."""

    def __init__(
        self,
        service: ChatService,
        store: JobStore,
        defaults: JobDefaults,
        workers: int,
        on_progress: Callable[[Progress], None] | None = None,
        cold: bool = True,
    ) -> None:
        self.service = service
        self.store = store
        self.defaults = defaults
        self.workers = max(1, workers)
        self.on_progress = on_progress or (lambda p: None)
        self.cold = cold
        self.owner = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finished = 0
        self._tokens = 0
        self._preempted = 0
        self._started = time.monotonic()
        self._cancels: set[threading.Event] = set()

    def stop(self) -> None:
        """Stops claiming; items in flight are cancelled (within one decode step) and go back to pending."""
        self._stop.set()
        with self._lock:
            for cancel in self._cancels:
                cancel.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> Progress:
        self._started = time.monotonic()
        threads = [
            threading.Thread(target=self._work, name=f"job-worker-{n}", daemon=True) for n in range(self.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short waits: the caller's signal handlers (SIGINT, SIGTERM -> stop) run meanwhile
        progress = self.progress()
        self.on_progress(progress)
        return progress

    def progress(self) -> Progress:
        with self._lock:
            finished, tokens, preempted = self._finished, self._tokens, self._preempted
        return Progress(self.store.counts(), finished, tokens, time.monotonic() - self._started, preempted)

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self.store.claim(self.owner)
            if item is None:
                return
            try:
                self._run_item(item)
            except BaseException:  # never leave an item claimed by a live run: the next claim would skip it
                self.store.release(item.seq, self.owner)
                log.exception("job item %s: worker failed", item.id)
                raise
            self.on_progress(self.progress())

    def _run_item(self, item: Claimed) -> None:
        cancel = threading.Event()
        with self._lock:
            self._cancels.add(cancel)
        try:
            if self._stop.is_set():
                cancel.set()
            answer, prompt_tokens, completion_tokens = self._answer(item, cancel)
        except Preempted:
            with self._lock:
                self._preempted += 1
            self.store.release(item.seq, self.owner)
            return
        except (Cancelled, Busy, TimeoutError) as exc:  # stopped, draining, or the model never came: not the item's
            self.store.release(item.seq, self.owner)
            if not self._stop.is_set() and not isinstance(exc, Cancelled):
                log.warning("job item %s put back: %s", item.id, exc)
                time.sleep(RETRY_DELAY_S)
            return
        except (RequestError, MediaError, ValueError) as exc:
            self._settled(self.store.fail(item.seq, self.owner, str(exc)), 0)
            return
        except EngineDied:  # the manager restarts the engine process: the item is tried again, not failed
            self.store.release(item.seq, self.owner)
            time.sleep(RETRY_DELAY_S)
            return
        except Exception as exc:
            log.exception("job item %s failed", item.id)
            self._settled(self.store.fail(item.seq, self.owner, f"internal error: {type(exc).__name__}: {exc}"), 0)
            return
        finally:
            with self._lock:
                self._cancels.discard(cancel)
        if self._stop.is_set():  # stopped meanwhile: the answer may be cut short, so it is redone next run
            self.store.release(item.seq, self.owner)
            return
        self._settled(self.store.finish(item.seq, self.owner, answer, prompt_tokens, completion_tokens), completion_tokens)

    def _settled(self, stored: bool, tokens: int) -> None:
        if stored:
            with self._lock:
                self._finished += 1
                self._tokens += tokens

    def _answer(self, item: Claimed, cancel: threading.Event) -> tuple[str, int, int]:
        request = self.request_for(item)
        final: Finished | None = None
        for event in self.service.chat(request, cancel, report_end=True, cold=self.cold):
            if isinstance(event, Finished):
                final = event
        if final is None:
            if self._stop.is_set():
                return "", 0, 0
            raise RequestError("the model returned no answer")
        return final.text, final.stats.prompt_tokens, final.stats.new_tokens

    def request_for(self, item: Claimed) -> ChatRequest:
        d, o = self.defaults, item.options
        sampling = SamplingParams(
            max_new_tokens=min(int(o.get("max_new_tokens", d.max_new_tokens)), d.max_context - 1),
            temperature=float(o.get("temperature", d.temperature)),
            seed=o.get("seed"),
        )
        return ChatRequest(
            message=UserMessage(item.prompt, item.files),
            system_prompt=str(o.get("system", d.system)),
            sampling=sampling,
            max_context=d.max_context,
            media=d.media,
            max_files_per_turn=d.max_files_per_turn,
        )


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
