"""Memory and token arithmetic for Qwen3-VL: weights by precision, KV cache per token, visual tokens."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

from qwen3vl_webui.precisions import LOADED
from qwen3vl_webui.vision_rules import rules

GIB = 1024**3

# Bytes per quantized parameter, from bitsandbytes 0.50.2 (bitsandbytes/functional.py,
# quantize_4bit / quantize_blockwise; nn/modules.py, Params4bit / Int8Params):
# - nf4: two 4-bit codes per uint8 byte, plus one absmax per block of 64 weights (the
#   Params4bit default blocksize). Without double quant absmax is fp32 (4 B / 64 weights).
#   With double quant (compress_statistics) absmax becomes uint8 (1 B / 64), and the fp32
#   absmax of that second quantization has one value per 256 absmax values (4 B / 16,384
#   weights): 0.5 + 1/64 + 4/16384 B = 0.127 bits of overhead per weight. The per-tensor
#   constants (16-entry nf4 code, 256-entry fp32 code of state2, the fp32 offset) are
#   about 1 KiB per Linear and ignored.
# - LLM.int8: int8 weights (CB), plus one fp32 scale per output row (SCB).
# - int8wo (kernels/int8.py): the same layout, int8 weights plus one fp32 scale per output row.
# - int4 (kernels/int4.py, W4A16): 0.5 B per weight, plus a 16-bit scale and a uint8 zero point per group of 128.
# - fp8 (kernels/fp8.py): 1 B per weight, plus one fp32 scale per 128x128 block.
_NF4_BYTES = 0.5
_NF4_ABSMAX_BYTES = 4 / 64
_NF4_ABSMAX_BYTES_DQ = 1 / 64 + 4 / (64 * 256)
_W4_BYTES = 0.5 + 3 / 128
_FP8_BYTES = 1 + 4 / (128 * 128)

# Qwen3-VL-4B-Instruct's preprocessor_config.json / video_preprocessor_config.json.
IMAGE_MIN_PIXELS = 65536
VIDEO_MIN_PIXELS = 4096
VIDEO_MAX_PIXELS = 25165824  # the whole clip's budget, summed over frames


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a Qwen3-VL checkpoint."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    quantizable_params: int  # weights of the language model's nn.Linear layers (bnb replaces these)
    other_params: int  # embeddings, norms, biases, vision tower, an untied lm_head: kept 16-bit
    patch_size: int = 16
    spatial_merge: int = 2
    temporal_patch: int = 2
    # Sum of out_features over the quantizable Linears: LLM.int8 keeps one fp32 scale per row.
    # 0 means unknown; weight_bytes then estimates it as quantizable_params / hidden_size.
    quantizable_rows: int = 0

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Count parameters of a transformers `Qwen3VLConfig` by building it on the meta device."""
        import torch
        import transformers

        config = copy.deepcopy(config)  # _from_config records attention choices on the config
        with torch.device("meta"):
            model = transformers.Qwen3VLForConditionalGeneration._from_config(config)
        quantizable_ids: set[int] = set()
        rows = 0
        for name, module in model.named_modules():
            # Mirrors the skip list ["model.visual", "lm_head"]: only decoder Linears get bnb.
            if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model."):
                if id(module.weight) not in quantizable_ids:
                    quantizable_ids.add(id(module.weight))
                    rows += module.out_features
        quantizable = other = 0
        # named_parameters() drops duplicates, so a tied lm_head counts once (as the embedding).
        for _, param in model.named_parameters():
            if id(param) in quantizable_ids:
                quantizable += param.numel()
            else:
                other += param.numel()
        text, vision = config.text_config, config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            quantizable_params=quantizable,
            other_params=other,
            patch_size=vision.patch_size,
            spatial_merge=vision.spatial_merge_size,
            temporal_patch=vision.temporal_patch_size,
            quantizable_rows=rows,
        )

    @classmethod
    def qwen3vl_4b(cls) -> ModelShape:
        """Qwen3-VL-4B-Instruct, counted by formula from its config.json (see _qwen3vl_params)."""
        quantizable, other, rows = _qwen3vl_params(
            hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8, head_dim=128,
            vocab=151936, tied=True, v_depth=24, v_hidden=1024, v_intermediate=4096, patch=16,
            temporal=2, merge=2, v_out=2560, v_positions=2304, deepstack=3,
        )  # fmt: skip
        return cls(
            num_layers=36,
            num_kv_heads=8,
            head_dim=128,
            hidden_size=2560,
            vocab_size=151936,
            quantizable_params=quantizable,  # 3,633,315,840
            other_params=other,  # 804,499,968
            quantizable_rows=rows,  # 1,105,920
        )


def _qwen3vl_params(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
    vocab: int, tied: bool, v_depth: int, v_hidden: int, v_intermediate: int, patch: int,
    temporal: int, merge: int, v_out: int, v_positions: int, deepstack: int,
) -> tuple[int, int, int]:  # fmt: skip
    """(quantizable, other, quantizable_rows) for a Qwen3-VL dense model.

    Layout read from transformers 5.23 models/qwen3_vl/modeling_qwen3_vl.py:
    decoder layer = q/k/v/o projections without bias, q_norm and k_norm (RMSNorm over
    head_dim), SwiGLU MLP (gate, up, down; no bias), two RMSNorms over hidden; a final
    RMSNorm. Vision tower = Conv3d patch embedding (with bias), learned position
    embedding, `depth` blocks (two LayerNorms with bias, fused qkv and proj with bias,
    fc1/fc2 MLP with bias), one patch merger (LayerNorm over v_hidden, then two Linears
    from v_hidden*merge^2) and `deepstack` mergers that normalise after the shuffle
    (LayerNorm over v_hidden*merge^2).
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    linear_per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate
    rows_per_layer = q + 2 * kv + hidden + 2 * intermediate + hidden
    norms_per_layer = 2 * hidden + 2 * head_dim
    text_other = vocab * hidden + layers * norms_per_layer + hidden
    if not tied:
        text_other += vocab * hidden  # a separate lm_head, kept 16-bit by the skip list

    def linear(i: int, o: int) -> int:
        return i * o + o

    block = (
        2 * 2 * v_hidden  # norm1, norm2 (weight + bias)
        + linear(v_hidden, 3 * v_hidden)  # fused qkv
        + linear(v_hidden, v_hidden)  # proj
        + linear(v_hidden, v_intermediate)
        + linear(v_intermediate, v_hidden)
    )
    merged = v_hidden * merge * merge
    merger_linears = linear(merged, merged) + linear(merged, v_out)
    vision = (
        3 * temporal * patch * patch * v_hidden + v_hidden  # Conv3d patch embedding
        + v_positions * v_hidden
        + v_depth * block
        + 2 * v_hidden + merger_linears  # final merger, norm before the shuffle
        + deepstack * (2 * merged + merger_linears)  # deepstack mergers, norm after it
    )  # fmt: skip
    return layers * linear_per_layer, text_other + vision, layers * rows_per_layer


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token per sequence: layers x KV heads x head_dim x (K and V)."""
    return shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * dtype_bytes


def _check_precision(precision: str) -> None:
    if precision not in LOADED:
        raise ValueError(f"precision must be one of {', '.join(LOADED)}; got {precision!r}")


def weight_bytes(shape: ModelShape, precision: str, *, double_quant: bool = True) -> int:
    """Bytes of the loaded weights, assuming the skip list ["model.visual", "lm_head"].

    `double_quant` only matters for int4-bnb (bnb_4bit_use_double_quant; transformers defaults
    it to False, so pass False to match a plain BitsAndBytesConfig).
    """
    _check_precision(precision)
    q, other = shape.quantizable_params, shape.other_params
    if precision == "fp32":
        return 4 * (q + other)
    if precision in ("bf16", "fp16"):
        return 2 * (q + other)
    if precision in ("int8", "int8wo"):
        rows = shape.quantizable_rows or q // shape.hidden_size
        return q + 4 * rows + 2 * other
    if precision == "int4":
        # kernels/w4_mma.py's layout (the loader's on a GPU that runs it, unless QWEN3VL_INT4_MMA=0): the words
        # repacked in place, and a 4-byte scale-and-zero entry a group of 128 beside the scales and zeros (counted
        # wherever it is not turned off: a GPU without NVRTC keeps 0.1 GiB spare)
        repacked = math.ceil(q * 4 / 128) if os.environ.get("QWEN3VL_INT4_MMA", "").strip() != "0" else 0
        return math.ceil(q * _W4_BYTES) + repacked + 2 * other
    if precision == "fp8":
        return math.ceil(q * _FP8_BYTES) + 2 * other
    absmax = _NF4_ABSMAX_BYTES_DQ if double_quant else _NF4_ABSMAX_BYTES
    return math.ceil(q * (_NF4_BYTES + absmax)) + 2 * other


def image_tokens(
    width: int,
    height: int,
    max_pixels: int,
    shape: ModelShape,
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
) -> int:
    """Visual tokens of one image after the processor's resize (placeholders excluded).

    The processor's resize is qwen-vl-utils' `smart_resize` (transformers' Qwen2-VL image processor has the same rule):
    sides rounded to the merged patch (32 px), then scaled into [min_pixels, max_pixels] keeping the aspect ratio.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    factor = shape.patch_size * shape.spatial_merge
    h, w = rules().smart_resize(height, width, factor, min_pixels, max_pixels)
    return (h // factor) * (w // factor)


def video_tokens(
    frames: int,
    width: int,
    height: int,
    shape: ModelShape,
    *,
    max_pixels: int = VIDEO_MAX_PIXELS,
    min_pixels: int = VIDEO_MIN_PIXELS,
) -> int:
    """Visual tokens of a clip of `frames` sampled frames (timestamps and placeholders excluded).

    `max_pixels`/`min_pixels` are the video processor's size["longest_edge"/"shortest_edge"],
    a budget for the whole clip; the defaults are Qwen3-VL-4B's.
    """
    if frames < 1 or width < 1 or height < 1:
        raise ValueError(f"need frames >= 1 and a positive size, got {frames} x {width}x{height}")
    factor = shape.patch_size * shape.spatial_merge
    t = shape.temporal_patch
    # transformers refuses clips shorter than one temporal patch; the model would see the
    # frame repeated to fill it, so count such a clip as a full patch.
    frames = max(frames, t)
    groups = -(-frames // t)  # the processor pads the clip to whole temporal patches
    h, w = _clip_resize(frames, height, width, factor, t, min_pixels, max_pixels)
    return groups * (h // factor) * (w // factor)


def _clip_resize(
    frames: int, height: int, width: int, factor: int, temporal: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The frame size transformers' Qwen3-VL video processor gives a clip (qwen3_vl/video_processing_qwen3_vl.py
    `smart_resize`), with qwen-vl-utils' rounding helpers.

    Not qwen-vl-utils' own `smart_resize`: this processor's pixel budget covers the whole clip (the frame count
    rounded to the temporal patch decides whether it is exceeded, the raw count how far to scale), where qwen-vl-utils
    budgets each frame inside `fetch_video`, which reads the file itself. Sides below `factor` are scaled up first.
    Note `round` is Python's half-to-even, as there: 720 / 32 = 22.5 rounds to 22 (704 px).
    """
    r = rules()
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > r.MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {r.MAX_RATIO}, got {width}x{height}")
    h_bar, w_bar = r.round_by_factor(height, factor), r.round_by_factor(width, factor)
    t_bar = r.round_by_factor(frames, temporal)
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width * frames / max_pixels)
        h_bar = max(factor, r.floor_by_factor(height / beta, factor))
        w_bar = max(factor, r.floor_by_factor(width / beta, factor))
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width * frames))
        h_bar, w_bar = r.ceil_by_factor(height * beta, factor), r.ceil_by_factor(width * beta, factor)
    return h_bar, w_bar
