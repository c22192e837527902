"""Compiling and CUDA graphs for the batch engine: decode steps warmed up and captured per batch bucket at start-up
(replayed at each step), and the prefill's first-chunk graphs or compiled chunks; no request waits for either."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.engine.batch import artifacts, compiled, prefill
from qwen3vl_webui.engine.batch.kv import SlotKV
from qwen3vl_webui.engine.batch.options import LEN_ALIGN, BatchOptions
from qwen3vl_webui.engine.batch.runner import ModelRunner
from qwen3vl_webui.kernels import attention, builds, fusion, vision
from qwen3vl_webui.kernels import layer as fused_layer
from qwen3vl_webui.weights.model import LoadedModel

log = logging.getLogger(__name__)

# The switch interval while the compile thread runs (Python's default: 5 ms); see DecodeGraphs._compile_buckets.
SWITCH_INTERVAL_S = 0.00005
# While streams are under way, one first-chunk capture (~0.1 s) per this many seconds (DecodeGraphs.prefill_capture_due).
PREFILL_CAPTURE_GAP_S = 0.3


def _pdl_mode(precision: str, index: int | None, model: Any = None) -> tuple[int, str]:
    """Our kernels' launch mode for this precision on this GPU and its name (kernels/pdl.py; imported here, on CUDA:
    it imports Triton, which nothing imports at package import time); whether `model`'s fp8 weights took
    kernels/fp8_mma.py's layout decides fp8's."""
    from qwen3vl_webui.kernels import pdl

    if not pdl.available(index or 0):
        return pdl.OFF, pdl.NAMES[pdl.OFF]
    mma = None
    if precision == "fp8" and model is not None:
        mma = any(getattr(m, "mma_kind", None) is not None for m in model.modules())
    return pdl.use_for(precision, mma), pdl.describe()


def cuda_index(device: Any) -> int:
    """The CUDA device index `device` stands for: `torch.cuda.set_device` refuses a bare "cuda" (torch 2.14:
    "Expected a torch.device with a specified index"), which means the current device of the thread that asks."""
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


# Probe passes started before the engine (the engine process's, while the weights load), by device: the engine's
# own pass joins the one for its device first, so that no probe runs twice at once.
_early_probes: dict[str, threading.Thread] = {}


def probe_kernels(
    device: str, dtype: Any, heads: int, kv_heads: int, head_dim: int, decode_kernel: bool, gemv_on: bool
) -> None:
    """The kernels' probes (each builds its kernel on this GPU and checks it against torch: the split-KV attention,
    the GEMV, the vision tower's packed flash attention) at once, one thread each: their builds overlap, and the
    routing finds their cached answers. On the H200 the engine spent ~5.4 s before its warm-up, much of it building
    these one after the other (bench/results/h200/s18_cs_server_cold.log); on an H100 host they were still 3.3 s of
    a cold start (bench/results/h100/s20_cs_pyspy_server_cold.log), hence `start_early_probes`."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from qwen3vl_webui.kernels import gemv

    index = cuda_index(device)

    def on_device(probe: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        def run() -> Any:
            torch.cuda.set_device(index)  # a new thread starts on cuda:0; Triton launches on the current device
            with torch.inference_mode():
                return probe(*args)

        return run

    # The same keys the routing in DecodeGraphs._prepare_decode caches them under: the vision tower's and the weights'
    # `tensor.device`. Each with the cache its answer is kept in: a refusal seen here is dropped, so that the routing
    # asks once more, alone (a failure of this concurrent pass must not turn a kernel off for the process's life).
    probes = [(on_device(vision.packed_attention_blocker, torch.device("cuda", index), dtype), vision.probe)]
    if decode_kernel:
        probe = on_device(attention.kernel_blocker, device, dtype, heads, kv_heads, head_dim)
        probes.append((probe, attention.kernel_blocker))
        # The fused layer's kernels (it runs only with the split-KV attention); keyed as the routing asks.
        layer_probe = on_device(fused_layer.probe, f"cuda:{index}", dtype, heads, kv_heads, head_dim)
        probes.append((layer_probe, fused_layer.probe))
    if gemv_on:
        probes.append((on_device(gemv.probe, f"cuda:{index}", dtype), gemv.probe))
    with ThreadPoolExecutor(len(probes), thread_name_prefix="kernel-probe") as pool:
        futures = [(pool.submit(probe), cached) for probe, cached in probes]
        for future, cached in futures:
            if future.exception() is not None or future.result() is not None:
                cached.cache_clear()


def start_early_probes(
    device: str, dtype: Any, heads: int, kv_heads: int, head_dim: int, decode_kernel: bool, gemv_on: bool
) -> threading.Thread:
    """`probe_kernels` on a thread now: the engine process starts it before the weights load (the probes need only
    the GPU, the dtype and the head shapes), and the engine's own pass joins it. A failure here is the engine's to
    see again: a probe that raised or refused is asked once more, alone."""

    def run() -> None:
        started = time.perf_counter()
        try:
            probe_kernels(device, dtype, heads, kv_heads, head_dim, decode_kernel, gemv_on)
        except Exception as exc:  # noqa: BLE001 - the engine probes again and reports
            log.info("kernel probes beside the weights' load: %r (the engine probes again)", exc)
        else:
            log.info("kernel probes: %.2f s, beside the weights' load", time.perf_counter() - started)

    thread = threading.Thread(target=run, name="early-probes", daemon=True)
    _early_probes[device] = thread
    thread.start()
    return thread


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
        self.cuda_index = cuda_index(loaded.device) if on_cuda else None  # for the compile thread's set_device
        self.cuda_graphs = on_cuda if options.cuda_graphs is None else (options.cuda_graphs and on_cuda)
        self.compile = compiled.should_compile(options.compile, loaded.device, loaded.precision)
        # our kernels' launches overlap (programmatic dependent launch) where this precision gained from it
        self.pdl_mode, self.pdl_name = _pdl_mode(loaded.precision, self.cuda_index, loaded.model) if on_cuda else (0, "off")
        self.compile_error: str | None = None
        self.compile_skipped = ""  # why a compile that would have run did not (the fused layers serve at full speed)
        self.graph_error: str | None = None
        # Prompt chunks (engine/batch/prefill.py): the eager text model costs ~0.85 ms of host time a layer whatever the
        # length, ~30 ms for any prompt. `prefill_graphs` (None: wherever decode steps are graphed) replays first
        # chunks from CUDA graphs captured at start-up. `compile_prefill` runs chunks through torch.compile with
        # dynamic lengths instead (a CPU test covers it; on an H100 it adds minutes of compiling to start-up).
        self.prefill_graphs = self.cuda_graphs if options.prefill_graphs is None else bool(options.prefill_graphs)
        self.compile_prefill = bool(options.compile_prefill)
        self.prefill_error: str | None = None
        self.prefill_warmup_s = 0.0
        self._prefill_todo: prefill.ChunkGraphs | None = None
        self._prefill_last = 0.0
        self._start_after_prefill = False
        # Decode Linears (kernels/fusion.py): q/k/v and gate/up as one product each, and one-row products on 16-bit
        # weights through the Triton GEMV. On by default on CUDA (bf16 1 stream 219 -> 270 tok/s on an H100,
        # bench/results/h100/gemv_check.json); each skips the layers it cannot take (quantized, fp32).
        self.fuse = on_cuda if options.fuse is None else bool(options.fuse)
        self.gemv = on_cuda if options.gemv is None else bool(options.gemv)
        self.gemv_linears = 0
        self.fused_groups = 0
        self.fused_layers = on_cuda if options.fused_layers is None else bool(options.fused_layers)
        self.layers_path = "transformers"  # the eager decode step's layers: "fused kernels", or why not
        self.decode_attention = ""
        self.warmup_s: dict[int, float] = {}  # per bucket: compile (if any) + two warm-up steps
        self.kernel_build_s = 0.0
        self.capture_s = 0.0  # the decode graphs' captures at start-up
        self.stages: dict[str, float] = {}  # the decode start-up's other stages, seconds each (the log's line)
        # Compiling in the background (None: wherever the step is compiled on CUDA): serve from eager graphs first.
        self.background = on_cuda if options.background_compile is None else bool(options.background_compile)
        # First-chunk graphs captured between the first steps (None: wherever the decode step compiles in the
        # background, or would: `--compile off` serves at once as well).
        self.defer_prefill = self._defers_prefill(options)
        self.compile_state = "none" if not self.compile else "waiting"  # none, waiting, compiling, done, failed
        self.compiled_at: dict[int, float] = {}  # bucket -> wall time its compiled step began to serve
        self.artifacts = "off"  # compile artifacts: off, absent, ignored, loaded, saved
        # Our kernels' builds (BatchEngine loads them): off, absent, ignored, loaded, saving, saved.
        self.kernel_artifacts = "off"
        # Set once a start-up that compiles nothing has saved them (or needed not).
        self.kernels_settled = threading.Event()
        self.regional = False  # the decode step compiled as one decoder layer every layer runs (RegionalDecode)
        self.regional_error: str | None = None  # why the regional compile gave way to the whole step's
        self.gate: threading.Semaphore | None = None  # tests and benchmarks: one release per bucket to compile
        self.on_compiled: Callable[[], None] = lambda: None  # wakes the engine thread for a swap
        self.swapped = 0
        self.swap_errors = 0
        self.recompiled = 0  # swaps whose real inputs needed a compile of their own (should stay 0)
        self._compile_seq = 0  # odd while the compile thread is inside a bucket
        self._compiled: Callable[..., Any] = runner.decode  # the compiled decode(rows, kv), once compiling
        self._compiler: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._start_lock = threading.Lock()
        self._first: bool | None = None  # `_compile_first`, decided once
        self._ready: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # compiled buckets waiting for their swap
        self._stop = threading.Event()
        self._swapped = threading.Event()  # the engine thread took the last compiled bucket (see _compile_buckets)
        self._pool: Any = None  # the decode graphs' memory pool (swapped-in graphs share it)
        self._side: Any = None  # the stream graphs are captured on
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._steps: dict[int, Callable[[int], Any]] = {}  # compiled steps run without graphs (no CUDA graphs)
        self._step: Callable[[int], Any] = runner.forward
        self._restore_attention: Callable[[], None] = lambda: None
        self._restore_vision: Callable[[], None] = lambda: None
        self._restore_regional: Callable[[], None] = lambda: None
        self._restore_layers: Callable[[], None] = lambda: None
        self._fused_layers: fused_layer.FusedLayers | None = None
        self._restored = False
        # How long a close waits for the compile thread's next safe point. Correctness does not hang on it (past it
        # the model is left as the engine changed it, `restore`); a cold bucket compiles for about a minute on an
        # H100, and an engine process that exits gets 30 s before it is killed (remote/client.py STOP_WAIT_S).
        self.stop_timeout_s = 5.0

    def _defers_prefill(self, options: BatchOptions) -> bool:
        wanted = options.defer_prefill_graphs
        return (self.background if wanted is None else bool(wanted)) and not self.compile_prefill

    # ------------------------------------------------------------------ start-up (worker thread)

    def prepare(self) -> None:
        started = time.perf_counter()
        self._prepare_decode()
        decode_s = time.perf_counter() - started
        self._prepare_prefill()
        if self._prefill_todo is None:
            self._start_up_built()
        if self.cuda_graphs or self.compile:  # the start-up's two slow stages, apart (issue 14's timeline)
            prefill_mode = "eager" if self.runner.chunk_graphs is None else "graphs"
            if self._prefill_todo is not None:
                prefill_mode = "graphs to capture between steps"
            log.info("decode steps ready in %.1f s (%s; eager layers: %s; programmatic dependent launch: %s), prefill "
                     "in %.1f s (%s)", decode_s, self.decode_mode, self.layers_path, self.pdl_name,
                     self.prefill_warmup_s, prefill_mode)  # fmt: skip
            log.info("decode start-up: %s, kernel builds %.2f s, warm-up per batch size %s s, captures %.2f s",
                     ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items()), self.kernel_build_s, self.warmup_s,
                     self.capture_s)  # fmt: skip

    def _prepare_decode(self) -> None:
        """Compiles (if asked) and warms up every bucket, then captures the graphs: all before the first request."""
        import torch

        model = self.loaded.model
        text = model.config.text_config
        device = self.loaded.device
        on_cuda = str(device).startswith("cuda")
        clock = time.perf_counter()
        if on_cuda:
            try:
                self._probe_kernels(text)
            except Exception as exc:  # the routing below asks each probe again, one by one
                log.warning("kernel probes: the parallel pass failed (%r); probing one by one", exc)
        self.stages["probes"] = round(time.perf_counter() - clock, 2)
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
        self._route_layers(text, decode_kernel)
        self._skip_compile_for_fused_layers()
        self.stages["routes"] = round(time.perf_counter() - clock - self.stages["probes"], 2)
        if self.compile:
            self._set_up_compile()
        self.stages["compile set-up"] = round(time.perf_counter() - clock - sum(self.stages.values()), 2)
        if not self.compile and not self.cuda_graphs:
            # Plain eager: nothing to prepare, unless our kernels' builds are to be saved (`_start_up_built`): then
            # the warm-up builds them here, or the file would hold the probes' builds alone.
            if self._saves_kernels():
                self._warm_up(self.runner.forward, None)
                self.kv.zero()
            return
        side = torch.cuda.Stream() if on_cuda else None
        if self.compile and self.background:
            # Serve at once: eager steps in CUDA graphs now; the compiled ones are built by `start_background` and
            # swapped in bucket by bucket between two decode steps (`swap_ready`).
            self.compile_state = "waiting"
            if self.cuda_graphs:
                self._build_kernels(self.runner.forward, side)
                self._warm_up(self.runner.forward, side)
                self._capture(self.runner.forward)
            self.kv.zero()
            return
        forward: Callable[[int], Any] = self.runner.forward
        # Read once: fused layers that fail their warm-up give a skipped compile back (`_warm_up`), to run in the
        # background later, not here.
        compiling = self.compile
        if compiling:
            forward = self._compiled_forward()
            self.compile_state = "compiling"
        else:
            self._build_kernels(forward, side)
        try:
            try:
                self._warm_up(forward, side)
            except Exception as exc:
                if not (compiling and self._whole_step_instead(exc)):
                    raise
                forward = self._compiled_forward()
                self._warm_up(forward, side)
        except Exception as exc:
            if not compiling:
                raise
            # Decoding stays correct uncompiled (graphs only): report it rather than refuse to start.
            log.warning("torch.compile of the decode step failed; decoding uncompiled: %r", exc)
            self._compile_failed(exc)
            forward = self.runner.forward
            if self.cuda_graphs:
                self._warm_up(forward, side)
        self._step = forward
        compiled_here = compiling and self.compile  # a failed compile turned `compile` off (`_compile_failed`)
        if self.cuda_graphs:
            self._capture(forward)
        elif compiled_here:
            self._steps = {rows: forward for rows in self.buckets}
        if compiled_here:
            self.compile_state = "done"
            self.compiled_at = {rows: time.time() for rows in self.buckets}
            self._save_artifacts()
        self.kv.zero()  # warm-up wrote at position 0 of every slot

    def _route_layers(self, text: Any, decode_kernel: bool) -> None:
        """The eager decode step's layers through the fused kernels (kernels/layer.py), where they run: before the
        regional compile wraps the layers, whose eager side then calls them (its compiled side traces transformers')."""
        if not self.fused_layers:
            self.layers_path = "transformers (turned off)"
            return
        if not decode_kernel:
            self.layers_path = "transformers (the fused layer needs the split-KV decode attention)"
            return
        device = self.loaded.device
        if str(device).startswith("cuda"):
            heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
            blocker = fused_layer.probe(f"cuda:{cuda_index(device)}", self.kv.dtype, heads, kv_heads, head_dim)
            if blocker is not None:
                log.warning("decode layers stay on transformers' forward: %s", blocker)
                self.layers_path = f"transformers ({blocker})"
                return
        layers = list(self.runner.lm.layers)
        self._fused_layers = fused_layer.FusedLayers(layers, getattr(self.runner.lm, "norm", None))
        self._restore_layers = self._fused_layers.restore
        fused = self._fused_layers.count
        if not fused:
            self.layers_path = f"transformers ({fused_layer.fusable(layers[0]) if layers else 'no layers'})"
            return
        self.layers_path = (
            "fused kernels" if fused == len(layers) else f"fused kernels ({fused} of {len(layers)} layers)"
        )

    def _set_up_compile(self) -> None:
        compiled.use_cache_dir(self.options.compile_cache_dir)
        wanted = self.options.regional_compile
        self.regional = self.cuda_graphs if wanted is None else bool(wanted)  # part of the artifacts' key
        # In the background mode the compile thread loads them, off the way to the first answer; not when the
        # prefill compiles here before serving (compile_prefill), which uses them too.
        if not self.background or self.options.compile_prefill:
            self._load_artifacts()
        self._build_compiled()

    def _skip_compile_for_fused_layers(self) -> None:
        """The background compile (the default, not asked for by name) is not started where the fused layers serve
        every layer: on an H100 their eager step was 2-5% faster than the compiled one for bf16, int4 and fp8 at 1 and
        32 streams (bench/RESULTS.md, session 24), so a swap would hand a faster step over to a slower one, and the
        compile would only take CPU and GPU time from the first chats. `--compile before-serving` and precompile
        (asked for) still compile, and write the artifacts; BatchOptions.compile=True compiles whatever serves."""
        if not (self.compile and self.background and self.options.compile is None):
            return
        if self.layers_path != "fused kernels":
            return
        self.compile, self.compile_state = False, "none"
        self.compile_skipped = "the fused eager layers serve at full speed"
        log.info("decode step: not compiled (%s; --compile before-serving or BatchOptions.compile=True compiles it)",
                 self.compile_skipped)  # fmt: skip

    def _build_compiled(self) -> None:
        """`self._compiled`: the decode step compiled regionally (one decoder layer every layer runs) or whole."""
        # bitsandbytes layers break the graph (tensor-subclass weights); the pieces between them still fuse.
        fullgraph = not precisions.needs_bitsandbytes(self.loaded.precision)
        if self.regional:
            regional = compiled.RegionalDecode(
                self.runner.decode, self.runner.lm.layers, len(self.buckets), fullgraph=fullgraph,
                dynamic_batch=self.options.dynamic_batch, backend=self.options.compile_backend,
            )  # fmt: skip
            self._compiled, self._restore_regional = regional, regional.restore
        else:
            self._compiled = compiled.compile_decode(
                self.runner.decode, len(self.buckets), fullgraph=fullgraph,
                dynamic_batch=self.options.dynamic_batch, backend=self.options.compile_backend,
            )  # fmt: skip

    def _compiled_forward(self) -> Callable[[int], Any]:
        compiled_step = self._compiled
        return lambda rows: compiled_step(rows, self.kv)

    def _whole_step_instead(self, exc: BaseException) -> bool:
        """After the regional compile failed: the whole step's compile takes over (the layers get their own forward
        back; buckets already swapped in keep their graphs). False if it was not regional (nothing else to try)."""
        if not self.regional:
            return False
        log.warning("the regional compile of the decode step failed (%s); compiling the whole step instead",
                    str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)  # fmt: skip
        self._unroute_regional()
        self.regional = False
        self.regional_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        self._build_compiled()
        return True

    def _unroute_regional(self) -> None:
        """The decoder layers' own forward again (once; a no-op unless the step was compiled regionally)."""
        restore, self._restore_regional = self._restore_regional, lambda: None
        restore()

    def _compile_failed(self, exc: BaseException) -> None:
        import torch

        self.compile_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
        self.compile = False
        self.compile_state = "failed"
        self._unroute_regional()
        if not self.runner.decode_kernel:  # the packed route was only there for the compiled step
            self._restore_attention()
            self._restore_attention = lambda: None
        torch._dynamo.reset()

    # ------------------------------------------------------------------ compile artifacts

    def artifact_key(self) -> dict[str, str]:
        """What the compiled decode step depends on (engine/batch/artifacts.py); call after `prepare`."""
        engine = {
            "max_batch": self.options.max_batch, "max_len": self.options.max_len, "buckets": list(self.buckets),
            "dynamic_batch": self.options.dynamic_batch, "attention": self.decode_attention, "fuse": self.fuse,
            "gemv": self.gemv, "mode": compiled.COMPILE_MODE, "backend": self.options.compile_backend,
            "regional": self.regional,
        }  # fmt: skip
        return artifacts.setup_key(self.loaded, engine)

    def _load_artifacts(self) -> None:
        folder = self.options.artifacts_dir
        if folder is not None:
            self.artifacts = artifacts.load(folder, self.artifact_key())

    def _save_artifacts(self) -> None:
        folder = self.options.artifacts_dir
        if folder is not None and self.artifacts != "loaded":
            if artifacts.save(folder, self.artifact_key()) is not None:
                self.artifacts = "saved"
        # Our kernels are all built by now (the warm-ups ran every decode and prefill shape): carry them too.
        if self._saves_kernels():
            self._save_kernels(self.kernel_artifacts)

    def _saves_kernels(self) -> bool:
        """Whether this engine saves our kernels' builds: an artifacts folder, and no file of them loaded from it."""
        return self.options.artifacts_dir is not None and self.kernel_artifacts in ("absent", "ignored")

    def _save_kernels(self, unsaved: str) -> None:
        """Packs our kernels' builds into the artifacts folder; `kernel_artifacts` is then "saved", else `unsaved`."""
        folder = self.options.artifacts_dir
        saved = folder is not None and artifacts.save_kernels(folder, artifacts.kernels_key(self.loaded.device))
        self.kernel_artifacts = "saved" if saved else unsaved

    def _start_up_built(self) -> None:
        """Every kernel the start-up builds is built (the decode warm-ups, and the first-chunk captures, deferred or
        not). Where nothing compiles (the fused layers serve, or `--compile off`), no compile's end saves our kernels'
        builds (`_save_artifacts`), so they are saved now, on a thread of their own: packing them takes a moment,
        which the first answers need not wait for. The next start on this kind of GPU, or a fresh machine given the
        folder, unpacks them before its kernels are built (engine.prepare_kernels)."""
        if self.compile or not self.warmup_s or not self._saves_kernels():  # no warm-up: not all of them are built
            self.kernels_settled.set()
            return
        before, self.kernel_artifacts = self.kernel_artifacts, "saving"

        def save() -> None:
            try:
                self._save_kernels(before)
            finally:
                self.kernels_settled.set()

        threading.Thread(target=save, name="kernel-builds-save", daemon=True).start()

    # ------------------------------------------------------------------ serve at once, speed up in the background

    def start_background(self, delay_s: float = 0.0) -> None:
        """Starts compiling the buckets on a thread of its own, after `delay_s` seconds (call once the engine serves;
        the engine starts it sooner, `start_now`, when it is first idle)."""
        if self.compile_state != "waiting":
            return
        if delay_s <= 0:
            self.start_now()
            return
        timer = threading.Timer(delay_s, self.start_now)
        timer.daemon = True
        self._timer = timer
        timer.start()

    @property
    def compile_pending(self) -> bool:
        """The background compile waits to be started."""
        return self.compile_state == "waiting" and self._compiler is None and self.background and self.compile

    def start_now(self) -> None:
        with self._start_lock:
            if self.compile_state != "waiting" or self._compiler is not None or self._stop.is_set():
                return
            if self._prefill_todo is not None and not self._compile_first():
                self._start_after_prefill = True  # after the prefill's captures (`capture_prefill_next`)
                return
            self.compile_state = "compiling"  # from here no prefill capture starts (`prefill_capture_due`)
            self._compiler = threading.Thread(target=self._compile_buckets, name="decode-compile", daemon=True)
            self._compiler.start()

    def _compile_first(self) -> bool:
        """Whether the background compile goes before the first-chunk captures left (which then wait for it): where
        this setup's compile artifacts are on disk. From them every bucket compiles in seconds (6.7 s under traffic
        on an H100), while the 32 captures, one per PREFILL_CAPTURE_GAP_S while streams run, took 8 s and held the
        compile, hence full speed, until +32.6 s (bench/results/h100/s20_cs_server_artifacts.log). A cold compile
        (about a minute) keeps the captures first: they take seconds and cut prompts' time to the first token."""
        if self._first is None:
            self._first = self.compile and self._artifacts_on_disk()
        return self._first

    def _artifacts_on_disk(self) -> bool:
        """This setup's artifact file is in the artifacts folder and its header names this setup (not its payload
        read: a damaged one is found, and compiled past, by the compile thread's load)."""
        folder = self.options.artifacts_dir
        if folder is None:
            return False
        try:
            key = self.artifact_key()
            header, _ = artifacts.read_header(artifacts.path_for(folder, key))
        except Exception:  # noqa: BLE001 - absent or unreadable: the captures go first, as without artifacts
            return False
        return header.get("key") == key

    def _compile_buckets(self) -> None:
        """The compile thread: each bucket in ascending order (a dynamic batch size compiles at the second), two
        steps on the scratch twin of the KV inputs (the first compiles), then handed to the engine thread.

        Dynamo and inductor are Python (their Triton builds run in worker processes): this thread competes with the
        engine thread for the GIL. Every torch op, graph replay and host sync of the engine's step releases the GIL;
        once this thread has asked for it (after one switch interval), the engine hands it over at the next release
        and waits up to an interval to get it back: on the H200 eager graphs fell from 146 to 16 tok/s (1 stream) and
        2,256 to 104 (32) at 1 ms. So the interval is lowered meanwhile to 0.05 ms (bench/gil_check.py, a CPU stand-in
        with an all-Python compile: the engine at 0.07 of its speed alone at 5 ms and 1 ms, 0.30 at 0.05 ms, the
        compile ~15% longer). (A throttle that sleeps while the engine decodes, `compiled.yielding_compile`, measured
        in bench/gil_check.py, is not used: it made the compile 7x as long.) Grad
        mode is thread-local: inference mode here too, so the compiled step's guards hold on the engine thread.
        torch's "compiling" flag is process-wide: the session stays private to this thread
        (`compiled.private_compile_session`), so the engine thread's eager forwards meanwhile take transformers'
        eager paths, as they do before and after.

        A stop (`stop_background`) is honoured at the next safe point: before a bucket, between its two steps, while
        its swap waits; a compile cannot be interrupted, so the thread may still be tracing the model for that long.
        """
        import torch

        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        started = time.perf_counter()
        side = None
        try:
            self.compile_state = "compiling"
            if self.cuda_index is not None:
                torch.cuda.set_device(self.cuda_index)  # a new thread starts on cuda:0
                side = torch.cuda.Stream()
            # Here, not in `prepare`: loading them (reading, checking, unpickling into inductor's caches, importing
            # inductor) delayed the first answer, and nothing uses them before this thread's first compile.
            if self.artifacts == "off" and not self._stop.is_set():
                try:
                    self._load_artifacts()
                except Exception as exc:  # artifacts.load never raises; the key's inputs might: compile without
                    log.warning("compile artifacts: not looked for (%r); compiling", exc)
            with (
                compiled.private_compile_session(),
                torch.inference_mode(),
                torch.cuda.stream(side) if side is not None else contextlib.nullcontext(),
            ):
                scratch = self.kv.scratch()  # inference tensors like the engine's: their dispatch keys are guarded
                for rows in self.buckets:
                    while self.gate is not None and not self.gate.acquire(timeout=0.05):
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                    begun = time.perf_counter()
                    self._compile_seq += 1
                    try:
                        try:
                            if not self._two_steps(rows, scratch):
                                return
                        except Exception as exc:  # the regional compile failed: the whole step's takes over
                            if self._stop.is_set() or not self._whole_step_instead(exc):
                                raise
                            if not self._two_steps(rows, scratch):
                                return
                        if side is not None:
                            side.synchronize()
                    finally:
                        self._compile_seq += 1
                    self.warmup_s[rows] = round(time.perf_counter() - begun, 2)
                    log.info(
                        "decode step compiled for batch size %d in %.1f s; swapping it in", rows, self.warmup_s[rows]
                    )
                    self._swapped.clear()
                    self._ready.put(rows)
                    self.on_compiled()
                    # The next bucket waits for this one's swap (one step boundary away): a capture never overlaps
                    # this thread's GPU work (inductor's autotuning synchronises the device).
                    while not self._swapped.wait(0.5):
                        if self._stop.is_set():
                            return
        except Exception as exc:
            if self._stop.is_set():
                return
            log.warning("torch.compile of the decode step failed in the background; decoding stays eager: %r", exc)
            self.compile_error = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}"
            self._ready.put(None)  # the engine thread records the failure between two steps
            self.on_compiled()
        finally:
            if side is not None:  # nothing of this thread's stays in flight on the GPU once it has ended
                with contextlib.suppress(Exception):
                    side.synchronize()
            sys.setswitchinterval(interval)
        if self._stop.is_set():  # the engine closed meanwhile: nothing to keep
            return
        log.info("decode step compiled for every batch size in %.1f s", time.perf_counter() - started)
        self._save_artifacts()  # here, not on the engine thread: serialising them takes a moment

    def _two_steps(self, rows: int, scratch: SlotKV) -> bool:
        """The compile thread's two steps of a bucket (the first compiles); False if told to stop meanwhile."""
        for _ in range(2):
            if self._stop.is_set():
                return False
            with self._step_rows(rows):
                self._compiled(rows, scratch)
        return True

    @property
    def swap_pending(self) -> bool:
        """A compiled bucket waits to be swapped in: the engine leaves a step boundary free for it."""
        return not self._ready.empty()

    @property
    def boundary_wanted(self) -> bool:
        """The next step boundary has work of ours (a swap, a prefill capture): the engine leaves it free."""
        return self.swap_pending or self.prefill_capture_due(idle=False)

    def swap_ready(self) -> None:
        """Between two decode steps (nothing in flight), on the engine thread: swaps in one compiled bucket.

        One step of that bucket runs first on the real inputs, outside any graph: it writes each running row's KV at
        its position, exactly what the next step writes again, and its logits are dropped. It checks the compiled
        code needs no new compile for the real inputs (it would say so in the log), then the graph is captured on a
        side stream and replaces the eager one. The pause is that one step and the capture.
        """
        import queue

        try:
            rows = self._ready.get_nowait()
        except queue.Empty:
            return
        if rows is None:
            self.compile_state = "failed"
            self._unroute_regional()  # the layers' own forward again (the compile thread has ended)
            self._free_compile_memory()
            return
        try:
            self._swap_in(rows)
        except Exception as exc:  # the eager path of this bucket stays; the others may still swap
            log.warning("could not swap in the compiled decode step for batch size %d: %r", rows, exc)
            self.swap_errors += 1
        finally:
            self._swapped.set()
        self.swapped += 1
        if self.swapped < len(self.buckets):
            if self.swap_pending:
                self.on_compiled()  # the next one at the next step boundary
        else:
            self.compile_state = "done" if not self.swap_errors else "failed"
            compiled_step = self._compiled
            self._step = lambda n: compiled_step(n, self.kv)
            log.info(
                "decode: every batch size swapped in (%d of %d compiled)", len(self.compiled_at), len(self.buckets)
            )
            self._free_compile_memory()

    def _free_compile_memory(self) -> None:
        """Once the compile is over (last swap, or its failure), on the engine thread: returns the blocks the compile
        left cached (its side stream's warm-up steps, inductor's autotuning buffers) to the driver.

        `empty_cache` frees only blocks no tensor holds; the decode graphs' pool keeps its blocks while a graph uses
        it (the compiled graphs share it), so no replay loses memory. Here, between two decode steps, nothing is in
        flight or being captured. No `gc.collect()` (release_cached_memory): a full collection would stall the
        streams, and what the compile allocated is freed by reference counting as its steps return.
        """
        if not str(self.loaded.device).startswith("cuda"):
            return
        import torch

        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        log.info(
            "decode compile over: %.0f MiB of cached GPU memory returned",
            (before - torch.cuda.memory_reserved()) / 2**20,
        )

    def _swap_in(self, rows: int) -> None:
        import torch
        from torch._dynamo.utils import counters

        on_cuda = str(self.loaded.device).startswith("cuda")
        side = self._side if on_cuda else None
        # Dynamo's graph count is global: it tells a recompile only while the compile thread is between buckets.
        seq, graphs_before = self._compile_seq, counters["stats"]["unique_graphs"]
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with self._step_rows(rows), torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._compiled(rows, self.kv)
            if seq % 2 == 0 and seq == self._compile_seq and counters["stats"]["unique_graphs"] != graphs_before:
                self.recompiled += 1
                log.warning("the compiled decode step recompiled for the engine's own inputs (batch size %d)", rows)
            if self.cuda_graphs and on_cuda:
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out = self._compiled(rows, self.kv)
                finally:
                    graph.capture_end()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        if self.cuda_graphs and on_cuda:
            self._graphs[rows] = (graph, out)
        else:
            compiled_step = self._compiled
            self._steps[rows] = lambda n: compiled_step(n, self.kv)
        self.compiled_at[rows] = time.time()

    def stop_background(self, timeout: float | None = None) -> bool:
        """Asks the compile thread to stop at its next safe point (`_compile_buckets`) and waits up to `timeout`
        seconds (None: `stop_timeout_s`). True once no compile thread runs; False if one is still compiling."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        with self._start_lock:
            thread = self._compiler
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(self.stop_timeout_s if timeout is None else timeout)
        return not thread.is_alive()

    @property
    def compiling_now(self) -> bool:
        """The compile thread is alive: it may be reading (tracing, running) the model."""
        thread = self._compiler
        return thread is not None and thread.is_alive()

    def _probe_kernels(self, text: Any) -> None:
        """The kernels' probes for this model (`probe_kernels`): answered at once when the engine process started
        them while the weights loaded (`start_early_probes`)."""
        heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        early = _early_probes.pop(self.loaded.device, None)
        if early is not None:
            early.join()
        probe_kernels(
            self.loaded.device, self.kv.dtype, heads, kv_heads, head_dim, self.options.decode_kernel, self.gemv
        )

    def _step_rows(self, rows: int) -> Any:
        """Around a batch size's launches of its build, warm-up and capture: the mode its graph launches our kernels
        with (kernels/pdl.py, `step_rows`: one row may differ). Nothing on a CPU, where pdl (Triton) is not imported."""
        if self.pdl_name == "off":
            return contextlib.nullcontext()
        from qwen3vl_webui.kernels import pdl

        return pdl.step_rows(rows)

    def _build_kernels(self, forward: Callable[[int], Any], stream: Any) -> None:
        """Before the first warm-up (CUDA): one dry pass over every bucket builds the Triton kernels the steps launch,
        in parallel threads (kernels/builds.py); the warm-up then finds them built. Its outputs are garbage: the
        warm-up runs next and the KV is zeroed after it. A failure leaves the builds to the warm-up, one by one."""
        if stream is None or not builds.available():
            return
        import torch

        started = time.perf_counter()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream), builds.dry_launches() as run:
                for rows in self.buckets:
                    with self._step_rows(rows):
                        forward(rows)
            stream.synchronize()
        except Exception as exc:
            log.warning("kernel builds: the parallel pass failed (%r); each builds at its first launch", exc)
            return
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        self.kernel_build_s = round(time.perf_counter() - started, 2)
        log.info(
            "kernel builds: %d Triton kernels built in %.1f s on %d threads (%d launches skipped, %.1f s waited)",
            run.built, self.kernel_build_s, run.workers, run.skipped, run.wait_s,
        )  # fmt: skip

    def _warm_up(self, forward: Callable[[int], Any], stream: Any) -> None:
        """`_warm_up_steps`; should it fail while the fused layers serve, they are turned off (transformers' layer
        forward from then on, said in `layers_path`) and the warm-up runs once more. Their probe checks them at
        small shapes; a build the step's own shapes need (a block, a split count) could still fail here."""
        try:
            self._warm_up_steps(forward, stream)
        except Exception as exc:
            fused = self._fused_layers
            if fused is None or not fused.on:
                raise
            why = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            log.warning(
                "decode layers: the fused kernels failed in the warm-up (%s); transformers' forward instead", why
            )
            fused.turn_off()
            self.layers_path = f"transformers (the fused kernels failed in the warm-up: {why})"
            if self.compile_skipped:  # skipped for them: the background compile is the fast path again
                self.compile, self.compile_state, self.compile_skipped = True, "waiting", ""
                self._set_up_compile()
            self._warm_up_steps(forward, stream)

    def _warm_up_steps(self, forward: Callable[[int], Any], stream: Any) -> None:
        """Two steps per bucket (the first one compiles), off the capture stream as torch.cuda.graph asks."""
        import torch

        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for rows in self.buckets:
                started = time.perf_counter()
                with self._step_rows(rows):
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

        started = time.perf_counter()
        pool = self._pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream()
        try:
            for rows in sorted(self.buckets, reverse=True):  # largest first: the shared pool fits them all
                graph = torch.cuda.CUDAGraph()
                with self._step_rows(rows), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = forward(rows)
                self._graphs[rows] = (graph, out)
        except Exception as exc:
            log.warning("CUDA graph capture of the decode step failed; decoding without graphs: %r", exc)
            self._graphs.clear()
            self.cuda_graphs = False
            self.graph_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.synchronize()
        self.capture_s = round(time.perf_counter() - started, 2)

    def _prepare_prefill(self) -> None:
        """Captures the first-chunk graphs and/or compiles chunks, so no request waits for either; or, where the decode
        step compiles in the background, leaves the captures for the engine thread between its first steps
        (`defer_prefill_graphs`): ~3.5 s of captures (32 lengths) off the way to the first answer.

        A failure leaves prompts on the eager path, correct and slower, and says why in `prefill_path`.
        """
        started = time.perf_counter()
        self.prefill_graphs = self.prefill_graphs and self.cuda_graphs  # not where decode steps could not be graphed
        chunk = self.options.prefill_chunk
        if self.prefill_graphs:
            steps = range(self.options.prefill_graph_step, chunk, self.options.prefill_graph_step)
            try:
                graphs = self.runner.new_chunk_graphs((*steps, chunk))
                if self.defer_prefill:
                    self.defer_prefill_capture(graphs)
                else:
                    graphs.capture()
                    self.runner.chunk_graphs = graphs
            except Exception as exc:
                log.warning("CUDA graph capture of the prefill failed; prompts prefill eagerly: %r", exc)
                self.prefill_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
        if self.compile_prefill:
            self._compile_prefill()
        self.prefill_warmup_s = round(time.perf_counter() - started, 2)

    def defer_prefill_capture(self, graphs: prefill.ChunkGraphs) -> None:
        """Serves prompts eagerly until their length's graph is captured by `capture_prefill_next` (engine thread,
        between steps); holds the background compile until the last one (a capture must not overlap the compile
        thread's GPU work: inductor's autotuning synchronises the device)."""
        self.runner.chunk_graphs = graphs
        self._prefill_todo = graphs

    @property
    def prefill_capturing(self) -> bool:
        """First-chunk graphs are left to capture between steps."""
        return self._prefill_todo is not None

    def prefill_capture_due(self, idle: bool) -> bool:
        """Whether the next step boundary captures one (always when idle; while serving, one per
        PREFILL_CAPTURE_GAP_S, so the streams under way lose at most ~a third of their pace meanwhile)."""
        if self._prefill_todo is None or self.compile_state == "compiling":  # no capture beside the compile's GPU work
            return False
        return idle or time.perf_counter() - self._prefill_last >= PREFILL_CAPTURE_GAP_S

    def capture_prefill_next(self) -> None:
        """Between two steps, on the engine thread: captures one more first-chunk length (longest first)."""
        graphs = self._prefill_todo
        if graphs is None:
            return
        more = False
        try:
            more = graphs.capture_next()
        except Exception as exc:  # prompts prefill eagerly, as when the capture before serving fails
            log.warning("CUDA graph capture of the prefill failed; prompts prefill eagerly: %r", exc)
            self.prefill_error = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.runner.chunk_graphs = None
        self._prefill_last = time.perf_counter()
        if more and self.prefill_error is None:
            return
        if self.prefill_error is None:
            log.info("prefill: %d first-chunk graphs captured between steps (%.1f s of captures)",
                     len(graphs.lengths), graphs.capture_s)  # fmt: skip
        with self._start_lock:
            self._prefill_todo = None
            start, self._start_after_prefill = self._start_after_prefill, False
        self._start_up_built()
        if str(self.loaded.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # the eager runs' transients, cached on the captures' side stream
        if start:
            self.start_now()

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
        if self._graphs or self._steps:
            rows = next(b for b in self.buckets if b >= n)  # graphs and compiled code exist for the buckets only
            entry = self._graphs.get(rows)
            if entry is not None:
                graph, out = entry
                graph.replay()
                return out[:n]
            step = self._steps.get(rows)
            if step is not None:
                with self._step_rows(rows):
                    return step(rows)[:n]
        with self._step_rows(n):
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
    def decode_mode(self) -> str:
        """How decode steps run now: "compiled graphs", "graphs", "compiled" or "eager" (compiled: every bucket)."""
        compiled_now = self.compile and len(self.compiled_at) == len(self.buckets)
        if self._graphs:
            return "compiled graphs" if compiled_now else "graphs"
        return "compiled" if compiled_now else "eager"

    @property
    def decode_path(self) -> str:
        """How decode steps run, in words (the live panel shows it)."""
        if self.compile_state in ("waiting", "compiling") and self.compile:
            base = "cuda graphs" if self._graphs else "eager"
            return f"{base}, compiling {len(self.compiled_at)} of {len(self.buckets)} batch sizes"
        if self._graphs:
            return "cuda graphs + torch.compile" if self.compile and self.compiled_at else "cuda graphs"
        if self.compile and self.compiled_at:
            return "torch.compile (no graphs)"
        reasons = [r for r in (self.graph_error, self.compile_error) if r]
        return "eager" + (f" ({'; '.join(reasons)})" if reasons else "")

    @property
    def prefill_path(self) -> str:
        """How prompt chunks run, in words."""
        paths = []
        graphs = self.runner.chunk_graphs
        if graphs is not None and self._prefill_todo is graphs:
            done = len(graphs.lengths) - len(graphs.pending)
            paths.append(f"cuda graphs (first chunks: capturing, {done} of {len(graphs.lengths)} lengths)")
        elif graphs is not None:
            paths.append("cuda graphs (first chunks)")
        paths.append("torch.compile" if self.runner.chunk_forward is not prefill.chunk_forward else "eager")
        return " + ".join(paths) + (f" ({self.prefill_error})" if self.prefill_error else "")

    # ------------------------------------------------------------------ shutdown

    def release(self) -> None:
        self.stop_background()
        self._graphs.clear()
        self._steps.clear()
        self.runner.chunk_graphs = None

    def restore(self) -> bool:
        """Undoes what start-up changed on the model: attention routes, fused projections. Once; True when done.

        Never while the compile thread may still read the model (a close in the middle of a compile that did not
        reach a safe point within `stop_timeout_s`): the model is then left as it is, which still computes the same model
        (the same weights and attention, routed through other kernels), and a later call, once that thread has ended,
        undoes them.
        """
        if self._restored:
            return True
        # The layers' own forward first, even mid-compile: the compiled region calls the layer class's forward, never
        # the instance's, so the compile thread does not notice; a later engine on this model can compile again.
        self._unroute_regional()
        if self.compiling_now:
            log.warning(
                "the decode compile thread is still compiling: the model keeps its decode changes (attention routes, "
                "fused projections: the same model through other kernels); the thread ends at its next safe point"
            )
            return False
        self._restored = True
        self._restore_layers()
        self._restore_attention()
        self._restore_vision()
        fusion.unfuse(self.loaded.model)
        return True
