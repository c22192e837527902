"""The vision tower fed with inputs computed on the CPU gives the same features, and nothing reroutes it off CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine import vision
from qwen3vl_webui.engine.generation import ChatRequest, SamplingParams, build_prompt

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_precomputed_grid_inputs_give_the_towers_own_features(tiny_loaded) -> None:
    prompt = build_prompt(
        tiny_loaded,
        ChatRequest(UserMessage("Describe.", (str(ASSETS / "example.png"),)), sampling=SamplingParams()),
    )
    model = tiny_loaded.model.model
    pixels, grid = prompt.inputs["pixel_values"], prompt.inputs["image_grid_thw"]
    extra = vision.vision_kwargs(model.visual, grid, "cpu")
    assert set(extra) == {"interp_indices", "interp_weights", "position_ids", "cu_seqlens", "max_seqlen"}
    assert extra["max_seqlen"] == int(grid[0].prod())  # one image: all its patches attend to each other
    with torch.inference_mode():
        own = model.get_image_features(pixels, grid, return_dict=True)
        fed = model.get_image_features(pixels, grid, return_dict=True, **extra)
    assert torch.equal(torch.cat(own.pooler_output), torch.cat(fed.pooler_output))
    for a, b in zip(own.deepstack_features, fed.deepstack_features, strict=True):
        assert torch.equal(torch.cat(a), torch.cat(b))


def test_packed_attention_is_only_routed_on_cuda_in_16_bit(tiny_loaded) -> None:
    visual = tiny_loaded.model.model.visual
    before = visual.config._attn_implementation
    restore = vision.use_packed_vision_attention(visual)  # fp32 on CPU: left alone
    assert visual.config._attn_implementation == before
    restore()
    assert vision.packed_attention_blocker("cpu", torch.bfloat16) == "not on CUDA"
    assert "not bf16/fp16" in vision.packed_attention_blocker("cuda:0", torch.float32)
