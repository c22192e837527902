"""The decode paths: the batch engine behind ModelManager gives generate's greedy answers, survives switches."""

from __future__ import annotations

import threading
from pathlib import Path

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.decoders import BatchDecoder, GenerateDecoder, make_decoder
from qwen3vl_webui.engine.generation import ChatRequest, SamplingParams, build_prompt
from qwen3vl_webui.engine.manager import ModelManager
from qwen3vl_webui.engine.scheduler import Scheduler

GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)


def _final(stream) -> tuple[str, object]:
    *_, (text, stats) = list(stream)
    return text, stats


def test_auto_picks_the_batch_engine_on_a_gpu_only() -> None:
    assert isinstance(make_decoder("auto", "cuda", 4, 4096), BatchDecoder)
    assert isinstance(make_decoder("auto", "cpu", 4, 4096), GenerateDecoder)
    assert isinstance(make_decoder("batch", "cpu", 4, 4096), BatchDecoder)


def test_batch_engine_answers_like_generate_and_follows_a_precision_switch(tiny_checkpoint: Path) -> None:
    manager = ModelManager(str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(2, 4), decoder="batch", max_context=1024)
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


def test_the_app_serves_chats_through_the_batch_engine(tiny_checkpoint: Path) -> None:
    from gradio_client import Client

    from qwen3vl_webui.conversation import ERROR_PREFIX
    from tests.conftest import start_app

    app, url = start_app(tiny_checkpoint.parent, "--engine", "batch", "--max-concurrency", "2", "--max-context", "2048")
    try:
        assert isinstance(app.service.manager.decoder, BatchDecoder)
        answer = Client(url, verbose=False).predict({"text": "Hello", "files": []}, max_new_tokens=16, api_name="/chat")
        assert answer and not answer.startswith(ERROR_PREFIX)
        engine = app.service.manager.decoder.engine
        assert engine.snapshot().steps > 0 and app.service.stats.last.new_tokens >= 1
        assert "batch engine" in app.service.snapshot().decoder
    finally:
        app.demo.close()
