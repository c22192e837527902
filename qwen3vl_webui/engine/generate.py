"""The plain decode path: transformers' `generate` in a thread per request, streamed, with stop and cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from qwen3vl_webui.engine.faults import FaultInjector
from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
from qwen3vl_webui.engine.stops import StopMatcher, StopText, TokenBytes
from qwen3vl_webui.telemetry import RequestStats
from qwen3vl_webui.weights.model import LoadedModel

# Seconds the stream reader waits for the next token before giving up on a dead generate thread.
TOKEN_TIMEOUT_S = 600.0


def stream_generate(
    loaded: LoadedModel,
    prompt: PreparedPrompt,
    sampling: SamplingParams,
    cancel: threading.Event,
    on_cancel: Callable[[RequestStats], None] | None = None,
    faults: FaultInjector | None = None,
) -> Iterator[tuple[str, RequestStats | None]]:
    """Yields (text so far, None) as tokens arrive, then (full text, stats).

    Closing the iterator (or setting `cancel`) stops generation within one decode step; `on_cancel`
    then gets the stats of what was generated before the stop. An exception in `generate` (a CUDA
    OOM, say) is re-raised here, in the reader's thread. `faults` stages failures for tests.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    # A class made per call sits in a reference cycle until the cyclic GC runs, and so does all it
    # closes over: it must not reach the prompt's tensors (pixels!), only small values.
    prompt_tokens = prompt.tokens
    processor, model = loaded.processor, loaded.model
    matcher = StopMatcher(sampling.stop, TokenBytes(processor.tokenizer)) if sampling.stop else None
    stops = StopText(sampling.stop) if sampling.stop else None

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if faults is not None:
                faults.fire("decode", prompt_tokens)
            # Checked once per new token: a stop frees the slot within one step; a stop string ends the
            # answer at the token that completes it.
            stop = cancel.is_set()
            if matcher is not None and not stop:
                stop = matcher.push(int(input_ids[0, -1]))
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    class _CountingStreamer(TextIteratorStreamer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.new_tokens = 0
            self.first_token_at: float | None = None
            self.last_token_at: float | None = None

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                now = time.perf_counter()
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
                self.new_tokens += int(value.numel())
            super().put(value)

    streamer = _CountingStreamer(
        processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=TOKEN_TIMEOUT_S
    )
    do_sample = sampling.temperature > 0
    kwargs: dict[str, Any] = dict(
        **{k: v.to(model.device) if hasattr(v, "to") else v for k, v in prompt.inputs.items()},
        max_new_tokens=sampling.max_new_tokens,
        do_sample=do_sample,
        repetition_penalty=sampling.repetition_penalty,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stop()]),
    )
    if sampling.ignore_eos:  # end-of-sequence is suppressed until the length is reached
        kwargs.update(min_new_tokens=sampling.max_new_tokens)
    if do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:  # greedy: silence the checkpoint's sampling defaults instead of warning about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if faults is not None:
                faults.fire("prefill", prompt_tokens)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # reported to the reader below
            failure.append(exc)
        finally:
            streamer.end()  # always unblock the reader, also when generate raised

    started = time.perf_counter()

    def stats() -> RequestStats:
        first = streamer.first_token_at or time.perf_counter()
        return RequestStats(
            prompt_text_tokens=prompt.text_tokens,
            prompt_image_tokens=prompt.image_tokens,
            prompt_video_tokens=prompt.video_tokens,
            new_tokens=streamer.new_tokens,
            ttft_s=first - started,
            decode_s=(streamer.last_token_at or first) - first,
        )

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    text, shown = "", ""
    finished = False
    try:
        for piece in streamer:
            if piece:
                text += piece
                visible = stops.visible(text) if stops is not None else text
                if visible != shown:
                    shown = visible
                    yield shown, None
        thread.join()
        if failure:
            raise failure[0]
        finished = True
        yield (stops.cut(text)[0] if stops is not None else text), stats()
    finally:
        stopped_early = not finished and not failure
        cancel.set()
        thread.join()
        if stopped_early and on_cancel is not None:
            on_cancel(stats())
