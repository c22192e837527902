"""The decode paths: the batch engine behind ModelManager gives generate's greedy answers, survives switches."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.decoders import BatchDecoder, GenerateDecoder, make_decoder
from qwen3vl_webui.engine.remote.decoder import RemoteDecoder
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.limits import Limits
from qwen3vl_webui.service.manager import ModelManager
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)


def _final(stream) -> tuple[str, object]:
    *_, (text, stats) = list(stream)
    return text, stats


def test_auto_picks_the_batch_engine_process_on_a_gpu_only() -> None:
    assert isinstance(make_decoder("auto", "cuda", 4, 4096), RemoteDecoder)
    assert isinstance(make_decoder("auto", "cpu", 4, 4096), GenerateDecoder)
    assert isinstance(make_decoder("batch", "cpu", 4, 4096), RemoteDecoder)
    assert isinstance(make_decoder("batch-inproc", "cpu", 4, 4096), BatchDecoder)


def test_batch_engine_answers_like_generate_and_follows_a_precision_switch(tiny_checkpoint: Path) -> None:
    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(2, 4), decoder="batch-inproc", limits=Limits(1024, 256)
    )
    loaded = manager.load()
    assert isinstance(manager.decoder, BatchDecoder) and manager.decoder.engine.loaded is loaded
    assert manager.decoder.engine.max_len == 1024 and manager.decoder.engine.max_batch == 2
    prompts = [build_prompt(loaded, ChatRequest(UserMessage(q), sampling=GREEDY)) for q in ("Hello", "Describe a ball")]
    reference = [_final(GenerateDecoder().stream(loaded, p, GREEDY, threading.Event()))[0] for p in prompts]
    results: list[str] = [""] * 2

    def run(i: int) -> None:
        results[i] = _final(manager.decoder.stream(loaded, prompts[i], GREEDY, threading.Event()))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == reference  # two requests decoded together, each equal to its own generate run
    assert manager.decoder.engine.snapshot().peak_active >= 1
    old_engine = manager.decoder.engine
    manager.switch("bf16")
    assert manager.decoder.engine is not old_engine and manager.decoder.engine.loaded is manager.current()
    text, stats = _final(
        manager.decoder.stream(
            manager.current(), build_prompt(manager.current(), ChatRequest(UserMessage("hi"), sampling=GREEDY)),
            GREEDY, threading.Event(),
        )
    )  # fmt: skip
    assert stats.new_tokens >= 1 and "batch engine" in manager.decoder.describe()


def test_the_panel_line_shows_batch_size_and_how_long_the_oldest_request_waits(tiny_checkpoint: Path) -> None:
    import re
    import time

    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(2, 4), decoder="batch-inproc", limits=Limits(512, 256)
    )
    loaded = manager.load()
    long = SamplingParams(max_new_tokens=400, temperature=0.0, repetition_penalty=1.0)
    prompt = build_prompt(loaded, ChatRequest(UserMessage("Hello"), sampling=long))
    decoder = manager.decoder
    decoder.max_batch = 1
    loaded.model.generation_config.eos_token_id = None  # random weights could end the first answer at once
    decoder.attach(loaded)  # one slot: the second request must wait for the first
    stop = threading.Event()
    first = decoder.stream(loaded, prompt, long, stop)
    next(iter(first))
    second = decoder.stream(loaded, prompt, long, threading.Event())
    time.sleep(0.3)
    line = decoder.describe()
    stop.set()
    list(first)
    second.close()
    assert "1/1 decoding" in line and "1 waiting" in line, line
    wait = float(re.search(r"oldest ([0-9.]+) s", line).group(1))
    assert 0.2 <= wait < 30, line
    decoder.detach()


def test_the_app_serves_chats_through_the_batch_engine(tiny_checkpoint: Path) -> None:
    from gradio_client import Client

    from qwen3vl_webui.conversation import ERROR_PREFIX
    from tests.conftest import start_app

    app, url = start_app(tiny_checkpoint.parent, "--engine", "batch", "--max-concurrency", "2", "--max-context", "2048")
    decoder = app.service.manager.decoder
    try:
        assert isinstance(decoder, RemoteDecoder) and decoder.pid not in (None, os.getpid())
        assert app.service.manager.current().model is None  # no weights in the web server's process
        answer = Client(url, verbose=False).predict({"text": "Hello", "files": []}, max_new_tokens=16, api_name="/chat")
        assert answer and not answer.startswith(ERROR_PREFIX)
        assert decoder.process.steps > 0 and app.service.stats.last.new_tokens >= 1
        time.sleep(0.6)  # the engine reports its load twice a second
        assert "batch engine in process" in app.service.snapshot().decoder
        assert app.service.snapshot().engine.steps > 0
        pid = decoder.pid
    finally:
        app.close()
    assert _gone(pid)  # closing the app stops the engine process


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_engine_process_answers_like_generate_and_a_switch_starts_a_new_one(tiny_checkpoint: Path) -> None:
    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(2, 4), decoder="batch", limits=Limits(1024, 256)
    )
    try:
        loaded = manager.load()
        assert loaded.model is None and loaded.precision == "fp32" and loaded.weights_bytes > 0
        prompts = [build_prompt(loaded, ChatRequest(UserMessage(q), sampling=GREEDY)) for q in ("Hello", "Describe a ball")]
        local = ModelManager(str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(1, 1)).load()
        reference = [_final(GenerateDecoder().stream(local, p, GREEDY, threading.Event()))[0] for p in prompts]
        got = [_final(manager.decoder.stream(loaded, p, GREEDY, threading.Event()))[0] for p in prompts]
        assert got == reference
        old_pid = manager.decoder.pid
        report = manager.switch("bf16")
        assert report.new == "bf16" and manager.current().precision == "bf16" and manager.decoder.pid != old_pid
        assert _gone(old_pid)  # the old precision's process exited: all its memory went back
        text, stats = _final(manager.decoder.stream(manager.current(), prompts[0], GREEDY, threading.Event()))
        assert stats.new_tokens >= 1
    finally:
        manager.close()


def test_the_engine_compiles_every_precision_it_can_capture_on_a_gpu() -> None:
    from qwen3vl_webui.engine.batch.compiled import graph_blocker, should_compile

    assert [p for p in ("bf16", "fp16", "int8wo", "int4", "fp8", "int4-bnb", "int8") if should_compile(None, "cuda", p)] == [
        "bf16", "fp16", "int8wo", "int4", "fp8", "int4-bnb",
    ]  # fmt: skip
    assert not should_compile(None, "cpu", "bf16") and should_compile(True, "cpu", "int8")  # explicit wins

    class Linear8bitLt:  # LLM.int8's outlier test runs on the host: no graphs, said why
        state = type("State", (), {"threshold": 6.0})()

    model = type("Model", (), {"modules": lambda self: [Linear8bitLt()]})()
    assert "outliers.any()" in graph_blocker(model)


def test_a_lowered_warmup_resizes_the_batch_engine_to_the_caps_requests_are_held_to(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One owner of the context caps: when the warm-up lowers them, the engine's KV slots follow (memory back)."""
    from qwen3vl_webui.service import warmup
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(2, 4), decoder="batch", limits=Limits(4096, 512)
    )
    manager.load()
    service = ChatService(manager, manager.scheduler, GenerationStats(), GpuProbe())
    before = manager.decoder.info  # the engine process's report of what it allocated
    assert before.max_len == 4096 and service.limits == Limits(4096, 512)  # sized for the configured caps first

    def lowered(*args, **kwargs):  # what warmup.run returns when 4,096 and 2,048 tokens ran out of memory
        return warmup.WarmupResult("full", 1024, 512, (4096, 2048, 1024), 0.1, None, False, "lowered to 1,024")

    monkeypatch.setattr(warmup, "run", lowered)
    service.warm_up("full", 64 * 64)
    assert service.limits == Limits(1024, 512) and service.configured_limits == Limits(4096, 512)
    after = manager.decoder.info
    assert after.pid != before.pid and after.max_len == 1024  # a new engine process, its KV slots at the lowered cap
    assert manager.status.startswith("Ready:")
    try:
        answer = list(service.chat(ChatRequest(UserMessage("Hello"), sampling=GREEDY, max_context=4096)))
        time.sleep(0.6)  # the engine reports its load twice a second
        assert answer and "1,024 tokens a slot" in manager.decoder.describe()  # held to 1,024, by the new engine
    finally:
        manager.close()


@pytest.mark.parametrize("decoder", ["batch", "generate"])
def test_the_full_warmup_runs_as_many_worst_case_chats_as_reach_the_decoders_peak(
    tiny_checkpoint: Path, decoder: str
) -> None:
    """The batch engine reserves every chat's KV cache at start and prefills a long prompt alone in its forward: two
    worst-case chats at once reach its peak, so the warm-up of 4 runs 2 and says so. generate's cache grows per chat:
    all 4 run."""
    from qwen3vl_webui.engine.batch.options import PEAK_CHATS
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(4, 4), decoder=decoder, limits=Limits(1024, 256)
    )
    manager.load()
    service = ChatService(manager, manager.scheduler, GenerationStats(), GpuProbe())
    chats: list[int] = []
    real = manager.decoder.stream

    def counted(*args, **kwargs):
        chats.append(1)
        return real(*args, **kwargs)

    manager.decoder.stream = counted
    try:
        result = service.warm_up("full", 64 * 64)
    finally:
        manager.close()
    assert result is not None and not result.failed and result.max_context == 1024, result
    if decoder == "batch":
        assert PEAK_CHATS == 2 and len(chats) == 2
        assert "1,024 tokens × 4 concurrent (2 of them run: every chat's KV cache is reserved at start" in result.note
    else:
        assert len(chats) == 4 and "1,024 tokens × 4 concurrent in" in result.note
