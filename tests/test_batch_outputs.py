"""The batch engine's plain-data side, no model: options, per-step outputs, and the reader streams built on them."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from qwen3vl_webui.engine.batch import BatchOptions, EngineClosed, EngineOutputs, RequestOutput
from qwen3vl_webui.engine.batch.requests import Outbox, Request, RequestStreams, coalesced, text_events, token_events
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.telemetry import RequestStats


class CharTokenizer:
    """Token id n decodes to chr(n)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def req(**sampling: object) -> Request:
    return Request(None, SamplingParams(**{"temperature": 0.0, **sampling}), length=4)


def message(*outputs: RequestOutput) -> EngineOutputs:
    return EngineOutputs(outputs, steps=0, prefill_forwards=0, decode_launches=0)


STATS = RequestStats(0, 0, 0, 3, 0.1, 0.2)


def test_options_are_validated_once_with_the_bad_value_named() -> None:
    options = BatchOptions(max_batch=8, token_budget=8 * 1000, buckets=[16, 1, 4])  # type: ignore[arg-type]
    assert options.max_len == 960 and options.slot_buckets == (1, 4, 8) and options.retained_slots == 2
    assert BatchOptions(max_batch=1, prefix_slots=0).retained_slots == 0
    for bad, match in (
        (dict(max_batch=0), "max_batch must be >= 1, got 0"),
        (dict(max_batch=4, token_budget=100), "token_budget 100 leaves under 64 tokens"),
        (dict(prefix_slots=-1), "prefix_slots must be >= 0"),
        (dict(prefill_chunk=32), "prefill_chunk must be >= 64 tokens, got 32"),
        (dict(buckets=(0, 8)), "buckets must be batch sizes >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            BatchOptions(**bad)  # type: ignore[arg-type]


def test_a_request_ends_on_a_stop_token_its_length_or_its_cancel() -> None:
    eos = frozenset({2})
    r = req(max_new_tokens=3)
    assert r.ends(7, eos) is None
    assert r.ends(2, eos) == "stop" and r.finish_reason == "stop"
    r.tokens += [7, 8]
    assert r.ends(9, eos) == "length"  # its third token is its last
    r = req(max_new_tokens=10)
    r.cancel.set()
    assert r.ends(7, eos) == "cancelled"


def test_a_steps_outputs_hold_each_requests_tokens_then_its_end() -> None:
    a, b, c = req(), req(), req()
    out = Outbox()
    assert not out
    out.token(a, 5)
    out.token(b, 6)
    out.token(a, 7)
    out.finish(a, "length")
    out.fail(c, RuntimeError("bad media"))
    taken = {o.request_id: o for o in out.take()}
    assert not out
    assert taken[a.id].new_token_ids == (5, 7) and taken[a.id].finished == "length" and taken[a.id].stats is not None
    assert taken[b.id] == RequestOutput(b.id, (6,))
    assert taken[c.id].new_token_ids == () and isinstance(taken[c.id].error, RuntimeError)


def test_outputs_are_routed_to_their_streams_which_close_at_the_end() -> None:
    streams = RequestStreams()
    one, two = streams.open(1), streams.open(2)
    streams.deliver(message(RequestOutput(1, (5,)), RequestOutput(2, (6,)), RequestOutput(3, (7,))))  # 3: nobody's
    streams.deliver(message(RequestOutput(1, (), "stop", STATS)))
    streams.deliver(message(RequestOutput(1, (8,))))  # after its end: nobody reads it
    assert [one.get_nowait().new_token_ids for _ in range(2)] == [(5,), ()] and one.empty()
    assert two.get_nowait().new_token_ids == (6,)


def test_a_slow_reader_gets_several_steps_tokens_at_once_then_the_stats() -> None:
    mailbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    for out in (RequestOutput(1, (5,)), RequestOutput(1, (6, 7)), RequestOutput(1, (8,), "stop", STATS)):
        mailbox.put(out)
    assert list(token_events(mailbox, lambda: True, 1.0)) == [([5, 6, 7, 8], None), ([], STATS)]


def test_a_coalescing_reader_takes_tokens_in_batches_but_sees_the_end_at_once() -> None:
    """The engine process's readers take tokens at most every interval (one wake-up per interval, not per step), yet
    the first tokens come at once and so does the end: a reader that slept out the interval after the last tokens
    saw the end up to that late (the closed loop's next request with it)."""
    streams = RequestStreams()
    mailbox = streams.open(1)
    seen: list[tuple[float, list[int], object]] = []

    def read() -> None:
        for new, stats in coalesced(token_events(mailbox, lambda: True, 1.0), mailbox.ended, 0.5):
            seen.append((time.monotonic(), new, stats))

    reader = threading.Thread(target=read)
    reader.start()
    streams.deliver(message(RequestOutput(1, (5,))))
    for token in (6, 7, 8):  # three more steps while the reader waits out its interval
        time.sleep(0.05)
        streams.deliver(message(RequestOutput(1, (token,))))
    time.sleep(0.05)
    ended = time.monotonic()
    streams.deliver(message(RequestOutput(1, (9,), "stop", STATS)))
    reader.join(5)
    # [5] at once; [6] when it comes (the interval counts from the reader's last wake-up); then [7, 8, 9] together,
    # when the end woke the reader 0.1 s into its 0.5 s interval.
    assert [(new, stats) for _, new, stats in seen] == [([5], None), ([6], None), ([7, 8, 9], None), ([], STATS)]
    assert seen[-1][0] - ended < 0.1  # not the rest of the 0.5 s interval
    assert streams.open(2).ended.is_set() is False


def test_a_reader_gets_the_workers_error_or_hears_that_it_stopped() -> None:
    mailbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    mailbox.put(RequestOutput(1, (5,)))
    mailbox.put(RequestOutput(1, error=EngineClosed("closed")))
    with pytest.raises(EngineClosed, match="closed"):
        list(token_events(mailbox, lambda: True, 1.0))
    with pytest.raises(EngineClosed, match="stopped"):
        list(token_events(queue.SimpleQueue(), lambda: False, 0.01))


def test_the_text_stream_never_shows_a_stop_string_and_cuts_the_final_text_before_it() -> None:
    mailbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    for text in ("The ", "EN", "D!"):
        mailbox.put(RequestOutput(1, tuple(map(ord, text))))
    mailbox.put(RequestOutput(1, (), "stop", STATS))
    cancel = threading.Event()
    items = list(
        text_events(token_events(mailbox, lambda: True, 1.0), CharTokenizer(), ("END",), cancel, lambda: STATS)
    )
    assert items[-1] == ("The ", STATS)
    assert all("E" not in text for text, _ in items)
    assert cancel.is_set()  # however it ends, the request is cancelled (a no-op once it ended)


def test_closing_a_text_stream_early_reports_what_was_generated() -> None:
    mailbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    mailbox.put(RequestOutput(1, (ord("a"),)))
    reported: list[RequestStats] = []
    cancel = threading.Event()
    stream = text_events(
        token_events(mailbox, lambda: True, 1.0), CharTokenizer(), (), cancel, lambda: STATS, reported.append
    )
    assert next(stream) == ("a", None)
    stream.close()
    assert cancel.is_set() and reported == [STATS]
