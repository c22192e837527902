"""UploadSweeper: keeps gradio's upload folder under an age limit and a total size cap (plain files, no gradio)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("qwen3vl_webui")

# A chat reads its files when it starts running, which can be after a wait in the queue; a file younger than
# this is never deleted, whatever the cap says (an upload in progress is younger still: its mtime moves).
MIN_AGE_S = 120.0
# Between two sweeps when nothing nudges the sweeper; an upload nudges it (at most one sweep a second, and at
# most a tenth of the time: 10,000 uploads take about 0.2 s to list on a 2-core machine).
INTERVAL_S = 30.0
_MIN_GAP_S = 1.0


@dataclass(frozen=True)
class SweepResult:
    deleted_files: int
    deleted_bytes: int
    kept_files: int
    kept_bytes: int


class UploadSweeper:
    """Deletes files under `folder` older than `max_age_s`, then the oldest until at most `max_bytes` remain.

    gradio's own `delete_cache` only removes files it tracked in this process (none from a previous run), never
    empty folders, and has no size cap, so the folder is swept here instead. `keep` returns paths that must stay
    (gradio's cached example files, which the page links to). 0 for either limit means no limit of that kind.
    """

    def __init__(
        self,
        folder: str | Path,
        max_age_s: float,
        max_bytes: int,
        keep: Callable[[], Iterable[str]] = tuple,
        min_age_s: float = MIN_AGE_S,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.keep = keep
        self.min_age_s = min_age_s  # tests lower it; nothing else should
        self.interval_s = interval_s
        self.totals = SweepResult(0, 0, 0, 0)  # deleted: since start; kept: after the last sweep
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = threading.Condition()
        self._sweeps = 0

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and (self.max_age_s or self.max_bytes):
            self._thread = threading.Thread(target=self._run, name="upload-sweeper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def nudge(self) -> None:
        """Asks for a sweep soon (after an upload); cheap, callable from the event loop."""
        self._wake.set()

    def wait_for_sweep(self, after: int, timeout: float) -> bool:
        """Waits until more than `after` sweeps have run (tests); returns whether one did."""
        with self._swept:
            return self._swept.wait_for(lambda: self._sweeps > after, timeout)

    @property
    def sweeps(self) -> int:
        return self._sweeps

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sweep()
            except Exception:  # a sweep must never take the server down; try again next time
                log.exception("upload sweep failed")
            took = time.monotonic() - started
            with self._swept:
                self._sweeps += 1
                self._swept.notify_all()
            self._wake.wait(self.interval_s)
            self._wake.clear()
            # A burst of uploads costs one sweep now and then, not one each: at most a tenth of one core.
            self._stop.wait(max(_MIN_GAP_S, 9 * took))

    # -- one sweep -----------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> SweepResult:
        """One pass: age limit, then size cap, oldest first; returns what this pass deleted and what is left."""
        now = time.time() if now is None else now
        keep = {os.path.abspath(p) for p in self.keep()}
        files, folders = _scan(str(self.folder), keep)
        files.sort()  # (mtime, size, path): oldest first
        total = sum(size for _, size, _ in files)
        deleted = freed = 0
        for mtime, size, path in files:
            age = now - mtime
            if age < self.min_age_s:
                break  # sorted: everything after is younger still
            too_old = bool(self.max_age_s) and age > self.max_age_s
            over_cap = bool(self.max_bytes) and total > self.max_bytes
            if not (too_old or over_cap):
                break
            if _remove(path):
                deleted += 1
                freed += size
                total -= size
        self._remove_empty(folders, now)
        result = SweepResult(deleted, freed, len(files) - deleted, total)
        if deleted:
            log.info("uploads: deleted %d file(s), %.1f MB; %.1f MB left", deleted, freed / 1e6, total / 1e6)
        self.totals = SweepResult(
            self.totals.deleted_files + deleted, self.totals.deleted_bytes + freed, result.kept_files, total
        )
        return result

    def _remove_empty(self, folders: list[str], now: float) -> None:
        # gradio makes one folder per upload (named by the content's hash) and leaves it behind when the file goes.
        # A folder's mtime moves when a file is added or deleted, so one just made or just emptied stays a while.
        for folder in sorted(folders, key=len, reverse=True):  # deepest first
            try:
                if now - os.lstat(folder).st_mtime >= self.min_age_s:
                    os.rmdir(folder)  # refused unless empty: nothing is lost if a file arrived meanwhile
            except OSError:
                pass


def _scan(root: str, keep: set[str]) -> tuple[list[tuple[float, int, str]], list[str]]:
    """(mtime, size, path) of every file under `root` but those in `keep`, and every folder below `root`.

    Links are listed as files (deleting one removes the link, not its target) and never followed.
    """
    files: list[tuple[float, int, str]] = []
    folders: list[str] = []
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:  # removed meanwhile
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    folders.append(entry.path)
                elif entry.path not in keep:
                    st = entry.stat(follow_symlinks=False)
                    files.append((st.st_mtime, st.st_size, entry.path))
            except OSError:  # gone meanwhile
                continue
    return files, folders


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("uploads: could not delete %s: %s", path, exc.strerror)
        return False
