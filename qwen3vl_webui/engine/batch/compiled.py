"""torch.compile for the decode step: when to compile, inductor's on-disk cache, what keeps a step out of a graph."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Inductor's mode: "default" fuses the pointwise/norm/rope kernels around cuBLAS GEMMs. "max-autotune-no-cudagraphs"
# benchmarks GEMM templates per shape (minutes per bucket) for little gain on decode's skinny GEMMs.
COMPILE_MODE = "default"
# Whether batch buckets share one dynamic compile, and whether decode uses the split-KV kernel: the batch engine's
# options (engine/batch/options.py: dynamic_batch, decode_kernel).


def default_cache_dir() -> Path:
    """Where compiled kernels persist between runs: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/qwen3vl-webui/inductor."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3vl-webui" / "inductor"


def use_cache_dir(path: str | os.PathLike[str] | None) -> Path:
    """Points inductor's FX-graph, AOT and Triton caches at `path` (read by torch at each compile), and returns it.

    torch's own default lives under /tmp (gone after a reboot or a fresh container); a warm cache turns the
    ~minute of compiling per batch bucket into a re-trace plus cache loads.
    """
    target = Path(path) if path is not None else default_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    return target


def use_kernel_cache_dir(path: str | os.PathLike[str] | None) -> str | None:
    """Points Triton's JIT cache (our kernels' builds: GEMV, split-KV attention, W4A16, FP8) at `path` unless the
    environment already sets TRITON_CACHE_DIR; returns the directory in effect (None: Triton's default)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    if path is None:
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(path)
    return str(path)


def should_compile(requested: bool | None, device: str, precision: str) -> bool:
    """None means: on for CUDA bf16/fp16, the weight-only precisions (int8wo, int4, fp8: their matmuls are custom ops)
    and int4-bnb; off on CPU and for LLM.int8.

    nf4 compiles with graph breaks around the bitsandbytes matmuls: 256 tok/s at 1 stream against ~130 with
    graphs alone on an H100 (`git show 0ad4f07^:bench/matrix_int4.h100.json`), greedy tokens parting from `generate`'s only at exact
    ties of its logits. LLM.int8 with its default threshold cannot be captured and decodes eagerly.
    """
    if requested is not None:
        return requested
    return str(device).startswith("cuda") and precision in ("bf16", "fp16", "int8wo", "int4", "fp8", "int4-bnb")


def compile_decode(
    fn: Callable[..., Any], buckets: int, fullgraph: bool, dynamic_batch: bool = False, backend: str = "inductor"
) -> Callable[..., Any]:
    """`fn(rows)` compiled per distinct `rows`, or (`dynamic_batch`) once for 1 and once for every larger `rows`.

    Static (`dynamic=False`) never generalises a bucket. Dynamic (`dynamic=None`, dynamo's automatic dynamic
    shapes): the first call compiles for its `rows`; the first call with another `rows` recompiles with `rows`
    symbolic (guarded to >= 2: dynamo specialises sizes 0 and 1), which every later bucket reuses. So call it with
    the buckets in ascending order, 1 first.
    """
    import torch

    # One dynamo cache entry per bucket; the default limit (8) would silently fall back to eager past it.
    _set_recompile_limit(buckets + 4)
    dynamic = None if dynamic_batch else False
    if backend != "inductor":  # a stand-in (tests: "eager", dynamo alone); modes are inductor's
        return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return torch.compile(fn, mode=COMPILE_MODE, fullgraph=fullgraph, dynamic=dynamic)


def _set_recompile_limit(limit: int) -> None:
    import torch

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    if getattr(config, name) < limit:
        setattr(config, name, limit)


def _layer_body(layer: Any, *args: Any, **kwargs: Any) -> Any:
    """One decoder layer's own forward: the region `RegionalDecode` compiles (one code object for every layer)."""
    return type(layer).forward(layer, *args, **kwargs)


class RegionalDecode:
    """The decode step `decode(rows, kv)` with each decoder layer compiled as one region, all layers sharing it.

    Compiling the whole step traces and lowers all 36 layers of the 4B model as one graph: about a minute per batch
    bucket on an H100. The layers are the same code on weights of the same shapes, and dynamo lifts a module's
    parameters into graph inputs, so one compile serves every layer (regional compilation, torch's recipe): the
    cost of one layer, not 36. What kept the layers apart is the KV cache: `SlotCache.update` looked its tensors up by
    `layer_idx`, an int attribute dynamo specialises on (a recompile per layer). Here each layer is handed its own
    `SlotCache.layer(idx)` view, which never reads the index. What runs around the layers (embedding, rotary
    tables, final norm, lm_head: a few small kernels) stays eager; in CUDA graphs it costs no host time.

    Only calls of this object take the compiled regions (a thread-local switch): the engine thread's eager decode
    graphs and prefill forwards go through the same layer objects and keep their eager forward, while the background
    compile thread (or the swap on the engine thread) calls this one. `restore` puts the layers' forward back.
    """

    def __init__(
        self, decode: Callable[..., Any], layers: Any, buckets: int, fullgraph: bool, dynamic_batch: bool = False,
        backend: str = "inductor",
    ) -> None:  # fmt: skip
        _set_recompile_limit(buckets + 4)
        dynamic = None if dynamic_batch else False
        options = dict(backend=backend) if backend != "inductor" else dict(mode=COMPILE_MODE)
        self._compile_args = dict(fullgraph=fullgraph, dynamic=dynamic, **options)
        self._body: Callable[..., Any] | None = None  # made at the first compiled call: `body`
        self._body_lock = threading.Lock()
        self._decode = decode
        self._on = threading.local()
        self._layers = list(layers)
        taken = [index for index, layer in enumerate(self._layers) if getattr(vars(layer).get("forward"), "regional", False)]
        if taken:  # checked before any layer changes: a refusal leaves the model as it was
            raise RuntimeError(f"decoder layer {taken[0]} is compiled regionally already")
        # What each layer had of its own (the fused decode layer's forward, kernels/layer.py), put back by `restore`.
        self._previous = [vars(layer).get("forward") for layer in self._layers]
        for index, layer in enumerate(self._layers):
            layer.forward = self._forward_for(layer, index)

    def __call__(self, rows: int, kv: Any) -> Any:
        previous = getattr(self._on, "value", False)
        self._on.value = True
        try:
            return self._decode(rows, kv)
        finally:
            self._on.value = previous

    def body(self) -> Callable[..., Any]:
        """The compiled region, made at the first compiled call (the compile thread's, after the engine serves):
        `torch.compile` imports AOT autograd and dynamo's debugging modules first, ~1 s of the engine's start on an
        H100 host (bench/results/h100/s20_cs_pyspy_coldstart.json) that the eager graphs do not need."""
        body = self._body
        if body is None:
            with self._body_lock:
                if self._body is None:
                    import torch

                    self._body = torch.compile(_layer_body, **self._compile_args)
                body = self._body
        return body

    def _forward_for(self, layer: Any, index: int) -> Callable[..., Any]:
        eager = layer.forward  # the layer's own (an instance's forward, if it has one) for every other caller
        on = self._on

        def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
            if getattr(on, "value", False) and hasattr(past_key_values, "layer"):
                return self.body()(layer, *args, past_key_values=past_key_values.layer(index), **kwargs)
            return eager(*args, past_key_values=past_key_values, **kwargs)

        forward.regional = True  # type: ignore[attr-defined]
        return forward

    def restore(self) -> None:
        """The layers' forward as before (the compiled regions stay in dynamo's cache, unused)."""
        for layer, previous in zip(self._layers, self._previous, strict=True):
            if previous is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = previous
        self._layers, self._previous = [], []


def graph_blocker(model: Any) -> str | None:
    """Why the decode step cannot be captured in a CUDA graph, or None."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and getattr(getattr(module, "state", None), "threshold", 0.0) > 0:
            return (
                "bitsandbytes LLM.int8 with llm_int8_threshold > 0 tests its outliers on the host "
                "(`outliers.any()`), which CUDA graph capture forbids"
            )
    return None


# ------------------------------------------------------------ a compile that other threads do not see

_private_session = threading.local()  # .on: this thread compiles without raising torch's process-wide flag


@contextlib.contextmanager
def private_compile_session() -> Iterator[None]:
    """Compiles on this thread without telling the other threads that "torch is compiling".

    torch >= 2.14 holds `torch.compiler._is_compiling_flag` (what `torch.compiler.is_compiling()` returns, hence
    transformers' `is_torchdynamo_compiling()` and `is_tracing()`) True for a whole compile session, and the flag is
    one module global: while the background compile traces, the engine thread's eager forwards would take
    transformers' tracing paths (its prefill masks materialised instead of SDPA's causal flag, its
    CompileableContextVar switched to one global shared by both threads, checks turned into `torch._check`).
    Inside this context, compiles on this thread leave the flag alone. The code dynamo traces still sees
    `is_compiling()` True (dynamo folds the call to a constant, whatever the flag); only code that runs during the
    session without being traced would see False here: AOTAutograd's and inductor's own passes, which do not ask.
    Other threads' compiles (a recompile on the engine thread) keep torch's behaviour.
    """
    _install_thread_aware_session()
    previous = getattr(_private_session, "on", False)
    _private_session.on = True
    try:
        yield
    finally:
        _private_session.on = previous


def _install_thread_aware_session() -> None:
    """Wraps torch's `_compile_session_context` (looked up at each compile) once per process: a pass-through except
    on a thread inside `private_compile_session`. Versions without it never set the flag for a compile."""
    import torch.compiler

    original = getattr(torch.compiler, "_compile_session_context", None)
    if original is None or getattr(original, "_qwen3vl_thread_aware", False):
        return

    @contextlib.contextmanager
    def session(*args: Any, **kwargs: Any) -> Iterator[None]:
        if getattr(_private_session, "on", False):
            yield
        else:
            with original(*args, **kwargs):
                yield

    session._qwen3vl_thread_aware = True  # type: ignore[attr-defined]
    session.__wrapped__ = original  # type: ignore[attr-defined]
    torch.compiler._compile_session_context = session


# ------------------------------------------------------------ a background compile that gives the GIL back


def yielding_hook(
    last_step: Callable[[], float], run_s: float, pause_s: float, recent_s: float = 0.1
) -> Callable[[Any, str, Any], None]:
    """A profile function for the compile thread: after each `run_s` it ran, it sleeps `pause_s` (the GIL released)
    if the engine stepped within the last `recent_s` (`last_step()`: the perf_counter time of its latest step).

    Why: dynamo and inductor are Python, and every torch op, graph replay and host sync of the engine thread
    releases the GIL; the compile thread takes it each time and the engine waits its turn (bench/gil_check.py). A
    lower switch interval only shortens each wait; a compile that sleeps leaves the engine alone for that long. The
    cost per Python call of the compile thread is one clock read; an idle engine leaves the compile at full speed.
    """
    clock = time.perf_counter
    state = [clock()]

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        now = clock()
        if now - state[0] < run_s:
            return
        if now - last_step() < recent_s:
            time.sleep(pause_s)
        state[0] = clock()

    return hook


@contextlib.contextmanager
def yielding_compile(last_step: Callable[[], float], run_s: float, pause_s: float) -> Iterator[None]:
    """Installs `yielding_hook` on this thread only (sys.setprofile is per thread) and restores what was there."""
    import sys

    previous = sys.getprofile()
    if run_s <= 0 or pause_s <= 0:
        yield
        return
    sys.setprofile(yielding_hook(last_step, run_s, pause_s))
    try:
        yield
    finally:
        sys.setprofile(previous)
