"""Compiling and CUDA graphs for the batch engine: decode steps warmed up and captured per batch bucket at start-up
(replayed at each step), and the prefill's first-chunk graphs or compiled chunks; no request waits for either."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.engine.batch import compiled, prefill
from qwen3vl_webui.engine.batch.kv import SlotKV
from qwen3vl_webui.engine.batch.options import LEN_ALIGN, BatchOptions
from qwen3vl_webui.engine.batch.runner import ModelRunner
from qwen3vl_webui.kernels import attention, fusion, vision
from qwen3vl_webui.weights.model import LoadedModel

log = logging.getLogger(__name__)


class DecodeGraphs:
    """How decode steps (and prompt chunks) run: eager, compiled by inductor, and/or replayed from CUDA graphs.

    On CUDA the decode step is compiled (`compile`) and replayed from graphs captured at start-up, one per batch
    bucket; start-up therefore compiles (~a minute per bucket cold, far less with the on-disk cache in
    `compile_cache_dir`). A failure leaves a slower path that is still correct, and says why.
    """

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, kv: SlotKV, options: BatchOptions) -> None:
        self.loaded = loaded
        self.runner = runner
        self.kv = kv
        self.options = options
        self.buckets = options.slot_buckets
        on_cuda = str(loaded.device).startswith("cuda")
        self.cuda_graphs = on_cuda if options.cuda_graphs is None else (options.cuda_graphs and on_cuda)
        self.compile = compiled.should_compile(options.compile, loaded.device, loaded.precision)
        self.compile_error: str | None = None
        self.graph_error: str | None = None
        # Prompt chunks (engine/batch/prefill.py): the eager text model costs ~0.85 ms of host time a layer whatever the
        # length, ~30 ms for any prompt. `prefill_graphs` (None: wherever decode steps are graphed) replays first
        # chunks from CUDA graphs captured at start-up. `compile_prefill` runs chunks through torch.compile with
        # dynamic lengths instead (a CPU test covers it; on an H100 it adds minutes of compiling to start-up).
        self.prefill_graphs = self.cuda_graphs if options.prefill_graphs is None else bool(options.prefill_graphs)
        self.compile_prefill = bool(options.compile_prefill)
        self.prefill_error: str | None = None
        self.prefill_warmup_s = 0.0
        # Decode Linears (kernels/fusion.py): q/k/v and gate/up as one product each, and one-row products on 16-bit
        # weights through the Triton GEMV. On by default on CUDA (bf16 1 stream 219 -> 270 tok/s on an H100,
        # bench/results/h100/gemv_check.json); each skips the layers it cannot take (quantized, fp32).
        self.fuse = on_cuda if options.fuse is None else bool(options.fuse)
        self.gemv = on_cuda if options.gemv is None else bool(options.gemv)
        self.gemv_linears = 0
        self.fused_groups = 0
        self.decode_attention = ""
        self.warmup_s: dict[int, float] = {}  # per bucket: compile (if any) + two warm-up steps
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._step: Callable[[int], Any] = runner.forward
        self._restore_attention: Callable[[], None] = lambda: None
        self._restore_vision: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ start-up (worker thread)

    def prepare(self) -> None:
        self._prepare_decode()
        self._prepare_prefill()

    def _prepare_decode(self) -> None:
        """Compiles (if asked) and warms up every bucket, then captures the graphs: all before the first request."""
        import torch

        model = self.loaded.model
        text = model.config.text_config
        device = self.loaded.device
        on_cuda = str(device).startswith("cuda")
        if self.cuda_graphs and (blocker := compiled.graph_blocker(model)):
            log.warning("decode steps run eagerly: %s", blocker)
            self.graph_error, self.cuda_graphs = blocker, False
        # Decode attention: the split-KV kernel over each row's live length where it runs (CUDA), compiled or not;
        # else SDPA over the whole slot behind the 4D mask (CPU: exactly as `generate`'s eager path).
        if self.options.decode_kernel:
            kernel_blocker = attention.decode_kernel_blocker(device, text, self.kv.dtype)
        else:
            kernel_blocker = "turned off (BatchOptions.decode_kernel)"
        if kernel_blocker is not None and on_cuda:
            log.warning("decode attention stays on SDPA: %s", kernel_blocker)
        decode_kernel = kernel_blocker is None
        if self.compile or decode_kernel:
            self._restore_attention = attention.use_packed_decode_attention(text)
            decode_kernel = decode_kernel and text._attn_implementation == attention.PACKED_DECODE_ATTENTION
        self.runner.decode_kernel = decode_kernel
        self.decode_attention = "split-KV triton" if decode_kernel else f"sdpa ({kernel_blocker or 'not routed'})"
        self._restore_vision = vision.use_packed_vision_attention(model.model.visual)
        lm = self.runner.lm
        if self.fuse:
            self.fused_groups = fusion.fuse_projections(lm, gemv=self.gemv)
        if self.gemv:
            self.gemv_linears = fusion.route_gemv([lm, self.runner.lm_head])
        forward: Callable[[int], Any] = self.runner.forward
        if self.compile:
            compiled.use_cache_dir(self.options.compile_cache_dir)
            # bitsandbytes layers break the graph (tensor-subclass weights); the pieces between them still fuse.
            fullgraph = not precisions.needs_bitsandbytes(self.loaded.precision)
            forward = compiled.compile_decode(
                self.runner.forward, len(self.buckets), fullgraph=fullgraph, dynamic_batch=self.options.dynamic_batch
            )
        if not self.compile and not self.cuda_graphs:
            return  # plain eager: nothing to prepare
        side = torch.cuda.Stream() if on_cuda else None
        try:
            self._warm_up(forward, side)
        except Exception as exc:
            if not self.compile:
                raise
            # Decoding stays correct uncompiled (graphs only): report it rather than refuse to start.
            log.warning("torch.compile of the decode step failed; decoding uncompiled: %r", exc)
            self.compile_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.compile = False
            if not self.runner.decode_kernel:  # the packed route was only there for the compiled step
                self._restore_attention()
                self._restore_attention = lambda: None
            torch._dynamo.reset()
            forward = self.runner.forward
            if self.cuda_graphs:
                self._warm_up(forward, side)
        self._step = forward
        if self.cuda_graphs:
            self._capture(forward)
        self.kv.zero()  # warm-up wrote at position 0 of every slot

    def _warm_up(self, forward: Callable[[int], Any], stream: Any) -> None:
        """Two steps per bucket (the first one compiles), off the capture stream as torch.cuda.graph asks."""
        import contextlib

        import torch

        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for rows in self.buckets:
                started = time.perf_counter()
                for _ in range(2):
                    forward(rows)
                if stream is not None:
                    stream.synchronize()
                self.warmup_s[rows] = round(time.perf_counter() - started, 2)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()

    def _capture(self, forward: Callable[[int], Any]) -> None:
        import torch

        pool = torch.cuda.graph_pool_handle()
        try:
            for rows in sorted(self.buckets, reverse=True):  # largest first: the shared pool fits them all
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = forward(rows)
                self._graphs[rows] = (graph, out)
        except Exception as exc:
            log.warning("CUDA graph capture of the decode step failed; decoding without graphs: %r", exc)
            self._graphs.clear()
            self.cuda_graphs = False
            self.graph_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.synchronize()

    def _prepare_prefill(self) -> None:
        """Captures the first-chunk graphs and/or compiles chunks, so no request waits for either.

        A failure leaves prompts on the eager path, correct and slower, and says why in `prefill_path`.
        """
        started = time.perf_counter()
        self.prefill_graphs = self.prefill_graphs and self.cuda_graphs  # not where decode steps could not be graphed
        chunk = self.options.prefill_chunk
        if self.prefill_graphs:
            steps = range(self.options.prefill_graph_step, chunk, self.options.prefill_graph_step)
            try:
                graphs = self.runner.new_chunk_graphs((*steps, chunk))
                graphs.capture()
                self.runner.chunk_graphs = graphs
            except Exception as exc:
                log.warning("CUDA graph capture of the prefill failed; prompts prefill eagerly: %r", exc)
                self.prefill_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        if self.compile_prefill:
            self._compile_prefill()
        self.prefill_warmup_s = round(time.perf_counter() - started, 2)

    def _compile_prefill(self) -> None:
        """Compiles prompt chunks and warms both graphs.

        `dynamic=True` makes the chunk and past lengths symbolic; dynamo still specialises an empty past, so a
        first chunk and a later one are two graphs, each covering every length >= 2 (1-token chunks run eagerly).
        """
        import torch

        fn = torch.compile(prefill.chunk_forward, dynamic=True, fullgraph=True, mode=compiled.COMPILE_MODE)
        text = self.loaded.model.config.text_config
        device = self.loaded.device
        length = 2 * LEN_ALIGN
        try:
            compiled.use_cache_dir(self.options.compile_cache_dir)
            for past in (0, length):
                embeds = torch.zeros(1, length, text.hidden_size, dtype=self.kv.dtype, device=device)
                positions = torch.arange(past, past + length, device=device).view(1, 1, -1).repeat(4, 1, 1)
                kv = self.kv.no_past.new_zeros(past, *self.kv.no_past.shape[1:])
                deepstack = embeds.new_zeros(self.runner.deepstack_layers, *embeds.shape)
                fn(self.runner.lm, embeds, positions, kv, deepstack)
        except Exception as exc:
            log.warning("torch.compile of the prefill failed; prompts prefill eagerly: %r", exc)
            self.prefill_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            return
        self.runner.chunk_forward = fn

    # ------------------------------------------------------------------ steps (worker thread)

    def logits(self, n: int) -> Any:
        """Logits [n, vocab] of one decode step over slots [0, n): a graph replay, the compiled step, or eager."""
        if self._graphs or self.compile:
            rows = next(b for b in self.buckets if b >= n)  # compiled code exists for the buckets only
            if self._graphs:
                graph, out = self._graphs[rows]
                graph.replay()
                return out[:n]
            return self._step(rows)[:n]
        return self.runner.forward(n)

    def graph(self, rows: int) -> Any:
        """Benchmarks: the captured decode graph of bucket `rows`, or None."""
        entry = self._graphs.get(rows)
        return entry[0] if entry is not None else None

    def step(self, rows: int) -> Any:
        """Benchmarks: one decode step of bucket `rows` launched op by op (compiled if compiled), no sampling."""
        return self._step(rows)

    @property
    def captured(self) -> tuple[int, ...]:
        """Buckets with a captured decode graph."""
        return tuple(sorted(self._graphs))

    @property
    def decode_path(self) -> str:
        """How decode steps run, in words (the live panel shows it)."""
        if self._graphs:
            return "cuda graphs + torch.compile" if self.compile else "cuda graphs"
        if self.compile:
            return "torch.compile (no graphs)"
        reasons = [r for r in (self.graph_error, self.compile_error) if r]
        return "eager" + (f" ({'; '.join(reasons)})" if reasons else "")

    @property
    def prefill_path(self) -> str:
        """How prompt chunks run, in words."""
        paths = []
        if self.runner.chunk_graphs is not None:
            paths.append("cuda graphs (first chunks)")
        paths.append("torch.compile" if self.runner.chunk_forward is not prefill.chunk_forward else "eager")
        return " + ".join(paths) + (f" ({self.prefill_error})" if self.prefill_error else "")

    # ------------------------------------------------------------------ shutdown

    def release(self) -> None:
        self._graphs.clear()
        self.runner.chunk_graphs = None

    def restore(self) -> None:
        """Undoes what start-up changed on the model: attention routes, fused projections."""
        self._restore_attention()
        self._restore_vision()
        fusion.unfuse(self.loaded.model)
