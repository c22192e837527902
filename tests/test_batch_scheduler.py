"""The batch engine's Scheduler on fake requests, no model: admission, prefill grouping, the burst rule, cancel."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from qwen3vl_webui.engine.batch.requests import EngineClosed, Request
from qwen3vl_webui.engine.batch.scheduler import PrefillJob, Scheduler
from qwen3vl_webui.engine.request import SamplingParams

CHUNK = 64


def fake(length: int = 20, multimodal: bool = False, new_tokens: int = 8) -> Request:
    return Request(
        None, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), length=length, multimodal=multimodal
    )


def scheduler(max_batch: int = 8, factor: int = 4, burst: int = 2) -> Scheduler:
    return Scheduler(max_batch, CHUNK, idle_prefill_factor=factor, burst_forwards=burst)


def admit_all(s: Scheduler, reqs: list[Request]) -> list[PrefillJob]:
    for r in reqs:
        s.add(r)
    admission = s.admit()
    assert admission is not None
    return [s.start_prefill(r) for r in admission.admitted]


def run_prefill(s: Scheduler) -> list[PrefillJob]:
    """Plays the runner for one planned forward: short texts finish, a long prompt advances one chunk."""
    plan = s.next_prefill()
    assert plan is not None and plan.jobs
    finished = []
    for job in plan.jobs:
        done = job.length if len(plan.jobs) > 1 else min(job.length, job.done + CHUNK)
        s.advance(job, done)
        if done == job.length:
            s.prefill_done(job)
            finished.append(job)
    return finished


def decode_step(s: Scheduler) -> None:
    s.launched()
    for req in s.running:
        req.tokens.append(1)


# ---------------------------------------------------------------- admission


def test_admission_is_first_come_first_served_up_to_the_free_slots() -> None:
    s = scheduler(max_batch=3)
    reqs = [fake() for _ in range(5)]
    jobs = admit_all(s, reqs)
    assert [j.req for j in jobs] == reqs[:3]  # running + prefilling + incoming never exceed max_batch
    assert s.waiting_load()[0] == 2
    run_prefill(s)  # the three together (short texts)
    for job in jobs:
        s.join(job.req)
    assert s.admit().admitted == []  # every slot is taken
    s.release(1)
    assert s.admit().admitted == [reqs[3]]  # one slot came free: the oldest waiting one
    assert s.waiting_load()[0] == 1


def test_cancelled_waiting_requests_are_dropped_at_admission() -> None:
    s = scheduler(max_batch=1)
    a, b, c = fake(), fake(), fake()
    for r in (a, b, c):
        s.add(r)
    b.cancel.set()
    admission = s.admit()
    assert admission.admitted == [a] and admission.dropped == [b]
    assert s.waiting_load()[0] == 1  # c still waits: no slot


def test_admission_blocks_until_work_and_returns_none_once_closed() -> None:
    s = scheduler()
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(s.admit()))
    worker.start()
    time.sleep(0.05)
    assert worker.is_alive() and not got  # nothing to do: it waits
    s.close()
    worker.join(5)
    assert got == [None]
    with pytest.raises(EngineClosed):
        s.add(fake())


def test_requests_added_while_admission_is_held_are_admitted_together() -> None:
    s = scheduler()
    admitted: list[list[Request]] = []
    worker = threading.Thread(target=lambda: admitted.append(s.admit().admitted))
    with s.hold():
        worker.start()
        reqs = [fake() for _ in range(4)]
        for r in reqs:
            s.add(r)
            time.sleep(0.01)  # the worker would have woken between two adds
    worker.join(5)
    assert admitted == [reqs]


# ---------------------------------------------------------------- prefill grouping


def test_short_prompts_share_a_forward_up_to_the_idle_budget_while_nobody_is_mid_answer() -> None:
    s = scheduler(max_batch=32)
    jobs = admit_all(s, [fake(20) for _ in range(14)])
    plan = s.next_prefill()
    assert plan.jobs == jobs[:12]  # 12 x 20 tokens fit 4 x 64; the 13th would not
    assert s.prefill_forwards == 1


def test_a_batched_forward_is_bounded_by_its_padded_size() -> None:
    """The forward pads every row to the widest prompt, so the bound is rows x widest (the KV and the transient it
    holds: plan.burst_tokens counts them), not the prompts' summed lengths."""
    s = scheduler(max_batch=32)
    jobs = admit_all(s, [fake(60), *(fake(20) for _ in range(9))])
    assert s.next_prefill().jobs == jobs[:4]  # 4 rows x 60 padded <= 4 x 64; summed (60 + 9 x 20) all 10 fitted


def test_mid_answer_short_prompts_share_only_one_chunk() -> None:
    s = scheduler(max_batch=32)
    running = fake()
    s.join(running)
    running.tokens += [1, 2]  # past its first token: a stall would break an answer under way
    jobs = admit_all(s, [fake(22), fake(21), fake(22)])
    assert s.mid_answer()
    assert s.next_prefill().jobs == jobs[:2]  # 22 + 21 fit one 64-token chunk, the third waits
    running.tokens[:] = [1]
    assert not s.mid_answer()
    assert s.next_prefill().jobs == jobs  # at its first token it is still "idle": all three


def test_a_long_a_started_or_a_media_prompt_runs_alone() -> None:
    s = scheduler(max_batch=8)
    short, long, image, after = admit_all(s, [fake(20), fake(3 * CHUNK), fake(100, multimodal=True), fake(20)])
    assert s.next_prefill().jobs == [short]  # grouping stops at the first prompt that cannot join: order is kept
    s.prefill_done(short)
    assert s.next_prefill().jobs == [long]
    s.advance(long, CHUNK)
    assert s.next_prefill().jobs == [long]  # started: its next chunk, alone
    s.prefill_done(long)
    assert s.next_prefill().jobs == [image]
    s.prefill_done(image)
    reused = s.start_prefill(fake(20), reused=16)  # starts from a retained prefix: mid-prompt, like a next chunk
    assert (reused.done, reused.base) == (16, 16) and not reused.short_text(CHUNK)
    assert s.next_prefill().jobs == [after]  # `after` was queued first


def test_the_vision_tower_runs_alone_only_when_it_would_stall_decoding_streams_too_long() -> None:
    s = scheduler()
    (image,) = admit_all(s, [fake(CHUNK // 2 + 1, multimodal=True)])
    assert not s.next_prefill().tower_alone  # nobody decodes: tower and text in one forward
    s.join(fake())
    assert s.next_prefill().tower_alone  # more than half a chunk of text left behind the tower
    s.advance(image, 1)
    assert not s.next_prefill().tower_alone  # half a chunk left: tower and text together


# ---------------------------------------------------------------- the burst rule


def simulate(s: Scheduler, arrivals: list[Request]) -> str:
    """Plays the engine core's loop over the scheduler: P per prefill forward, D per decode step, until all end."""
    for r in arrivals:
        s.add(r)
    trace = ""
    while s.running or s.prefilling or s.waiting_load()[0]:
        admission = s.admit()
        for r in admission.admitted:
            s.start_prefill(r)
        if s.prefilling:
            trace += "P"
            for job in run_prefill(s):
                s.join(job.req)
                job.req.tokens.append(0)  # its first token comes from the prefill
        if s.decode_now():
            trace += "D"
            decode_step(s)
            for slot in reversed(range(len(s.running))):
                if len(s.running[slot].tokens) >= s.running[slot].sampling.max_new_tokens:
                    s.release(slot)
    return trace


def test_a_burst_waits_for_at_most_burst_forwards_prefill_forwards_before_its_first_decode_step() -> None:
    # 24 prompts of 20 tokens: 12 per idle forward -> two forwards, then decoding.
    assert simulate(scheduler(max_batch=32), [fake(20, new_tokens=3) for _ in range(24)]) == "PPDD"
    # 36 prompts: three forwards' worth; the first decode step comes after two, the third forward waits for it
    # and, with streams mid-answer, shares one chunk's budget (3 of 20 tokens) per forward.
    trace = simulate(scheduler(max_batch=36), [fake(20, new_tokens=4) for _ in range(36)])
    assert trace.startswith("PPDPD") and trace.count("P") == 2 + 4
    assert simulate(scheduler(max_batch=36, burst=1), [fake(20, new_tokens=3) for _ in range(36)]).startswith("PDP")


def test_forwards_before_the_first_stream_do_not_count_against_a_burst() -> None:
    """A long prompt prefilled in chunks while idle, short ones queued behind it: once it joins (alone, at its first
    token), the burst still gets one more forward before the first decode step."""
    trace = simulate(
        scheduler(max_batch=8), [fake(3 * CHUNK, new_tokens=3), *[fake(20, new_tokens=3) for _ in range(6)]]
    )
    assert trace.startswith("PPPPD")  # 3 chunks (the third joins it), the 6 short ones, then decode


def test_a_burst_never_holds_back_a_stream_that_is_mid_answer() -> None:
    s = scheduler(max_batch=8)
    running = fake()
    s.join(running)
    running.tokens += [0, 1]
    admit_all(s, [fake(20) for _ in range(3)])
    assert not s.burst_pending() and s.decode_now()


def test_no_burst_when_a_media_or_long_prompt_is_pending() -> None:
    for pending in (fake(100, multimodal=True), fake(2 * CHUNK)):
        s = scheduler()
        s.join(fake())  # at its first token
        admit_all(s, [fake(20), pending])
        assert not s.burst_pending() and s.decode_now()


# ---------------------------------------------------------------- memory pressure, cancel, slots


def test_a_prefill_that_ran_out_of_memory_is_retried_once() -> None:
    s = scheduler()
    a, b = admit_all(s, [fake(), fake()])
    assert s.may_retry([a, b]) and a.retried and b.retried
    assert not s.may_retry([a, b])  # the second failure fails the jobs
    (c,) = admit_all(s, [fake()])
    assert not s.may_retry([c, a])  # a group holding a job already retried is not retried again


def test_cancelled_prompts_leave_the_prefill_queue_as_they_are_met() -> None:
    s = scheduler()
    a, b, long, c = admit_all(s, [fake(20), fake(20), fake(2 * CHUNK), fake(20)])
    a.req.cancel.set()
    c.req.cancel.set()
    plan = s.next_prefill()
    assert plan.cancelled == [a] and plan.jobs == [b]  # grouping stopped at the long prompt, before c
    assert list(s.prefilling) == [b, long, c]
    s.prefill_done(b)
    s.prefill_done(long)
    plan = s.next_prefill()
    assert plan.cancelled == [c] and plan.jobs == [] and s.prefill_forwards == 1  # no forward for nobody


def test_release_keeps_slots_dense_and_cancelled_running_requests_are_found_highest_first() -> None:
    s = scheduler()
    reqs = [fake() for _ in range(4)]
    assert [s.join(r) for r in reqs] == [0, 1, 2, 3] and s.peak == 4
    reqs[0].cancel.set()
    reqs[2].cancel.set()
    found = []
    for slot in s.cancelled_slots():  # released one by one, as the core does
        found.append(slot)
        assert s.release(slot) == len(s.running)  # the slot that came free is the last one
    assert found == [2, 0]
    assert s.running == [reqs[3], reqs[1]]  # the last request moved into each hole
    assert s.unjoin(reqs[3]) is None and s.unjoin(reqs[1]) == 1  # only the last join can be taken back
    assert s.fail_running() == [reqs[3]] and not s.running


def test_drain_hands_back_every_request_it_holds() -> None:
    s = scheduler(max_batch=2)
    reqs = [fake() for _ in range(3)]
    jobs = admit_all(s, reqs)
    s.prefill_done(jobs[0])
    s.join(reqs[0])
    assert s.drain() == reqs and not s.running and not s.prefilling and s.waiting_load() == (0, None)


def test_the_scheduler_never_imports_torch() -> None:
    code = "import sys, qwen3vl_webui.engine.batch.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_nudge_that_lands_while_busy_still_wakes_the_next_idle_wait() -> None:
    """A compiled bucket's swap asks for one idle step (issue 14): a nudge during a busy step must not be lost."""
    s = scheduler()
    s.running.append(fake())  # a stream decoding: admit() returns at once, no idle wait to end
    s.nudge()
    assert s.admit() is not None
    s.running.clear()  # the batch finished: the worker is idle now
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(s.admit()), daemon=True)
    waiter.start()
    waiter.join(timeout=2)
    assert not waiter.is_alive() and got and got[0] is not None and not got[0].admitted  # woken for its swap
    # Consumed: the next idle admit waits again, until work (or close) comes.
    waiter = threading.Thread(target=lambda: got.append(s.admit()), daemon=True)
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive()
    s.close()
    waiter.join(timeout=2)
    assert not waiter.is_alive() and got[-1] is None


def test_a_stream_that_just_ended_is_not_mid_answer() -> None:
    """The step after a leave is enqueued before the leave is handled: a burst is not held back for a stream that
    ended with the step just read (it is still in `running` until released)."""
    s = scheduler(max_batch=8)
    running = fake()
    s.join(running)
    running.tokens = [1, 2]
    assert s.mid_answer()
    running.finish_reason = "length"
    assert not s.mid_answer()
