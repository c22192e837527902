"""Benchmarking only: a Qwen3-VL of a preset's architecture with random weights, built in memory (no download).

`python app.py --random-weights 4b` serves the real Qwen3-VL-4B architecture (same FLOPs and bytes per token
as the checkpoint) through every layer of the app, in about a second instead of a 9 GB download or 8 GB
written to disk. The tokenizer and processor are the tiny generator's (`tiny_model.build_tokenizer`).

Random logits over the 4B vocabulary would pick ids the tiny tokenizer cannot decode (empty answers) and,
now and then, an end-of-turn token. So the output layer gets a bias that leaves only "words": tokens that
decode to a space and letters and encode back to themselves. Any run of them decodes to text that the same
tokenizer splits back into exactly those tokens, so a client can count an answer's tokens from its text,
and no answer ends before its max new tokens.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwen3vl_webui import precisions

if TYPE_CHECKING:
    from qwen3vl_webui.weights.model import LoadedModel

PREFIX = "random-weights:"
# Far below any logit the random weights give (|logit| ~ a few), finite so penalties and softmax stay NaN-free.
_MASK = -1.0e4
NOTICE = (
    "⚠️ **Benchmarking only: random weights** (`--random-weights {preset}`): the Qwen3-VL {arch} "
    "architecture with random weights, so every answer is random words. Speed and memory are real; answers are not."
)
_ARCH = {"4b": "4B (Qwen3-VL-4B-Instruct)", "tiny": "tiny test"}


def source_for(preset: str) -> str:
    """The model 'source' the manager passes to the loader for `--random-weights preset`."""
    return PREFIX + preset


def is_random_source(source: str) -> bool:
    return source.startswith(PREFIX)


def notice(source: str) -> str:
    preset = source.removeprefix(PREFIX)
    return NOTICE.format(preset=preset, arch=_ARCH.get(preset, preset))


def word_token_ids(tokenizer: Any) -> list[int]:
    """Ids that decode to ' ' + letters and encode back to themselves (never a special or end-of-turn token)."""
    specials = set(tokenizer.all_special_ids)
    words = []
    for i in range(len(tokenizer)):
        if i in specials:
            continue
        text = tokenizer.decode([i])
        if re.fullmatch(r" [A-Za-z]+", text) and tokenizer.encode(text, add_special_tokens=False) == [i]:
            words.append(i)
    return words


def build_front(source: str) -> tuple[Any, Any]:
    """(processor, config) of a `random-weights:PRESET` source, without weights: what an engine process's front end
    needs (the engine process builds the same weights from the same seed)."""
    from qwen3vl_webui.weights.tiny_model import PRESETS, build_config, build_processor, build_tokenizer

    preset = source.removeprefix(PREFIX)
    if preset not in PRESETS:
        raise ValueError(f"unknown random-weights preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    tokenizer = build_tokenizer()
    return build_processor(tokenizer), build_config(preset, tokenizer)


def build(
    preset: str, dtype: Any, device: str, attn: str = "sdpa", seed: int = 0, tokenizer_only: bool = False
) -> tuple[Any, Any]:
    """(model, processor): random weights of `preset` on `device`, output restricted to word tokens (`tokenizer_only`:
    the processor is a `TokenizerOnly`, as `load_model` gives the engine process)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from qwen3vl_webui.weights.model import TokenizerOnly
    from qwen3vl_webui.weights.tiny_model import PRESETS, build_config, build_processor, build_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"unknown random-weights preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    tokenizer = build_tokenizer()
    processor = TokenizerOnly(tokenizer) if tokenizer_only else build_processor(tokenizer)
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: ~0.5 s for 4B on an H100 instead of minutes on CPU
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    with torch.no_grad():
        head = model.lm_head
        if not config.tie_word_embeddings:
            head.weight.normal_(0, 0.5)  # as tiny_model does: a wider spread makes sampled output vary
        bias = torch.full((head.out_features,), _MASK, dtype=head.weight.dtype, device=head.weight.device)
        bias[word_token_ids(tokenizer)] = 0
        head.bias = torch.nn.Parameter(bias, requires_grad=False)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos[1]
    model.generation_config.do_sample = False
    return model.eval(), processor


def load_random(
    source: str,
    precision: str,
    device: str,
    attn: str = "sdpa",
    progress: Callable[[str], None] | None = None,
    tokenizer_only: bool = False,
) -> LoadedModel:
    """The loader's path for a `random-weights:PRESET` source: a LoadedModel like `load_model`'s."""
    from qwen3vl_webui.weights.model import LoadRefused, compute_dtype, loaded

    if precision not in precisions.IN_MEMORY:
        raise LoadRefused(
            f"--random-weights offers {', '.join(precisions.IN_MEMORY)} (built in memory), not {precision}."
        )
    preset = source.removeprefix(PREFIX)
    if progress:
        progress(f"Building RANDOM weights of the {preset} architecture in {precisions.label(precision)} on {device}…")
    started = time.perf_counter()
    from qwen3vl_webui.weights import quantize

    quantize.check_device(precision, device)
    model, processor = build(preset, compute_dtype(precision, device), device, attn, tokenizer_only=tokenizer_only)
    quantize.quantize(model, precision, device)  # as the loader does for a checkpoint
    return loaded(model.eval(), processor, precision, device, source, started, is_demo=False)
