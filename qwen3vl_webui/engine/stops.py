"""Stop strings: where the answer's text ends, and the token that ends it, shared by both decode paths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class StopText:
    """Cuts generated text before its first stop string; while a stop string may still be forming, hides it.

    A streamed text never shows a stop string, nor the start of one until the next tokens decide it:
    "The END" with stop "END" streams "The " and then ends as "The ".
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops

    def cut(self, text: str) -> tuple[str, bool]:
        """(text before the earliest stop string, whether there was one)."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def visible(self, text: str) -> str:
        """What of a partial text may be shown: cut at a stop string, less a tail that could begin one."""
        text, found = self.cut(text)
        if found:
            return text
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        return text[: len(text) - hold]


class StopMatcher:
    """Per request: fed each generated token, says whether it completed a stop string.

    Matches UTF-8 bytes, not decoded text, so a token costs one dict lookup and a few byte compares and a
    character split across tokens still matches (UTF-8 is self-synchronising: the bytes of a string occur
    in the bytes of a text exactly where the string occurs in the text).
    """

    def __init__(self, stops: tuple[str, ...], token_bytes: Callable[[int], bytes]) -> None:
        self._stops = [s.encode() for s in stops]
        self._keep = max(len(s) for s in self._stops) - 1  # a match ending later starts within this tail
        self._tail = b""
        self._bytes = token_bytes

    def push(self, token: int) -> bool:
        buf = self._tail + self._bytes(token)
        self._tail = buf[-self._keep :] if self._keep else b""
        return any(s in buf for s in self._stops)


class TokenBytes:
    """Token id -> the UTF-8 bytes it adds to `decode(..., skip_special_tokens=True)`, memoised.

    Qwen's tokenizer is byte-level BPE: a token's string maps back to bytes through GPT-2's byte table.
    Special tokens add nothing; any other token that is not byte-level text falls back to `decode`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._special = set(tokenizer.all_special_ids)
        self._memo: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        got = self._memo.get(token)
        if got is None:
            got = self._memo[token] = self._lookup(token)
        return got

    def _lookup(self, token: int) -> bytes:
        added = self._added.get(token)
        if token in self._special or (added is not None and added.special):
            return b""
        if added is not None:
            return added.content.encode()
        piece = self._tok.convert_ids_to_tokens(token)
        table = _unicode_to_byte()
        if isinstance(piece, str) and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self._tok.decode([token], skip_special_tokens=True).encode()


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode` (byte-level BPE spells each byte as one printable character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def parse_stop_lines(text: str) -> tuple[str, ...]:
    """One stop string a line (the UI's textbox, the API's `stop_strings`); `\\n` and `\\t` stand for a line
    break and a tab, `\\\\` for a backslash; blank lines are skipped."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            out.append(_unescape(line))
    return tuple(out)


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        pair = line[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)
