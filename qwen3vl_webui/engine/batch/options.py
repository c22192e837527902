"""The batch engine's settings: one frozen dataclass, validated once where it is built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

# KV rows per slot are rounded to this (SDPA's memory-efficient kernel wants 16-aligned masks).
LEN_ALIGN = 64


# The batch engine reserves every slot's KV cache when it starts and prefills a long prompt alone in its forward
# (engine/batch/scheduler.py `next_prefill`): one such prompt prefilling while another decodes reaches its memory
# peak, and more worst-case chats at once only repeat it (the warm-up of 32 took 2.2 s of an H100 start,
# bench/results/h100/s20_cs_server_artifacts.log).
PEAK_CHATS = 2


@dataclass(frozen=True)
class BatchOptions:
    """Everything a BatchEngine is built from; benchmarks vary these instead of module globals."""

    max_batch: int = 8  # requests decoding together; each holds one KV slot
    token_budget: int = 8 * 4096  # KV tokens of all running slots together: max_len = budget / max_batch, aligned
    # Batch sizes with a captured decode graph; a step of n requests replays the smallest bucket >= n.
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's generation config
    cuda_graphs: bool | None = None  # None: on CUDA
    compile: bool | None = None  # None: compiled.should_compile (CUDA 16-bit and weight-only)
    compile_cache_dir: str | os.PathLike[str] | None = None
    # Where our own Triton kernels' JIT builds persist (TRITON_CACHE_DIR) when the environment names no place: beside
    # the inductor cache under --cache-dir, so a Docker volume or a Space's /data keeps them (else ~/.triton/cache).
    kernel_cache_dir: str | os.PathLike[str] | None = None
    # Serve at once, speed up later (graphs.py): decode starts from eager steps captured in CUDA graphs and each batch
    # bucket's compiled graph is swapped in between two decode steps once a background thread has compiled it.
    # None: where the step is compiled on CUDA. False: compile every bucket before the engine serves (precompile).
    background_compile: bool | None = None
    # The background compile starts when the engine is first idle after it began serving (the start-up warm-up's
    # requests done), or this many seconds after, whichever comes first.
    compile_delay_s: float = 10.0
    compile_backend: str = "inductor"  # torch.compile's backend; tests stand "eager" (dynamo alone) in for inductor
    # Where compile artifacts (torch.compiler.save_cache_artifacts) are kept, one file per GPU, versions, precision,
    # model and engine options (engine/batch/artifacts.py); None: none are read or written.
    artifacts_dir: str | os.PathLike[str] | None = None
    # Prompt tokens one prefill forward may take between two decode steps (about 60 ms of H100 time in bf16):
    # bounds how long a new prompt stalls the running streams.
    prefill_chunk: int = 2048
    prefix_slots: int | None = None  # retained-KV entries; None: prefix_share of max_batch (at least one); 0: off
    fuse: bool | None = None  # fused q/k/v and gate/up projections; None: on CUDA
    gemv: bool | None = None  # one-row products through the Triton GEMV; None: on CUDA
    # The eager decode step's layers in ~11 kernels each (kernels/layer.py: add+RMSNorm, q/k norm + RoPE + KV write,
    # SiLU·mul) instead of transformers' ~55: the path that serves before (or without) the compile. None: on CUDA
    # with the split-KV decode attention, where the kernels pass their probe. QWEN3VL_FUSED_LAYERS=0 turns it off.
    fused_layers: bool | None = field(
        default_factory=lambda: False if os.environ.get("QWEN3VL_FUSED_LAYERS") == "0" else None
    )
    prefill_graphs: bool | None = None  # first prompt chunks replayed from CUDA graphs; None: where decode is graphed
    compile_prefill: bool = False  # prompt chunks through torch.compile (minutes of start-up on an H100)
    # First-chunk graphs captured one length at a time between the engine's first steps rather than before it serves
    # (graphs.DecodeGraphs.capture_prefill_next); None: wherever decode compiles in the background.
    defer_prefill_graphs: bool | None = None
    # Padded lengths of the first-chunk prefill graphs (engine/batch/prefill.py), capped at the prefill chunk: every
    # multiple of LEN_ALIGN, so a prompt pays at most 63 tokens of padding (capturing one takes ~0.1 s on an H100).
    prefill_graph_step: int = LEN_ALIGN
    # While streams are mid-answer, prompts whose first chunk fits a prefill graph replay it rather than run eagerly:
    # a batch of short prompts runs as one replay each instead of one eager forward through transformers (~30 ms of
    # Python launches on an H200 host, which the decoding streams wait for), and a retained prefix covering less than
    # half such a prompt is not reused (the rest of the prompt would be a later chunk, eager). QWEN3VL_PREFER_PREFILL_
    # GRAPHS=0 turns it off (bench.ab compares the two).
    prefer_prefill_graphs: bool = field(default_factory=lambda: os.environ.get("QWEN3VL_PREFER_PREFILL_GRAPHS") != "0")
    # Short text prompts batch up to this many times prefill_chunk tokens in one forward while no stream is mid-answer.
    idle_prefill_factor: int = 4
    # A burst's first decode step waits for at most this many prefill forwards (32 prompts of 512 tokens: 2), so
    # arrivals that keep trickling in cannot hold the first streams' second token (nor the GIL) for long.
    burst_forwards: int = 2
    prefix_share: float = 0.25  # retained-KV slots per running slot when prefix_slots is None (rounded up)
    poll_s: float = 1.0  # how often a waiting reader checks that the worker is still alive
    # On CUDA, one-token decode queries use the split-KV Triton kernel over each row's live length (attention.py)
    # instead of SDPA over the whole slot behind a mask. Benchmarks turn it off to compare.
    decode_kernel: bool = True
    # Batch buckets > 1 share one compile with a symbolic batch size (dynamo's automatic dynamic shapes: bucket 1
    # compiles static, the next bucket recompiles with the row count symbolic, later buckets reuse it). False: one
    # static compile per bucket.
    dynamic_batch: bool = True
    # Compile one decoder layer as a region every layer runs (compiled.RegionalDecode) instead of the whole step: the
    # compile costs about one layer's, not 36 (CPU, 36 narrow layers: bench/results/cpu/compile_check.json). None:
    # wherever decode steps replay CUDA graphs (without graphs each step would pay a Python call and dynamo's guard
    # check per layer: 0.54x tok/s on that CPU run).
    regional_compile: bool | None = None

    def __post_init__(self) -> None:
        # Tuples whatever was passed (a list from JSON, a generator): the options stay hashable and reusable.
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefix_slots is not None and self.prefix_slots < 0:
            raise ValueError(f"prefix_slots must be >= 0 (0 turns prefix reuse off), got {self.prefix_slots}")
        if self.prefill_chunk < LEN_ALIGN:
            raise ValueError(f"prefill_chunk must be >= {LEN_ALIGN} tokens, got {self.prefill_chunk}")
        if self.max_len < LEN_ALIGN:
            raise ValueError(
                f"token_budget {self.token_budget} leaves under {LEN_ALIGN} tokens per slot for {self.max_batch} "
                f"slots; give at least {LEN_ALIGN * self.max_batch}."
            )
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets must be batch sizes >= 1, got {self.buckets}")
        if self.prefill_graph_step < 1 or self.idle_prefill_factor < 1 or self.burst_forwards < 0:
            raise ValueError(
                "prefill_graph_step and idle_prefill_factor must be >= 1 and burst_forwards >= 0, got "
                f"{self.prefill_graph_step}, {self.idle_prefill_factor}, {self.burst_forwards}"
            )
        if self.poll_s <= 0 or self.prefix_share < 0:
            raise ValueError(f"poll_s must be > 0 and prefix_share >= 0, got {self.poll_s}, {self.prefix_share}")

    @property
    def max_len(self) -> int:
        """Tokens one slot holds (prompt + answer)."""
        return self.token_budget // self.max_batch // LEN_ALIGN * LEN_ALIGN

    @property
    def retained_slots(self) -> int:
        """Retained-prefix entries: `prefix_slots`, else a share of `max_batch` (at least one)."""
        if self.prefix_slots is not None:
            return self.prefix_slots
        return max(1, math.ceil(self.max_batch * self.prefix_share))

    @property
    def slot_buckets(self) -> tuple[int, ...]:
        """The graph buckets below `max_batch`, and `max_batch` itself."""
        return tuple(sorted({b for b in self.buckets if b < self.max_batch} | {self.max_batch}))


def compile_options(mode: str) -> dict[str, bool]:
    """The app's --compile as BatchOptions fields: background (the engine's default on CUDA), before-serving, off."""
    choices = {"background": {}, "before-serving": {"background_compile": False}, "off": {"compile": False}}
    if mode not in choices:
        raise ValueError(f"compile mode must be one of {', '.join(choices)}; got {mode!r}")
    return choices[mode]
