"""Gradio history shapes -> turns; refusals left out of the prompt; trimming by whole turns."""

from __future__ import annotations

from qwen3vl_webui.conversation import ERROR_PREFIX, Turn, UserMessage, fit_turns, parse_history, parse_message


def test_parse_message_from_textbox_and_api() -> None:
    assert parse_message("hi") == UserMessage("hi", ())
    msg = parse_message({"text": "look", "files": ["/tmp/a.png", {"path": "/tmp/b.mp4", "meta": {}}]})
    assert msg == UserMessage("look", ("/tmp/a.png", "/tmp/b.mp4"))
    assert parse_message({"text": "  ", "files": []}).is_empty and parse_message(None).is_empty


def test_history_in_the_api_state_shape() -> None:
    # What ChatInterface keeps in its state: files as {"path"} items, text as plain strings.
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "what is it?"]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": ["and now?"]},
        {"role": "assistant", "content": "a dog"},
    ]
    assert parse_history(history) == [
        Turn(UserMessage("what is it?", ("/tmp/a.png",)), "a cat"),
        Turn(UserMessage("and now?", ()), "a dog"),
    ]


def test_history_in_the_chatbot_shape_with_files_as_separate_messages() -> None:
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/a.png"}}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/v.mp4"}}]},
        {"role": "user", "content": [{"type": "text", "text": "compare"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "same"}]},
    ]
    assert parse_history(history) == [Turn(UserMessage("compare", ("/tmp/a.png", "/tmp/v.mp4")), "same")]


def test_refused_turns_and_unanswered_messages_are_left_out() -> None:
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "bad file"},
        {"role": "assistant", "content": ERROR_PREFIX + "x.png is not a valid image"},
        {"role": "user", "content": "stopped before any token"},
    ]
    assert parse_history(history) == [Turn(UserMessage("first"), "ok")]


def test_fit_turns_drops_whole_turns_oldest_first() -> None:
    turns = [Turn(UserMessage(f"t{i}"), "a") for i in range(5)]
    cost = {t.user.text: 10 for t in turns}

    def count(kept: list[Turn]) -> int:
        return sum(cost[t.user.text] for t in kept)

    kept, n = fit_turns(turns, count, 30)
    assert [t.user.text for t in kept] == ["t2", "t3", "t4"] and n == 30
    kept, n = fit_turns(turns, count, 5)  # the current message alone is over budget: caller decides
    assert [t.user.text for t in kept] == ["t4"] and n == 10
