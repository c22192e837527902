"""Start-up warm-up: the worst case the sliders allow, run for real; max context is lowered until it fits.

"full" (the default on a GPU): `concurrency` prompts at once, each a largest-allowed image plus text
filling max context, each generating two tokens; that is the prefill activations and the whole KV
cache of every slot at the same moment. On a CUDA OOM the context is halved and the pass repeated.
"quick" (the default on a CPU): one short text + small image turn, to load kernels and warm caches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwen3vl_webui.engine.faults import FaultInjector, is_out_of_memory
from qwen3vl_webui.engine.generate import stream_generate
from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
from qwen3vl_webui.telemetry import format_bytes
from qwen3vl_webui.weights.model import LoadedModel

# The decoder's `stream` (generate per request, or the batch engine): the warm-up must measure the
# path chats take, since the batch engine's KV cache is allocated up front and generate's grows.
StreamFn = Callable[..., Any]

MIN_CONTEXT = 1024
# Why a decoder with `warmup_chats` runs fewer worst-case chats than the concurrency (the status line says it).
PEAK_REASON = "every chat's KV cache is reserved at start, and long prompts prefill one per forward"
_NEW_TOKENS = 2
_QUICK_IMAGE = (64, 64)


@dataclass(frozen=True)
class WarmupResult:
    mode: str
    max_context: int  # the cap that passed (or the last one tried, when failed)
    max_new_tokens: int
    tried: tuple[int, ...]
    seconds: float
    peak_bytes: int | None  # CUDA only
    failed: bool
    note: str  # one sentence for the status line


def resolve_mode(mode: str, device: str) -> str:
    if mode == "auto":
        return "full" if device.startswith("cuda") else "quick"
    return mode


def run(
    loaded: LoadedModel,
    mode: str,
    max_context: int,
    max_new_tokens: int,
    concurrency: int,
    image_pixels: int,
    faults: FaultInjector | None = None,
    release_memory: Callable[[], None] | None = None,
    stream: StreamFn = stream_generate,
    peak_chats: int | None = None,
) -> WarmupResult:
    """Runs the warm-up (the caller holds the scheduler's exclusive section).

    `peak_chats`: how many worst-case chats at once reach the decoder's memory peak, where fewer than `concurrency`
    do (the batch engine: `BatchDecoder.warmup_chats`); None runs all `concurrency` of them (generate, whose KV
    cache grows with each chat)."""
    started = time.perf_counter()
    if mode == "quick":
        _generate_all(loaded, [_prompt(loaded, _QUICK_IMAGE[0] * _QUICK_IMAGE[1], "Hello.", None)], faults, stream)
        seconds = time.perf_counter() - started
        note = f"warm-up done in {seconds:.1f} s (short text + image turn)"
        return WarmupResult(mode, max_context, max_new_tokens, (max_context,), seconds, None, False, note)

    running = concurrency if peak_chats is None else max(1, min(concurrency, peak_chats))
    ran = "" if running == concurrency else f" ({running} of them run: {PEAK_REASON})"
    floor = min(MIN_CONTEXT, max_context)
    context, tried = max_context, []
    while True:
        tried.append(context)
        try:
            peak = _worst_case(loaded, context, running, image_pixels, faults, stream)
            break
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            del exc
            if release_memory is not None:
                release_memory()
            if context <= floor:
                seconds = time.perf_counter() - started
                note = (
                    f"Warm-up: even {context:,} tokens × {concurrency} concurrent chat(s) ran out of GPU memory, "
                    "so chats are refused. Restart with a lower --max-concurrency or --precision int4."
                )
                return WarmupResult(mode, context, min(max_new_tokens, context // 2), tuple(tried), seconds, None, True, note)
            context = max(floor, context // 2 // 256 * 256)
    seconds = time.perf_counter() - started
    peak_text = f", peak {format_bytes(peak)}" if peak is not None else ""
    if context < max_context:
        new_tokens = min(max_new_tokens, context // 2)
        note = (
            f"Warm-up: {max_context:,}-token context × {concurrency} concurrent did not fit in GPU memory; "
            f"max context lowered to {context:,} (max new tokens {new_tokens:,}){peak_text}."
        )
        return WarmupResult(mode, context, new_tokens, tuple(tried), seconds, peak, False, note)
    note = (
        f"warm-up passed at the worst case: {context:,} tokens × {concurrency} concurrent{ran} in {seconds:.1f} s"
        f"{peak_text}"
    )
    return WarmupResult(mode, context, max_new_tokens, tuple(tried), seconds, peak, False, note)


def _worst_case(
    loaded: LoadedModel, context: int, concurrency: int, image_pixels: int, faults: FaultInjector | None,
    stream: StreamFn,
) -> int | None:  # fmt: skip
    import torch

    # The peak is this process's: with the engine in its own process (no model here) it is not measured, and CUDA
    # must not be touched from the front end (a context of its own would cost ~500 MiB of the GPU).
    cuda = loaded.device.startswith("cuda") and loaded.model is not None
    prompt = _prompt(loaded, image_pixels, "Describe this image in detail.", context - _NEW_TOKENS)
    if cuda:
        torch.cuda.synchronize(loaded.device)
        torch.cuda.reset_peak_memory_stats(loaded.device)
    _generate_all(loaded, [prompt] * concurrency, faults, stream)
    return int(torch.cuda.max_memory_allocated(loaded.device)) if cuda else None


def _generate_all(
    loaded: LoadedModel, prompts: list[PreparedPrompt], faults: FaultInjector | None, stream: StreamFn
) -> None:
    """Runs the prompts at the same time, as concurrent chats would; re-raises the first failure."""
    errors: list[BaseException] = []
    sampling = SamplingParams(max_new_tokens=_NEW_TOKENS, temperature=0.0)

    def one(prompt: PreparedPrompt) -> None:
        try:
            for _ in stream(loaded, prompt, sampling, threading.Event(), None, faults):
                pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,), name="warm-up", daemon=True) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        oom = [e for e in errors if is_out_of_memory(e)]
        raise (oom or errors)[0]


def _prompt(loaded: LoadedModel, image_pixels: int, text: str, total_tokens: int | None) -> PreparedPrompt:
    """A chat prompt with one image of `image_pixels` (16:9) and, if given, text filler up to `total_tokens`."""
    from PIL import Image

    width = max(32, int((image_pixels * 16 / 9) ** 0.5))
    height = max(32, int(width * 9 / 16))
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    inputs = _encode(loaded, image, text, image_pixels)
    if total_tokens is not None and inputs["input_ids"].shape[1] > total_tokens // 2:
        inputs = _encode(loaded, None, text, image_pixels)  # the image alone would not leave room for text
    if total_tokens is not None:
        inputs = _fill(loaded, inputs, total_tokens)
    ids = inputs["input_ids"][0]
    config = loaded.config
    image_tokens = int((ids == config.image_token_id).sum())
    return PreparedPrompt(inputs, int(ids.shape[0]), int(ids.shape[0]) - image_tokens, image_tokens, 0, 0)


def _encode(loaded: LoadedModel, image: Any, text: str, image_pixels: int) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image}] if image is not None else []
    content.append({"type": "text", "text": text})
    return loaded.processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
        processor_kwargs={"images_kwargs": {"size": {"longest_edge": image_pixels, "shortest_edge": 32 * 32}}},
    )


def _fill(loaded: LoadedModel, inputs: dict[str, Any], total: int) -> dict[str, Any]:
    """Inserts plain text tokens before the user turn's end so the prompt is exactly `total` tokens."""
    import torch

    ids = inputs["input_ids"]
    missing = total - ids.shape[1]
    if missing <= 0:
        return inputs
    tokenizer = loaded.processor.tokenizer
    filler = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    at = int((ids[0] == end).nonzero()[-1]) if (ids[0] == end).any() else ids.shape[1]
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == ids.shape:
            pad = filler if key == "input_ids" else (1 if key == "attention_mask" else 0)
            block = torch.full((1, missing), pad, dtype=value.dtype)
            out[key] = torch.cat([value[:, :at], block, value[:, at:]], dim=1)
    return out
