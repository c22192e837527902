"""A batch job's state in SQLite (WAL): items claimed in a transaction, answered atomically, exported in input order.

Why it survives `kill -9`, a reboot or a preempted instance: every change is one committed transaction. An item is
`pending`, `running` (claimed by this run), `done` (its answer written in the same UPDATE that marks it) or `failed`
(with the reason). A run that dies leaves `running` rows; the next run (`recover`) puts them back to `pending`, so a
half-done item is redone and a done one is never run again. One runner per database at a time (`RunLock`, an flock
the kernel drops when the process dies). What the job answers with (model, precision, default sampling) is in its
`meta` table under `setup`, written at each run's start: a database of an older version has none and reads the same.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("pending", "running", "done", "failed")
# A run that died while holding an item this many times (a crash of the whole process, every time) fails it.
MAX_ATTEMPTS = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    files TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    answer TEXT,
    error TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS items_status ON items (status, seq);
"""


class JobError(ValueError):
    """A job that cannot start as asked (a database holding another job, a second runner); str() is one sentence."""


@dataclass(frozen=True)
class JobItem:
    """One item: a prompt with zero or more files. `options`: per-item system prompt, max_new_tokens, temperature,
    seed. `error`: set when the input line itself was bad; the item is stored as failed with it."""

    id: str
    prompt: str
    files: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Claimed:
    seq: int
    id: str
    prompt: str
    files: tuple[str, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class Counts:
    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.running + self.done + self.failed

    @property
    def finished(self) -> int:
        return self.done + self.failed


class JobStore:
    """One job's SQLite database. Thread-safe: one connection, one lock (each call is a short transaction)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we say BEGIN ourselves, so a claim's SELECT and UPDATE are one transaction.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed answer survives a power cut, not just kill -9
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- filling ----------------------------------------------------------------------------
    def add(self, items: list[JobItem], source: str = "") -> bool:
        """Stores the job's items, once: True if they were added now, False if this database already holds exactly
        this job (a resumed run). JobError if it holds another one."""
        digest = items_digest(items)
        with self._lock, self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'digest'").fetchone()
            if row is not None:
                if row[0] != digest:
                    count = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                    raise JobError(
                        f"{self.path.name} already holds another job ({count} items); give this input its own --db, "
                        "or run the same input again to resume it."
                    )
                return False
            now = time.time()
            self._db.executemany(
                "INSERT INTO items (seq, id, prompt, files, options, status, error, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (n, it.id, it.prompt, json.dumps(list(it.files)), json.dumps(it.options),
                     "failed" if it.error else "pending", it.error, now if it.error else None)
                    for n, it in enumerate(items)
                ],
            )  # fmt: skip
            meta = {"digest": digest, "created_at": str(now), "source": source}
            self._db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            return True

    def has_items(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM items LIMIT 1").fetchone() is not None

    def mark_ended(self, how: str) -> None:
        """Records that the job ended ("finished", or "stopped" by the operator): the app does not resume it."""
        with self._lock, self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ended', ?)", (how,))

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def setup(self) -> dict[str, Any] | None:
        """What the job's last run answered with (service/jobs.py's JobSetup); None for a job no run recorded it of
        (one made by an older version, or not run yet)."""
        raw = self.meta("setup")
        try:
            value = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    def record_setup(self, setup: dict[str, Any]) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('setup', ?)", (json.dumps(setup, sort_keys=True),)
            )

    # -- running ----------------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """At the start of a run: items a dead run held go back to pending (redone), or fail after MAX_ATTEMPTS
        claims that never finished. Returns (requeued, failed)."""
        with self._lock, self._transaction():
            failed = self._db.execute(
                "UPDATE items SET status = 'failed', finished_at = ?, claimed_by = NULL, error = ? "
                "WHERE status = 'running' AND attempts >= ?",
                (time.time(), f"the runner died {MAX_ATTEMPTS} times while answering this item", MAX_ATTEMPTS),
            ).rowcount
            requeued = self._db.execute(
                "UPDATE items SET status = 'pending', claimed_by = NULL, started_at = NULL WHERE status = 'running'"
            ).rowcount
        return requeued, failed

    def claim(self, owner: str) -> Claimed | None:
        """The next pending item in input order, marked running for `owner` in the same transaction; None when none
        is left."""
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT seq, id, prompt, files, options FROM items WHERE status = 'pending' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE items SET status = 'running', claimed_by = ?, started_at = ?, attempts = attempts + 1 "
                "WHERE seq = ?",
                (owner, time.time(), row[0]),
            )
        return Claimed(row[0], row[1], row[2], tuple(json.loads(row[3])), json.loads(row[4]))

    def finish(self, seq: int, owner: str, answer: str, prompt_tokens: int, completion_tokens: int) -> bool:
        """Marks the item done with its answer, in one statement: it is either answered or still running."""
        return self._settle(
            "status = 'done', answer = ?, error = NULL, prompt_tokens = ?, completion_tokens = ?",
            (answer, prompt_tokens, completion_tokens), seq, owner,
        )  # fmt: skip

    def fail(self, seq: int, owner: str, error: str) -> bool:
        return self._settle("status = 'failed', error = ?", (error,), seq, owner)

    def release(self, seq: int, owner: str) -> bool:
        """Back to pending (preempted by a chat, or the run stopped): not counted as an attempt."""
        with self._lock, self._transaction():
            return bool(
                self._db.execute(
                    "UPDATE items SET status = 'pending', claimed_by = NULL, started_at = NULL, "
                    "attempts = MAX(0, attempts - 1) WHERE seq = ? AND status = 'running' AND claimed_by = ?",
                    (seq, owner),
                ).rowcount
            )

    def _settle(self, assignments: str, values: tuple[Any, ...], seq: int, owner: str) -> bool:
        with self._lock, self._transaction():
            return bool(
                self._db.execute(
                    f"UPDATE items SET {assignments}, finished_at = ?, claimed_by = NULL "
                    "WHERE seq = ? AND status = 'running' AND claimed_by = ?",
                    (*values, time.time(), seq, owner),
                ).rowcount
            )

    # -- reading ----------------------------------------------------------------------------
    def counts(self) -> Counts:
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
                "FROM items GROUP BY status"
            ).fetchall()
        by = {r[0]: r for r in rows}
        return Counts(
            *(by[s][1] if s in by else 0 for s in STATUSES),
            prompt_tokens=sum(r[2] for r in rows), completion_tokens=sum(r[3] for r in rows),
        )  # fmt: skip

    def results(self, include_unfinished: bool = False) -> Iterator[dict[str, Any]]:
        """Output records in input order: finished items (all items with `include_unfinished`)."""
        where = "" if include_unfinished else "WHERE status IN ('done', 'failed')"
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, status, answer, error, prompt_tokens, completion_tokens FROM items {where} ORDER BY seq"
            ).fetchall()
        for id_, status, answer, error, prompt_tokens, completion_tokens in rows:
            yield {
                "id": id_, "status": status, "answer": answer or "", "error": error or "",
                "prompt_tokens": prompt_tokens or 0, "completion_tokens": completion_tokens or 0,
            }  # fmt: skip

    def export(self, output: str | os.PathLike[str], include_unfinished: bool = False) -> int:
        """Writes the results as JSON lines (through a temporary file and a rename: never half a file); returns the
        number of lines."""
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        count = 0
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in self.results(include_unfinished):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        return count

    # -- helpers ----------------------------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): the write lock is taken at the start, so two runners
    could never claim the same row even without RunLock."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


class RunLock:
    """One runner per database: an exclusive flock on `<db>.lock` that the kernel releases when the process dies
    (kill -9 included), so a crashed run never blocks the next."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = Path(f"{db_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise JobError(
                f"{Path(str(self.path)[:-5]).name} is being run by pid {holder}; wait for it or stop it."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def items_digest(items: Iterable[JobItem]) -> str:
    """Identifies a job's input: the same lines give the same digest (a resumed run), others another."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.prompt, list(it.files), it.options, it.error], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()
