"""Tests for qwen3vl_webui.planner against measured weight sizes (H100) and transformers' own resize."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from qwen3vl_webui.planner import (
    GIB,
    ModelShape,
    image_tokens,
    kv_bytes_per_token,
    video_tokens,
    weight_bytes,
)
from qwen3vl_webui.precisions import LOADED as PRECISIONS

SHAPE = ModelShape.qwen3vl_4b()

# Qwen3-VL-4B-Instruct's config.json.
CONFIG_4B = {
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rope_theta": 5000000,
        "rope_scaling": {
            "rope_type": "default",
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 2560,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
        "hidden_act": "gelu_pytorch_tanh",
    },
    "tie_word_embeddings": True,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def test_kv_bytes_per_token_4b() -> None:
    assert kv_bytes_per_token(SHAPE) == 147456
    assert kv_bytes_per_token(SHAPE, dtype_bytes=4) == 2 * 147456


def test_weight_bytes_ordering_and_measurements() -> None:
    sizes = {p: weight_bytes(SHAPE, p) for p in PRECISIONS}
    assert sizes["int4-bnb"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert sizes["bf16"] == sizes["fp16"]
    # Measured on an H100 (random weights of the real architecture): bf16 8.32 GiB; nf4 with skip
    # ["model.visual", "lm_head"] 3.56 GiB.
    assert sizes["bf16"] / GIB == pytest.approx(8.32, rel=0.03)
    assert sizes["int4-bnb"] / GIB == pytest.approx(3.56, rel=0.10)
    # transformers' default BitsAndBytesConfig has no double quant; that run fits it closer.
    assert weight_bytes(SHAPE, "int4-bnb", double_quant=False) / GIB == pytest.approx(3.56, rel=0.05)


def test_weight_bytes_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="bf16, fp16, fp32, fp8, int8, int8wo, int4, int4-bnb"):
        weight_bytes(SHAPE, "int3")


def test_nf4_rate_matches_bitsandbytes() -> None:
    """Quantize one real decoder-sized weight with bnb on CPU and compare stored bytes."""
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1024, 2560, dtype=torch.bfloat16)
    one_linear = ModelShape(1, 1, 1, 2560, 1, quantizable_params=weight.numel(), other_params=0)
    for double_quant in (True, False):
        packed, state = functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
        )
        stored = [packed, state.absmax]
        if state.nested:
            stored += [state.state2.absmax]
        actual = sum(t.numel() * t.element_size() for t in stored)
        assert weight_bytes(one_linear, "int4-bnb", double_quant=double_quant) == pytest.approx(
            actual, abs=8
        )
    codes, scales, _ = functional.int8_vectorwise_quant(weight.half())
    one_linear = ModelShape(1, 1, 1, 2560, 1, weight.numel(), 0, quantizable_rows=1024)
    actual = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
    assert weight_bytes(one_linear, "int8") == actual


def test_qwen3vl_4b_param_split() -> None:
    assert SHAPE.quantizable_params == 3_633_315_840
    assert SHAPE.other_params == 804_499_968
    # Qwen3-VL-4B-Instruct: about 4.0 B language + 0.4 B vision parameters.
    assert (SHAPE.quantizable_params + SHAPE.other_params) / 1e9 == pytest.approx(4.44, abs=0.01)


def test_from_config_matches_formula() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLConfig(**CONFIG_4B)
    shape = ModelShape.from_config(config)
    assert shape.num_layers == SHAPE.num_layers
    assert shape.num_kv_heads == SHAPE.num_kv_heads
    assert shape.head_dim == SHAPE.head_dim
    assert shape.hidden_size == SHAPE.hidden_size
    assert shape.vocab_size == SHAPE.vocab_size
    assert (shape.patch_size, shape.spatial_merge, shape.temporal_patch) == (16, 2, 2)
    assert shape.quantizable_params == pytest.approx(SHAPE.quantizable_params, rel=0.01)
    assert shape.other_params == pytest.approx(SHAPE.other_params, rel=0.01)
    assert shape.quantizable_rows == SHAPE.quantizable_rows


def _sizes() -> list[tuple[int, int]]:
    sides = [1, 7, 31, 32, 48, 100, 224, 333, 480, 720, 1000, 1080, 1920, 2160, 3840, 5000]
    return [(w, h) for w, h in itertools.product(sides, sides) if max(w, h) / min(w, h) <= 200]


def test_image_tokens_match_smart_resize() -> None:
    qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for max_pixels in (256 * 32 * 32, 1280 * 32 * 32, 16777216):
        for width, height in _sizes():
            h, w = qwen2_vl.smart_resize(
                height, width, factor=32, min_pixels=65536, max_pixels=max_pixels
            )
            expected = (h // 32) * (w // 32)
            assert image_tokens(width, height, max_pixels, SHAPE) == expected, (
                width,
                height,
                max_pixels,
            )


def test_image_tokens_720p() -> None:
    assert image_tokens(1280, 720, 16777216, SHAPE) == pytest.approx(900, rel=0.05)
    with pytest.raises(ValueError):
        image_tokens(1000, 2, 16777216, SHAPE)  # aspect ratio over 200, as transformers refuses


def test_video_tokens_match_processor() -> None:
    video = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    sizes = {"shortest_edge": 4096, "longest_edge": 25165824}
    processor = video.Qwen3VLVideoProcessor(
        size=sizes, patch_size=16, temporal_patch_size=2, merge_size=2
    )
    for frames in (2, 3, 8, 9, 64, 128):
        for width, height in [(1280, 720), (640, 360), (1920, 1080), (31, 500), (3840, 2160)]:
            patches = processor.get_num_of_video_patches(frames, height, width, {"size": sizes})
            assert video_tokens(frames, width, height, SHAPE) == patches // 4, (
                frames,
                width,
                height,
            )


def test_video_tokens_rounding() -> None:
    # 720 / 32 = 22.5 rounds half-to-even to 22 rows of tokens, 1280 / 32 = 40 columns.
    assert video_tokens(8, 1280, 720, SHAPE) == 4 * 22 * 40
    assert video_tokens(1, 1280, 720, SHAPE) == video_tokens(2, 1280, 720, SHAPE)


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys\n"
        "from qwen3vl_webui import planner\n"
        "shape = planner.ModelShape.qwen3vl_4b()\n"
        "planner.weight_bytes(shape, 'int4'), planner.kv_bytes_per_token(shape)\n"
        "planner.image_tokens(640, 480, 16777216, shape), planner.video_tokens(8, 1280, 720, shape)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
