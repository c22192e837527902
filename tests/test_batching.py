"""BatchEngine on the tiny real Qwen3-VL (CPU, eager): greedy tokens equal `generate`, joins, cancel, sampling."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_webui.conversation import Turn, UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions, EngineClosed, EngineOutputs
from qwen3vl_webui.engine.request import PreparedPrompt, RequestError, SamplingParams
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from qwen3vl_webui.weights.loading import load_model
from qwen3vl_webui.weights.model import LoadedModel
from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

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
    with BatchEngine(loaded, BatchOptions(max_batch=4, token_budget=4 * 1024)) as engine:
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
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 1024, eos_token_ids=())) as engine:
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


def test_a_joining_request_does_not_leave_the_gpu_waiting_for_the_host(loaded, prompts) -> None:
    """The decode step after a join is enqueued before the previous step's tokens go out (the joined row in it), as
    when nobody joins: the message of that step already counts one launch more than the steps read back."""
    long = SamplingParams(max_new_tokens=96, temperature=0.0, repetition_penalty=1.0)
    messages: list[EngineOutputs] = []
    options = BatchOptions(max_batch=2, token_budget=2 * 1024, eos_token_ids=(), prefix_slots=0)
    with BatchEngine(loaded, options) as engine:
        engine.add_listener(messages.append)
        a = engine.submit_tokens(prompts["long"], long, threading.Event())
        head = [next(a) for _ in range(4)]
        b = engine.submit_tokens(prompts["text"], GREEDY, threading.Event())
        got_b = list(b)
        got_a = head + list(a)
    assert got_a == reference(loaded, prompts["long"], long, eos_token_id=None)
    assert got_b == reference(loaded, prompts["text"], GREEDY, eos_token_id=None)
    first_id = messages[0].outputs[0].request_id
    at = next(i for i, m in enumerate(messages) if any(o.request_id != first_id for o in m.outputs))
    join, after = messages[at], messages[at + 1]
    # The joined prompt's first token goes out after the next step is enqueued, the joined row in it: the message
    # after the join's already holds the joined request's second token (until session 12 that step was launched
    # before the join and held the first request alone).
    assert join.decode_launches == join.steps + 1
    assert {o.request_id for o in after.outputs} == {o.request_id for o in join.outputs} and len(after.outputs) == 2


def test_a_leaving_request_does_not_leave_the_gpu_waiting_for_the_host(loaded, prompts) -> None:
    """The step after a request ends is enqueued before that end goes out, the ended row riding along (its token
    dropped); the slots are compacted under it: the last running request moves into the hole while that step
    writes its next KV row in the old slot, and every stream still answers like `generate`."""
    lengths = {"long": 64, "video": 40, "text": 12}  # ends in the order text, video, long
    messages: list[EngineOutputs] = []
    options = BatchOptions(max_batch=3, token_budget=3 * 1024, eos_token_ids=(), prefix_slots=2)
    with BatchEngine(loaded, options) as engine:
        engine.add_listener(messages.append)
        with (
            engine.hold_admission()
        ):  # admitted together: "text" takes slot 0, so the others move down as it and "video" leave
            streams = {
                n: engine.submit_tokens(prompts[n], dataclasses.replace(GREEDY, max_new_tokens=k), threading.Event())
                for n, k in (("text", 12), ("video", 40), ("long", 64))
            }
        got = {n: list(s) for n, s in streams.items()}
    for n, k in lengths.items():
        assert got[n] == reference(
            loaded, prompts[n], dataclasses.replace(GREEDY, max_new_tokens=k), eos_token_id=None
        ), n
    ends = [m for m in messages if any(o.finished for o in m.outputs)]
    assert len(ends) == 3
    assert all(m.decode_launches == m.steps + 1 for m in ends[:2]), [(m.steps, m.decode_launches) for m in ends]


def test_cancel_and_close_free_the_slot(loaded, prompts) -> None:
    long = SamplingParams(max_new_tokens=400, temperature=0.0, repetition_penalty=1.0)
    with BatchEngine(loaded, BatchOptions(max_batch=1, token_budget=1024, eos_token_ids=())) as engine:
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
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 1024)) as engine:
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
    with BatchEngine(loaded, BatchOptions(max_batch=4, token_budget=4 * 512, eos_token_ids=())) as engine:
        runs = [
            engine.submit_tokens(prompts["long"], p, threading.Event()) for p in (penalised, sampled, sampled, top1)
        ]
        got = [list(r) for r in runs]
    assert got[0] == reference(loaded, prompts["long"], penalised, eos_token_id=None)
    assert got[1] == got[2]  # same seed, batched side by side: same tokens
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)
    assert got[3] == reference(loaded, prompts["long"], greedy, eos_token_id=None)  # top_k=1 is greedy


def test_request_over_the_slot_length_is_refused(loaded, prompts) -> None:
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 128)) as engine:
        with pytest.raises(RequestError, match="slots holds 128"):
            engine.submit(prompts["video"], GREEDY, threading.Event())
    with pytest.raises(ValueError, match="token_budget"):
        BatchOptions(max_batch=4, token_budget=100)


def test_a_failing_prompt_fails_alone(loaded, prompts) -> None:
    good = prompts["image"]
    inputs = dict(good.inputs, pixel_values=good.inputs["pixel_values"][:4])  # fewer patches than image tokens
    bad = PreparedPrompt(inputs, good.tokens, good.text_tokens, good.image_tokens, 0, 0)
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 512)) as engine:
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
    with BatchEngine(
        loaded, BatchOptions(max_batch=4, token_budget=4 * 512, prefill_chunk=64, prefix_slots=0)
    ) as engine:
        running = engine.submit_tokens(prompts["long"], long, threading.Event())
        head = [next(running) for _ in range(3)]
        joining = engine.submit_tokens(chunked, long, threading.Event())  # prefilled between decode steps
        got_long = list(joining)
        got_running = head + list(running)
        forwards = forwards_before_short = engine.snapshot().prefill_forwards
        # Three short prompts (22 + 21 + 22 tokens) queued at once while nothing decodes: nobody to stall, so
        # they share one forward (budget IDLE_PREFILL_FACTOR x 64 tokens).
        with engine.hold_admission():  # the worker admits them together
            streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in short]
        got_short = [list(s) for s in streams]
        idle_batched = engine.snapshot().prefill_forwards - forwards
        # The same three while a stream decodes: the first two fit one padded 64-token batch, the third waits.
        background = engine.submit_tokens(prompts["long"], long, threading.Event())
        [next(background) for _ in range(3)]  # mid-answer (a stream at its first token would still be "idle")
        forwards = engine.snapshot().prefill_forwards
        with engine.hold_admission():
            streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in short]
        got_short_busy = [list(s) for s in streams]
        busy_batched = engine.snapshot().prefill_forwards - forwards
        background.close()
    assert got_long == expected_long
    assert got_running == reference(loaded, prompts["long"], long, eos_token_id=None)
    assert got_short == expected_short and got_short_busy == expected_short
    assert forwards_before_short == 1 + 2  # the running prompt, then the long one in two chunks
    assert idle_batched == 1
    assert busy_batched == 2


def _submit_together(engine: BatchEngine, burst: list[PreparedPrompt]) -> tuple[list[list[int]], list[int]]:
    """Submits `burst` so the worker admits it at once; returns each answer's tokens and, per decode step enqueued,
    how many prefill forwards had run by then."""
    forwards_at_launch: list[int] = []

    def listen(outputs: EngineOutputs) -> None:  # each message: the counters as its step's decode steps were enqueued
        launched = outputs.decode_launches - len(forwards_at_launch)
        forwards_at_launch.extend([outputs.prefill_forwards] * launched)

    engine.add_listener(listen)
    with engine.hold_admission():  # the worker waits until all are queued
        streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in burst]
    return [list(s) for s in streams], forwards_at_launch


@pytest.mark.parametrize("pairs", [6, 15], ids=["two-forwards", "three-forwards"])
def test_a_burst_of_short_prompts_is_prefilled_before_the_first_decode_step(loaded, prompts, pairs) -> None:
    """Short prompts at once (~22 tokens each) overflowing one idle forward (4 x 64 tokens): up to BURST_FORWARDS
    forwards come before the first decode step, as nobody is mid-answer yet, and no more; answers equal `generate`'s."""
    burst = [prompts["text"], prompts["long"]] * pairs
    expected = [reference(loaded, p, GREEDY) for p in burst[:2]] * pairs
    slots = len(burst)
    with BatchEngine(
        loaded, BatchOptions(max_batch=slots, token_budget=slots * 256, prefill_chunk=64, prefix_slots=0)
    ) as engine:
        got, forwards_at_launch = _submit_together(engine, burst)
    assert got == expected
    total = sum(p.inputs["input_ids"].shape[1] for p in burst)
    assert total > 4 * 64  # more than one idle forward's budget
    assert BatchOptions().burst_forwards == 2
    assert forwards_at_launch[0] == 2  # the first decode step came after two forwards, not one
    if pairs == 6:
        assert engine.snapshot().prefill_forwards == 2
    else:  # prompts were left after two forwards: they waited for the decode steps, in chunk-sized groups
        assert engine.snapshot().prefill_forwards > 3


def test_forwards_before_the_first_stream_do_not_count_against_a_burst(loaded, prompts) -> None:
    """A long prompt prefilled in chunks while idle, with short prompts queued behind it: once it joins (alone, at
    its first token), the burst still gets its one more forward before the first decode step."""
    long = build_prompt(loaded, ChatRequest(UserMessage("Count the objects " * 40), sampling=GREEDY))
    chunks = -(-long.inputs["input_ids"].shape[1] // 64)
    assert chunks >= 3
    burst = [long, *[prompts["text"]] * 6]
    with BatchEngine(
        loaded, BatchOptions(max_batch=8, token_budget=8 * 512, prefill_chunk=64, prefix_slots=0)
    ) as engine:
        got, forwards_at_launch = _submit_together(engine, burst)
    assert got[0] == reference(loaded, long, GREEDY) and got[1] == reference(loaded, prompts["text"], GREEDY)
    assert forwards_at_launch[0] == chunks + 1  # the long prompt's chunks, then one forward of the burst


def test_media_prompts_prefill_vision_then_text_chunks(loaded, prompts) -> None:
    names = ["image", "video", "mixed"]
    lengths = {n: prompts[n].inputs["input_ids"].shape[1] for n in names}
    assert lengths["video"] > 128 and lengths["mixed"] > 128, lengths  # 64-token chunks cut through the visual tokens
    expected = {n: reference(loaded, prompts[n], GREEDY) for n in names}
    with BatchEngine(
        loaded, BatchOptions(max_batch=4, token_budget=4 * 1024, prefill_chunk=64, prefix_slots=0)
    ) as engine:
        running = engine.submit_tokens(prompts["long"], GREEDY, threading.Event())
        first = next(running)
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        got = {n: list(s) for n, s in streams.items()}
        rest = list(running)
        forwards = engine.snapshot().prefill_forwards
    assert got == expected
    assert [first, *rest] == reference(loaded, prompts["long"], GREEDY)
    # Per media prompt: the vision tower, then ceil(length / 64) text chunks; plus the running text prompt.
    assert forwards == 1 + sum(1 + -(-lengths[n] // 64) for n in names)


@pytest.mark.skipif(not os.environ.get("QWEN3VL_SLOW_TESTS"), reason="compiles with inductor on CPU (~1 min)")
def test_compiled_decode_equals_eager(loaded, prompts, tmp_path) -> None:
    names = ["text", "long"]
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=())) as engine:
        eager = [list(engine.submit_tokens(prompts[n], GREEDY, threading.Event())) for n in names]
    with BatchEngine(
        loaded,
        BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), compile=True, compile_cache_dir=tmp_path),
    ) as engine:
        assert engine.snapshot().decode_path == "torch.compile (no graphs)", engine.compile_error
        streams = [engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names]
        assert [list(s) for s in streams] == eager


def test_compiled_prefill_equals_generate(loaded, prompts, tmp_path) -> None:
    """Prompt chunks through torch.compile (inductor on CPU; two graphs, warmed at start-up): first chunks and later
    ones, text and media, of many lengths, give `generate`'s tokens, and no request compiles anything. With the
    decode Linears fused as on CUDA (a branch on the row count would have split the graphs)."""
    from torch._dynamo.utils import counters

    from qwen3vl_webui.engine.batch import prefill

    names = ["image", "mixed", "long", "text"]
    expected = {n: reference(loaded, prompts[n], GREEDY) for n in names}
    options = BatchOptions(
        max_batch=2, token_budget=2 * 1024, prefill_chunk=64, prefix_slots=0, compile_prefill=True,
        compile_cache_dir=tmp_path, fuse=True,
    )  # fmt: skip
    with BatchEngine(loaded, options) as engine:
        assert engine.snapshot().prefill_path == "torch.compile", engine.prefill_error
        graphs = counters["stats"]["unique_graphs"]
        compiled_chunks = []
        runner = engine.core.runner  # prompt chunks run through runner.chunk_forward
        real = runner.chunk_forward

        def counting(lm: Any, embeds: Any, positions: Any, past: Any, deepstack: Any) -> Any:
            compiled_chunks.append((past.shape[0], embeds.shape[1]))
            return real(lm, embeds, positions, past, deepstack)

        runner.chunk_forward = counting
        got = {n: list(engine.submit_tokens(prompts[n], GREEDY, threading.Event())) for n in names}
        assert counters["stats"]["unique_graphs"] == graphs  # every chunk found a warmed graph
    assert got == expected
    assert len({n for _, n in compiled_chunks}) >= 4  # lengths: the chunk size and each prompt's remainder
    assert any(p == 0 for p, _ in compiled_chunks) and any(p > 0 for p, _ in compiled_chunks)
    assert all(prefill.compiles(p, n) for p, n in compiled_chunks)  # the rest ran eagerly, never compiling anew


# ---------------------------------------------------------------- prefix reuse


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(prompt: PreparedPrompt) -> list[int]:
    return prompt.inputs["input_ids"][0].tolist()


@pytest.fixture
def vision_calls(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of pixels the vision tower saw, one item per call (images and videos both go through it)."""
    model = loaded.model.model
    real = model.get_image_features
    calls: list[int] = []

    @functools.wraps(real)  # generate picks the arguments it passes by the signature
    def counting(pixel_values: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(pixel_values.shape[0]))
        return real(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", counting)
    return calls


def _image(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (160, 224, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_a_follow_up_turn_reuses_the_first_turns_kv_and_answers_like_generate(
    loaded, kind, vision_calls, tmp_path
) -> None:
    files = {"text": (), "image": (_image(tmp_path / "a.png", 5),), "video": (str(ASSETS / "example.mp4"),)}[kind]
    first = UserMessage("Describe what you see in detail.", files)
    turn1 = build_prompt(loaded, ChatRequest(first, sampling=GREEDY))
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 1024)) as engine:
        tokens1 = list(engine.submit_tokens(turn1, GREEDY, threading.Event()))
        answer = loaded.processor.tokenizer.decode(tokens1, skip_special_tokens=True)
        assert engine.snapshot().prefix_entries == 1 and len(vision_calls) == (0 if kind == "text" else 1)
        history = [Turn(first, answer)]
        turn2 = build_prompt(loaded, ChatRequest(UserMessage("And what else?"), history, sampling=GREEDY))
        before = engine.snapshot()
        got = list(engine.submit_tokens(turn2, GREEDY, threading.Event()))
        after = engine.snapshot()
    # The entry holds turn 1's prompt and the answer tokens fed back (all but the last one emitted).
    kept = _ids(turn1) + tokens1[:-1]
    reused = _common(kept, _ids(turn2))
    assert reused >= len(_ids(turn1))  # the whole first prompt, and the answer as far as it re-tokenizes alike
    assert after.prefix_hits - before.prefix_hits == 1
    assert after.prefix_tokens_reused - before.prefix_tokens_reused == reused
    assert after.prefill_tokens - before.prefill_tokens == len(_ids(turn2)) - reused
    assert len(vision_calls) == (0 if kind == "text" else 1)  # turn 2 did not run the vision tower again
    assert got == reference(loaded, turn2, GREEDY)


def test_regenerate_reuses_all_but_the_last_prompt_token(loaded, prompts, vision_calls) -> None:
    prompt = prompts["image"]
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, seed=1, repetition_penalty=1.0)
    with BatchEngine(loaded, BatchOptions(max_batch=1, token_budget=1024)) as engine:
        list(engine.submit_tokens(prompt, sampled, threading.Event()))
        before = engine.snapshot()
        again = list(engine.submit_tokens(prompt, GREEDY, threading.Event()))  # the same history, a new answer
        after = engine.snapshot()
    assert after.prefix_tokens_reused - before.prefix_tokens_reused == len(_ids(prompt)) - 1
    assert after.prefill_tokens - before.prefill_tokens == 1 and len(vision_calls) == 1
    assert again == reference(loaded, prompt, GREEDY)


def test_a_different_image_in_the_same_place_is_not_reused(loaded, vision_calls, tmp_path) -> None:
    system = "You are a careful assistant who looks closely at every picture before answering."
    a, b = _image(tmp_path / "a.png", 1), _image(tmp_path / "b.png", 2)  # same size: the same tokens exactly
    prompt_a, prompt_b = (
        build_prompt(loaded, ChatRequest(UserMessage("What is this?", (f,)), system_prompt=system, sampling=GREEDY))
        for f in (a, b)
    )
    assert _ids(prompt_a) == _ids(prompt_b)
    image_start = _ids(prompt_a).index(loaded.model.config.image_token_id)
    assert image_start >= 16  # the system prompt alone is worth reusing
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 1024, prefix_slots=2)) as engine:
        list(engine.submit_tokens(prompt_a, GREEDY, threading.Event()))
        got_b = list(engine.submit_tokens(prompt_b, GREEDY, threading.Event()))
        after_b = engine.snapshot()
        got_a = list(engine.submit_tokens(prompt_a, GREEDY, threading.Event()))
        after_a = engine.snapshot()
    # b reuses the system prompt only, up to its image; its image goes through the vision tower. Both entries
    # are kept (neither holds the other), and a again finds its own image: no third vision forward.
    assert after_b.prefix_tokens_reused == image_start and len(vision_calls) == 2
    assert after_a.prefix_tokens_reused - after_b.prefix_tokens_reused == len(_ids(prompt_a)) - 1
    assert after_a.prefix_entries == 2
    assert got_b == reference(loaded, prompt_b, GREEDY)
    assert got_a == reference(loaded, prompt_a, GREEDY)


def test_a_second_image_after_a_reused_one_runs_the_vision_tower_on_it_alone(loaded, vision_calls, tmp_path) -> None:
    a, b = _image(tmp_path / "a.png", 1), str(ASSETS / "example.mp4")
    first = UserMessage("What is this?", (a,))
    turn1 = build_prompt(loaded, ChatRequest(first, sampling=GREEDY))
    with BatchEngine(loaded, BatchOptions(max_batch=1, token_budget=2048)) as engine:
        tokens1 = list(engine.submit_tokens(turn1, GREEDY, threading.Event()))
        history = [Turn(first, loaded.processor.tokenizer.decode(tokens1, skip_special_tokens=True))]
        turn2 = build_prompt(loaded, ChatRequest(UserMessage("And this?", (b,)), history, sampling=GREEDY))
        got = list(engine.submit_tokens(turn2, GREEDY, threading.Event()))
        snap = engine.snapshot()
    assert snap.prefix_hits == 1 and snap.prefix_tokens_reused >= len(_ids(turn1))
    video_patches = int(turn2.inputs["pixel_values_videos"].shape[0])
    assert vision_calls == [int(turn1.inputs["pixel_values"].shape[0]), video_patches]  # the video alone
    assert got == reference(loaded, turn2, GREEDY)


def test_the_least_recently_used_entry_is_evicted_when_the_pool_is_full(loaded) -> None:
    def prompt(text: str) -> PreparedPrompt:
        return build_prompt(loaded, ChatRequest(UserMessage(text), sampling=GREEDY))

    one, two, three = (prompt(f"{w} topic: tell me everything you know about it") for w in ("First", "Second", "Third"))
    short = SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=1.0)
    with BatchEngine(loaded, BatchOptions(max_batch=1, token_budget=1024, prefix_slots=2)) as engine:

        def run(p: PreparedPrompt) -> int:
            hits = engine.snapshot().prefix_hits
            list(engine.submit_tokens(p, short, threading.Event()))
            return engine.snapshot().prefix_hits - hits

        assert (run(one), run(two)) == (0, 0)
        assert run(one) == 1  # one is now the most recently used
        assert run(three) == 0 and engine.snapshot().prefix_evicted == 1  # two made room, not one (older)
        assert run(one) == 1
        kept = engine.prefix_entries
        assert (run(two), run(three)) == (0, 0)  # each pushed out the least recently used: three, then one
        snap = engine.snapshot()
        # Each entry holds exactly its own tokens' KV; an evicted one holds none (its memory went back).
        text = loaded.model.config.text_config
        for entry in engine.prefix_entries:
            assert tuple(entry.kv.shape) == (text.num_hidden_layers, 2, text.num_key_value_heads, len(entry.ids), text.head_dim)  # fmt: skip
        assert all(e.kv is None for e in kept)
    assert snap.prefix_entries == 2 and snap.prefix_evicted == 3


def test_reuse_is_off_with_zero_prefix_slots(loaded, prompts) -> None:
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 512, prefix_slots=0)) as engine:
        assert engine.kv_slots == 2
        for _ in range(2):
            list(engine.submit_tokens(prompts["long"], GREEDY, threading.Event()))
        snap = engine.snapshot()
    assert snap.prefix_slots == 0 and snap.prefix_hits == 0 and snap.prefix_entries == 0
    assert snap.prefill_tokens == 2 * len(_ids(prompts["long"]))
    with BatchEngine(loaded, BatchOptions(max_batch=8, token_budget=8 * 128)) as engine:
        assert engine.prefix_slots == 2 and engine.kv_slots == 8  # default: a quarter of the running slots, kept
        # outside the running slots' KV (allocated per entry as requests finish)
    with pytest.raises(ValueError, match="prefix_slots"):
        BatchOptions(max_batch=1, token_budget=1024, prefix_slots=-1)


def test_out_of_memory_in_a_prefill_drops_the_retained_prefixes_and_retries(loaded) -> None:
    first = UserMessage("Count the objects " * 6)
    turn1 = build_prompt(loaded, ChatRequest(first, sampling=GREEDY))
    layer = loaded.model.model.language_model.layers[1]
    armed = []

    def fail_once(module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if armed and hidden.shape[1] > 1:  # a prefill forward, halfway through the layers
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with BatchEngine(loaded, BatchOptions(max_batch=1, token_budget=1024, prefill_chunk=64)) as engine:
        tokens1 = list(engine.submit_tokens(turn1, GREEDY, threading.Event()))
        history = [Turn(first, loaded.processor.tokenizer.decode(tokens1, skip_special_tokens=True))]
        turn2 = build_prompt(loaded, ChatRequest(UserMessage("go on " * 30), history, sampling=GREEDY))
        assert len(_ids(turn2)) - len(_ids(turn1)) > 64  # a suffix of two chunks, starting mid-prompt
        handle = layer.register_forward_pre_hook(fail_once, with_kwargs=True)
        try:
            stream = engine.submit_tokens(turn2, GREEDY, threading.Event())
            armed.append(True)
            got = list(stream)
        finally:
            handle.remove()
        snap = engine.snapshot()
    assert not armed and snap.prefix_dropped == 1 and snap.prefix_hits == 1
    assert got == reference(loaded, turn2, GREEDY)  # the half-written chunk was cut back before the retry


def test_the_chat_service_sends_history_that_the_engine_reuses(tiny_checkpoint, tmp_path) -> None:
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.service.limits import Limits
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

    manager = ModelManager(
        str(tiny_checkpoint), "fp32", "cpu", "sdpa", Scheduler(1, 4), decoder="batch-inproc", limits=Limits(2048, 1024)
    )
    manager.load()
    service = ChatService(manager, manager.scheduler, GenerationStats(), GpuProbe())
    engine = manager.decoder.engine
    first = UserMessage("Describe this picture.", (_image(tmp_path / "p.png", 4),))
    answer = list(service.chat(ChatRequest(first, sampling=GREEDY, max_context=2048)))[-1]
    request = ChatRequest(UserMessage("Thanks. What else?"), [Turn(first, answer)], sampling=GREEDY, max_context=2048)
    turn1 = build_prompt(manager.current(), ChatRequest(first, sampling=GREEDY, max_context=2048))
    list(service.chat(request))
    snap = engine.snapshot()
    assert snap.prefix_hits == 1 and snap.prefix_tokens_reused > len(_ids(turn1))
    from qwen3vl_webui.ui.panels import format_panel

    assert f"1 hits · {snap.prefix_tokens_reused:,} prompt tokens reused" in format_panel(service.snapshot())
    assert "kept for follow-up turns (1 entry)" in service.estimate(2048, 1_000_000, 8, 4_000_000)
    # A history too long for the context is trimmed by whole turns: the prompt's start changes, nothing reused
    # wrongly, and the answer is still generate's.
    trimmed = dataclasses.replace(request, max_context=turn1.tokens + GREEDY.max_new_tokens)
    prompt = build_prompt(manager.current(), trimmed)
    assert prompt.turns_dropped == 1
    hits = snap.prefix_hits
    assert list(engine.submit_tokens(prompt, GREEDY, threading.Event())) == reference(manager.current(), prompt, GREEDY)
    assert engine.snapshot().prefix_hits == hits
    manager.decoder.detach()  # stops the engine's worker


# ---------------------------------------------------------------- stop strings


def _stop_case(tokenizer: Any, tokens: list[int], after: int = 6) -> tuple[str, int, str]:
    """A stop string taken from the answer's own text: (stop, index of the token completing it, text before)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for i in range(after, len(text) - 3):
        stop = text[i : i + 3]
        if stop.isascii() and stop.strip() == stop and text.find(stop) == i:
            break
    else:
        raise AssertionError(f"no usable stop string in {text!r}")
    end = next(j for j in range(len(tokens)) if stop in tokenizer.decode(tokens[: j + 1], skip_special_tokens=True))
    return stop, end, text[:i]


def test_a_stop_string_ends_the_request_and_is_never_streamed(loaded, prompts) -> None:
    plain = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    expected = reference(loaded, prompts["long"], plain, eos_token_id=None)
    stop, end, before = _stop_case(loaded.processor.tokenizer, expected)
    stopping = dataclasses.replace(plain, stop=("never appears", stop))
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=())) as engine:
        tokens = list(engine.submit_tokens(prompts["long"], stopping, threading.Event()))
        items = list(engine.submit(prompts["long"], stopping, threading.Event()))
    assert tokens == expected[: end + 1]  # ended at the token that completed the stop string
    *partial, (final, stats) = items
    assert final == before and stats.new_tokens == end + 1
    assert partial and all(final.startswith(t) and stop not in t for t, _ in partial)


def test_a_reuse_point_inside_a_video_moves_back_to_the_videos_first_frame(loaded, prompts) -> None:
    from qwen3vl_webui.engine.batch.prefix import PrefixPool, find_media

    prompt = prompts["mixed"]  # an image, then a video of several frames with timestamps between them
    config = loaded.model.config
    media = find_media(prompt.inputs, config.image_token_id, config.video_token_id, 2)
    image, video = media
    ids = prompt.inputs["input_ids"][0]
    assert (image.kind, video.kind) == ("image", "video") and image.end <= video.start
    assert video.end - video.start > prompt.video_tokens  # the frames' timestamps lie inside the video's span
    inside = next(i for i in range(video.start, video.end) if ids[i] != config.video_token_id)
    pool = PrefixPool([0, 1], min_tokens=1)
    pool.store(ids[: inside + 1], media[:1])  # a prefix that ends between two frames of the video
    assert pool.match(ids, media)[1] == video.start  # never inside a medium: the whole video is prefilled
    other = dataclasses.replace(image, hashing=_resolved("another picture"))
    assert pool.match(ids, (other, video))[1] == image.start  # same probe, another digest: not reused


def _resolved(value: str) -> Future:
    done: Future = Future()
    done.set_result(value)
    return done


def test_media_digests_are_awaited_only_where_the_probes_agree(loaded, prompts) -> None:
    """A prompt's full pixel hash (~15 ms for 720p) runs in the background: matching against an entry whose media
    differ never waits for it, and an equal picture is still confirmed by its full digest."""
    from qwen3vl_webui.engine.batch.prefix import PrefixPool, find_media

    prompt = prompts["image"]
    config = loaded.model.config
    (image,) = find_media(prompt.inputs, config.image_token_id, config.video_token_id, 2)
    assert image.digest == find_media(prompt.inputs, config.image_token_id, config.video_token_id, 2)[0].digest
    ids = prompt.inputs["input_ids"][0]
    pool = PrefixPool([0], min_tokens=1)
    pool.store(ids, (image,))
    never: Future = Future()  # a digest that never arrives: waiting on it would hang the test
    elsewhere = dataclasses.replace(image, probe="another probe", hashing=never)
    assert pool.match(ids, (elsewhere,))[1] == image.start
    assert pool.match(ids, (dataclasses.replace(image, hashing=_resolved(image.digest)),))[1] == len(ids) - 1


class _EagerReplay:
    """Stands in for a captured CUDA graph on CPU: replay() reruns the forward on the same static buffers."""

    def __init__(self, forward: Any, out: Any) -> None:
        self._forward, self._out = forward, out

    def replay(self) -> None:
        self._out.copy_(self._forward()[0])


def _EagerGraphs() -> type:
    """prefill.ChunkGraphs whose 'graphs' are _EagerReplay stand-ins (CPU)."""
    from qwen3vl_webui.engine.batch import prefill

    class EagerGraphs(prefill.ChunkGraphs):
        def capture(self) -> None:
            for n in self.lengths:
                self._graphs[n] = _EagerReplay(functools.partial(prefill.chunk_forward, *self._args(n)), self._hidden[:, :n])  # fmt: skip

    return EagerGraphs


def _install_graphs(engine: BatchEngine, lengths: tuple[int, ...]) -> None:
    """Stand-in first-chunk graphs on CPU, their static buffers filled with random values (padding must not matter)."""
    runner = engine.core.runner
    graphs = runner.new_chunk_graphs(lengths, _EagerGraphs())
    with torch.inference_mode():
        graphs.capture()
        for buffer in (graphs._embeds, graphs._deepstack, graphs._kv, graphs._hidden):
            buffer.normal_()
    runner.chunk_graphs = graphs


def _kinds(engine: BatchEngine) -> dict[str, int]:
    return dict(engine.snapshot().prefill_kinds)


@pytest.mark.parametrize("prefer", [True, False], ids=["graph-replays", "eager-batch"])
def test_short_prompts_arriving_mid_answer_replay_graphs_instead_of_one_eager_batch(loaded, prompts, prefer) -> None:
    """While a stream is mid-answer, short prompts admitted together run one graph replay each (no eager forward
    through transformers for the stream to wait on), still as one scheduled forward; answers equal `generate`'s.
    With prefer_prefill_graphs off they share one eager batched forward, as before."""
    long = SamplingParams(max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
    short = [prompts["text"], prompts["long"], prompts["text"]]
    expected = [reference(loaded, p, GREEDY) for p in short]
    options = BatchOptions(
        max_batch=4, token_budget=4 * 512, prefill_chunk=64, prefix_slots=0, prefer_prefill_graphs=prefer
    )
    with BatchEngine(loaded, options) as engine:
        _install_graphs(engine, (32, 64))
        background = engine.submit_tokens(prompts["long"], long, threading.Event())
        [next(background) for _ in range(3)]  # mid-answer
        kinds, forwards = _kinds(engine), engine.snapshot().prefill_forwards
        with engine.hold_admission():
            streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in short]
        got = [list(s) for s in streams]
        after, forwards = _kinds(engine), engine.snapshot().prefill_forwards - forwards
        background.close()
    assert got == expected
    added = {k: after.get(k, 0) - kinds.get(k, 0) for k in after}
    assert forwards == 2  # the first two fit one padded 64-token forward, the third waits (as without graphs)
    if prefer:
        assert added.get("graphed") == 3 and not added.get("batched")
    else:
        assert added.get("batched") == 1 and added.get("graphed") == 1


@pytest.mark.parametrize("prefer", [True, False], ids=["graph-replay", "reuse"])
def test_a_prefix_under_half_a_graphed_prompt_is_not_reused(loaded, prefer) -> None:
    """A retained prefix covering under half of a prompt that one graph replay takes is not reused (the rest would be
    an eager later chunk); with prefer_prefill_graphs off it is. Answers equal `generate`'s either way."""
    words = "alpha beta gamma"
    first = build_prompt(loaded, ChatRequest(UserMessage(words), sampling=GREEDY))
    second = build_prompt(loaded, ChatRequest(UserMessage(words + " upsilon phi chi psi omega" * 2), sampling=GREEDY))
    shared = _common(_ids(first), _ids(second))
    assert 16 <= shared < len(_ids(second)) // 2 and len(_ids(second)) <= 128
    options = BatchOptions(max_batch=2, token_budget=2 * 512, prefill_chunk=128, prefer_prefill_graphs=prefer)
    with BatchEngine(loaded, options) as engine:
        _install_graphs(engine, (64, 128))
        list(engine.submit_tokens(first, GREEDY, threading.Event()))
        before, kinds = engine.snapshot(), _kinds(engine)
        got = list(engine.submit_tokens(second, GREEDY, threading.Event()))
        after = engine.snapshot()
    assert got == reference(loaded, second, GREEDY)
    added = {k: v - kinds.get(k, 0) for k, v in dict(after.prefill_kinds).items()}
    if prefer:
        assert after.prefix_hits == before.prefix_hits and added == {"graphed": 1}
    else:
        assert after.prefix_hits == before.prefix_hits + 1 and added.get("eager") == 1


def test_first_chunks_padded_to_a_graph_length_answer_like_generate(loaded, prompts) -> None:
    """engine/batch/prefill.ChunkGraphs' padding, on CPU: each first chunk runs at the next graph length on static buffers
    that hold a previous prompt's rows (here: random values) after it; later chunks run eagerly after it."""
    names = ["image", "mixed", "long", "text"]
    expected = {n: reference(loaded, prompts[n], GREEDY) for n in names}
    with BatchEngine(
        loaded, BatchOptions(max_batch=2, token_budget=2 * 1024, prefill_chunk=128, prefix_slots=0)
    ) as engine:
        text = loaded.model.config.text_config
        runner = engine.core.runner  # first chunks replay runner.chunk_graphs where it fits
        graphs = runner.new_chunk_graphs((64, 128), _EagerGraphs())
        with torch.inference_mode():
            graphs.capture()
            for buffer in (graphs._embeds, graphs._deepstack, graphs._kv, graphs._hidden):
                buffer.normal_()  # padding rows must not matter
            graphs._positions.random_(0, text.max_position_embeddings)
        replays = []
        real_run = graphs.run

        def counting(embeds: Any, positions: Any, deepstack: Any) -> Any:
            replays.append(embeds.shape[1])
            return real_run(embeds, positions, deepstack)

        graphs.run = counting
        runner.chunk_graphs = graphs
        got = {n: list(engine.submit_tokens(prompts[n], GREEDY, threading.Event())) for n in names}
    assert got == expected
    lengths = {n: prompts[n].inputs["input_ids"].shape[1] for n in names}
    assert sorted(replays) == sorted(min(length, 128) for length in lengths.values())
    assert any(n not in graphs.lengths for n in replays)  # padded
    assert any(length > 128 for length in lengths.values())  # and prompts with later, eager chunks
