"""Batch jobs: the SQLite store, the CLI end to end on the tiny model, kill -9 and resume, hot/cold slot sharing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.jobs import folder_items, read_jsonl
from qwen3vl_webui.service.jobstore import JobError, JobItem, JobStore, RunLock

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


def _jobs(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qwen3vl_webui.jobs", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _model_flags(cache: Path, *extra: str) -> list[str]:
    return ["--demo", "--cache-dir", str(cache), "--warmup", "off", "--max-context", "512", "--max-new-tokens", "16",
            "--max-concurrency", "2", "--no-progress", *extra]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------- the store


def test_store_claims_in_order_answers_once_and_recovers_half_done_items(tmp_path: Path) -> None:
    db = tmp_path / "j.sqlite"
    items = [JobItem(f"i{n}", f"prompt {n}") for n in range(4)] + [JobItem("bad", "", error="line 5 is not JSON")]
    with JobStore(db) as store:
        assert store.add(items) is True
        assert store.add(items) is False  # the same job again: a resume
        with pytest.raises(JobError, match="another job"):
            store.add(items[:2])
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        a, b = store.claim("run1"), store.claim("run1")
        assert (a.id, b.id) == ("i0", "i1")
        assert store.finish(a.seq, "run1", "answer 0", 10, 3)
        assert not store.finish(a.seq, "run1", "again", 10, 3)  # done once: a second answer is refused
        assert not store.finish(b.seq, "other-run", "x", 1, 1)  # only the claimer settles it
    with JobStore(db) as store:  # a new run after the old one died holding i1
        assert store.recover() == (1, 0)
        assert [store.claim("run2").id for _ in range(3)] == ["i1", "i2", "i3"]
        assert store.claim("run2") is None
        counts = store.counts()
        assert (counts.done, counts.failed, counts.running, counts.pending) == (1, 1, 3, 0)
        records = list(store.results(include_unfinished=True))
    assert [r["id"] for r in records] == ["i0", "i1", "i2", "i3", "bad"]
    assert records[0] == {"id": "i0", "status": "done", "answer": "answer 0", "error": "", "prompt_tokens": 10,
                          "completion_tokens": 3}  # fmt: skip
    assert records[4]["status"] == "failed" and "not JSON" in records[4]["error"]


def test_an_item_that_keeps_killing_the_runner_fails_and_a_second_runner_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "j.sqlite"
    with JobStore(db) as store:
        store.add([JobItem("poison", "p"), JobItem("ok", "q")])
        for run in range(3):
            assert store.claim(f"run{run}").id == "poison"
            store.recover()
        assert store.counts().failed == 1 and "died 3 times" in next(store.results())["error"]
    with RunLock(db), pytest.raises(JobError, match=f"pid {os.getpid()}"):
        RunLock(db).acquire()
    RunLock(db).acquire()  # released: the next run takes it


def test_jsonl_and_folder_inputs(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes((ASSETS / "example.png").read_bytes())
    (tmp_path / "media" / "notes.txt").write_text("not media")
    lines = [
        {"id": "x", "prompt": "Describe.", "files": ["media/a.png"], "temperature": 0.5},
        "not json",
        {"id": "y", "prompt": 3},
        {"prompt": "", "files": []},
        {"id": "z", "prompt": "hi", "seed": "seven"},
    ]
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    items = read_jsonl(source)
    assert [i.id for i in items] == ["x", "line-2", "y", "line-4", "z"]
    assert items[0].files == (str(tmp_path / "media" / "a.png"),) and items[0].options == {"temperature": 0.5}
    assert [bool(i.error) for i in items] == [False, True, True, True, True]
    assert "seed must be" in items[4].error
    source.write_text('{"id": "a", "prompt": "p"}\n{"id": "a", "prompt": "q"}\n')
    with pytest.raises(JobError, match="appears twice"):
        read_jsonl(source)
    folder = folder_items(tmp_path / "media", "Caption this.")
    assert [(i.id, i.prompt) for i in folder] == [("a.png", "Caption this.")]
    with pytest.raises(JobError, match="no image or video"):
        (tmp_path / "empty").mkdir()
        folder_items(tmp_path / "empty", "x")


# ----------------------------------------------------------------------------------- hot and cold


def test_a_waiting_chat_preempts_a_cold_item_and_cold_items_wait_behind_chats() -> None:
    scheduler = Scheduler(max_concurrency=2, queue_size=4)
    preempted: list[str] = []
    release = {name: threading.Event() for name in ("cold1", "cold2", "hot")}
    got: list[str] = []

    def hold(name: str, cold: bool) -> None:
        def preempt() -> None:
            preempted.append(name)
            release[name].set()  # the job item leaves at its next decode step

        with scheduler.slot(cold=cold, preempt=preempt):
            got.append(name)
            release[name].wait(10)

    threads = [threading.Thread(target=hold, args=(n, True)) for n in ("cold1", "cold2")]
    for t in threads:
        t.start()
    assert _until(lambda: scheduler.state().cold_running == 2)
    hot = threading.Thread(target=hold, args=("hot", False))
    hot.start()
    assert _until(lambda: "hot" in got)
    assert preempted == ["cold2"]  # one slot was needed: the newest cold item gave it
    late = threading.Thread(target=hold, args=("cold3", True))
    release["cold3"] = threading.Event()
    late.start()
    time.sleep(0.3)
    assert "cold3" not in got  # both slots are taken (cold1 + the chat): it waits
    release["hot"].set()
    assert _until(lambda: "cold3" in got)
    release["cold1"].set()
    release["cold3"].set()
    for t in (*threads, hot, late):
        t.join(5)
    state = scheduler.state()
    assert (state.running, state.cold_running, state.waiting, state.cold_waiting) == (0, 0, 0, 0)


def _until(condition, seconds: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


# ----------------------------------------------------------------------------------- the CLI, end to end


def test_cli_runs_a_job_with_bad_items_and_exports_in_input_order(tmp_path: Path, tiny_checkpoint: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really" * 8)
    items = [
        {"id": "text", "prompt": "Say hello."},
        {"id": "image", "prompt": "Describe it.", "files": [str(ASSETS / "example.png")]},
        {"id": "missing", "prompt": "Describe it.", "files": ["gone.png"]},
        {"id": "corrupt", "prompt": "Describe it.", "files": ["broken.png"]},
        {"id": "long", "prompt": "word " * 900},  # over the 512-token context
        {"id": "pdf", "prompt": "Read it.", "files": ["notes.xyz"]},
    ]
    (tmp_path / "notes.xyz").write_text("x")
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join(json.dumps(i) for i in items) + "\nnot json\n")
    db, out = tmp_path / "state" / "job.sqlite", tmp_path / "results.jsonl"  # a folder the run makes
    done = _jobs("run", "--input", str(source), "--db", str(db), "--output", str(out),
                 *_model_flags(tiny_checkpoint.parent))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = _lines(out)
    assert [r["id"] for r in results] == ["text", "image", "missing", "corrupt", "long", "pdf", "line-7"]
    by = {r["id"]: r for r in results}
    for name in ("text", "image"):
        assert by[name]["status"] == "done" and by[name]["completion_tokens"] > 0 and by[name]["prompt_tokens"] > 0
    assert by["image"]["prompt_tokens"] > by["text"]["prompt_tokens"]  # the image's tokens count
    assert "gone.png was not found" in by["missing"]["error"]
    assert "broken.png is not a valid image" in by["corrupt"]["error"]
    assert "max context" in by["long"]["error"]
    assert "not a supported file type" in by["pdf"]["error"]
    assert all(by[k]["status"] == "failed" for k in ("missing", "corrupt", "long", "pdf", "line-7"))
    status = _jobs("status", "--db", str(db), "--json")
    assert json.loads(status.stdout) | {"prompt_tokens": 0, "completion_tokens": 0} == {
        "total": 7, "pending": 0, "running": 0, "done": 2, "failed": 5, "prompt_tokens": 0, "completion_tokens": 0
    }  # fmt: skip
    again = _jobs("run", "--input", str(source), "--db", str(db), *_model_flags(tiny_checkpoint.parent))
    assert again.returncode == 0 and "nothing to run" in again.stderr  # nothing is answered twice
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "new", "prompt": "p"}\n')
    refused = _jobs("run", "--input", str(other), "--db", str(db), *_model_flags(tiny_checkpoint.parent))
    assert refused.returncode == 2 and "already holds another job" in refused.stderr


def test_a_job_killed_with_sigkill_resumes_every_item_exactly_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    count = 40
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"id": f"item-{n:02d}", "prompt": f"Item {n}: say something."}) + "\n"
                              for n in range(count)))  # fmt: skip
    db, out = tmp_path / "job.sqlite", tmp_path / "results.jsonl"
    args = ["run", "--input", str(source), "--db", str(db), "--output", str(out),
            *_model_flags(tiny_checkpoint.parent, "--max-new-tokens", "24")]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_webui.jobs", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _until(lambda: _done(db) >= 4, 180), "the job never got going"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    first = _rows(db)
    done_before = {r[0]: r[2] for r in first if r[1] == "done"}
    half_done = [r[0] for r in first if r[1] == "running"]
    assert 4 <= len(done_before) < count, "killed too late to test a resume"
    assert half_done, "no item was being answered at the kill"
    assert not out.exists()
    second = _jobs(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    results = _lines(out)
    assert [r["id"] for r in results] == [f"item-{n:02d}" for n in range(count)]  # each once, in input order
    assert all(r["status"] == "done" for r in results)
    for r in results:  # what was answered before the kill was not answered again
        if r["id"] in done_before:
            assert r["answer"] == done_before[r["id"]]
    attempts = {r[0]: r[3] for r in _rows(db)}
    assert all(attempts[i] == 1 for i in done_before)
    assert all(attempts[i] == 2 for i in half_done)  # claimed by the killed run, redone by the next
    assert max(attempts.values()) <= 2


def _done(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM items WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is being written
        return 0


def _rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, status, answer, attempts FROM items ORDER BY seq").fetchall()


# ----------------------------------------------------------------------------------- a job and chats at once


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.wiring import build_service

    settings = parse_settings(["--demo", "--cache-dir", str(tiny_checkpoint.parent), "--warmup", "off",
                               "--max-context", "1024", "--max-new-tokens", "512", "--max-concurrency", "2"])  # fmt: skip
    svc = build_service(settings)
    svc.start_in_background(True, "off", 1_000_000)
    svc.manager.wait_ready(120)
    yield svc
    svc.close()
    svc.manager.close()


def test_chats_take_their_slots_from_a_running_job_which_still_answers_every_item_once(
    service, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    import dataclasses

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.chat import Finished
    from qwen3vl_webui.service.jobs import JobDefaults, JobRunner
    from qwen3vl_webui.service.prompt import ChatRequest

    store = JobStore(tmp_path / "job.sqlite")
    store.add([JobItem(f"item-{n}", f"Tell a long story number {n}.") for n in range(6)])
    runner = JobRunner(service, store, JobDefaults(max_context=1024, max_new_tokens=300), workers=3)
    plain = runner.request_for

    def long_answers(item):  # type: ignore[no-untyped-def]
        request = plain(item)  # every item holds its slot for 300 tokens: long enough to be in the way
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, ignore_eos=True))

    runner.request_for = long_answers  # type: ignore[method-assign]
    job = threading.Thread(target=runner.run)
    job.start()
    scheduler = service.scheduler
    assert _until(lambda: scheduler.state().cold_running == 2, 60), "the job never filled the slots"
    hot_peak, waits = [0], []

    def chat(n: int) -> None:
        started = time.monotonic()
        request = ChatRequest(UserMessage(f"Hello {n}"), sampling=SamplingParams(max_new_tokens=8, temperature=0),
                              max_context=1024)  # fmt: skip
        for event in service.chat(request, report_end=True):
            if isinstance(event, Finished):
                waits.append(time.monotonic() - started)

    chats = [threading.Thread(target=chat, args=(n,)) for n in range(2)]
    for t in chats:
        t.start()
    while any(t.is_alive() for t in chats):
        state = scheduler.state()
        hot_peak[0] = max(hot_peak[0], state.running - state.cold_running)
        time.sleep(0.01)
    assert len(waits) == 2 and max(waits) < 15, waits  # they did not wait for 300-token job items to end
    assert hot_peak[0] == 2  # both chats held a slot at once: the job gave both back
    assert runner.progress().preempted >= 2
    job.join(240)
    assert not job.is_alive()
    records = list(store.results())
    assert [r["id"] for r in records] == [f"item-{n}" for n in range(6)] and {r["status"] for r in records} == {"done"}
    assert all(r["completion_tokens"] == 300 for r in records)  # a preempted item was redone whole, not cut short
    attempts = [row[0] for row in store._db.execute("SELECT attempts FROM items")]
    assert attempts == [1] * 6  # a preemption is not an attempt
    store.close()


def test_the_batch_jobs_tab_runs_an_uploaded_zip_and_offers_the_results(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import zipfile

    from conftest import start_app
    from gradio_client import Client, handle_file

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(ASSETS / "example.png", "a/one.png")
        z.write(ASSETS / "example.png", "two.png")
        z.writestr("broken.jpg", b"not a jpeg")
    app, url = start_app(tiny_checkpoint.parent, "--max-context", "1024", "--max-new-tokens", "16", "--warmup", "off")
    try:
        client = Client(url, verbose=False)
        started = client.predict(handle_file(str(archive)), "Caption this.", api_name="/start_job")
        assert started.startswith("Started job") and "3 items" in started, started
        job = started.split()[2].rstrip(":")
        results = tiny_checkpoint.parent / "jobs" / job / "results.jsonl"
        assert _until(results.exists, 120), "the job did not finish"
        records = _lines(results)
        assert [r["id"] for r in records] == ["a/one.png", "broken.jpg", "two.png"]
        assert [r["status"] for r in records] == ["done", "failed", "done"]
        assert "not a valid image" in records[1]["error"]
        again = client.predict(handle_file(str(tmp_path / "photos.zip")), "", api_name="/start_job")
        assert again.startswith("⚠️") and "needs a prompt" in again, again
    finally:
        app.close()


def test_the_precision_is_not_switched_while_a_page_job_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A job answers with one model and precision (its setup is recorded): a switch mid-job is refused with the
    reason, and goes through once the job is stopped."""
    from conftest import start_app
    from gradio_client import Client, handle_file

    source = tmp_path / "stories.jsonl"
    source.write_text("".join(json.dumps({"id": f"s{n}", "prompt": f"Tell a long story number {n}."}) + "\n"
                              for n in range(300)))  # fmt: skip
    app, url = start_app(tiny_checkpoint.parent, "--max-context", "1024", "--max-new-tokens", "256", "--warmup", "off")
    try:
        client = Client(url, verbose=False)
        started = client.predict(handle_file(str(source)), "", api_name="/start_job")
        assert started.startswith("Started job") and "300 items" in started, started
        job = started.split()[2].rstrip(":")
        assert _until(lambda: app.jobs.view().state == "running", 30)
        refused = client.predict("int8", api_name="/switch_precision")
        assert refused.startswith(f"Not switched: batch job {job} is running (") and "of 300 items answered" in refused
        assert "stop it on the Batch jobs tab" in refused, refused
        assert app.service.manager.current().precision == "fp32"
        assert app.jobs.view().state == "running"  # the job went on
        client.predict(api_name="/stop_job")
        assert _until(lambda: app.jobs.view().state == "stopped", 60), app.jobs.view()
        assert "Switched fp32 → int8" in client.predict("int8", api_name="/switch_precision")
    finally:
        app.close()


class _EchoService:
    """A stand-in ChatService for the board's bookkeeping: each item's answer is its prompt, upper-cased (held until
    `gate` is set, if given); its model is the demo model in fp32; it keeps the requests it was sent."""

    draining = False

    def __init__(self, gate: threading.Event | None = None) -> None:
        from types import SimpleNamespace

        loaded = SimpleNamespace(is_demo=True, source="/somewhere/demo", precision="fp32")
        self.manager = SimpleNamespace(wait_ready=lambda timeout=None: loaded, backend=None)
        self.gate = gate
        self.requests: list = []

    def switching(self) -> bool:  # no precision switch under way
        return False

    def chat(self, request, cancel=None, **kw):  # type: ignore[no-untyped-def]
        from qwen3vl_webui.service.chat import Finished
        from qwen3vl_webui.telemetry import RequestStats

        self.requests.append(request)
        if self.gate is not None:
            self.gate.wait(10)
        yield Finished(request.message.text.upper(), RequestStats(3, 0, 0, 2, 0.01, 0.01))


def test_the_board_resumes_interrupted_jobs_oldest_first_but_not_stopped_finished_or_locked_ones(tmp_path: Path) -> None:
    from qwen3vl_webui.service.jobs import DEMO_MODEL, JobBoard, JobDefaults
    from qwen3vl_webui.ui.jobs_tab import describe

    def job(name: str, ended: str | None = None, done: int = 0, setup: dict | None = None) -> Path:
        folder = tmp_path / name
        with JobStore(folder / "job.sqlite") as store:
            store.add([JobItem(f"{name}-{n}", f"p{n}") for n in range(3)])
            if setup is not None:
                store.record_setup(setup)
            for _ in range(done):
                claimed = store.claim("old-run")
                store.finish(claimed.seq, "old-run", "kept", 1, 1)
            store.claim("dead-run")  # an item the dead run was answering
            if ended:
                store.mark_ended(ended)
        return folder

    # The first job was started by this model with its own sampling defaults (which it keeps); the second by an
    # older version (nothing recorded); the third by the same model in bf16: it must not be resumed in fp32.
    own = {"model": DEMO_MODEL, "precision": "fp32", "temperature": 0.0, "max_new_tokens": 7, "system": "Be brief."}
    first = job("20260101-000000-aaaaaa", done=1, setup=own)
    other = job("20260101-120000-hhhhhh", setup=own | {"precision": "bf16"})
    second = job("20260102-000000-bbbbbb")
    job("20260103-000000-cccccc", ended="stopped")  # the operator's Stop: stays stopped
    job("20260104-000000-dddddd", ended="finished")
    locked = job("20260105-000000-eeeeee")
    (tmp_path / "20260106-000000-ffffff").mkdir()  # a job whose upload never got as far as its database
    held = RunLock(locked / "job.sqlite")
    held.acquire()  # a command-line run is finishing it
    untouched = _rows(other / "job.sqlite")
    service = _EchoService()
    board = JobBoard(service, tmp_path, JobDefaults(), workers=2)  # type: ignore[arg-type]
    try:
        assert board.resume_interrupted() == [first.name, other.name, second.name, locked.name]
        assert _until(lambda: (second / "results.jsonl").exists(), 10)  # one after the other, oldest first
        assert _until(lambda: board.view().state == "finished", 10)
        for folder in (first, second):
            records = _lines(folder / "results.jsonl")
            assert [r["id"] for r in records] == [f"{folder.name}-{n}" for n in range(3)]
            assert all(r["status"] == "done" for r in records)
        assert [r["answer"] for r in _lines(first / "results.jsonl")] == ["kept", "P1", "P2"]  # done ones kept
        assert [(r.sampling.max_new_tokens, r.system_prompt) for r in service.requests] == (
            [(7, "Be brief.")] * 2 + [(JobDefaults().max_new_tokens, "")] * 3
        )  # the first job answered with its own defaults, the second (none recorded) with the board's
        with JobStore(second / "job.sqlite") as store:
            assert store.setup() == own | {"max_new_tokens": JobDefaults().max_new_tokens, "system": ""}
        assert not (locked / "results.jsonl").exists()  # left to the run that holds it
        assert not (other / "results.jsonl").exists() and _rows(other / "job.sqlite") == untouched
        view = board.view()
        assert view.job == second.name and view.resumed and view.message == "resumed after a restart: 3 of 3 items left (1 redone)"
        (why,) = view.held
        assert why.startswith(f"Job {other.name} was not resumed: it was started with {DEMO_MODEL} in bf16, and this "
                              f"server runs {DEMO_MODEL} in fp32")  # fmt: skip
        assert f"--db {other / 'job.sqlite'} --allow-setup-change" in why and why in describe(view)
        with JobStore(tmp_path / "20260103-000000-cccccc" / "job.sqlite") as stopped:
            assert stopped.counts().pending == 2 and stopped.counts().running == 1  # untouched
    finally:
        held.release()


def test_a_start_refused_while_a_job_runs_leaves_no_folder_behind(tmp_path: Path) -> None:
    from qwen3vl_webui.service.jobs import JobBoard, JobDefaults
    from qwen3vl_webui.ui.jobs_tab import JobsTab

    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{n}", "prompt": f"p{n}"}) + "\n" for n in range(2)))
    not_zip = tmp_path / "photos.zip"
    not_zip.write_bytes(b"not a zip")
    root, gate = tmp_path / "jobs", threading.Event()
    board = JobBoard(_EchoService(gate), root, JobDefaults(), workers=1)  # type: ignore[arg-type]
    tab = JobsTab(board, is_operator=lambda request: True)
    try:
        started = tab.start(str(source), "")
        assert started.startswith("Started job") and "2 items" in started, started
        job = started.split()[2].rstrip(":")
        assert _until(lambda: board.view().state == "running", 5)
        refused = tab.start(str(source), "")
        assert refused == f"⚠️ job {job} is still running; stop it or wait for it to finish.", refused
        assert [p.name for p in root.iterdir()] == [job]  # nothing was written for the refused one
    finally:
        gate.set()
    assert _until(lambda: board.view().state == "finished", 10)
    refused = tab.start(str(not_zip), "Caption this.")  # refused for itself, once its folder was made: removed
    assert refused == "⚠️ the upload is not a valid zip file", refused
    assert [p.name for p in root.iterdir()] == [job]


def test_no_job_starts_while_a_precision_switch_is_under_way(tmp_path: Path) -> None:
    """A switch that passed its guard (no job then) and is reloading: a job started now would record the old
    precision and be answered by the new one. It is refused with a sentence, and starts once the switch is over."""
    from qwen3vl_webui.service.jobs import JobBoard, JobDefaults
    from qwen3vl_webui.ui.jobs_tab import JobsTab

    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"id": "i0", "prompt": "p0"}) + "\n")
    service = _EchoService()
    switching = [True]
    service.switching = lambda: switching[0]  # type: ignore[attr-defined]
    board = JobBoard(service, tmp_path / "jobs", JobDefaults(), workers=1)  # type: ignore[arg-type]
    tab = JobsTab(board, is_operator=lambda request: True)
    refused = tab.start(str(source), "")
    assert refused == "⚠️ the model is being switched to another precision; start the job once the switch is done."
    assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").iterdir())  # nothing written
    switching[0] = False
    assert tab.start(str(source), "").startswith("Started job")
    assert _until(lambda: board.view().state == "finished", 10)


def test_a_page_job_survives_a_sigkilled_app_and_resumes_when_it_starts_again(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    import httpx
    from gradio_client import Client, handle_file

    from qwen3vl_webui.ui.jobs_tab import describe
    from tests.conftest import _free_port, start_app

    cache = tmp_path / "cache"  # the app's own --cache-dir: the job database lives in <cache dir>/jobs/<id>/
    cache.mkdir(mode=0o700)
    shutil.copytree(tiny_checkpoint, cache / tiny_checkpoint.name)
    count = 40
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"id": f"item-{n:02d}", "prompt": f"Item {n}: say something."}) + "\n"
                              for n in range(count)))  # fmt: skip
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    flags = ["--warmup", "off", "--max-context", "512", "--max-new-tokens", "24", "--max-concurrency", "2"]
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        app = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port), "--cache-dir", str(cache),
                                *flags], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert _until(lambda: _ready(httpx, url), 120), log.read_text()[-2000:]
        started = Client(url, verbose=False).predict(handle_file(str(source)), "", api_name="/start_job")
        assert started.startswith("Started job") and f"{count} items" in started, started
        folder = cache / "jobs" / started.split()[2].rstrip(":")
        assert _until(lambda: _done(folder / "job.sqlite") >= 4, 120), "the job never got going"
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(10)
    before = _rows(folder / "job.sqlite")
    done_before = {r[0]: r[2] for r in before if r[1] == "done"}
    half_done = [r[0] for r in before if r[1] == "running"]
    assert 4 <= len(done_before) < count and half_done, "killed too late (or between items) to test a resume"
    assert not (folder / "results.jsonl").exists()

    # Started again on the same --cache-dir (here in this process: a second interpreter start costs 20 s on CI's two
    # cores), and nobody clicks anything: the job goes on.
    again, _ = start_app(cache, *flags)
    try:
        view = again.jobs.view()
        assert view.job == folder.name and view.resumed and "resumed after the server restarted" in describe(view)
        assert _until((folder / "results.jsonl").exists, 120), "the resumed job did not finish"
        results = _lines(folder / "results.jsonl")
        assert [r["id"] for r in results] == [f"item-{n:02d}" for n in range(count)]  # each once, in input order
        assert all(r["status"] == "done" for r in results)
        assert all(r["answer"] == done_before[r["id"]] for r in results if r["id"] in done_before)
        attempts = {r[0]: r[3] for r in _rows(folder / "job.sqlite")}
        assert all(attempts[i] == 1 for i in done_before) and all(attempts[i] == 2 for i in half_done)
        assert again.jobs.resume_interrupted() == []  # finished: a later start leaves it alone
    finally:
        again.close()


def test_a_job_started_in_bf16_is_not_resumed_in_fp32_by_the_page_nor_by_the_cli_unless_allowed(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from qwen3vl_webui import jobs as jobs_cli
    from qwen3vl_webui.service.jobs import DEMO_MODEL
    from qwen3vl_webui.ui.jobs_tab import describe
    from tests.conftest import start_app

    cache = tmp_path / "cache"  # the page's --cache-dir: the job below lies in its jobs folder, as a page job does
    cache.mkdir(mode=0o700)
    shutil.copytree(tiny_checkpoint, cache / tiny_checkpoint.name)
    folder = cache / "jobs" / "20260101-000000-aaaaaa"
    folder.mkdir(parents=True)
    db = folder / "job.sqlite"
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"id": f"item-{n}", "prompt": f"Item {n}."}) + "\n" for n in range(3)))
    flags = ["--demo", "--cache-dir", str(cache), "--warmup", "off", "--max-context", "512", "--max-new-tokens", "16"]
    run = ["run", "--db", str(db), "--no-progress", *flags]
    assert jobs_cli.main([*run, "--input", str(source), "--precision", "bf16"]) == 0, capsys.readouterr().err
    with JobStore(db) as store:
        assert store.setup() == {"model": DEMO_MODEL, "precision": "bf16", "temperature": 0.0, "max_new_tokens": 16,
                                 "system": ""}  # fmt: skip
    with sqlite3.connect(db) as conn:  # as a kill -9 leaves it: the last two items were being answered
        conn.execute("UPDATE items SET status = 'running', answer = NULL, finished_at = NULL WHERE seq > 0")
    before = _rows(db)
    first_answer = before[0][2]

    # The page, started again in fp32 (auto on a CPU), leaves it unfinished and says why on the tab and in the log.
    app, _ = start_app(cache, *flags[3:])
    try:
        assert _until(lambda: app.jobs.view().state == "paused", 30), app.jobs.view()
        text = describe(app.jobs.view())
        assert f"it was started with {DEMO_MODEL} in bf16, and this server runs {DEMO_MODEL} in fp32" in text, text
        assert f"--db {db} --allow-setup-change" in text and "with the job's --model and --precision" in text
        assert any("was not resumed" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    finally:
        app.close()
    assert _rows(db) == before and not (folder / "results.jsonl").exists()  # nothing redone, nothing exported

    # The command line in fp32: one line naming both, exit 2, nothing touched.
    capsys.readouterr()
    assert jobs_cli.main(run) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {db} was started with {DEMO_MODEL} in bf16, and this run loaded {DEMO_MODEL} in fp32: their answers "
        "would mix in one job. Run it with the job's --model and --precision, or pass --allow-setup-change to go on "
        "with this one."
    ]
    assert _rows(db) == before

    # Told to, it goes on in fp32 (and with this run's answer length), says so, and the job now records both.
    out = tmp_path / "results.jsonl"
    assert jobs_cli.main([*run, "--output", str(out), "--allow-setup-change", "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "results mix both" in err and "answering the rest with temperature 0, up to 8 new tokens" in err, err
    results = _lines(out)
    assert [r["status"] for r in results] == ["done"] * 3 and results[0]["answer"] == first_answer
    assert all(0 < r["completion_tokens"] <= 8 for r in results[1:])
    with JobStore(db) as store:
        assert (store.setup()["precision"], store.setup()["max_new_tokens"]) == ("fp32", 8)


def _ready(httpx, url: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return httpx.get(url + "ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_upload_reads_files_only_from_inside_itself(tmp_path: Path) -> None:
    import zipfile

    from qwen3vl_webui.service.jobs import items_from_upload

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escape.png", b"x")
    (tmp_path / "job1").mkdir()
    with pytest.raises(JobError, match="outside itself"):
        items_from_upload(evil, "p", tmp_path / "job1")
    assert not (tmp_path / "escape.png").exists()
    listed = tmp_path / "list.jsonl"
    listed.write_text(json.dumps({"id": "a", "prompt": "p", "files": ["/etc/hostname.png"]}) + "\n"
                      + json.dumps({"id": "b", "prompt": "p"}) + "\n")  # fmt: skip
    (tmp_path / "job2").mkdir()
    items = items_from_upload(listed, "", tmp_path / "job2")
    assert items[0].error == "files must come inside the uploaded zip" and items[1].error is None
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.write(ASSETS / "example.png", "img/x.png")
        z.writestr("items.jsonl", json.dumps({"id": "x", "prompt": "p", "files": ["img/x.png"]}) + "\n")
    (tmp_path / "job3").mkdir()
    (item,) = items_from_upload(bundle, "", tmp_path / "job3")
    assert item.error is None and Path(item.files[0]).read_bytes() == (ASSETS / "example.png").read_bytes()


def test_a_backend_model_not_known_yet_is_not_taken_for_another_model() -> None:
    """A --backend-url front end that started before its backend answered records "backend model (not known)": a
    resume that knows the name (or the other way round) is the same model; only another precision is a change; the
    record keeps the name it knew."""
    from qwen3vl_webui.service.jobs import UNKNOWN_BACKEND_MODEL, JobSetup, SetupCheck

    known = JobSetup("backend model Qwen/Qwen3-VL-4B-Instruct", "backend", 0.7, 512, "")
    unknown = JobSetup(UNKNOWN_BACKEND_MODEL, "backend", 0.7, 512, "")
    assert not SetupCheck(known, unknown).model_changed and not SetupCheck(unknown, known).model_changed
    assert SetupCheck(known, unknown).go_on().model == known.model  # not overwritten by "not known"
    assert SetupCheck(unknown, known).go_on().model == known.model
    other = JobSetup("backend model other/model", "backend", 0.7, 512, "")
    assert SetupCheck(known, other).model_changed  # two known names still differ
    assert SetupCheck(known, JobSetup(UNKNOWN_BACKEND_MODEL, "bf16", 0.7, 512, "")).model_changed
