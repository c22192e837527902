"""Chat history in the shapes gradio sends -> turns of text + file paths; the server's record of each conversation."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
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


@dataclass(frozen=True)
class History:
    """The turns of a conversation the server trusts, and where they start in the client's list of turns."""

    turns: list[Turn]
    offset: int = 0
    untrusted: int = 0  # turns the client sent that were left out


class ConversationStore:
    """What this server answered in each session: the only history a prompt is built from.

    The client holds a copy of the chat (gradio's chatbot and state) and sends it with every message, and any
    visitor can overwrite it through gradio's undocumented events (by `fn_index`). So a turn the client sends
    is used only where it matches, in order, a turn this server produced for the same session: undo, retry and
    clear (the client's list got shorter) still work, and a forged list of 10,000 turns costs one comparison.
    Each conversation keeps at most `max_turns` turns and `max_files` files (older turns are forgotten), and
    the store at most `max_sessions` conversations, least recently used first out.
    """

    def __init__(self, max_turns: int = 100, max_files: int = 32, max_sessions: int = 1000) -> None:
        self.max_turns = max_turns
        self.max_files = max_files
        self.max_sessions = max_sessions
        self._items: OrderedDict[str, History] = OrderedDict()
        self._lock = threading.Lock()

    def trusted(self, session: str, claimed: Sequence[Turn]) -> History:
        """The turns of `claimed` that match this session's record, from the first, up to the first mismatch.

        An answer the client shows may be shorter than the one recorded (a stream stopped between two
        updates); the client's shorter copy is used then, never anything the server did not produce.
        """
        with self._lock:
            record = self._items.get(session)
            if record is not None:
                self._items.move_to_end(session)
        if record is None:
            return History([], len(claimed), len(claimed))
        kept: list[Turn] = []
        for i, mine in enumerate(record.turns):
            j = record.offset + i
            if j >= len(claimed):
                break
            theirs = claimed[j]
            if theirs.user != mine.user or not theirs.assistant or not mine.assistant.startswith(theirs.assistant):
                break
            kept.append(theirs)
        # Nothing matched: the next turn is recorded at the end of what the client shows.
        return History(kept, record.offset if kept else len(claimed), len(claimed) - len(kept))

    def record(self, session: str, history: History, turn: Turn) -> None:
        """After an answer: the session's conversation is now `history` + `turn`, within the caps."""
        turns = [*history.turns, turn]
        offset = history.offset
        while len(turns) > 1 and (
            len(turns) > self.max_turns or sum(len(t.user.files) for t in turns) > self.max_files
        ):
            turns.pop(0)
            offset += 1
        with self._lock:
            self._items[session] = History(turns, offset)
            self._items.move_to_end(session)
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)

    def forget(self, session: str) -> None:
        with self._lock:
            self._items.pop(session, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
