"""Greedy equality on the GPU: the BatchEngine's tokens against plain `generate`'s, in fp32, on answers that vary.

Random weights easily answer one token over and over, and equal repeats prove little. So the model is the random
4B built in memory WITHOUT the app's word-only output bias (`--random-weights` keeps answers to re-tokenizable
words; here every id of the 152k vocabulary may win), the prompts are random ids (and a 1280x720 image prompt with
random ids after it), and a prompt counts only if its answer has at least `--min-distinct` distinct tokens. For each
prompt, the engine answers alone and all prompts together (the batched decode step), and each answer is checked:
- equal to `generate`'s, token for token (`equal_prefix`; where they part, generate's logit gap says near-tie or not);
- every token is the top-1 of the model's own logits along the engine's path (one teacher-forced forward over
  prompt + answer): `ranks` all 0, `max_logit_shortfall` 0.
Exit code 1 if an informative prompt fails, or fewer than two prompts are informative.

    python -m bench.greedy --out $OUT/greedy_fp32.json                     # GPU, ~1 min on an H200
    python -m bench.greedy --model random-weights:tiny --device cpu --tokens 16 --prompt-tokens 48   # plumbing
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from bench import common


def with_random_ids(prompt: Any, vocab: int, count: int, seed: int) -> Any:
    """`prompt` with `count` random ordinary ids appended after its last token (after the image, for an image
    prompt): the answer then depends on varied text, not on a fixed question that random weights answer with one
    repeated token."""
    import torch

    from qwen3vl_webui.engine.request import PreparedPrompt

    extra = torch.randint(0, vocab, (1, count), generator=torch.Generator().manual_seed(seed))
    inputs = dict(prompt.inputs)
    inputs["input_ids"] = torch.cat([prompt.inputs["input_ids"], extra.to(prompt.inputs["input_ids"].dtype)], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        kind = prompt.inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([kind, torch.zeros_like(extra, dtype=kind.dtype)], dim=1)
    return PreparedPrompt(
        inputs, prompt.tokens + count, prompt.text_tokens + count, prompt.image_tokens, prompt.video_tokens, 0
    )


def engine_together(engine: Any, prompts: list[Any], tokens: int) -> list[list[int]]:
    """Every prompt submitted at once (one batched decode step for all), each read by its own thread."""
    out: list[list[int]] = [[] for _ in prompts]
    with engine.hold_admission():  # admitted together: the decode steps run with every row
        streams = [engine.submit_tokens(p, common.greedy(tokens), threading.Event()) for p in prompts]
    threads = [threading.Thread(target=lambda i=i: out[i].extend(streams[i])) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def verdict(check: dict[str, Any], together: list[int], min_distinct: int) -> dict[str, Any]:
    """Whether a prompt is informative (varied answer) and passes (equal to generate, top-1 at every step)."""
    informative = check["distinct_tokens"] >= min_distinct
    top1 = all(rank == 0 for rank in check["ranks"])
    same_together = together == check["engine_tokens"]
    return dict(
        informative=informative, top1_every_step=top1, equal_when_batched=same_together,
        passed=check["identical"] and top1 and same_together,
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Any:
    ap = common.model_args(__doc__)
    ap.set_defaults(precision="fp32")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens compared per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--texts", type=int, default=3, help="random-id text prompts")
    ap.add_argument("--no-image", action="store_true", help="leave out the image prompt")
    ap.add_argument("--min-distinct", type=int, help="distinct answer tokens a prompt needs to count (default tokens/2)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the engine's torch.compile")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    min_distinct = args.min_distinct or max(2, args.tokens // 2)
    t0 = time.perf_counter()
    loaded = common.load(args.model, args.precision, args.device, args.write)
    head = loaded.model.lm_head
    if getattr(head, "bias", None) is not None:
        head.bias = None  # the app's word-only bias for --random-weights: off, so any id may win (varied answers)
    vocab = common.ordinary_vocab(loaded)
    prompts = common.make_prompts(args.texts, args.prompt_tokens, vocab, seed=1)
    labels = [f"text {args.prompt_tokens} #{i}" for i in range(args.texts)]
    if not args.no_image:
        prompts.append(with_random_ids(common.make_image_prompt(loaded, args.tokens), vocab, 64, seed=5))
        labels.append("1280x720 image + 64 random ids")
    report: dict[str, Any] = dict(
        **common.environment(args.device), model=args.model, precision=args.precision, tokens=args.tokens,
        min_distinct=min_distinct, lm_head_bias="removed", prompts=[], errors={},
    )  # fmt: skip
    slot = max(p.tokens for p in prompts) + args.tokens + 64
    options = dict(
        max_batch=len(prompts), token_budget=len(prompts) * slot, buckets=(1, len(prompts)),
        compile={"auto": None, "on": True, "off": False}[args.compile], prefix_slots=0,
    )  # fmt: skip
    engine, report["engine_startup"] = common.start_engine(loaded, **options)
    try:
        checks = [common.greedy_check(loaded, engine, p, args.tokens) for p in prompts]
        together = engine_together(engine, prompts, args.tokens)
    finally:
        engine.close()
        common.free(engine)
    for label, prompt, check, batched in zip(labels, prompts, checks, together):
        row = dict(prompt=label, prompt_tokens=prompt.tokens, **check, **verdict(check, batched, min_distinct))
        report["prompts"].append(row)
        print(label, json.dumps({k: v for k, v in row.items() if k not in ("engine_tokens", "ranks")}), flush=True)
    informative = [r for r in report["prompts"] if r["informative"]]
    report["informative_prompts"] = len(informative)
    report["pass"] = len(informative) >= 2 and all(r["passed"] for r in informative)
    report["decode_path"] = report["engine_startup"]["decode_path"]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    common.write_json(args.out, report)
    print(f"{args.precision} greedy: {sum(r['passed'] for r in informative)}/{len(informative)} informative prompts "
          f"equal to generate and top-1 at every step ({len(report['prompts']) - len(informative)} too repetitive "
          f"to count); engine {report['decode_path']}: {'PASS' if report['pass'] else 'FAIL'}")  # fmt: skip
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
