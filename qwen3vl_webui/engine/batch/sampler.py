"""Next-token choice for the batch engine's slots: repetition penalty, then greedy or temperature/top-k/top-p."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwen3vl_webui.engine.batch.requests import Request
from qwen3vl_webui.engine.batch.transfer import to_device


class Sampler:
    """Per-slot sampling state on the device (penalty, seen tokens, temperature, top-k, top-p); a generator of its
    own only for a request with a seed, so that its tokens are the same alone or batched.

    Sampling is batched: one top-k, one softmax and one multinomial draw for all rows, and each row's parameters
    live in slot-indexed device tensors set when a request joins. Per-row tensors built from Python lists and a
    multinomial call per row (the earlier version) cost ~3 ms of host time a step at 32 streams, which held the
    engine process at one busy core on an H200 (bench/results/h200/suite_a.log).
    """

    def __init__(self, device: Any, max_batch: int) -> None:
        self.device = device
        self.max_batch = max_batch
        self.vocab = 0
        self.penalty: Any = None
        self.seen: Any = None
        self.temperature: Any = None
        self.top_k: Any = None
        self.top_p: Any = None

    def allocate(self, vocab: int) -> None:
        import torch

        self.vocab = vocab
        b, dev = self.max_batch, self.device
        self.penalty = torch.ones(b, 1, dtype=torch.float32, device=dev)
        self.seen = torch.zeros(b, vocab, dtype=torch.bool, device=dev)
        self.temperature = torch.zeros(b, 1, dtype=torch.float32, device=dev)
        self.top_k = torch.full((b, 1), vocab, dtype=torch.long, device=dev)
        self.top_p = torch.ones(b, 1, dtype=torch.float32, device=dev)

    def join(self, slot: int, req: Request) -> None:
        """A request takes `slot`: its penalty, the prompt tokens it has seen, its sampling values, its generator."""
        import torch

        sampling = req.sampling
        # fill_ (one kernel each), not `buf[slot] = value`: copying a host scalar in waits for the GPU.
        self.penalty[slot].fill_(sampling.repetition_penalty)
        self.seen[slot].fill_(False)
        if sampling.repetition_penalty != 1.0:
            self.seen[slot].index_fill_(0, to_device(req.prompt.inputs["input_ids"][0], self.device), True)
        self.temperature[slot].fill_(max(0.0, sampling.temperature))
        self.top_k[slot].fill_(self._k(req))
        self.top_p[slot].fill_(sampling.top_p)
        if sampling.temperature > 0 and sampling.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)

    def _k(self, req: Request) -> int:
        return min(req.sampling.top_k or self.vocab, self.vocab)

    def choose(self, logits: Any, reqs: Sequence[Request], lo: int) -> Any:
        """Next token of each of `reqs`, in slots [lo, lo + len(reqs)), from their logits [len(reqs), vocab]."""
        import torch

        hi = lo + len(reqs)
        if any(r.sampling.repetition_penalty != 1.0 for r in reqs):
            penalty = self.penalty[lo:hi]
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self.seen[lo:hi], penalised, logits)
        greedy = logits.argmax(-1)
        ks = [self._k(r) for r in reqs if r.sampling.temperature > 0]
        if not ks:
            return greedy
        temperature = self.temperature[lo:hi]
        scores, order = torch.topk(logits / temperature.clamp_min(1e-5), max(ks), dim=-1)  # sorted, largest first
        rank = torch.arange(scores.shape[-1], device=logits.device).view(1, -1)
        scores = scores.masked_fill(rank >= self.top_k[lo:hi], float("-inf"))
        probs = scores.softmax(-1)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > self.top_p[lo:hi], 0.0)
        # The exponential race: argmax of p / E with E ~ Exp(1) draws index i with probability p_i, like
        # torch.multinomial, which checks its input on the host (a stream sync: the decode step just enqueued would
        # finish before the host could emit the previous one's tokens). A seeded request draws its own k values from
        # its own generator, so its tokens are the same alone or batched.
        race = torch.empty_like(probs).exponential_()
        for i, req in enumerate(reqs):
            if req.generator is not None:
                race[i, : self._k(req)].exponential_(generator=req.generator)
        sampled = order.gather(1, race_pick(probs, race)).squeeze(1)
        return torch.where(temperature.squeeze(1) > 0, sampled, greedy)

    def saw(self, reqs: Sequence[Request], lo: int, tokens: Any) -> None:
        """The chosen tokens count as seen for the repetition penalty (only where a request uses one)."""
        if any(r.sampling.repetition_penalty != 1.0 for r in reqs):
            self.seen[lo : lo + len(reqs)].scatter_(1, tokens.view(len(reqs), 1), True)

    def move(self, src: int, dst: int) -> None:
        for buf in (self.penalty, self.seen, self.temperature, self.top_k, self.top_p):
            buf[dst].copy_(buf[src])

    def free(self) -> None:
        self.seen = None


def race_pick(probs: Any, race: Any) -> Any:
    """Index `[rows, 1]` of the largest p / E per row. E is never 0 here: a drawn 0 under a 0 probability would be
    NaN, which argmax takes for the largest (a token the filters removed)."""
    import torch

    return (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(-1, keepdim=True)

