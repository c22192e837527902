"""Chat history in the shapes gradio sends -> turns of text + file paths; trimming to a token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# An assistant message that starts with this is a refusal shown to the user, not model output:
# the turn it answers is left out of the next prompt.
ERROR_PREFIX = "⚠️ "
# Shown while a request waits for a GPU slot; a turn left with only this (stopped while waiting)
# is not an answer either.
WAIT_PREFIX = "⏳ "


@dataclass(frozen=True)
class UserMessage:
    text: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_empty(self) -> bool:
        return not self.text.strip() and not self.files


@dataclass(frozen=True)
class Turn:
    user: UserMessage
    assistant: str


def parse_message(message: Any) -> UserMessage:
    """A `{"text", "files"}` dict (MultimodalTextbox / API) or a plain string."""
    if message is None:
        return UserMessage()
    if isinstance(message, str):
        return UserMessage(text=message)
    if isinstance(message, dict):
        files = tuple(p for p in (_file_path(f) for f in message.get("files") or []) if p)
        return UserMessage(text=str(message.get("text") or ""), files=files)
    raise TypeError(f"unsupported message type {type(message).__name__}")


def _file_path(item: Any) -> str | None:
    """The path inside any of gradio's file shapes: str, {"path"}, {"file": {"path"}}, FileData-like."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and item:
        return _file_path(item[0])
    if isinstance(item, dict):
        if "path" in item and item["path"]:
            return str(item["path"])
        if "file" in item:
            return _file_path(item["file"])
        return None
    path = getattr(item, "path", None)
    return str(path) if path else None


def _content_parts(content: Any) -> tuple[list[str], list[str]]:
    """(texts, files) of one history message's content in any shape gradio uses."""
    texts: list[str] = []
    files: list[str] = []
    items = content if isinstance(content, list) else [content]
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(str(item.get("text", "")))
        elif isinstance(item, dict) and "text" in item and "path" not in item and "file" not in item:
            texts.append(str(item["text"]))
        else:
            path = _file_path(item)
            if path:
                files.append(path)
    return texts, files


def parse_history(history: Sequence[dict[str, Any]] | None) -> list[Turn]:
    """Groups gradio's message list into turns; gradio sends each uploaded file as its own message."""
    turns: list[Turn] = []
    texts: list[str] = []
    files: list[str] = []
    answer: list[str] = []

    def flush() -> None:
        reply = "".join(answer)
        if (texts or files) and answer and not reply.startswith((ERROR_PREFIX, WAIT_PREFIX)):
            turns.append(Turn(UserMessage("\n".join(t for t in texts if t), tuple(files)), reply))

    for msg in history or []:
        role = msg.get("role")
        msg_texts, msg_files = _content_parts(msg.get("content"))
        if role == "user":
            if answer:
                flush()
                texts, files, answer = [], [], []
            texts.extend(msg_texts)
            files.extend(msg_files)
        elif role == "assistant":
            answer.extend(msg_texts)
    if answer:
        flush()
    return turns


def fit_turns(
    turns: list[Turn], count_tokens: Callable[[list[Turn]], int], budget: int
) -> tuple[list[Turn], int]:
    """Drops whole turns, oldest first, until `count_tokens(kept) <= budget`.

    The last turn is the current message and is never dropped; if it alone does not fit the caller
    gets (the one turn, its count) and decides. Counting is done on real processor output, so image
    and video tokens are exact.
    """
    start = 0
    count = count_tokens(turns)
    while count > budget and start < len(turns) - 1:
        start += 1
        count = count_tokens(turns[start:])
    return turns[start:], count


def keep_recent_chars(turns: list[Turn], max_chars: int) -> list[Turn]:
    """The newest turns whose text adds up to at most `max_chars` characters.

    A cheap first cut before token counting: turns that cannot fit by characters are never
    tokenized (see generation.CHARS_PER_TOKEN).
    """
    total = 0
    start = len(turns)
    for i in range(len(turns) - 1, -1, -1):
        total += len(turns[i].user.text) + len(turns[i].assistant)
        if total > max_chars:
            break
        start = i
    return turns[start:]
