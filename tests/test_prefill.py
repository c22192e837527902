"""A prompt chunk through engine/batch/prefill.py gives what the model's own forward gives, bitwise, cache and all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import prefill
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class _VisualFeatures:
    """What Qwen3VLModel.forward reads from a precomputed `mm_encoder_outputs` entry (per medium: a tuple)."""

    pooler_output: tuple[Any, ...]
    deepstack_features: list[tuple[Any, ...]]


def _reference(model, ids, positions, cuts, features=None):
    """Qwen3VLModel.forward chunk by chunk into a DynamicCache (the engine's former prefill): per chunk the last
    normed hidden state, and the whole cache as [T, layers, 2, kv_heads, dim]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    image = ids[0] == model.config.image_token_id
    hidden = []
    for start, end in zip(cuts, cuts[1:]):
        visual = {}
        if features is not None:
            lo, count = int(image[:start].sum()), int(image[start:end].sum())
            if count:
                embeds, deepstack = features
                visual["image"] = _VisualFeatures((embeds[lo : lo + count],), [(f[lo : lo + count],) for f in deepstack])
        out = model(
            input_ids=ids[:, start:end], position_ids=positions[:, :, start:end], past_key_values=cache,
            use_cache=True, mm_encoder_outputs=visual,
        )  # fmt: skip
        hidden.append(out.last_hidden_state[:, -1])
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # [layers, 2, h, T, d]
    return hidden, kv.permute(3, 0, 1, 2, 4)


def _chunked(model, ids, positions, cuts, features=None):
    """The same through prefill.media_inputs + prefill.chunk_forward."""
    lm = model.language_model
    text = model.config.text_config
    layers = len(model.visual.deepstack_visual_indexes) if hasattr(model.visual, "deepstack_visual_indexes") else 0
    image = ids[0] == model.config.image_token_id
    kv = torch.zeros(0, text.num_hidden_layers, 2, text.num_key_value_heads, text.head_dim)
    hidden = []
    for start, end in zip(cuts, cuts[1:]):
        pieces = []
        if features is not None:
            where = torch.nonzero(image[start:end]).view(-1)
            lo = int(image[:start].sum())
            if len(where):
                embeds, deepstack = features
                stacked = torch.stack(deepstack)
                pieces.append((where, embeds[lo : lo + len(where)], stacked[:, lo : lo + len(where)]))
        embeds, dense = prefill.media_inputs(lm.embed_tokens(ids[:, start:end]), layers, pieces)
        normed, new = prefill.chunk_forward(lm, embeds, positions[:, :, start:end], kv, dense)
        kv = torch.cat([kv, new])
        hidden.append(normed[:, -1])
    return hidden, kv


def _positions(tiny_loaded, prompt):
    inputs = prompt.inputs
    ids = inputs["input_ids"]
    text = torch.arange(ids.shape[1]).view(1, 1, -1)
    if inputs.get("image_grid_thw") is None:
        return torch.cat([text, text.expand(3, 1, -1)])
    vis, _ = tiny_loaded.model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    return torch.cat([text, vis])


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_chunks_equal_the_models_forward_bitwise(tiny_loaded, image) -> None:
    media = (str(ASSETS / "example.png"),) if image else ()
    prompt = build_prompt(
        tiny_loaded, ChatRequest(UserMessage("Describe this, in a few words. " * 3, media), sampling=SamplingParams())
    )
    model = tiny_loaded.model.model
    ids = prompt.inputs["input_ids"]
    positions = _positions(tiny_loaded, prompt)
    length = ids.shape[1]
    features = None
    if image:
        with torch.inference_mode():
            out = model.get_image_features(prompt.inputs["pixel_values"], prompt.inputs["image_grid_thw"], return_dict=True)
        features = (torch.cat(out.pooler_output), [torch.cat(f) for f in out.deepstack_features])
        placeholders = torch.nonzero(ids[0] == model.config.image_token_id).view(-1)
        middle = int(placeholders[len(placeholders) // 2])  # a cut inside the image: its features span two chunks
        cuts = [0, middle, length - 1, length]  # and a 1-token last chunk
    else:
        cuts = [0, length // 3, length]
    with torch.inference_mode():
        want_hidden, want_kv = _reference(model, ids, positions, cuts, features)
        got_hidden, got_kv = _chunked(model, ids, positions, cuts, features)
    assert got_kv.shape == want_kv.shape == (length, *got_kv.shape[1:])
    assert torch.equal(got_kv, want_kv)
    for got, want in zip(got_hidden, want_hidden, strict=True):
        assert torch.equal(got, want)


def test_causal_mask_is_bottom_right_aligned() -> None:
    assert prefill.causal_mask(0, 4, "cpu") is None  # SDPA's own causal flag
    assert prefill.causal_mask(4, 1, "cpu") is None  # one query sees every key
    mask = prefill.causal_mask(3, 2, "cpu")[0, 0]
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert prefill.compiles(0, 2) and prefill.compiles(5, 7)
    assert not prefill.compiles(0, 1) and not prefill.compiles(1, 5)  # sizes dynamo specialises: eager
