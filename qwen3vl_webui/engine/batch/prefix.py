"""Prefix reuse: which retained KV a new prompt may start from (same tokens, same media), kept LRU in pool slots."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# A shorter shared prefix is not worth a cache copy (every chat prompt shares its first 3 tokens).
MIN_REUSE_TOKENS = 16
# Patch rows a medium's probe hashes (evenly spaced): ~0.4 MB of a 720p image's 22 MB of pixel values.
PROBE_ROWS = 64
# A digest hashes its pixels in pieces of this size on HASH_THREADS threads, then hashes the pieces' digests: a 720p
# image's 22 MB took ~17 ms in one piece on the H100 host, which a follow-up turn about it waited for.
HASH_PIECE_BYTES = 4 << 20
HASH_THREADS = 4


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    """Full pixel digests run here, beside the GPU work (hashlib releases the GIL on large buffers)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="media-hash")


@functools.cache
def _piece_hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="media-hash-piece")


@dataclass(frozen=True)
class Medium:
    """One image or video of a prompt: where its placeholder tokens are, where its patches are, what it shows.

    Image (and video) pad token ids are the same for every image, so equal tokens say nothing about equal
    pictures: `digest` (SHA-256 of the grid and all pixel values) does. A video's span runs from its first to its
    last pad token, its per-frame timestamps included.

    The digest of a 720p image takes ~15 ms of CPU, which used to sit in front of every image prompt's first token.
    It is computed in the background (`hashing`); `probe`, a hash of the grid and PROBE_ROWS sampled rows, is
    ready at once. Matching compares probes first and waits for digests only where the probes agree, i.e. when
    the same picture is likely there and reusing it saves far more than the wait.
    """

    kind: str  # "image" or "video"
    index: int  # its row in image_grid_thw / video_grid_thw
    start: int  # first placeholder token
    end: int  # one past the last placeholder token
    rows: tuple[int, int]  # its patch rows in pixel_values / pixel_values_videos
    probe: str
    hashing: Future[str] = field(compare=False, repr=False)

    @property
    def digest(self) -> str:
        return self.hashing.result()

    @property
    def key(self) -> tuple[str, int, int, str, str]:
        """What a retained entry records (waits for the digest)."""
        return (self.kind, self.start, self.end, self.probe, self.digest)

    def same_as(self, key: tuple[str, int, int, str, str]) -> bool:
        """Whether a retained medium `key` is this one: same place and probe first, then the full digest."""
        return key[:4] == (self.kind, self.start, self.end, self.probe) and key[4] == self.digest


def _digest(grid_row: bytes, pixels: Any) -> str:
    """SHA-256 of `grid_row` and the bytes of the contiguous array `pixels`, through SHA-256s of its pieces."""
    flat = pixels.reshape(-1)
    pieces = [flat[i : i + HASH_PIECE_BYTES] for i in range(0, len(flat), HASH_PIECE_BYTES)]
    if len(pieces) <= 1:
        digest = hashlib.sha256(grid_row)
        digest.update(flat)
        return digest.hexdigest()
    parts = _piece_hasher().map(lambda piece: hashlib.sha256(piece).digest(), pieces)
    return hashlib.sha256(grid_row + b"".join(parts)).hexdigest()


def find_media(inputs: dict[str, Any], image_token_id: int, video_token_id: int, merge: int) -> tuple[Medium, ...]:
    """The prompt's media in token order, each with its probe and its digest under way (run it off the GPU thread)."""
    import numpy as np
    import torch

    # numpy, not torch, on this path: torch's CPU ops run on its intra-op thread pool, whose spinning threads
    # delayed the GPU worker's wake-up by milliseconds on a 16-core host.
    ids = inputs["input_ids"][0].cpu().numpy()
    media: list[Medium] = []
    for kind, token, pixels, grids in (
        ("image", image_token_id, "pixel_values", "image_grid_thw"),
        ("video", video_token_id, "pixel_values_videos", "video_grid_thw"),
    ):
        if inputs.get(grids) is None:
            continue
        where = np.flatnonzero(ids == token).tolist()
        grid = inputs[grids].cpu().numpy()
        values = inputs[pixels].detach().cpu()
        # One row of bytes per patch (a view: no copy for the usual contiguous pixel values).
        rows_bytes = values.contiguous().view(torch.uint8).numpy().reshape(values.shape[0], -1)
        first_pad = first_row = 0
        for index, thw in enumerate(grid.tolist()):
            patches = thw[0] * thw[1] * thw[2]
            pads = patches // (merge * merge)
            if pads == 0 or first_pad + pads > len(where):
                raise ValueError(f"the prompt has fewer {kind} placeholder tokens than its {kind}s need")
            rows = (first_row, first_row + patches)
            grid_row = grid[index].tobytes()
            block = rows_bytes[rows[0] : rows[1]]
            sample = np.ascontiguousarray(block[:: max(1, patches // PROBE_ROWS)])
            probe = _digest(grid_row + str(block.shape).encode(), sample)
            hashing = _hasher().submit(_digest, grid_row, block)
            start, end = where[first_pad], where[first_pad + pads - 1] + 1
            media.append(Medium(kind, index, start, end, rows, probe, hashing))
            first_pad += pads
            first_row += patches
    return tuple(sorted(media, key=lambda m: m.start))


@dataclass(eq=False)
class Entry:
    """A retained prefix: the KV of `ids` (a finished request's prompt and fed-back tokens)."""

    slot: int
    ids: Any  # 1-D CPU long tensor
    media: tuple[tuple[str, int, int, str, str], ...]  # Medium.key of each medium inside `ids`
    used: int  # LRU clock
    kv: Any = None  # the engine's copy of the KV, allocated for this entry alone: dropping the entry frees it


class PrefixPool:
    """At most `len(slots)` retained prefixes, least recently used first out; owned by the engine's worker thread.

    The engine allocates each entry's KV when it keeps it (exactly its length) and sets `entry.kv`; removing an
    entry drops that reference, so eviction and `clear` give the memory back to the allocator.
    """

    def __init__(self, slots: Iterable[int], min_tokens: int = MIN_REUSE_TOKENS) -> None:
        self.slots = tuple(slots)
        self.min_tokens = min_tokens
        self.entries: list[Entry] = []
        self._free = list(self.slots)
        self._clock = 0
        self.hits = 0
        self.tokens_reused = 0
        self.evicted = 0
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self.slots)

    def match(self, ids: Any, media: tuple[Medium, ...], at_least: int = 0) -> tuple[Entry | None, int]:
        """The entry sharing the longest usable prefix with prompt `ids`, and that prefix's length (None, 0 when
        shorter than `min_tokens` or `at_least`).

        Usable: equal tokens, every medium inside it equal (same place, same pixels), never ending inside a
        medium (so the rest of the prompt holds whole media only), and at least one prompt token left to
        prefill (the first answer token needs its logits).
        """
        limit = len(ids) - 1
        best, best_len = None, 0
        for entry in self.entries:
            n = min(len(entry.ids), limit)
            if n <= best_len or n < self.min_tokens:
                continue
            differ = (entry.ids[:n] != ids[:n]).nonzero()
            common = _media_cut(int(differ[0]) if len(differ) else n, media, entry.media)
            if common > best_len:
                best, best_len = entry, common
        if best is None or best_len < max(self.min_tokens, at_least):
            return None, 0
        self._clock += 1
        best.used = self._clock
        self.hits += 1
        self.tokens_reused += best_len
        return best, best_len

    def store(self, ids: Any, media: tuple[Medium, ...]) -> Entry | None:
        """Records `ids` and returns the entry to put their KV in; None if nothing needs keeping.

        An entry that is a prefix of the new one (the chat's previous turn, say) is replaced by it; a new one
        that an entry already covers is not kept twice; otherwise the least recently used entry makes room.
        """
        if not self.slots or len(ids) < self.min_tokens:
            return None
        keys = tuple(m.key for m in media)
        self._clock += 1
        for entry in self.entries:
            if _covers(entry.ids, entry.media, ids, keys):
                entry.used = self._clock
                return None
        for entry in [e for e in self.entries if _covers(ids, keys, e.ids, e.media)]:
            self._remove(entry)
        if not self._free:
            self._remove(min(self.entries, key=lambda e: e.used))
            self.evicted += 1
        entry = Entry(self._free.pop(0), ids, keys, self._clock)
        self.entries.append(entry)
        return entry

    def forget(self, entry: Entry) -> None:
        if entry in self.entries:
            self._remove(entry)

    def clear(self) -> None:
        """Drops every entry and so frees their KV (memory pressure): later prompts prefill in full until new
        ones are kept."""
        self.dropped += len(self.entries)
        for entry in list(self.entries):
            self._remove(entry)

    def _remove(self, entry: Entry) -> None:
        self.entries.remove(entry)
        entry.kv = None
        self._free.append(entry.slot)
        self._free.sort()


def _media_cut(common: int, media: tuple[Medium, ...], kept: tuple[tuple[str, int, int, str, str], ...]) -> int:
    """`common` moved back to the start of the first medium that is not the same in both or not wholly inside."""
    for medium in media:  # in token order
        if medium.start >= common:
            break
        if medium.end > common or not any(medium.same_as(key) for key in kept):
            return medium.start
    return common


def _covers(ids: Any, keys: tuple[Any, ...], other_ids: Any, other_keys: tuple[Any, ...]) -> bool:
    """Whether (ids, keys) holds all of (other_ids, other_keys): its tokens start with other's, same media there."""
    n = len(other_ids)
    if n > len(ids) or not bool((ids[:n] == other_ids).all()):
        return False
    return tuple(k for k in keys if k[1] < n) == tuple(other_keys)
