"""The vision tower fed with inputs computed on the CPU gives the same features, and nothing reroutes it off CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.kernels import vision
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

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


def test_packed_attention_routes_each_images_patches_among_themselves(tiny_loaded, monkeypatch, tmp_path) -> None:
    """The route's tensor layouts, checked on CPU: torch's varlen flash kernel (CUDA only; its features matched SDPA's
    exactly on an H100, `git show 0ad4f07^:bench/ttft_probe.py`) stands in as per-segment SDPA over the same boundaries, for a message
    with two images of different sizes."""
    import torch.nn.functional as F

    calls = []

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # [T, heads, D] each
        calls.append((tuple(q.shape), cu_q.tolist(), max_q))
        bounds = cu_q.tolist()
        outs = [
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(outs)

    from PIL import Image

    paths = []
    for i, size in enumerate(((320, 240), (160, 480))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(paths[-1])
    prompt = build_prompt(tiny_loaded, ChatRequest(UserMessage("Compare.", tuple(paths)), sampling=SamplingParams()))
    model = tiny_loaded.model.model
    pixels, grid = prompt.inputs["pixel_values"], prompt.inputs["image_grid_thw"]
    assert len(grid) == 2 and grid[0].tolist() != grid[1].tolist()
    with torch.inference_mode():
        own = torch.cat(model.get_image_features(pixels, grid, return_dict=True).pooler_output)
    monkeypatch.setattr(vision, "flash_varlen", reference_varlen)
    monkeypatch.setattr(vision, "packed_attention_blocker", lambda device, dtype: None)  # as on a GPU in bf16
    restore = vision.use_packed_vision_attention(model.visual)
    try:
        assert model.visual.config._attn_implementation == vision.PACKED_VISION_ATTENTION
        with torch.inference_mode():
            routed = model.get_image_features(
                pixels, grid, return_dict=True, **vision.vision_kwargs(model.visual, grid, "cpu")
            )
    finally:
        restore()
    assert model.visual.config._attn_implementation == "sdpa"
    depth = len(model.visual.blocks)
    bounds = [0, *torch.cumsum(grid.prod(-1), 0).tolist()]
    assert len(calls) == depth and all(c[1] == bounds and c[2] == max(grid.prod(-1).tolist()) for c in calls)
    torch.testing.assert_close(torch.cat(routed.pooler_output), own, rtol=1e-5, atol=1e-5)
