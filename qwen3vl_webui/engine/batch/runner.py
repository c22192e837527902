"""The batch engine's model calls: the decode step's forward, prompt prefill (text chunks, batched short texts, the
vision tower). It holds the tensors of prompts being prefilled; it never touches queues or decides what runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3vl_webui.engine.batch import prefill
from qwen3vl_webui.engine.batch.kv import LayerKV, SlotKV
from qwen3vl_webui.engine.batch.scheduler import PrefillJob, PrefillPlan
from qwen3vl_webui.engine.batch.transfer import to_device
from qwen3vl_webui.kernels import vision
from qwen3vl_webui.weights.model import LoadedModel


@dataclass(frozen=True)
class Prefilled:
    """A prompt whose last piece ran: its KV per layer, its rope delta, the logits of its first answer token."""

    layer_kv: LayerKV
    delta: int
    logits: Any  # [1, vocab]


@dataclass(eq=False)
class _PromptTensors:
    kv: Any = None  # the prompt's keys/values [length, layers, 2, kv_heads, head_dim], filled up to the job's `done`;
    # allocated at a prefix hit or when a first chunk leaves more to go (engine/batch/prefill.py's layout)
    ids: Any = None  # input ids on the device, once chunking started
    positions: Any = None  # [4, 1, length]: text row + the 3 mrope rows
    delta: int = 0
    media: dict[str, tuple[Any, Any]] | None = None  # per kind: merged embeddings, stacked deepstack features


class ModelRunner:
    """Runs the model for the engine: `forward(rows)` for a decode step, `prefill(plan)` for one prefill forward.

    `chunk_forward` (prefill.chunk_forward, or its compiled version) and `chunk_graphs` (first chunks replayed from
    CUDA graphs, or None) are how prompt chunks run; graphs.py sets them at start-up, tests may replace them.
    """

    def __init__(self, loaded: LoadedModel, kv: SlotKV, prefill_chunk: int) -> None:
        model = loaded.model
        self.loaded = loaded
        self.kv = kv
        self.device = loaded.device
        self.prefill_chunk = prefill_chunk
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.deepstack_layers = len(getattr(model.model.visual, "deepstack_visual_indexes", ()))
        self.decode_kernel = False  # decode attention reads each row's live length (set at start-up)
        self.chunk_forward: Callable[..., Any] = prefill.chunk_forward
        self.chunk_graphs: prefill.ChunkGraphs | None = None
        self.prefer_graphs = False  # a batch of short prompts mid-answer runs as graph replays (BatchOptions)
        self.prefill_tokens = 0  # prompt tokens run through prefill forwards (reused ones are not)
        # Prefill forwards by kind: batched (short texts, eager), graphed / eager / compiled (one prompt's chunk), tower.
        self.prefill_kinds: dict[str, int] = {}
        self._prompts: dict[int, _PromptTensors] = {}  # by request id

    # ------------------------------------------------------------------ decode

    def forward(self, rows: int) -> Any:
        """Logits [rows, vocab] of one decode step over slots [0, rows); only device ops (capturable)."""
        return self.decode(rows, self.kv)

    def decode(self, rows: int, kv: SlotKV) -> Any:
        """`forward` over the decode inputs of `kv` (the engine's, or their scratch twin while compiling)."""
        pos = kv.pos[:rows]
        rope = (pos + kv.delta[:rows]).view(1, rows, 1).expand(3, rows, 1)  # text: the 3 mrope axes agree
        mask = (kv.arange.view(1, -1) <= pos.view(-1, 1)).view(rows, 1, 1, kv.max_len)
        index = (kv.base[:rows] + pos.view(-1, 1)).view(-1)
        # The decode kernel reads each row's live length instead of the mask (compiled, the mask is dead code).
        lengths = {"kv_lengths": pos + 1} if self.decode_kernel else {}
        hidden = self.lm(
            input_ids=kv.ids[:rows],
            position_ids=rope,
            attention_mask=mask,
            past_key_values=kv.cache(rows, index),
            use_cache=True,
            **lengths,
        ).last_hidden_state
        return self.lm_head(hidden[:, -1])

    # ------------------------------------------------------------------ prefill

    def new_chunk_graphs(
        self, lengths: tuple[int, ...], kind: type[prefill.ChunkGraphs] = prefill.ChunkGraphs
    ) -> prefill.ChunkGraphs:
        """First-chunk graphs for this model at `lengths` (not captured yet)."""
        return kind(self.lm, lengths, self.deepstack_layers, self.kv.no_past.shape[1:])

    def adopt(self, job: PrefillJob, kv: Any) -> None:
        """A prompt KV already holding the job's reused prefix (a prefix hit)."""
        self._prompts[job.req.id] = _PromptTensors(kv=kv)

    def forget(self, job: PrefillJob) -> None:
        self._prompts.pop(job.req.id, None)

    def forget_all(self) -> None:
        self._prompts.clear()

    def prefill(self, plan: PrefillPlan) -> list[tuple[int, Prefilled | None]]:
        """One prefill forward: several short text prompts batched, or one prompt's next piece.

        Per job: (prompt tokens now in its KV, None while pieces are left, else its Prefilled).
        """
        job = plan.jobs[0]
        if len(plan.jobs) > 1 and plan.decoding and self.prefer_graphs and all(self.graphed(j.length) for j in plan.jobs):
            return self._prefill_replays(plan.jobs)
        if len(plan.jobs) > 1:
            self._count("batched")
            return self._prefill_texts(plan.jobs)
        state = self._prompts.setdefault(job.req.id, _PromptTensors())
        if job.multimodal and state.media is None and self._encode_media(job, state) and plan.tower_alone:
            self._count("tower")
            return [(job.done, None)]  # the vision tower was this turn's forward
        return [self._prefill_chunk(job, state)]

    def graphed(self, length: int) -> bool:
        """Whether a fresh prompt of `length` tokens runs as one first-chunk graph replay."""
        graphs = self.chunk_graphs
        return graphs is not None and length <= self.prefill_chunk and graphs.fits(0, length)

    def _prefill_replays(self, jobs: list[PrefillJob]) -> list[tuple[int, Prefilled | None]]:
        """Short text prompts one graph replay each: no Python launches for the decoding streams to wait on. The
        graphs share one output buffer, so each prompt's KV is copied into a tensor of its own before the next."""
        results = []
        for job in jobs:
            state = self._prompts.setdefault(job.req.id, _PromptTensors())
            state.kv = self.kv.prompt_kv(job.length)
            results.append(self._prefill_chunk(job, state))
        return results

    def _count(self, kind: str) -> None:
        self.prefill_kinds[kind] = self.prefill_kinds.get(kind, 0) + 1

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.loaded.model.config.get_text_config(decoder=True))

    def _prefill_texts(self, jobs: list[PrefillJob]) -> list[tuple[int, Prefilled | None]]:
        """Short text prompts in one right-padded batch through the model's own forward: one forward, eager."""
        import torch

        dev = self.device
        for j in jobs:  # a replay that ran out of memory may have left a prompt KV of its own: retried here instead
            self._prompts.pop(j.req.id, None)
        lengths = [j.length for j in jobs]
        width = max(lengths)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, j in enumerate(jobs):
            ids[row, : j.length] = j.req.prompt.inputs["input_ids"][0]
            mask[row, : j.length] = 1
        positions = torch.arange(width, device=dev).view(1, 1, -1).expand(4, len(jobs), -1)
        cache = self._new_cache()
        out = self.loaded.model.model(
            input_ids=to_device(ids, dev), attention_mask=to_device(mask, dev), position_ids=positions,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        self.prefill_tokens += sum(lengths)
        rows = torch.arange(len(jobs), device=dev)
        logits = self.lm_head(out.last_hidden_state[rows, to_device(torch.tensor(lengths), dev) - 1])

        def layer_kv(row: int, n: int) -> LayerKV:
            return lambda layer: (cache.layers[layer].keys[row, :, :n], cache.layers[layer].values[row, :, :n])

        return [(n, Prefilled(layer_kv(row, n), 0, logits[row : row + 1])) for row, n in enumerate(lengths)]

    def _prompt_positions(self, inputs: dict[str, Any]) -> tuple[Any, int]:
        """Position ids [4, 1, P] (text row + 3 mrope rows) as `generate` builds them, and the rope delta."""
        import torch

        ids = inputs["input_ids"]
        length = ids.shape[1]
        text = torch.arange(length, device=ids.device).view(1, 1, length)
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return torch.cat([text, text.expand(3, 1, length)]), 0
        vision_pos, deltas = self.loaded.model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
        )
        return torch.cat([text, vision_pos]), int(deltas.view(-1)[0])

    def _encode_media(self, job: PrefillJob, state: _PromptTensors) -> bool:
        """The prompt's mrope positions, and the vision tower over its media after the reused prefix (if any).

        Positions come from the whole prompt (a medium's rope positions depend on everything before it);
        returns whether the vision tower ran (not when every medium lies inside the reused prefix).
        """
        import torch

        dev = self.device
        inputs = job.req.prompt.inputs
        shapes = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
        # On the host, where the prompt is: transformers' rope index loops over the media with host reads, which on
        # the GPU would wait for the decode step in flight at each one. Then in through pinned memory, like the rest.
        positions, state.delta = self._prompt_positions({k: inputs[k] for k in shapes if inputs.get(k) is not None})
        state.positions = to_device(positions, dev)
        state.ids = to_device(inputs["input_ids"], dev)
        media = {}
        model = self.loaded.model.model
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):  # fmt: skip
            if inputs.get(pixels) is None:
                continue
            first_row, first = 0, 0
            if job.base:  # media after the reused prefix are the kind's last ones, in token order
                fresh = [m for m in job.req.media if m.kind == kind and m.start >= job.base]
                if not fresh:
                    continue
                first_row, first = fresh[0].rows[0], fresh[0].index
            # Grid-derived inputs from the CPU grid: the tower then never waits on the GPU (kernels/vision.py).
            extra = {  # on the host, then in pinned (a pageable copy in, even non_blocking, syncs the stream)
                k: to_device(v, dev) if isinstance(v, torch.Tensor) else v
                for k, v in vision.vision_kwargs(model.visual, inputs[grid][first:], "cpu").items()
            }
            grid_thw = inputs[grid][first:] if extra else to_device(inputs[grid][first:], dev)
            out = model.get_image_features(
                to_device(inputs[pixels][first_row:], dev), grid_thw, return_dict=True, **extra
            )  # videos: the same  # fmt: skip
            deepstack = torch.stack([torch.cat(f) for f in out.deepstack_features])  # [layers, tokens, hidden]
            media[kind] = (torch.cat(out.pooler_output), deepstack)
        state.media = media  # set last: a failed vision forward leaves the job to be retried whole
        return bool(media)

    def _prefill_chunk(self, job: PrefillJob, state: _PromptTensors) -> tuple[int, Prefilled | None]:
        """The next `prefill_chunk` prompt tokens, attending to the chunks before them (engine/batch/prefill.py)."""
        import torch

        dev = self.device
        if state.ids is None:  # a text prompt's first chunk
            state.ids = to_device(job.req.prompt.inputs["input_ids"], dev)
            state.positions = torch.arange(job.length, device=dev).view(1, 1, -1).expand(4, 1, -1)
        start, end = job.done, min(job.length, job.done + self.prefill_chunk)
        last = end == job.length
        if state.kv is None and not last:  # the whole prompt's KV, written chunk by chunk
            state.kv = self.kv.prompt_kv(job.length)
        no_past = self.kv.no_past
        past = no_past if start == 0 else state.kv[:start]
        out = None if state.kv is None else state.kv[start:end]
        pieces = []
        if state.media:
            config = self.loaded.model.config
            ids = job.req.prompt.inputs["input_ids"][0].numpy()  # numpy: torch CPU ops wake its intra-op pool
            for kind, token in (("image", config.image_token_id), ("video", config.video_token_id)):
                if kind not in state.media:
                    continue
                placeholders = ids == token  # features exist for those after the reused prefix only
                lo, where = int(placeholders[job.base : start].sum()), np.flatnonzero(placeholders[start:end])
                if len(where):
                    embeds, deepstack = state.media[kind]
                    pieces.append((to_device(where, self.device), embeds[lo : lo + len(where)], deepstack[:, lo : lo + len(where)]))  # fmt: skip
        embeds, deepstack = prefill.media_inputs(self.lm.embed_tokens(state.ids[:, start:end]), self.deepstack_layers, pieces)  # fmt: skip
        forward = self.chunk_forward if prefill.compiles(start, end - start) else prefill.chunk_forward
        # Contiguous positions: a text prompt's are an expanded view, an image prompt's not, and dynamo guards strides.
        positions = state.positions[:, :, start:end].contiguous()
        if self.chunk_graphs is not None and self.chunk_graphs.fits(start, end - start):
            # The graphs' output buffer, overwritten by the next replay: a prompt's last chunk is copied into its
            # slot at once (the engine's activation), an earlier one into the prompt's KV.
            self._count("graphed")
            hidden, kv = self.chunk_graphs.run(embeds, positions, deepstack)
        elif forward is prefill.chunk_forward:
            self._count("eager")
            hidden, kv = forward(self.lm, embeds, positions, past, deepstack, out)
        else:  # compiled: returns its own output (writing into `out` would be another graph)
            self._count("compiled")
            hidden, kv = forward(self.lm, embeds, positions, past, deepstack)
        if out is not None and kv is not out:
            out.copy_(kv)
        self.prefill_tokens += end - start
        if not last:
            return end, None
        if state.kv is not None:
            kv = state.kv
        del self._prompts[job.req.id]
        return end, Prefilled(_layer_view(kv, job.length), state.delta, self.lm_head(hidden[:, -1]))


def _layer_view(kv: Any, length: int) -> LayerKV:
    """Per-layer (keys, values) [kv_heads, length, head_dim] of a prompt KV in prefill's layout."""
    return lambda layer: (kv[:length, layer, 0].transpose(0, 1), kv[:length, layer, 1].transpose(0, 1))
