"""One prompt chunk through the Qwen3-VL text model: eagerly, replayed from a CUDA graph, or compiled by dynamo.

The eager text model costs ~0.85 ms of host time a layer whatever the length (docs/engine.md): ~30 ms for any
prompt on an H100, more than the GPU needs for ~900 tokens. `ChunkGraphs` captures a first chunk (empty past) at a
few padded lengths at start-up, so a fresh prompt's text forward costs one graph replay of host time.
"""

from __future__ import annotations

import time
from typing import Any

# A chunk compiles for lengths >= 2 after an empty past or one of >= 2 tokens: dynamo specialises sizes 0 and 1, so
# these are the two graphs warmed at start-up; 1-token chunks (and a 1-token past) run eagerly instead.
MIN_COMPILED = 2


class ChunkKV:
    """The `past_key_values` of one chunk: per layer, the prompt's earlier keys/values followed by the chunk's.

    Duck-typed for transformers' attention layers, which only call `update`. The past arrives as one tensor
    [P, layers, 2, kv_heads, head_dim] (P = 0 for a first chunk); the chunk's own keys/values are gathered in the
    same layout, [L, layers, 2, kv_heads, head_dim], for the caller to append.
    """

    def __init__(self, past: Any, out: Any = None) -> None:
        self._past, self._out = past, out
        self.new: list[Any] = []

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        if self._out is not None:  # [L, layers, 2, kv_heads, dim] given: written in place
            self._out[:, layer_idx, 0].copy_(key_states[0].transpose(0, 1))
            self._out[:, layer_idx, 1].copy_(value_states[0].transpose(0, 1))
        else:  # [1, kv_heads, L, dim] -> [L, 2, kv_heads, dim]
            self.new.append(torch.stack([key_states[0], value_states[0]]).permute(2, 0, 1, 3))
        if self._past.shape[0] == 0:
            return key_states, value_states
        past = self._past[:, layer_idx].permute(1, 2, 0, 3).unsqueeze(1)  # [2, 1, kv_heads, P, dim]
        return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)

    def chunk(self) -> Any:
        import torch

        return self._out if self._out is not None else torch.stack(self.new, dim=1)


def causal_mask(past: int, length: int, device: Any) -> Any:
    """[1, 1, length, past + length] bool, True where query i (at position past + i) may attend, or None.

    What transformers' `create_causal_mask` gives SDPA for a DynamicCache: None for a first chunk (the kernel's own
    causal flag) and for one token (it sees every key), else the bottom-right-aligned causal mask.
    """
    import torch

    if past == 0 or length == 1:
        return None
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    return (keys.view(1, -1) <= queries.view(-1, 1)).view(1, 1, length, past + length)


def chunk_forward(lm: Any, embeds: Any, positions: Any, past: Any, deepstack: Any, out: Any = None) -> tuple[Any, Any]:
    """Qwen3VLTextModel.forward's work for one prompt chunk of one sequence, through its own modules.

    embeds [1, L, hidden] (media features already merged in), positions [4, 1, L] (the text row, then the three
    mrope rows; contiguous, as compiled graphs are specialised on strides), past [P, layers, 2, kv_heads, head_dim], deepstack [n, 1, L, hidden]: the vision tower's
    deepstack features at the media placeholders, zeros elsewhere, added after each of the first n layers
    (transformers adds them at the placeholders by boolean indexing, which breaks a dynamo graph in every one of
    those layers; adding zeros elsewhere is the same sum). Returns the final-normed hidden states [1, L, hidden]
    and the chunk's keys/values [L, layers, 2, kv_heads, head_dim] (written into `out` if given).
    tests/test_prefill.py checks it against `Qwen3VLModel.forward` with a DynamicCache, bitwise.
    """
    cache = ChunkKV(past, out)
    text_positions = positions[0]
    mask = causal_mask(past.shape[0], embeds.shape[1], embeds.device)
    rope = lm.rotary_emb(embeds, positions[1:])
    hidden = embeds
    for index, layer in enumerate(lm.layers):
        hidden = layer(
            hidden, attention_mask=mask, position_ids=text_positions, past_key_values=cache, position_embeddings=rope
        )  # fmt: skip
        if index < deepstack.shape[0]:
            hidden = hidden + deepstack[index]
    return lm.norm(hidden), cache.chunk()


def compiles(past: int, length: int) -> bool:
    """Whether a chunk of `length` tokens after `past` ones has a warmed graph (see MIN_COMPILED)."""
    return length >= MIN_COMPILED and (past == 0 or past >= MIN_COMPILED)


def media_inputs(embeds: Any, layers: int, pieces: list[tuple[Any, Any, Any]]) -> tuple[Any, Any]:
    """A chunk's embeddings with its media features placed, and its dense deepstack tensor.

    embeds: [1, L, hidden] from the token embedding (written in place); pieces: per medium kind in the chunk,
    (placeholder indices in the chunk [count], features [count, hidden], deepstack features [layers, count, hidden]).
    Returns (embeds, deepstack [layers, 1, L, hidden], zeros off the placeholders), as `chunk_forward` takes them.
    """
    deepstack = embeds.new_zeros(layers, *embeds.shape)
    for index, features, stacked in pieces:
        embeds[0, index] = features.to(embeds.dtype)
        deepstack[:, 0, index] = stacked.to(embeds.dtype)
    return embeds, deepstack


class ChunkGraphs:
    """First chunks (empty past) replayed from CUDA graphs, one per padded length.

    A chunk of n tokens runs in the graph of the smallest length >= n: its inputs are copied into static buffers,
    the padding rows after them are zeroed (causal attention never lets the real rows see them; zeros keep them
    finite), and the real rows' hidden states and keys/values are read back. Every graph
    shares one memory pool and writes into the same output buffers, so what the graphs pin is about one longest
    chunk's prefill transient, however many lengths there are; the next replay overwrites the outputs.

    The lengths are captured longest first (the pool fits the shorter ones in what the longest left), all at once
    (`capture`) or one at a time between the engine's steps (`capture_next`, issue 14: the first answer does not
    wait for ~3.5 s of captures); until its own length is captured, a chunk runs eagerly (`fits`).
    """

    def __init__(self, lm: Any, lengths: tuple[int, ...], deepstack_layers: int, kv_dims: tuple[int, ...]) -> None:
        import torch

        weight = lm.embed_tokens.weight
        top = max(lengths)
        self.lengths = tuple(sorted(lengths))
        self._lm = lm
        self._embeds = torch.zeros(1, top, weight.shape[1], dtype=weight.dtype, device=weight.device)
        self._positions = torch.zeros(4, 1, top, dtype=torch.long, device=weight.device)
        self._deepstack = self._embeds.new_zeros(deepstack_layers, 1, top, weight.shape[1])
        self._kv = self._embeds.new_zeros(top, *kv_dims)  # [top, layers, 2, kv_heads, head_dim]
        self._hidden = torch.zeros_like(self._embeds)
        self._past = self._embeds.new_zeros(0, *kv_dims)
        self._graphs: dict[int, Any] = {}
        self._pool: Any = None
        self._side: Any = None
        self.capture_s = 0.0  # seconds spent capturing so far

    @property
    def pending(self) -> tuple[int, ...]:
        """Lengths not captured yet, in the order they will be (longest first)."""
        return tuple(n for n in reversed(self.lengths) if n not in self._graphs)

    def capture(self) -> None:
        """Every length not captured yet."""
        while self.capture_next():
            pass

    def capture_next(self) -> bool:
        """Captures the longest length not captured yet; True while lengths remain. Between two engine steps (nothing
        in flight), on the engine's thread."""
        pending = self.pending
        if pending:
            started = time.perf_counter()
            self._capture_one(pending[0])
            self.capture_s += time.perf_counter() - started
        return len(pending) > 1

    def _capture_one(self, n: int) -> None:
        """Eager runs on a side stream (as CUDA graph capture asks: two before the first capture, one before each
        later one), then the capture on it. Not `torch.cuda.graph`, whose entry synchronises the device, collects
        garbage and empties the allocator's cache: between two steps nothing of ours is in flight, and the side stream
        waits for the current one."""
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(1 if self._graphs else 2):
                chunk_forward(*self._args(n))
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                hidden, _ = chunk_forward(*self._args(n))
                self._hidden[:, :n].copy_(hidden)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self._graphs[n] = graph

    def _args(self, n: int) -> tuple[Any, ...]:
        return (
            self._lm, self._embeds[:, :n], self._positions[:, :, :n], self._past, self._deepstack[:, :, :n],
            self._kv[:n],
        )  # fmt: skip

    def padded(self, length: int) -> int | None:
        """The graph length a first chunk of `length` tokens runs at, or None if longer than every length."""
        return next((m for m in self.lengths if m >= length), None)

    def fits(self, past: int, length: int) -> bool:
        """A first chunk whose padded length is captured."""
        return past == 0 and self.padded(length) in self._graphs

    def run(self, embeds: Any, positions: Any, deepstack: Any) -> tuple[Any, Any]:
        """`chunk_forward` of a first chunk (empty past): hidden states [1, n, hidden], keys/values [n, ...] (views)."""
        n = embeds.shape[1]
        padded = self.padded(n)
        self._embeds[:, :n].copy_(embeds)
        self._embeds[:, n:padded].zero_()
        self._positions[:, :, :n].copy_(positions)
        self._deepstack[:, :, :n].copy_(deepstack)
        self._deepstack[:, :, n:padded].zero_()
        self._graphs[padded].replay()
        return self._hidden[:, :n], self._kv[:n]
