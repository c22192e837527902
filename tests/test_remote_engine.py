"""The batch engine in its own process (CPU, tiny model): same answers as in-process, stop, errors, death."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
from qwen3vl_webui.engine.remote.client import EngineProcess, EngineStartFailed
from qwen3vl_webui.engine.remote.protocol import EngineDied, RemoteError
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
OPTIONS = {"max_batch": 2, "token_budget": 2 * 2048}


@pytest.fixture(scope="module")
def engine_process(tiny_checkpoint: Path):
    deaths: list[int | None] = []
    process = EngineProcess(
        {"source": str(tiny_checkpoint), "precision": "fp32", "device": "cpu", "attn": "sdpa", "options": OPTIONS},
        on_death=deaths.append,
    )
    info = process.start()
    assert info.device == "cpu" and info.max_batch == 2 and info.pid != os.getpid()
    yield process, deaths
    process.stop()


def _answer(stream) -> tuple[str, object]:
    text, stats = "", None
    for item in stream:
        text, stats = item
    return text, stats


def test_greedy_answers_through_the_process_equal_the_in_process_engine(engine_process, tiny_loaded) -> None:
    process, _ = engine_process
    image = str(ASSETS / "example.png")
    prompts = [
        build_prompt(tiny_loaded, ChatRequest(UserMessage("hello there"), sampling=GREEDY)),
        build_prompt(tiny_loaded, ChatRequest(UserMessage("Describe it.", (image,)), sampling=GREEDY)),
    ]
    with BatchEngine(tiny_loaded, BatchOptions(**OPTIONS)) as local:
        expected = [_answer(local.submit(p, GREEDY, threading.Event()))[0] for p in prompts]
    tokenizer = tiny_loaded.processor.tokenizer
    streams = [process.submit(p, GREEDY, tokenizer, threading.Event()) for p in prompts]  # both at once
    got = [_answer(s) for s in streams]
    assert [text for text, _ in got] == expected
    assert got[1][1].prompt_image_tokens > 0 and got[0][1].new_tokens > 0
    assert process.steps > 0


def test_a_stop_reaches_the_engine_and_frees_the_slot(engine_process, tiny_loaded) -> None:
    process, _ = engine_process
    long = SamplingParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("story"), sampling=GREEDY))
    cancel = threading.Event()
    stream = process.submit(prompt, long, tiny_loaded.processor.tokenizer, cancel)
    next(stream)
    stream.close()  # what gradio does on Stop
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (process.stats is None or process.stats.snapshot.active):
        time.sleep(0.05)
    assert process.stats.snapshot.active == 0
    again = _answer(process.submit(prompt, GREEDY, tiny_loaded.processor.tokenizer, threading.Event()))
    assert again[1].new_tokens > 0


def test_a_request_too_long_for_a_slot_fails_alone_with_the_reason(engine_process, tiny_loaded) -> None:
    process, _ = engine_process
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("hi"), sampling=GREEDY))
    huge = SamplingParams(max_new_tokens=5000, temperature=0.0)
    with pytest.raises(RemoteError) as err:
        _answer(process.submit(prompt, huge, tiny_loaded.processor.tokenizer, threading.Event()))
    assert err.value.kind == "request" and "slots holds" in str(err.value)


def test_a_killed_engine_fails_requests_in_flight_at_once_and_reports_its_death(tiny_checkpoint, tiny_loaded) -> None:
    deaths: list[int | None] = []
    process = EngineProcess(
        {"source": str(tiny_checkpoint), "precision": "fp32", "device": "cpu", "attn": "sdpa", "options": OPTIONS},
        on_death=deaths.append,
    )
    process.start()
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("story"), sampling=GREEDY))
    long = SamplingParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    stream = process.submit(prompt, long, tiny_loaded.processor.tokenizer, threading.Event())
    next(stream)
    os.kill(process.pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(EngineDied):
        for _ in stream:
            pass
    assert time.monotonic() - killed < 2.0
    deadline = time.monotonic() + 5
    while not deaths and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deaths == [-signal.SIGKILL] and not process.alive
    with pytest.raises(EngineDied):
        process.submit(prompt, GREEDY, tiny_loaded.processor.tokenizer, threading.Event())


def test_a_load_failure_is_one_sentence(tmp_path: Path) -> None:
    process = EngineProcess(
        {
            "source": str(tmp_path / "nothing-here"),
            "precision": "fp32",
            "device": "cpu",
            "attn": "sdpa",
            "options": OPTIONS,
        }
    )
    with pytest.raises(EngineStartFailed):
        process.start()


def _mapped(pid: int, package: str) -> bool:
    """Whether the process has one of `package`'s compiled modules mapped: imported, seen from outside the process."""
    with open(f"/proc/{pid}/maps") as maps:
        return any(f"/{package}/" in line for line in maps)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_the_engine_process_imports_neither_scipy_nor_torchvision_unless_told(
    tiny_checkpoint, tiny_loaded, monkeypatch
) -> None:
    # transformers imports both wherever they are installed (weights/lean.py); the engine process uses neither. With
    # QWEN3VL_LEAN_IMPORTS=0 it imports both, as before: the check can fail.
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("hello there"), sampling=GREEDY))
    seen = {}
    for lean in ("1", "0"):
        monkeypatch.setenv("QWEN3VL_LEAN_IMPORTS", lean)
        process = EngineProcess(
            {"source": str(tiny_checkpoint), "precision": "fp32", "device": "cpu", "attn": "sdpa", "options": OPTIONS}
        )
        try:
            process.start()
            text, stats = _answer(process.submit(prompt, GREEDY, tiny_loaded.processor.tokenizer, threading.Event()))
            seen[lean] = (_mapped(process.pid, "scipy"), _mapped(process.pid, "torchvision"), text, stats.new_tokens)
        finally:
            process.stop()
    assert seen["1"][:2] == (False, False), seen
    assert seen["0"][:2] == (True, True), seen
    assert seen["1"][2:] == seen["0"][2:] and seen["1"][3] > 0  # the same greedy answer either way


def test_a_stream_that_finds_the_engine_dead_reads_why_before_it_gives_up() -> None:
    """The reader thread puts each stream's reason (`EngineDied`, "stopped unexpectedly") before it marks the
    process dead; a stream whose wait ran out just then must still raise that reason, not the bare "The generation
    engine stopped." (a server error at the API: CI saw one under load)."""
    import queue

    from qwen3vl_webui.engine.batch.requests import EngineClosed, RequestOutput, token_events
    from qwen3vl_webui.engine.remote.protocol import EngineDied

    mailbox: queue.SimpleQueue = queue.SimpleQueue()
    seen = []

    def alive() -> bool:  # the wait ran out with the queue empty; meanwhile the reason arrived and the flag went down
        seen.append(True)
        mailbox.put(RequestOutput(7, (5, 6), error=EngineDied("The engine stopped unexpectedly while answering")))
        return False

    events = token_events(mailbox, alive, 0.001)
    with pytest.raises(EngineDied, match="stopped unexpectedly"):
        next(events)
    assert seen == [True]
    with pytest.raises(EngineClosed):  # nothing in the mailbox and the engine gone: the bare error, as before
        next(token_events(queue.SimpleQueue(), lambda: False, 0.001))
