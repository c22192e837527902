"""workers.Workers: the event loop's hand-off of blocking jobs to long-lived threads (no Thread.start once warm)."""

from __future__ import annotations

import threading
import time

from qwen3vl_webui.workers import Workers
from tests.conftest import wait_for


def test_an_idle_thread_takes_the_next_job_and_a_busy_pool_grows() -> None:
    pool = Workers("test-workers", idle_s=30)
    seen: list[str] = []
    done = threading.Event()
    pool.run(lambda: (seen.append(threading.current_thread().name), done.set()))
    assert done.wait(5) and wait_for(lambda: pool.idle == 1, 5)
    first = [t for t in threading.enumerate() if t.name == "test-workers"]
    done.clear()
    pool.run(lambda: (seen.append(threading.current_thread().name), done.set()))
    assert done.wait(5) and pool.started == 1  # the same thread: none started
    assert [t for t in threading.enumerate() if t.name == "test-workers"] == first
    # Jobs that block at once each get a thread of their own (a chat's stream holds its thread to its end).
    release = threading.Event()
    running = []
    for _ in range(4):
        pool.run(lambda: (running.append(threading.current_thread().ident), release.wait(5)))
    assert wait_for(lambda: len(running) == 4, 5)
    assert len(set(running)) == 4 and pool.started == 4
    release.set()
    assert wait_for(lambda: pool.idle == 4, 5)
    assert seen == ["test-workers", "test-workers"]


def test_a_failing_job_leaves_its_thread_serving() -> None:
    pool = Workers("test-workers-fail", idle_s=30)
    pool.run(lambda: 1 / 0)
    assert wait_for(lambda: pool.idle == 1, 5)
    done = threading.Event()
    pool.run(done.set)
    assert done.wait(5) and pool.started == 1


def test_idle_threads_end_after_idle_s_and_the_pool_starts_anew() -> None:
    pool = Workers("test-workers-idle", idle_s=0.2)
    done = threading.Event()
    pool.run(done.set)
    assert done.wait(5)
    assert wait_for(lambda: pool.idle == 0 and not any(t.name == "test-workers-idle" for t in threading.enumerate()), 5)
    done.clear()
    pool.run(done.set)
    assert done.wait(5) and pool.started == 2


def test_a_job_handed_over_as_the_thread_times_out_still_runs() -> None:
    # The race the pool guards: `run` takes an idle worker just as its wait times out; the worker must stay for it.
    pool = Workers("test-workers-race", idle_s=0.01)
    ran = []
    for i in range(200):
        done = threading.Event()
        pool.run(lambda i=i, done=done: (ran.append(i), done.set()))
        assert done.wait(5), i
        time.sleep(0.01 * (i % 3))  # around the idle timeout
    assert ran == list(range(200))


def test_each_job_runs_in_a_context_of_its_own() -> None:
    # A job that sets a context variable (the OpenAI API's stream runs its chat directly on the pooled thread) leaves
    # nothing for the next job on the same thread, as a new thread would.
    import contextvars

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    pool = Workers("test-workers-context", idle_s=30)
    seen: list[tuple[int, str]] = []
    for value in ("first job's", "second job's"):
        done = threading.Event()

        def job(value: str = value, done: threading.Event = done) -> None:
            seen.append((threading.get_ident(), marker.get()))
            marker.set(value)
            done.set()

        pool.run(job)
        assert done.wait(5) and wait_for(lambda: pool.idle == 1, 5)
    assert seen[0][0] == seen[1][0] and [m for _, m in seen] == ["unset", "unset"]
