"""What crosses between the front end and the engine process, and how: pickled messages over a Unix socket.

Arrays (a prompt's token ids and pixels) travel as out-of-band buffers: pickle protocol 5 hands each array's memory
to the socket as its own frame instead of copying it into the pickle. Everything else is small plain data: one
message per engine step carries every request's new tokens (`EngineOutputs`), as vLLM's EngineCoreOutputs does.

front end -> engine                              engine -> front end
  ("add", id, PreparedPrompt, SamplingParams)      ("progress", text)        while loading
  ("abort", (id, ...))                             ("ready", EngineInfo)
  ("release",)   gc + the allocator's cache        ("failed", text)          the load failed: the process exits
  ("shutdown",)  finish nothing, exit              ("out", EngineOutputs)    once per step, errors as RemoteError
                                                   ("stats", EngineStats)    every STATS_EVERY_S
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field
from typing import Any

# The engine reports its load (the live panel's figures) this often, unasked.
STATS_EVERY_S = 0.5


class EngineDied(RuntimeError):
    """The engine process exited (killed, crashed, a CUDA error); requests in flight end with this."""


class RemoteError(RuntimeError):
    """A request's failure in the engine process, told across: `kind` is "oom", "request", "closed" or "error"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def out_of_memory(self) -> bool:  # what engine.faults.is_out_of_memory looks for
        return self.kind == "oom"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.kind, str(self)))


def remote_error(exc: BaseException) -> RemoteError:
    """An exception raised in the engine process, as the front end should see it (no traceback, no objects)."""
    from qwen3vl_webui.engine.batch import EngineClosed
    from qwen3vl_webui.engine.faults import is_out_of_memory
    from qwen3vl_webui.engine.request import RequestError

    if isinstance(exc, RemoteError):
        return exc
    if is_out_of_memory(exc):
        kind = "oom"
    elif isinstance(exc, RequestError):
        kind = "request"
    elif isinstance(exc, EngineClosed):
        kind = "closed"
    else:
        kind = "error"
    text = str(exc).strip().splitlines()
    return RemoteError(kind, text[0] if text else type(exc).__name__)


def to_wire(prompt: Any) -> Any:
    """A PreparedPrompt whose inputs are numpy arrays: pickle 5 hands their memory to the socket out of band."""
    from dataclasses import replace

    return replace(prompt, inputs={k: v.numpy() if hasattr(v, "numpy") else v for k, v in prompt.inputs.items()})


def from_wire(prompt: Any) -> Any:
    """The received PreparedPrompt with CPU tensors again (sharing the received buffers' memory)."""
    from dataclasses import replace

    import torch

    return replace(prompt, inputs={k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in prompt.inputs.items()})


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process says once it serves: the model it loaded and how it decodes."""

    precision: str
    label: str
    device: str
    source: str
    is_demo: bool
    load_seconds: float
    weights_bytes: int
    max_batch: int
    max_len: int
    prefix_slots: int
    decode_path: str
    note: str = ""  # e.g. why CUDA graphs are off
    pid: int = 0
    loaded_at: float = 0.0  # wall time the weights were loaded (start-up stages, service/timeline.py)
    serving_at: float = 0.0  # wall time the engine could first answer
    imported_at: float = 0.0  # wall time the engine process had imported torch and the model's code


@dataclass(frozen=True)
class EngineStats:
    """The engine process's load and memory, for the live panel (its own torch allocator figures)."""

    snapshot: Any  # EngineSnapshot
    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    free: int = 0  # free device memory (CUDA driver), or available RAM on a CPU
    extra: dict[str, Any] = field(default_factory=dict)


class Channel:
    """One direction of a multiprocessing Connection, sending whole messages under a lock (any thread)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        with self._lock:
            self.connection.send_bytes(len(buffers).to_bytes(4, "little") + head)
            for buffer in buffers:
                self.connection.send_bytes(buffer.raw())

    def recv(self) -> Any:
        """The next message; raises EOFError once the other side has gone."""
        first = self.connection.recv_bytes()
        count = int.from_bytes(first[:4], "little")
        # Writable copies: the arrays become torch tensors, which want memory they may write.
        buffers = [bytearray(self.connection.recv_bytes()) for _ in range(count)]
        return pickle.loads(memoryview(first)[4:], buffers=buffers)

    def poll(self, timeout: float) -> bool:
        return bool(self.connection.poll(timeout))

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass
