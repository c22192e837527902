"""Next-token choice for the batch engine's slots: repetition penalty, then greedy or temperature/top-k/top-p."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qwen3vl_webui.engine.batch.requests import Request


class Sampler:
    """Per-slot penalty state on the device; a seeded generator per sampling request (`Request.generator`)."""

    def __init__(self, device: Any, max_batch: int) -> None:
        self.device = device
        self.max_batch = max_batch
        self.penalty: Any = None
        self.seen: Any = None

    def allocate(self, vocab: int) -> None:
        import torch

        self.penalty = torch.ones(self.max_batch, 1, dtype=torch.float32, device=self.device)
        self.seen = torch.zeros(self.max_batch, vocab, dtype=torch.bool, device=self.device)

    def join(self, slot: int, req: Request) -> None:
        """A request takes `slot`: its penalty, the prompt tokens it has seen, its generator."""
        import torch

        self.penalty[slot] = req.sampling.repetition_penalty
        self.seen[slot] = False
        if req.sampling.repetition_penalty != 1.0:
            self.seen[slot, req.prompt.inputs["input_ids"][0].to(self.device)] = True
        if req.sampling.temperature > 0:
            seed = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            req.generator = torch.Generator(device=self.device).manual_seed(seed)

    def choose(self, logits: Any, reqs: Sequence[Request], lo: int) -> Any:
        """Next token of each of `reqs`, in slots [lo, lo + len(reqs)), from their logits [len(reqs), vocab]."""
        import torch

        hi = lo + len(reqs)
        if any(r.sampling.repetition_penalty != 1.0 for r in reqs):
            penalty = self.penalty[lo:hi]
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self.seen[lo:hi], penalised, logits)
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(reqs) if r.sampling.temperature > 0]
        if not sampled:
            return tokens
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        temperature = torch.tensor([reqs[i].sampling.temperature for i in sampled], device=dev).view(-1, 1)
        top_k = torch.tensor([reqs[i].sampling.top_k or logits.shape[-1] for i in sampled], device=dev).view(-1, 1)
        top_p = torch.tensor([reqs[i].sampling.top_p for i in sampled], device=dev).view(-1, 1)
        scores, order = (logits[rows] / temperature).sort(-1, descending=True)
        rank = torch.arange(scores.shape[-1], device=dev).view(1, -1)
        scores = scores.masked_fill(rank >= top_k, float("-inf"))
        probs = scores.softmax(-1)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
        for j, i in enumerate(sampled):
            choice = torch.multinomial(probs[j], 1, generator=reqs[i].generator)
            tokens[i] = order[j, choice[0]]
        return tokens

    def saw(self, reqs: Sequence[Request], lo: int, tokens: Any) -> None:
        """The chosen tokens count as seen for the repetition penalty (only where a request uses one)."""
        if any(r.sampling.repetition_penalty != 1.0 for r in reqs):
            self.seen[lo : lo + len(reqs)].scatter_(1, tokens.view(len(reqs), 1), True)

    def move(self, src: int, dst: int) -> None:
        for buf in (self.penalty, self.seen):
            buf[dst].copy_(buf[src])

    def free(self) -> None:
        self.seen = None
