"""Prompt building under the context cap, streaming, stop, and bad input — on the tiny real model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen3vl_webui.conversation import Turn, UserMessage
from qwen3vl_webui.engine.request import RequestError, SamplingParams
from qwen3vl_webui.media import MediaBudget
from qwen3vl_webui.service.admission import Scheduler
from qwen3vl_webui.service.chat import ChatService
from qwen3vl_webui.service.manager import ModelManager
from qwen3vl_webui.service.prompt import ChatRequest, MediaCache, RequestTimedOut, TurnCounts, build_prompt
from qwen3vl_webui.telemetry import GenerationStats, GpuProbe

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> ChatService:
    scheduler = Scheduler(max_concurrency=1, queue_size=4)
    manager = ModelManager(str(tiny_checkpoint), "fp32", "cpu", "sdpa", scheduler)
    manager.load()
    return ChatService(manager, scheduler, GenerationStats(), GpuProbe())


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(path)
    return str(path)


def _answer(service: ChatService, request: ChatRequest) -> list[str]:
    return list(service.chat(request))


def test_text_image_video_and_several_files_become_model_inputs(tiny_loaded, image: str) -> None:
    video = str(ASSETS / "example.mp4")
    text = build_prompt(tiny_loaded, ChatRequest(UserMessage("hello"), sampling=GREEDY))
    assert text.image_tokens == 0 and text.video_tokens == 0 and text.text_tokens == text.tokens > 0
    img = build_prompt(tiny_loaded, ChatRequest(UserMessage("what?", (image,)), sampling=GREEDY))
    # Qwen's resize rounds each side to a multiple of 32 (240 -> 256): 8 x 10 merged patches.
    assert img.image_tokens == 8 * 10 and "pixel_values" in img.inputs
    both = build_prompt(tiny_loaded, ChatRequest(UserMessage("compare", (image, video, image)), sampling=GREEDY))
    assert both.image_tokens == 2 * img.image_tokens and both.video_tokens > 0
    assert tuple(both.inputs["image_grid_thw"].shape) == (2, 3) and tuple(both.inputs["video_grid_thw"].shape) == (1, 3)
    assert both.inputs["mm_token_type_ids"].shape == both.inputs["input_ids"].shape


def test_image_pixel_budget_bounds_image_tokens(tiny_loaded, image: str) -> None:
    small = MediaBudget(max_image_pixels=128 * 96)
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("what?", (image,)), sampling=GREEDY, media=small))
    assert prompt.image_tokens * 32 * 32 <= 128 * 96


def test_history_is_trimmed_by_whole_turns_to_the_context_cap(tiny_loaded) -> None:
    history = [Turn(UserMessage(f"question {i} " + "word " * 60), "answer " * 60) for i in range(6)]
    full = build_prompt(tiny_loaded, ChatRequest(UserMessage("now?"), history, sampling=GREEDY, max_context=100_000))
    assert full.turns_dropped == 0
    capped = ChatRequest(UserMessage("now?"), history, sampling=GREEDY, max_context=full.tokens // 2)
    trimmed = build_prompt(tiny_loaded, capped)
    assert 0 < trimmed.turns_dropped < len(history)
    assert trimmed.tokens <= capped.max_context - GREEDY.max_new_tokens
    decoded = tiny_loaded.processor.tokenizer.decode(trimmed.inputs["input_ids"][0])
    assert "question 5" in decoded and "question 0" not in decoded  # oldest dropped first


def test_trimming_is_one_pass_with_each_turn_counted_once_and_the_most_that_fit_kept(tiny_loaded, image) -> None:
    history = [Turn(UserMessage(f"q{i} " + "word " * 20, (image,) if i % 3 == 0 else ()), "ok " * 20) for i in range(300)]
    calls: list[int] = []
    processor = tiny_loaded.processor
    real = processor.apply_chat_template

    def counting(messages, **kwargs):
        calls.append(len(messages))
        return real(messages, **kwargs)

    processor.apply_chat_template = counting
    try:
        counts, cache = TurnCounts(), MediaCache()
        request = ChatRequest(UserMessage("now?"), history, sampling=GREEDY, max_context=1024)
        first = build_prompt(tiny_loaded, request, cache, counts)
        kept = len(history) - first.turns_dropped
        # The current message, each kept turn and the one that did not fit counted once, one final encode:
        # not the 300 re-encodes of every remaining turn that dropping one turn at a time costs.
        assert 0 < kept < 40 and len(calls) == 1 + (kept + 1) + 1
        calls.clear()
        again = build_prompt(tiny_loaded, request, cache, counts)  # the next turn: counts are cached
        assert len(calls) == 2 and again.tokens == first.tokens
    finally:
        processor.apply_chat_template = real
    budget = request.max_context - GREEDY.max_new_tokens
    assert first.tokens <= budget
    # The count is exact (turns are additive in the template) and one more turn would not have fitted.
    one_more = ChatRequest(UserMessage("now?"), history[-kept - 1 :], sampling=GREEDY, max_context=100_000)
    assert build_prompt(tiny_loaded, one_more).tokens > budget
    exact = ChatRequest(UserMessage("now?"), history[-kept:], sampling=GREEDY, max_context=100_000)
    assert build_prompt(tiny_loaded, exact).tokens == first.tokens


def test_prompt_building_stops_at_the_deadline(tiny_loaded) -> None:
    import time

    history = [Turn(UserMessage(f"q{i}"), "a") for i in range(50)]
    with pytest.raises(RequestTimedOut, match="building the prompt"):
        build_prompt(tiny_loaded, ChatRequest(UserMessage("now?"), history, sampling=GREEDY), deadline=time.monotonic() - 1)


def test_an_earlier_turn_whose_file_is_gone_ends_the_history_there(tiny_loaded, image: str, tmp_path: Path) -> None:
    gone = tmp_path / "expired.png"
    Image.new("RGB", (64, 64)).save(gone)
    history = [Turn(UserMessage("old", (str(gone),)), "x"), Turn(UserMessage("recent", (image,)), "y")]
    gone.unlink()  # the upload sweeper removed it
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("now?"), history, sampling=GREEDY))
    assert prompt.turns_dropped == 1 and prompt.image_tokens > 0


def test_a_single_turn_over_the_cap_is_refused_with_both_numbers(tiny_loaded) -> None:
    request = ChatRequest(UserMessage("word " * 400), sampling=GREEDY, max_context=300)
    with pytest.raises(RequestError) as err:
        build_prompt(tiny_loaded, request)
    message = str(err.value)
    needed = build_prompt(tiny_loaded, ChatRequest(UserMessage("word " * 400), sampling=GREEDY)).tokens
    assert f"needs {needed:,} prompt tokens" in message and "leaves 276" in message


def test_streaming_yields_several_growing_updates_and_records_stats(service: ChatService) -> None:
    request = ChatRequest(UserMessage("Describe a red circle."), sampling=SamplingParams(max_new_tokens=40, temperature=0.0))
    service.manager.current().model.generation_config.eos_token_id = None  # random weights: force the length
    updates = _answer(service, request)
    assert len(updates) >= 5
    assert all(a != b and b.startswith(a) for a, b in zip(updates, updates[1:], strict=False))
    last = service.stats.last
    assert last.new_tokens == 40 and last.prompt_text_tokens > 0 and last.ttft_s > 0


def test_greedy_with_a_seed_is_reproducible(service: ChatService) -> None:
    request = ChatRequest(UserMessage("Count to ten."), sampling=SamplingParams(max_new_tokens=12, temperature=0.9, seed=7))
    assert _answer(service, request)[-1] == _answer(service, request)[-1]


def test_stop_ends_generation_early_and_frees_the_slot(service: ChatService) -> None:
    service.manager.current().model.generation_config.eos_token_id = None
    request = ChatRequest(UserMessage("Tell a long story."), sampling=SamplingParams(max_new_tokens=2000, temperature=0.0))
    stream = service.chat(request)
    next(stream), next(stream)
    assert service.scheduler.state().running == 1
    stream.close()  # what gradio does on Stop or a closed tab
    assert service.scheduler.state().running == 0
    assert 0 < service.stats.last.new_tokens < 100  # stopped within a few decode steps, not after 2,000
    assert len(_answer(service, ChatRequest(UserMessage("still there?"), sampling=GREEDY))) >= 1


def test_cancel_event_while_waiting_for_a_slot(service: ChatService) -> None:
    cancel = threading.Event()
    with service.scheduler.slot():  # occupy the only slot
        stream = service.chat(ChatRequest(UserMessage("hi"), sampling=GREEDY), cancel)
        cancel.set()
        from qwen3vl_webui.service.admission import Cancelled

        with pytest.raises(Cancelled):
            next(stream)
    assert service.scheduler.state().running == 0


def _bad_files(tmp_path: Path) -> dict[str, str]:
    text_png = tmp_path / "notes.png"
    text_png.write_text("this is not an image\n" * 10)
    corrupt = tmp_path / "corrupt.png"
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    corrupt.write_bytes(good.read_bytes()[:60])
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes((ASSETS / "example.mp4").read_bytes()[:1500])
    unsupported = tmp_path / "doc.pdf"
    unsupported.write_bytes(b"%PDF-1.4\n")
    return {"text renamed .png": str(text_png), "corrupt image": str(corrupt), "truncated video": str(truncated),
            "unsupported type": str(unsupported)}  # fmt: skip


def test_bad_input_is_refused_with_a_clear_message_and_the_next_request_works(
    service: ChatService, tmp_path: Path
) -> None:
    history = [Turn(UserMessage("earlier question"), "earlier answer")]
    for case, path in _bad_files(tmp_path).items():
        with pytest.raises(RequestError) as err:
            _answer(service, ChatRequest(UserMessage("what is this?", (path,)), history, sampling=GREEDY))
        assert Path(path).name in str(err.value), case
    with pytest.raises(RequestError, match="empty"):
        _answer(service, ChatRequest(UserMessage("   "), history, sampling=GREEDY))
    with pytest.raises(RequestError, match="prompt tokens"):
        _answer(service, ChatRequest(UserMessage("long " * 5000), history, sampling=GREEDY, max_context=2048))
    with pytest.raises(RequestError, match="temperature must be between"):
        SamplingParams(temperature=5.0)
    assert service.scheduler.state().running == 0
    assert _answer(service, ChatRequest(UserMessage("and now?"), history, sampling=GREEDY))


def test_a_stop_string_ends_generate_at_the_token_that_completes_it_and_is_never_streamed(tiny_loaded) -> None:
    import dataclasses

    import torch

    from qwen3vl_webui.engine.generate import stream_generate

    plain = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("Count the objects"), sampling=plain))
    tok = tiny_loaded.processor.tokenizer
    with torch.inference_mode():
        out = tiny_loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=40, repetition_penalty=1.0)
    tokens = out[0, prompt.inputs["input_ids"].shape[1] :].tolist()
    text = tok.decode(tokens, skip_special_tokens=True)
    at = next(i for i in range(6, len(text) - 3) if text[i : i + 3].isascii() and text.find(text[i : i + 3]) == i)
    stop = text[at : at + 3]
    end = next(j for j in range(len(tokens)) if stop in tok.decode(tokens[: j + 1], skip_special_tokens=True))
    sampling = dataclasses.replace(plain, stop=(stop, "not in it"))
    *partial, (final, stats) = list(stream_generate(tiny_loaded, prompt, sampling, threading.Event()))
    assert final == text[:at] and stats.new_tokens == end + 1 < len(tokens)
    assert all(final.startswith(t) and stop not in t for t, _ in partial)


def test_stop_strings_are_validated_with_a_clear_message() -> None:
    assert SamplingParams(stop=["END", "\n\n"]).stop == ("END", "\n\n")  # a list is kept as a tuple
    cases = {
        "At most 8 stop strings": [f"s{i}" for i in range(9)],
        "must not be empty": [""],
        "at most 100 characters": ["x" * 101],
        "must be a list of strings": "END",
        "must be text": [3],
    }
    for message, stop in cases.items():
        with pytest.raises(RequestError, match=message):
            SamplingParams(stop=stop)


def test_stop_matching_on_token_bytes_agrees_with_decoded_text(tiny_loaded) -> None:
    import random

    from qwen3vl_webui.engine.stops import StopMatcher, StopText, TokenBytes, parse_stop_lines

    tok = tiny_loaded.processor.tokenizer
    token_bytes = TokenBytes(tok)
    rng = random.Random(0)
    for _ in range(300):  # any ids, special tokens and split UTF-8 characters included
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 24))]
        decoded = b"".join(token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        assert decoded == tok.decode(ids, skip_special_tokens=True)
    # "é" is two bytes: a stop string completed by the second byte's token ends the answer there.
    ids = tok.encode("café au lait")
    matcher = StopMatcher(("é a",), token_bytes)
    hits = [matcher.push(i) for i in ids]
    assert hits.index(True) == next(j for j in range(len(ids)) if "é a" in tok.decode(ids[: j + 1]))
    stops = StopText(("END", "\n\n"))
    shown = [stops.visible(t) for t in ("The E", "The EN", "The ENX", "a\n", "a\nb", "x END y")]
    assert shown == ["The ", "The ", "The ENX", "a", "a\nb", "x "]
    assert parse_stop_lines("END\r\n\n  \n\\n\\n\nback\\\\slash") == ("END", "\n\n", "back\\slash")
