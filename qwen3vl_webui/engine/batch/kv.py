"""The batch engine's KV memory: one slot per running request, compaction when one leaves, the retained prefixes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qwen3vl_webui.engine.batch.prefix import Entry, PrefixPool
from qwen3vl_webui.engine.batch.requests import Request
from qwen3vl_webui.weights.model import LoadedModel

log = logging.getLogger(__name__)

LayerKV = Callable[[int], tuple[Any, Any]]  # layer -> that layer's keys and values [kv_heads, length, head_dim]


class SlotCache:
    """The `past_key_values` of one decode step over slots [0, rows): writes each row at its own position.

    Duck-typed for transformers' attention layers, which only call `update`. Each layer's K (and V) is one flat
    tensor [slots x kv_heads x max_len, head_dim] written with `index_copy_` on the tensor itself: inductor then
    updates it in place (a write through a view of a graph input is functionalised into a copy of the whole
    KV per layer). Returns the [rows, kv_heads, max_len, head_dim] view; the 4D mask hides each row's tail.
    """

    def __init__(self, layers: list[tuple[Any, Any]], shape: tuple[int, int, int, int], rows: int, index: Any) -> None:
        self._layers, self._shape, self._rows, self._index = layers, shape, rows, index

    def layer(self, layer_idx: int) -> LayerSlotCache:
        """One layer's part: what a layer compiled as a region of its own is handed (compiled.RegionalDecode)."""
        keys, values = self._layers[layer_idx]
        return LayerSlotCache(keys, values, self._shape, self._rows, self._index)

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return self.layer(layer_idx).update(key_states, value_states, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never consulted: position_ids and the 4D mask are always passed


class LayerSlotCache:
    """`SlotCache` for one layer: its own K and V, so `update` never reads the layer index (an int dynamo would
    specialise on: a compile per layer)."""

    def __init__(self, keys: Any, values: Any, shape: tuple[int, int, int, int], rows: int, index: Any) -> None:
        self._keys, self._values, self._shape, self._rows, self._index = keys, values, shape, rows, index

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        dim = self._shape[3]
        self._keys.index_copy_(0, self._index, key_states.reshape(-1, dim))  # [rows, heads, 1, dim] -> rows x heads
        self._values.index_copy_(0, self._index, value_states.reshape(-1, dim))
        return self.views()

    def flat(self) -> tuple[Any, Any, Any]:
        """The flat K and V [*, head_dim] and the step's row in them for each (row, kv head): what the fused decode
        layer writes itself (kernels/layer.py), instead of `update`."""
        return self._keys, self._values, self._index

    def views(self) -> tuple[Any, Any]:
        """K and V as [rows, kv_heads, max_len, head_dim] views."""
        slots, heads, length, _ = self._shape
        n = slots * heads * length  # the scratch rows after them are never read
        return self._keys[:n].view(self._shape)[: self._rows], self._values[:n].view(self._shape)[: self._rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class SlotKV:
    """KV slots [0, max_batch) of the running batch, allocated once, and the per-slot decode inputs.

    Prefix reuse: up to `prefix_slots` retained entries keep finished requests' KV (prompt + answer), each allocated
    when kept, exactly its length, so memory goes only to what is kept and comes back when an entry is evicted.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int, max_len: int, prefix_slots: int) -> None:
        self.loaded = loaded
        self.device = loaded.device
        self.max_batch = max_batch
        self.max_len = max_len
        # Pool slots follow the running ones: rows [0, max_batch) of the KV are what decode steps read.
        self.pool = PrefixPool(range(prefix_slots))
        self.layers: list[tuple[Any, Any]] = []
        self.shape = (max_batch, 0, max_len, 0)

    def allocate(self) -> None:
        """The slots' KV and decode inputs (in the worker thread, under inference mode)."""
        import torch

        model = self.loaded.model
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = text.num_key_value_heads
        self.dtype = model.model.language_model.embed_tokens.weight.dtype
        dev = self.device
        # Slots [0, max_batch) hold the running batch, the prefix pool's slots come after them.
        self.shape = (self.max_batch, heads, self.max_len, head_dim)
        rows = self.max_batch * heads * self.max_len
        # Past the slots, one scratch row per KV head: what a decode step compiled on another thread writes (see
        # `scratch`), so that compiling never touches a running request's KV.
        self.scratch_row = rows
        rows += heads
        # One K and one V tensor per layer, each flat (see SlotCache); a slot's rows are [slot, :, :len] of the view.
        self.layers = [
            (
                torch.zeros(rows, head_dim, dtype=self.dtype, device=dev),
                torch.zeros(rows, head_dim, dtype=self.dtype, device=dev),
            )
            for _ in range(text.num_hidden_layers)
        ]
        # Flat KV row of (slot, kv head) at position 0.
        slots = torch.arange(self.max_batch, device=dev).view(-1, 1)
        self.base = (slots * heads + torch.arange(heads, device=dev).view(1, -1)) * self.max_len
        self.ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=dev)  # each slot's next input token
        self.pos = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # next KV write index per slot
        self.delta = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # mrope delta per slot
        self.arange = torch.arange(self.max_len, device=dev)
        # A first chunk's past: no tokens, in prefill.chunk_forward's layout [length, layers, 2, kv_heads, head_dim].
        self.no_past = torch.zeros(0, text.num_hidden_layers, 2, heads, head_dim, dtype=self.dtype, device=dev)

    @property
    def slots(self) -> int:
        """KV slots of the running batch (retained prefixes live outside them)."""
        return self.shape[0]

    def cache(self, rows: int, index: Any) -> SlotCache:
        return SlotCache(self.layers, self.shape, rows, index)

    def view(self, flat: Any) -> Any:
        """A layer's flat K or V as [slots, kv_heads, max_len, head_dim] (the scratch rows left out)."""
        slots, heads, length, _ = self.shape
        return flat[: slots * heads * length].view(self.shape)

    def scratch(self) -> SlotKV:
        """The same KV tensors with decode inputs of their own, every row writing only the scratch rows.

        The background compile runs decode steps on it (graphs.py) while the engine thread serves from the real
        inputs: same object type, same tensor shapes, so the code compiled on it runs the real step unchanged.
        """
        import copy

        import torch

        twin = copy.copy(self)
        twin.ids, twin.pos, twin.delta = torch.zeros_like(self.ids), torch.zeros_like(self.pos), torch.zeros_like(self.delta)
        heads = self.shape[1]
        rows = torch.arange(heads, device=self.base.device).view(1, -1) + self.scratch_row
        twin.base = rows.expand(self.max_batch, heads).contiguous()
        return twin

    def prompt_kv(self, length: int) -> Any:
        """An empty prompt KV of `length` tokens in prefill's layout."""
        return self.no_past.new_empty(length, *self.no_past.shape[1:])

    def reuse_prefix(self, req: Request, at_least: int = 0) -> tuple[Any, int] | None:
        """The retained entry sharing the longest usable prefix with the request's prompt, if at least `at_least`
        tokens long: (prompt KV, tokens).

        The entry's KV for that prefix is copied (on the device) into a prompt KV of the request's own at once, so
        the entry may be evicted meanwhile; the prefill then starts mid-prompt, like a long prompt's next chunk.
        """
        if not self.pool or not req.reusable:
            return None
        try:
            entry, reuse = self.pool.match(req.ids, req.media, at_least)
            if entry is None:
                return None
            kv = self.prompt_kv(req.length)
            kv[:reuse].copy_(entry.kv[:, :, :, :reuse].permute(3, 0, 1, 2, 4))  # [layers, 2, heads, len, dim] ->
        except Exception as exc:  # e.g. out of memory for the copy: prefill it all instead
            log.warning("prefix reuse skipped: %r", exc)
            return None
        return kv, reuse

    def join(self, slot: int, length: int, delta: int) -> None:
        # fill_ with a Python number is one kernel; `pos[slot] = length` would copy a host scalar in, which waits for
        # the GPU (a pageable copy syncs the stream): for the decode step in flight and the prefill just enqueued.
        self.pos[slot].fill_(length)
        self.delta[slot].fill_(delta)

    def write_prompt(self, slot: int, layer_kv: LayerKV, length: int) -> None:
        """Copies a prompt's KV into its slot."""
        for layer, (keys, values) in enumerate(self.layers):
            prompt_keys, prompt_values = layer_kv(layer)
            self.view(keys)[slot, :, :length].copy_(prompt_keys)
            self.view(values)[slot, :, :length].copy_(prompt_values)

    def set_next(self, slot: int, token: Any) -> None:
        self.ids[slot, 0] = token

    def advance(self, rows: int, tokens: Any) -> None:
        """A decode step over slots [0, rows) was enqueued: its tokens are the next inputs, one position on."""
        self.ids[:rows, 0].copy_(tokens)
        self.pos[:rows] += 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s request moves into `dst` (compaction): its first `length` KV rows and its decode inputs."""
        for pair in self.layers:
            for flat in pair:
                view = self.view(flat)
                view[dst, :, :length].copy_(view[src, :, :length])
        for buf in (self.ids, self.pos, self.delta):
            buf[dst].copy_(buf[src])

    def clear_slot(self, slot: int) -> None:
        self.pos[slot].fill_(0)  # padding rows of a graph bucket write at position 0 of a free slot
        self.delta[slot].fill_(0)

    def clear_all(self) -> None:
        self.pos.zero_()
        self.delta.zero_()

    def zero(self) -> None:
        """Zeroes every slot's KV and position (warm-up wrote at position 0 of every slot)."""
        for keys, values in self.layers:
            keys.zero_()
            values.zero_()
        self.pos.zero_()

    def place_rows(self, rows: int, position: int) -> None:
        """Benchmarks: slots [0, rows) at `position` for a replay on an idle engine (0 puts them back)."""
        import torch

        with torch.inference_mode():  # the buffers are inference tensors
            self.pos[:rows].fill_(position)

    def retain(self, req: Request, slot: int) -> None:
        """Keeps the finished request's KV (prompt + fed-back tokens) in a pool entry for a later prompt."""
        if not self.pool or not req.reusable or req.kv_len < len(req.ids):
            return
        import torch

        length = req.kv_len
        fed = req.tokens[: length - len(req.ids)]  # the last token emitted has no KV yet
        ids = torch.cat([req.ids, torch.tensor(fed, dtype=req.ids.dtype)]) if fed else req.ids
        entry = self.pool.store(ids, req.media)
        if entry is None:
            return
        try:
            # Exactly this entry's tokens, allocated now: memory is taken only by what is kept, and evicting the
            # entry (or dropping the pool under memory pressure) gives it back.
            _, heads, _, dim = self.shape
            kv = torch.empty(len(self.layers), 2, heads, length, dim, dtype=self.dtype, device=self.device)
            for layer, pair in enumerate(self.layers):
                for half, flat in enumerate(pair):
                    kv[layer, half].copy_(self.view(flat)[slot, :, :length])
            entry.kv = kv
        except Exception as exc:  # e.g. out of memory: a lost entry costs a full prefill later, nothing else
            log.warning("could not keep a finished request's KV: %r", exc)
            self.pool.forget(entry)

    def entries(self) -> tuple[Entry, ...]:
        """The retained prefixes now (read-only: a snapshot of the pool's entries)."""
        return tuple(self.pool.entries)

    def forget_prefixes(self) -> None:
        self.pool.clear()

    def relieve_memory(self) -> None:
        """A prefill ran out of memory: drops the retained entries and the allocator's cached blocks."""
        log.warning("a prefill ran out of memory: dropping %d retained prefixes and retrying", len(self.pool.entries))
        self.pool.clear()
        if str(self.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def free(self) -> None:
        self.layers = []
