"""BatchEngine on the tiny real Qwen3-VL (CPU, eager): greedy tokens equal `generate`, joins, cancel, sampling."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batching import BatchEngine, EngineClosed
from qwen3vl_webui.engine.generation import ChatRequest, PreparedPrompt, RequestError, SamplingParams, build_prompt
from qwen3vl_webui.engine.loading import LoadedModel, load_model
from qwen3vl_webui.testing.tiny_model import ensure_demo_checkpoint

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GREEDY = SamplingParams(max_new_tokens=48, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(ensure_demo_checkpoint(tmp_path_factory.mktemp("engine"))), "fp32", "cpu")


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedPrompt]:
    image = tmp_path_factory.mktemp("media") / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (160, 224, 3), dtype=np.uint8)).save(image)
    messages = {
        "text": UserMessage("hello there"),  # greedy output reaches eos after 40 tokens
        "image": UserMessage("Describe the image.", (str(image),)),
        "video": UserMessage("What is in this video?", (str(ASSETS / "example.mp4"),)),
        "mixed": UserMessage("compare", (str(image), str(ASSETS / "example.mp4"))),
        "long": UserMessage("Count the objects"),
    }
    return {k: build_prompt(loaded, ChatRequest(m, sampling=GREEDY)) for k, m in messages.items()}


def reference(loaded: LoadedModel, prompt: PreparedPrompt, sampling: SamplingParams, **kwargs: Any) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(
            **prompt.inputs,
            do_sample=False,
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            **kwargs,
        )
    return out[0, prompt.inputs["input_ids"].shape[1] :].tolist()


def test_greedy_tokens_equal_generate_for_text_image_video_batched_together(loaded, prompts) -> None:
    names = ["text", "image", "video", "mixed"]
    expected = {n: reference(loaded, prompts[n], GREEDY) for n in names}
    assert len(expected["text"]) < GREEDY.max_new_tokens and expected["text"][-1] in (469, 470)  # stopped at eos
    with BatchEngine(loaded, max_batch=4, token_budget=4 * 1024) as engine:
        # All four are queued before any is read: the worker runs them as one batch.
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        got = {n: list(s) for n, s in streams.items()}
        assert engine.snapshot().peak_active == 4
        for n in names:
            assert got[n] == expected[n], n
        alone = list(engine.submit_tokens(prompts["image"], GREEDY, threading.Event()))
        assert alone == expected["image"]
        assert engine.snapshot().active == 0


def test_request_joining_mid_batch_leaves_both_streams_equal_to_generate(loaded, prompts) -> None:
    long = SamplingParams(max_new_tokens=160, temperature=0.0, repetition_penalty=1.0)
    expected_a = reference(loaded, prompts["long"], long, eos_token_id=None)
    expected_b = reference(loaded, prompts["video"], GREEDY, eos_token_id=None)
    with BatchEngine(loaded, max_batch=2, token_budget=2 * 1024, eos_token_ids=()) as engine:
        a = engine.submit_tokens(prompts["long"], long, threading.Event())
        head = [next(a) for _ in range(4)]
        b = engine.submit_tokens(prompts["video"], GREEDY, threading.Event())
        got_b = list(b)
        got_a = head + list(a)
        snap = engine.snapshot()
    # Each decodes len - 1 steps (the first token comes from prefill); fewer steps in all means shared steps.
    assert snap.peak_active == 2 and snap.steps < (len(got_a) - 1) + (len(got_b) - 1)
    assert got_a == expected_a
    assert got_b == expected_b


def test_cancel_and_close_free_the_slot(loaded, prompts) -> None:
    long = SamplingParams(max_new_tokens=400, temperature=0.0, repetition_penalty=1.0)
    with BatchEngine(loaded, max_batch=1, token_budget=1024, eos_token_ids=()) as engine:
        cancel = threading.Event()
        running = engine.submit(prompts["long"], long, cancel)
        waiting_cancel = threading.Event()
        waiting = engine.submit(prompts["text"], GREEDY, waiting_cancel)  # no free slot: waits
        next(running)
        waiting_cancel.set()
        *_, (_text, stats) = waiting  # a cancelled waiting request ends at once with empty stats
        assert stats is not None and stats.new_tokens == 0
        cancel.set()
        *_, (_text, stats) = running  # setting cancel ends the stream with final stats
        assert stats is not None and 0 < stats.new_tokens < long.max_new_tokens
        # Closing the iterator frees the slot too; on_cancel reports what was generated.
        reported = []
        closed = engine.submit(prompts["long"], long, threading.Event(), on_cancel=reported.append)
        next(closed)
        closed.close()
        again = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        assert again == reference(loaded, prompts["text"], GREEDY, eos_token_id=None)
        assert reported and reported[0].new_tokens >= 1
        assert engine.snapshot().active == 0
        stuck = engine.submit_tokens(prompts["long"], long, threading.Event())
        next(stuck)
    with pytest.raises(EngineClosed):
        list(stuck)


def test_text_stream_matches_the_stream_generate_contract(loaded, prompts) -> None:
    expected = reference(loaded, prompts["image"], GREEDY)
    with BatchEngine(loaded, max_batch=2, token_budget=2 * 1024) as engine:
        items = list(engine.submit(prompts["image"], GREEDY, threading.Event()))
    *growing, (final, stats) = items
    assert all(s is None for _, s in growing) and growing
    assert final == loaded.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert all(final.startswith(t) for t, _ in growing)
    assert stats.new_tokens == len(expected) and stats.prompt_image_tokens == prompts["image"].image_tokens
    assert stats.ttft_s > 0 and stats.decode_s > 0


def test_repetition_penalty_and_seeded_sampling(loaded, prompts) -> None:
    penalised = SamplingParams(max_new_tokens=32, temperature=0.0, repetition_penalty=1.3)
    sampled = SamplingParams(max_new_tokens=32, temperature=0.9, top_p=0.8, top_k=20, seed=7, repetition_penalty=1.0)
    top1 = SamplingParams(max_new_tokens=32, temperature=0.7, top_k=1, seed=1, repetition_penalty=1.0)
    with BatchEngine(loaded, max_batch=4, token_budget=4 * 512, eos_token_ids=()) as engine:
        runs = [
            engine.submit_tokens(prompts["long"], p, threading.Event()) for p in (penalised, sampled, sampled, top1)
        ]
        got = [list(r) for r in runs]
    assert got[0] == reference(loaded, prompts["long"], penalised, eos_token_id=None)
    assert got[1] == got[2]  # same seed, batched side by side: same tokens
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)
    assert got[3] == reference(loaded, prompts["long"], greedy, eos_token_id=None)  # top_k=1 is greedy


def test_request_over_the_slot_length_is_refused(loaded, prompts) -> None:
    with BatchEngine(loaded, max_batch=2, token_budget=2 * 128) as engine:
        with pytest.raises(RequestError, match="slots holds 128"):
            engine.submit(prompts["video"], GREEDY, threading.Event())
    with pytest.raises(ValueError, match="token_budget"):
        BatchEngine(loaded, max_batch=4, token_budget=100)


def test_a_failing_prompt_fails_alone(loaded, prompts) -> None:
    good = prompts["image"]
    inputs = dict(good.inputs, pixel_values=good.inputs["pixel_values"][:4])  # fewer patches than image tokens
    bad = PreparedPrompt(inputs, good.tokens, good.text_tokens, good.image_tokens, 0, 0)
    with BatchEngine(loaded, max_batch=2, token_budget=2 * 512) as engine:
        running = engine.submit_tokens(prompts["long"], GREEDY, threading.Event())
        first = next(running)
        with pytest.raises(RuntimeError, match="size of tensor"):
            list(engine.submit_tokens(bad, GREEDY, threading.Event()))
        rest = list(running)
    assert [first, *rest] == reference(loaded, prompts["long"], GREEDY)


def test_long_prompt_prefills_in_chunks_and_short_ones_together(loaded, prompts) -> None:
    long = SamplingParams(max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
    chunked = build_prompt(loaded, ChatRequest(UserMessage("Count the objects " * 12), sampling=long))
    assert chunked.inputs["input_ids"].shape[1] > 64  # two chunks of 64 tokens
    short = [prompts["text"], prompts["long"], prompts["text"]]
    expected_long = reference(loaded, chunked, long, eos_token_id=None)
    expected_short = [reference(loaded, p, GREEDY) for p in short]
    with BatchEngine(loaded, max_batch=4, token_budget=4 * 512, prefill_chunk=64) as engine:
        running = engine.submit_tokens(prompts["long"], long, threading.Event())
        head = [next(running) for _ in range(3)]
        joining = engine.submit_tokens(chunked, long, threading.Event())  # prefilled between decode steps
        got_long = list(joining)
        got_running = head + list(running)
        forwards = engine._prefill_forwards
        # Three short prompts (22 + 21 + 22 tokens) queued at once: the first two fit one padded 64-token batch.
        with engine._cond:  # the worker admits them together (the condition's lock is re-entrant)
            streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in short]
        got_short = [list(s) for s in streams]
        batched = engine._prefill_forwards - forwards
    assert got_long == expected_long
    assert got_running == reference(loaded, prompts["long"], long, eos_token_id=None)
    assert got_short == expected_short
    assert forwards == 1 + 2  # the running prompt, then the long one in two chunks
    assert batched == 2


def test_media_prompts_prefill_vision_then_text_chunks(loaded, prompts) -> None:
    names = ["image", "video", "mixed"]
    lengths = {n: prompts[n].inputs["input_ids"].shape[1] for n in names}
    assert lengths["video"] > 128 and lengths["mixed"] > 128, lengths  # 64-token chunks cut through the visual tokens
    expected = {n: reference(loaded, prompts[n], GREEDY) for n in names}
    with BatchEngine(loaded, max_batch=4, token_budget=4 * 1024, prefill_chunk=64) as engine:
        running = engine.submit_tokens(prompts["long"], GREEDY, threading.Event())
        first = next(running)
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        got = {n: list(s) for n, s in streams.items()}
        rest = list(running)
        forwards = engine._prefill_forwards
    assert got == expected
    assert [first, *rest] == reference(loaded, prompts["long"], GREEDY)
    # Per media prompt: the vision tower, then ceil(length / 64) text chunks; plus the running text prompt.
    assert forwards == 1 + sum(1 + -(-lengths[n] // 64) for n in names)


@pytest.mark.skipif(not os.environ.get("QWEN3VL_SLOW_TESTS"), reason="compiles with inductor on CPU (~1 min)")
def test_compiled_decode_equals_eager(loaded, prompts, tmp_path) -> None:
    names = ["text", "long"]
    with BatchEngine(loaded, max_batch=2, token_budget=2 * 512, eos_token_ids=()) as engine:
        eager = [list(engine.submit_tokens(prompts[n], GREEDY, threading.Event())) for n in names]
    with BatchEngine(
        loaded, max_batch=2, token_budget=2 * 512, eos_token_ids=(), compile=True, compile_cache_dir=tmp_path
    ) as engine:
        assert engine.snapshot().decode_path == "torch.compile (no graphs)", engine.compile_error
        streams = [engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names]
        assert [list(s) for s in streams] == eager
