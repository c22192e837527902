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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen3vl_webui import ranges
from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.remote.protocol import EngineDied
from qwen3vl_webui.engine.request import RequestError, SamplingParams
from qwen3vl_webui.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaBudget, MediaError
from qwen3vl_webui.service.admission import Busy, Cancelled, Preempted
from qwen3vl_webui.service.chat import ChatService, Finished
from qwen3vl_webui.service.jobstore import Claimed, Counts, JobError, JobItem, JobStore, RunLock
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
        raise JobError(f"{root} is not a folder")
    if not prompt.strip():
        raise JobError("a folder of files needs a prompt (--prompt): the question asked of every file")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
    if not files:
        raise JobError(f"{root.name or root} holds no image or video ({', '.join(MEDIA_EXTENSIONS)})")
    return [JobItem(str(p.relative_to(root)), prompt, (str(p.resolve()),)) for p in files]


def _check_unique(items: list[JobItem], where: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise JobError(f"{where}: id {it.id!r} appears twice; every item needs its own id")
        seen.add(it.id)


# ----------------------------------------------------------------------------------- running


def default_media() -> MediaBudget:
    """The page's default image and video budget (its sliders' starting values), for items that carry files."""
    r = ranges.REQUEST
    return MediaBudget(
        max_image_pixels=int(r["image_megapixels"].default * ranges.MEGA), video_fps=r["video_fps"].default,
        video_max_frames=int(r["video_max_frames"].default),
        video_total_pixels=int(r["video_megapixels"].default * ranges.MEGA),
    )  # fmt: skip


@dataclass(frozen=True)
class JobDefaults:
    """What an item asks when it says nothing else: greedy answers (a job is reproducible), the caps' budget."""

    max_context: int = 16384
    max_new_tokens: int = 512
    temperature: float = 0.0
    system: str = ""
    media: MediaBudget = field(default_factory=default_media)
    max_files_per_turn: int = 8
    ignore_eos: bool = False  # benchmarks: every answer is max_new_tokens long (bench/jobs.py)


DEMO_MODEL = "demo model (tiny Qwen3-VL)"  # the manager's name for it (its folder depends on --cache-dir)


@dataclass(frozen=True)
class JobSetup:
    """What a job's answers depend on besides its items: the model and precision that answer them, and the defaults
    an item that says nothing falls back on. Recorded in the job's database at each run's start (JobStore.setup), so
    a resume can tell whether it would mix the answers of two setups in one results file."""

    model: str  # as the manager names it: the checkpoint's id or folder, the demo model, a backend's model
    precision: str  # the one it loaded in (`auto` resolved)
    temperature: float
    max_new_tokens: int
    system: str

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> JobSetup | None:
        """The recorded setup; None for a job no run recorded one of (an older version's) or a record not ours."""
        if not isinstance(record, dict):
            return None
        try:
            return cls(str(record["model"]), str(record["precision"]), float(record["temperature"]),
                       int(record["max_new_tokens"]), str(record["system"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def model_and_precision(self) -> str:
        return f"{self.model} in {self.precision}"

    @property
    def sampling_values(self) -> tuple[float, int, str]:
        return self.temperature, self.max_new_tokens, self.system

    @property
    def sampling(self) -> str:
        system = f"system prompt {_clip(self.system)!r}" if self.system else "no system prompt"
        return f"temperature {self.temperature:g}, up to {self.max_new_tokens} new tokens, {system}"

    def defaults(self, base: JobDefaults) -> JobDefaults:
        """`base` with this setup's sampling defaults."""
        return replace(base, temperature=self.temperature, max_new_tokens=self.max_new_tokens, system=self.system)


# A --backend-url front end that started before its backend answered does not know the backend's model name yet.
UNKNOWN_BACKEND_MODEL = "backend model (not known)"


@dataclass(frozen=True)
class SetupCheck:
    """A run's setup beside the one its job recorded (None: none recorded, nothing to compare)."""

    recorded: JobSetup | None
    current: JobSetup

    @property
    def model_changed(self) -> bool:
        """Another model or precision: its answers would mix with the job's. Refused unless the user says so. A
        backend's model not known yet (on either side) is not taken for another one: only its precision counts."""
        if self.recorded is None:
            return False
        r, c = self.recorded, self.current
        if UNKNOWN_BACKEND_MODEL in (r.model, c.model):
            return r.precision != c.precision
        return r.model_and_precision != c.model_and_precision

    @property
    def sampling_changed(self) -> bool:
        return self.recorded is not None and self.recorded.sampling_values != self.current.sampling_values

    def go_on(self, allow_change: bool = False) -> JobSetup:
        """What the run answers with: this run's model and precision, and the job's own sampling defaults (so a
        resume with other --temperature, --max-new-tokens or --system flags does not mix them), or this run's with
        `allow_change` or for a job that recorded none."""
        current = self.current
        if self.recorded is not None and current.model == UNKNOWN_BACKEND_MODEL:
            current = replace(current, model=self.recorded.model)  # the record keeps the name it knew
        if self.recorded is None or allow_change:
            return current
        r = self.recorded
        return replace(current, temperature=r.temperature, max_new_tokens=r.max_new_tokens, system=r.system)


def loaded_setup(
    service: ChatService, defaults: JobDefaults, stopped: Callable[[], bool] = lambda: False
) -> JobSetup | None:
    """The setup this process answers with, once its model is loaded: None if `stopped` first; RuntimeError if the
    model failed to load."""
    while True:
        try:
            loaded = service.manager.wait_ready(1.0)
            break
        except TimeoutError:
            if stopped():
                return None
    model = DEMO_MODEL if loaded.is_demo else loaded.source
    backend = service.manager.backend
    if backend is not None:
        model = f"backend model {backend.model}" if backend.model else UNKNOWN_BACKEND_MODEL
    return JobSetup(model, loaded.precision, float(defaults.temperature), int(defaults.max_new_tokens), defaults.system)


def check_setup(store: JobStore, current: JobSetup) -> SetupCheck:
    return SetupCheck(JobSetup.from_record(store.setup()), current)


def _clip(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


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
            if self.service.draining:  # stopped by the server's shutdown, not the item's fault: redone next time
                self.store.release(item.seq, self.owner)
                self._stop.set()
                return
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
            ignore_eos=d.ignore_eos,
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


# ----------------------------------------------------------------------------------- jobs started from the page


@dataclass(frozen=True)
class BoardView:
    """What the Batch jobs tab shows: the current (or last) job, plain data."""

    job: str | None
    state: str  # idle, running, stopping, finished, stopped, interrupted, paused, failed
    progress: Progress | None
    results: str | None  # the results file, once written
    message: str = ""
    resumed: bool = False  # a job the last run of the server left unfinished, taken up again at start
    held: tuple[str, ...] = ()  # why other unfinished jobs were not resumed (made with another model or precision)


class JobBoard:
    """The app's batch jobs: one runs at a time, as cold requests beside the chats, each in its own folder
    (`<root>/<job id>/job.sqlite`, its extracted media, results.jsonl).

    A job survives the server: one that a crash, `kill -9` or a shutdown left unfinished (no `ended` mark in its
    database) is resumed when the server starts again (`resume_interrupted`), oldest first, as a queue does; its
    half-done items are redone and its done ones kept. A job the operator stopped stays stopped. A job made with
    another model or precision than this server's is not resumed (its answers would mix): it stays unfinished,
    `paused`, and the tab and the log say why and how to resume it."""

    def __init__(self, service: ChatService, root: str | Path, defaults: JobDefaults, workers: int) -> None:
        self.service = service
        self.root = Path(root)
        self.defaults = defaults
        self.workers = workers
        self._lock = threading.Lock()
        self._runner: JobRunner | None = None
        self._job: str | None = None
        self._state = "idle"
        self._message = ""
        self._results: str | None = None
        self._last: Progress | None = None
        self._resumed = False
        self._waiting: list[Path] = []  # interrupted jobs to resume after the one running
        self._held: dict[str, str] = {}  # interrupted jobs not resumed, and why
        self._closed = False

    def submit(self, upload: str | Path, prompt: str) -> tuple[str, int]:
        """A job uploaded through the page, started in the background: (its id, its number of items). JobError if a
        job is running already (before anything is written) or the upload is refused (its folder is removed)."""
        import shutil

        with self._lock:
            self._refuse_if_busy()
        job = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.root / job
        folder.mkdir(parents=True, mode=0o700)
        try:
            items = items_from_upload(upload, prompt, folder)
            self.start(job, folder, items)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job, len(items)

    def start(self, job: str, folder: Path, items: list[JobItem]) -> None:
        """Runs `items` (in `folder`, fresh) in the background; JobError if a job is running already."""
        with self._lock:
            self._refuse_if_busy()
            lock = RunLock(folder / "job.sqlite")
            lock.acquire()  # a fresh folder: free
            store = JobStore(folder / "job.sqlite")
            try:
                store.add(items, source="upload")
            except BaseException:
                store.close()
                lock.release()
                raise
            self._launch(job, folder, store, lock, f"{len(items)} items", resumed=False)

    def resume_interrupted(self) -> list[str]:
        """Queues every job a previous run left unfinished and starts the oldest; returns their ids."""
        found = [db.parent for db in sorted(self.root.glob("*/job.sqlite")) if _interrupted(db)]
        with self._lock:
            self._waiting += [f for f in found if f not in self._waiting]
        if found:
            log.info("batch jobs left unfinished by the last run, resumed in order: %s", ", ".join(f.name for f in found))
            self._next()
        return [f.name for f in found]

    def _next(self) -> None:
        """Starts the next waiting interrupted job, if none runs."""
        while True:
            with self._lock:
                if self._closed or not self._waiting or self._state in ("running", "stopping"):
                    return
                if self._switching():  # after the switch: the job's recorded setup is then checked against it
                    timer = threading.Timer(1.0, self._next)
                    timer.daemon = True
                    timer.start()
                    return
                folder = self._waiting.pop(0)
                lock = RunLock(folder / "job.sqlite")
                try:
                    lock.acquire()
                except JobError as exc:  # a command-line run holds it: that run finishes the job
                    log.warning("batch job %s not resumed: %s", folder.name, exc)
                    continue
                store = JobStore(folder / "job.sqlite")
                note = "resumed after a restart: waiting for the model…"
                self._launch(folder.name, folder, store, lock, note, resumed=True)
                return

    def _refuse_if_busy(self) -> None:
        if self._state in ("running", "stopping"):
            raise JobError(f"job {self._job} is still running; stop it or wait for it to finish.")
        if self._switching():
            raise JobError("the model is being switched to another precision; start the job once the switch is done.")

    def _switching(self) -> bool:
        """A precision switch is under way (ChatService.switching): a job started now would record one precision
        and be answered by another. The switch marks itself before it asks `switch_refusal`, and a start checks
        this under the board's lock before it sets "running", so one of the two always sees the other."""
        return self.service.switching()

    def _launch(self, job: str, folder: Path, store: JobStore, lock: RunLock, message: str, resumed: bool) -> None:
        """Under the board's lock, holding the job's RunLock (one runner per database, the CLI's too): starts it."""
        runner = JobRunner(self.service, store, self.defaults, self.workers, on_progress=self._progress, cold=True)
        self._runner, self._job, self._state, self._results, self._last = runner, job, "running", None, None
        self._message, self._resumed = message, resumed
        thread = threading.Thread(
            target=self._run, args=(runner, store, folder, lock, resumed), name="job-board", daemon=True
        )
        thread.start()

    def _progress(self, progress: Progress) -> None:
        self._last = progress

    def _run(self, runner: JobRunner, store: JobStore, folder: Path, lock: RunLock, resumed: bool) -> None:
        ended = held = False
        try:
            held = not self._prepare(runner, store, folder, resumed)
            if held:
                with self._lock:
                    self._last, self._state, self._message = runner.progress(), "paused", self._held[folder.name]
            else:
                ended = self._finish(runner, store, folder)
        except Exception as exc:  # the page says so; the chats go on
            log.exception("batch job failed")
            with self._lock:
                self._state, self._message = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            store.close()
            lock.release()
        if ended or held:
            self._next()

    def _prepare(self, runner: JobRunner, store: JobStore, folder: Path, resumed: bool) -> bool:
        """Waits for the model, then checks and records what the job answers with. False: the job was made with
        another model or precision, and is left unfinished (why, and how to resume it: on the tab and in the log)."""
        current = loaded_setup(self.service, self.defaults, stopped=lambda: runner.stopped)
        if current is None:  # stopped (or the server closing) before the model came: the run ends at once
            return True
        check = check_setup(store, current)
        recorded = check.recorded
        if recorded is not None and check.model_changed:
            reason = (
                f"Job {folder.name} was not resumed: it was started with {recorded.model_and_precision}, and this "
                f"server runs {current.model_and_precision}; its answers would mix. To resume it, start the server "
                "with the job's --model and --precision, or finish it from the command line with this server's "
                f"flags: `python -m qwen3vl_webui.jobs run --db {folder / 'job.sqlite'} --allow-setup-change`."
            )
            log.warning("%s", reason)
            with self._lock:
                self._held[folder.name] = reason
            return False
        setup = check.go_on()  # a resumed job keeps its own sampling defaults
        store.record_setup(setup.record())
        runner.defaults = setup.defaults(self.defaults)
        if resumed:
            requeued, gave_up = store.recover()  # the dead run's items: redone (failed after 3 deaths)
            counts = store.counts()
            note = f"resumed after a restart: {counts.pending} of {counts.total} items left ({requeued} redone"
            note += f", {gave_up} failed)" if gave_up else ")"
            with self._lock:
                self._message = note
        return True

    def _finish(self, runner: JobRunner, store: JobStore, folder: Path) -> bool:
        """Runs the job to its end or a stop; True if it finished (the next waiting job may start)."""
        progress = runner.run()
        with self._lock:
            by_operator = self._state == "stopping"
        if runner.stopped and not by_operator:  # the server is closing: resumed at its next start
            with self._lock:
                self._last, self._state = progress, "interrupted"
            return False
        out = folder / "results.jsonl"
        store.export(out, include_unfinished=runner.stopped)
        store.mark_ended("stopped" if runner.stopped else "finished")
        with self._lock:
            self._last, self._results = progress, str(out)
            self._state = "stopped" if runner.stopped else "finished"
        return not runner.stopped

    def switch_refusal(self) -> str | None:
        """Why the model's precision may not be switched now: a running job answers with one model and precision
        (its setup is recorded; a switch mid-job would mix two precisions' answers in one results file)."""
        with self._lock:
            if self._state not in ("running", "stopping"):
                return None
            job, progress = self._job, self._runner.progress() if self._runner is not None else self._last
        done = f" ({progress.counts.finished} of {progress.counts.total} items answered)" if progress is not None else ""
        return (
            f"batch job {job} is running{done}, and a job answers with one model and precision: stop it on the "
            "Batch jobs tab, or wait for it to end, then switch."
        )

    def stop(self) -> None:
        """The operator's Stop: items in flight go back to pending, the results so far are exported, and the job is
        not resumed at the next start (the command line can finish it)."""
        with self._lock:
            self._waiting.clear()
            if self._runner is not None and self._state == "running":
                self._state = "stopping"
                self._runner.stop()

    def close(self) -> None:
        """The server is closing: the job's items in flight go back to pending and it is resumed at the next start."""
        with self._lock:
            self._closed = True
            if self._runner is not None and self._state == "running":
                self._runner.stop()

    def view(self) -> BoardView:
        with self._lock:
            runner, state = self._runner, self._state
            progress = runner.progress() if runner is not None and state in ("running", "stopping") else self._last
            held = tuple(why for job, why in self._held.items() if job != self._job)
            return BoardView(self._job, state, progress, self._results, self._message, self._resumed, held)


def _interrupted(db: Path) -> bool:
    """A job a previous run of the server left unfinished: it has items and no end (finished or stopped) recorded;
    a job of an older version that ended has its results file."""
    if (db.parent / "results.jsonl").exists():
        return False
    try:
        with JobStore(db) as store:
            return store.has_items() and store.meta("ended") is None
    except Exception as exc:  # a damaged database is left alone (its folder is the operator's to look at)
        log.warning("batch job database %s not read: %s", db, exc)
        return False


MAX_ZIP_BYTES = 8 * 2**30  # uncompressed, all members together
MAX_ZIP_MEMBERS = 100_000


def items_from_upload(upload: str | Path, prompt: str, folder: Path) -> list[JobItem]:
    """A job uploaded through the page: a JSONL (text items; files only from a zip), or a zip of media (with
    `prompt`) or of media plus one `.jsonl` whose paths are relative to it. Files are read only from inside `folder`,
    where the upload is unpacked: a line naming a path elsewhere on the server fails with a reason."""
    import shutil
    import zipfile

    source = Path(upload)
    if source.suffix.lower() == ".jsonl":
        target = folder / "items.jsonl"
        shutil.copyfile(source, target)
        return _confined(read_jsonl(target), folder)
    if source.suffix.lower() != ".zip":
        raise JobError("upload a .jsonl of items or a .zip of media (optionally with one items .jsonl inside)")
    files = folder / "files"
    try:
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise JobError(f"the zip holds over {MAX_ZIP_MEMBERS} files or {MAX_ZIP_BYTES // 2**30} GB")
            for member in members:
                parts = Path(member.filename).parts
                if not parts or member.filename.startswith("/") or ".." in parts:
                    raise JobError(f"the zip names a file outside itself: {member.filename!r}")
                target = files.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise JobError("the upload is not a valid zip file") from None
    lists = sorted(files.rglob("*.jsonl"))
    if len(lists) > 1:
        raise JobError("the zip holds more than one .jsonl; keep one list of items")
    if lists:
        return _confined(read_jsonl(lists[0]), files)
    return folder_items(files, prompt)


def _confined(items: list[JobItem], root: Path) -> list[JobItem]:
    root = root.resolve()
    out = []
    for it in items:
        outside = [f for f in it.files if not Path(f).resolve().is_relative_to(root)]
        if outside and not it.error:
            it = JobItem(it.id, it.prompt, it.files, it.options, "files must come inside the uploaded zip")
        out.append(it)
    return out
