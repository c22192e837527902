"""Host <-> device transfers that do not wait for the GPU.

A plain `tensor.to("cuda")` from pageable host memory, or `cuda_tensor[i] = number`, synchronizes the stream: the
engine's host thread would wait for the decode step in flight and the prefill just enqueued before it could enqueue
anything else. Host data goes in through pinned memory, and tokens come back through a pinned copy with an event,
so reading a step's tokens waits for that step alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def to_device(host: Any, device: Any) -> Any:
    """A host tensor (or numpy array) on `device`; on a GPU through pinned memory, asynchronously (one already on a
    GPU is moved as torch moves it)."""
    import torch

    if not isinstance(host, torch.Tensor):
        host = torch.from_numpy(host)
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class OnDevice:
    """Tokens the GPU will produce, on their way to the host: a pinned copy enqueued behind them and the event that
    says it landed (on a CPU: the tokens themselves)."""

    tokens: Any
    host: Any = None
    ready: Any = None

    @staticmethod
    def of(tokens: Any) -> OnDevice:
        if tokens.device.type != "cuda":
            return OnDevice(tokens)
        import torch

        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return OnDevice(tokens, host, ready)

    def values(self) -> list[int]:
        """The tokens as Python ints; waits for the step that makes them, not for work enqueued after it."""
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        return self.host.tolist()
