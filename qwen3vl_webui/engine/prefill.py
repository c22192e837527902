"""One prompt chunk through the Qwen3-VL text model, in a form torch.compile traces as one graph for every length."""

from __future__ import annotations

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

    def __init__(self, past: Any) -> None:
        self._past = past
        self.new: list[Any] = []

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        # [1, kv_heads, L, dim] -> [L, 2, kv_heads, dim]
        self.new.append(torch.stack([key_states[0], value_states[0]]).permute(2, 0, 1, 3))
        if self._past.shape[0] == 0:
            return key_states, value_states
        past = self._past[:, layer_idx].permute(1, 2, 0, 3).unsqueeze(1)  # [2, 1, kv_heads, P, dim]
        return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)

    def chunk(self) -> Any:
        import torch

        return torch.stack(self.new, dim=1)


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


def chunk_forward(lm: Any, embeds: Any, positions: Any, past: Any, deepstack: Any) -> tuple[Any, Any]:
    """Qwen3VLTextModel.forward's work for one prompt chunk of one sequence, through its own modules.

    embeds [1, L, hidden] (media features already merged in), positions [4, 1, L] (the text row, then the three
    mrope rows; contiguous, as compiled graphs are specialised on strides), past [P, layers, 2, kv_heads, head_dim], deepstack [n, 1, L, hidden]: the vision tower's
    deepstack features at the media placeholders, zeros elsewhere, added after each of the first n layers
    (transformers adds them at the placeholders by boolean indexing, which breaks a dynamo graph in every one of
    those layers; adding zeros elsewhere is the same sum). Returns the final-normed hidden state of the last
    position [1, hidden] and the chunk's keys/values [L, layers, 2, kv_heads, head_dim].
    tests/test_prefill.py checks it against `Qwen3VLModel.forward` with a DynamicCache, bitwise.
    """
    cache = ChunkKV(past)
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
    return lm.norm(hidden[:, -1]), cache.chunk()


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
