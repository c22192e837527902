"""The batch engine's sampler on a CPU: the exponential race draws like a multinomial, seeds hold across batches."""

from __future__ import annotations

import math

import torch

from qwen3vl_webui.engine.batch.requests import Request
from qwen3vl_webui.engine.batch.sampler import Sampler, race_pick
from qwen3vl_webui.engine.request import SamplingParams


def joined(sampler: Sampler, slot: int, sampling: SamplingParams) -> Request:
    req = Request(None, sampling, length=4)
    if sampling.seed is not None and sampling.temperature > 0:
        req.generator = torch.Generator().manual_seed(sampling.seed)
    sampler.join(slot, req)
    if req.generator is not None:  # the sampler makes the generator on its device; the same seed on the CPU
        req.generator = torch.Generator().manual_seed(sampling.seed)
    return req


def test_the_race_draws_each_token_with_its_probability() -> None:
    torch.manual_seed(0)
    rows, vocab = 4000, 6
    sampler = Sampler("cpu", rows)
    sampler.allocate(vocab)
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    reqs = [joined(sampler, slot, sampling) for slot in range(rows)]
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0]).repeat(rows, 1)
    counts = torch.zeros(vocab)
    for _ in range(5):
        counts += torch.bincount(sampler.choose(logits, reqs, 0), minlength=vocab)
    expected = logits[0].softmax(-1)
    share = counts / counts.sum()
    # 20,000 draws: a standard error under 0.0036 for every share; 5 of them is far beyond chance.
    assert torch.all((share - expected).abs() < 0.018), (share, expected)
    assert counts[5] == 0  # e^-30 of the mass


def test_top_p_keeps_the_head_and_a_seeded_row_draws_the_same_alone_or_batched() -> None:
    vocab = 50
    logits = torch.linspace(3.0, -3.0, vocab).unsqueeze(0)
    seeded = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=20, top_p=0.9, seed=7, repetition_penalty=1.0)
    wide = SamplingParams(max_new_tokens=4, temperature=1.3, top_k=0, seed=None, repetition_penalty=1.0)

    alone = Sampler("cpu", 1)
    alone.allocate(vocab)
    req = joined(alone, 0, seeded)
    solo = [int(alone.choose(logits, [req], 0)[0]) for _ in range(12)]

    batched = Sampler("cpu", 2)
    batched.allocate(vocab)
    other, req = joined(batched, 0, wide), joined(batched, 1, seeded)  # the batch's draw is 50 wide, not 20
    pair = [int(batched.choose(logits.repeat(2, 1), [other, req], 0)[1]) for _ in range(12)]
    assert solo == pair
    head = math.ceil(vocab * 0.4)  # top-20 of a falling ramp, then the 0.9 head: never the tail
    assert max(solo) < head and len(set(solo)) > 1


def test_a_drawn_zero_never_picks_a_removed_token() -> None:
    probs = torch.tensor([[0.0, 0.7, 0.3, 0.0]])
    race = torch.tensor([[0.0, 1.0, 0.2, 2.0]])  # 0 / 0 would be NaN, and argmax takes NaN for the largest
    assert race_pick(probs, race).tolist() == [[2]]
    assert race_pick(probs, torch.tensor([[3.0, 0.0, 0.5, 0.0]])).tolist() == [[1]]  # a 0 under a kept token wins
