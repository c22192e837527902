"""The engine process: loads the weights, runs the batch engine, and speaks the protocol with the front end.

Started by `client.EngineProcess` as `python -m qwen3vl_webui.engine.remote.worker`, with its spec (a pickled dict)
on stdin. Nothing but the engine runs Python here: the scheduler and the GPU worker thread, a thread that reads the
front end's messages (and hashes a prompt's pixels for prefix reuse, off the GPU thread), and a stats tick.
It exits when the front end says so, when the front end's end of the socket closes (the front end died), or when
the engine's worker thread dies (a fatal CUDA error): the front end then restarts it.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from qwen3vl_webui.engine.batch import BatchOptions, EngineOutputs, RequestOutput
from qwen3vl_webui.engine.remote.protocol import (
    STATS_EVERY_S,
    Channel,
    EngineInfo,
    EngineStats,
    RemoteError,
    from_wire,
    remote_error,
)

log = logging.getLogger("qwen3vl_webui.engine")
_imported_at = 0.0  # wall time the imports were done (the prewarm's, when started with --prewarm)


def main() -> int:
    # Ctrl-C (and a service manager's SIGTERM) reach the whole process group: the front end decides when the
    # engine stops, after its drain; from the first line, so a prespawned process waiting for its spec lives too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    global _imported_at
    from qwen3vl_webui.weights import lean

    lean.skip(*lean.ENGINE_PROCESS)  # before any transformers module binds its checks (weights/lean.py)
    if "--prewarm" in sys.argv[1:]:  # started at launch (client.prespawn): the slow imports before the model is known
        prewarm()
    _imported_at = time.time()
    try:
        spec: dict[str, Any] = pickle.load(sys.stdin.buffer)
    except EOFError:  # the front end exited (or never needed this process)
        return 0
    env = spec.pop("env", None)
    if env is not None:  # the front end's environment when it gave the model (a prespawned process has the launch's)
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
    logging.basicConfig(
        level=spec.get("log_level", logging.INFO), format="%(asctime)s %(levelname)s engine: %(message)s"
    )
    # If the front end dies, however it dies, its end of the socket closes and this process exits (and the stats
    # tick notices a new parent). Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started us ends, and
    # the front end starts engines from short-lived threads.
    from multiprocessing.connection import Client

    channel = Channel(Client(spec["address"], family="AF_UNIX", authkey=spec["authkey"]))
    try:
        engine, info = _start(spec, channel)
    except BaseException as exc:  # the front end says why and decides about restarting
        log.exception("the engine failed to start")
        text = str(exc).strip().splitlines()
        channel.send(("failed", text[0] if text else type(exc).__name__))
        return 1
    worker = Worker(engine, channel)
    channel.send(("ready", info))
    return worker.serve()


def prewarm() -> None:
    """Imports what loading and serving the model need (torch is in already), so that it is done when the spec
    arrives; modules that fail to import here fail again, with their message, where they are used."""
    import importlib

    # Only what building the weights needs (the batch engine itself is imported with this module). Not inductor's
    # compile_fx (0.6 s of 4.8 on a 2-core CPU, bench/prewarm_check.py): until the spec is read the weights wait for
    # this, and nothing imports it before the engine serves in the background mode (the compile thread does).
    names = ("transformers", "transformers.models.qwen3_vl.modeling_qwen3_vl", "qwen3vl_webui.weights.loading")
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - reported by the import that needs it
            continue


def _start(spec: dict[str, Any], channel: Channel) -> tuple[Any, EngineInfo]:
    import torch

    from qwen3vl_webui.engine.batch import BatchEngine
    from qwen3vl_webui.weights.loading import load_model

    def progress(text: str) -> None:
        log.info("%s", text)
        channel.send(("progress", text))

    torch.set_grad_enabled(False)
    # The kernels' probes beside the weights' load. Sessions 25-26 also started them during the prewarm imports (the
    # spec read on a thread): no gain on an H100, the imports ~0.5 s longer beside them (one GIL), first answer
    # 14.40 s against 14.28 (bench/RESULTS.md, session 26); removed.
    _start_early_probes(spec)
    loaded = load_model(spec["source"], spec["precision"], spec["device"], spec["attn"], progress, tokenizer_only=True)
    loaded_at = time.time()
    progress("Starting the batch engine (decode steps in CUDA graphs)…" if loaded.device.startswith("cuda")
             else "Starting the batch engine…")  # fmt: skip
    options = BatchOptions(**spec["options"])
    note = ""
    try:
        engine = BatchEngine(loaded, options)
    except Exception as exc:  # e.g. a kernel that cannot be captured: keep serving, eagerly
        log.warning("batch engine with CUDA graphs failed to start (%s); retrying without graphs", exc)
        engine = BatchEngine(loaded, BatchOptions(**{**spec["options"], "cuda_graphs": False}))
        note = f"CUDA graphs off: {exc}"
    info = EngineInfo(
        precision=loaded.precision, label=loaded.label, device=loaded.device, source=loaded.source,
        is_demo=loaded.is_demo, load_seconds=loaded.load_seconds, weights_bytes=loaded.weights_bytes,
        max_batch=engine.max_batch, max_len=engine.max_len, prefix_slots=engine.prefix_slots,
        decode_path=engine.decode_path, note=note, pid=os.getpid(), loaded_at=loaded_at,
        serving_at=engine.core.serving_at, imported_at=_imported_at,
    )  # fmt: skip
    return engine, info


def _start_early_probes(spec: dict[str, Any]) -> None:
    """The kernels' probes on a thread while the weights load (CUDA): they need the GPU, the dtype and the head
    shapes only; the engine's own pass then finds their answers (engine/batch/graphs.py `start_early_probes`).
    Triton's cache is set up first, with the carried kernel builds unpacked into it (engine.prepare_kernels), as the
    engine would before building anything: the probes build where the engine looks and its artifacts save. Only a
    speed-up: any failure here leaves the probes to the engine, with one log line."""
    device = str(spec["device"])
    if not device.startswith("cuda"):
        return
    try:
        from qwen3vl_webui.engine.batch.engine import prepare_kernels
        from qwen3vl_webui.engine.batch.graphs import start_early_probes
        from qwen3vl_webui.weights.loading import text_heads
        from qwen3vl_webui.weights.model import compute_dtype

        shape = text_heads(spec["source"])
        if shape is None:
            return
        from qwen3vl_webui.kernels import pdl

        options = BatchOptions(**spec["options"])
        prepare_kernels(options, device)
        mma = None
        if spec["precision"] == "fp8":  # whether fp8's weights will take kernels/fp8_mma.py's layout (PDL gains there)
            from qwen3vl_webui.kernels import fp8_mma

            mma = fp8_mma.wanted(device)
        pdl.use_for(spec["precision"], mma)  # the probes build the kernels the engine will launch (with PDL or without)
        start_early_probes(device, compute_dtype(spec["precision"], device), *shape,
                           decode_kernel=options.decode_kernel, gemv_on=options.gemv is None or bool(options.gemv))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the engine probes (and sets up its cache) itself
        log.warning("kernel probes before the weights: not started (%s)", exc)


class Worker:
    """Reads requests into the engine; forwards each step's outputs; reports its load."""

    def __init__(self, engine: Any, channel: Channel) -> None:
        self.engine = engine
        self.channel = channel
        self._cancels: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        engine.add_listener(self._forward)

    def serve(self) -> int:
        threading.Thread(target=self._report, name="engine-stats", daemon=True).start()
        try:
            while True:
                try:
                    message = self.channel.recv()
                except (EOFError, OSError):  # the front end is gone
                    log.warning("the front end closed the connection: stopping")
                    return 0
                if not self._handle(message):
                    return 0
        finally:
            self._done.set()
            self.engine.close()

    def _handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "add":
            self._add(*message[1:])
        elif kind == "abort":
            with self._lock:
                events = [self._cancels.get(rid) for rid in message[1]]
            for event in events:
                if event is not None:
                    event.set()
        elif kind == "release":
            self._release()
        elif kind == "shutdown":
            return False
        else:
            log.warning("unknown message %r", kind)
        return True

    def _add(self, request_id: int, prompt: Any, sampling: Any) -> None:
        cancel = threading.Event()
        with self._lock:
            self._cancels[request_id] = cancel
        try:
            self.engine.add(from_wire(prompt), sampling, cancel, request_id=request_id)
        except Exception as exc:  # refused before it was queued (too long for a slot, bad grids)
            with self._lock:
                self._cancels.pop(request_id, None)
            failed = RequestOutput(request_id, error=remote_error(exc))
            self.channel.send(("out", EngineOutputs((failed,), 0, 0, 0)))

    def _forward(self, outputs: Any) -> None:
        """The engine's listener (on its GPU thread): the step's outputs, errors made plain, in one message."""
        plain = []
        ended = []
        for out in outputs.outputs:
            if out.error is not None and not isinstance(out.error, RemoteError):
                out = replace(out, error=remote_error(out.error))
            if out.finished is not None or out.error is not None:
                ended.append(out.request_id)
            plain.append(out)
        self.channel.send(("out", replace(outputs, outputs=tuple(plain))))
        if ended:
            with self._lock:
                for rid in ended:
                    self._cancels.pop(rid, None)

    def _release(self) -> None:
        gc.collect()
        from qwen3vl_webui.weights.model import release_cached_memory

        release_cached_memory()

    def _report(self) -> None:
        """The engine's load every STATS_EVERY_S, the first at once: until it arrives the front end cannot tell
        /ready whether decode runs at full speed (a first answer could otherwise beat the first report)."""
        engine_thread = self.engine.worker_thread
        parent = os.getppid()
        first = True
        while first or not self._done.wait(STATS_EVERY_S):
            first = False
            if os.getppid() != parent:  # the front end is gone and nobody will read us
                log.error("the front end died: exiting")
                os._exit(0)
            if not engine_thread.is_alive():  # a fatal error ended the GPU thread: let the front end restart us
                log.error("the engine's worker thread died: exiting")
                self.channel.close()
                os._exit(3)
            try:
                self.channel.send(("stats", stats(self.engine)))
            except (OSError, EOFError, BrokenPipeError):
                return


def stats(engine: Any) -> EngineStats:
    import torch

    device = engine.loaded.device
    snap = engine.snapshot()
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return EngineStats(
            snap,
            allocated=int(torch.cuda.memory_allocated(device)),
            reserved=int(torch.cuda.memory_reserved(device)),
            peak=int(torch.cuda.max_memory_allocated(device)),
            free=int(free),
        )
    import psutil

    return EngineStats(snap, free=int(psutil.virtual_memory().available))


if __name__ == "__main__":
    raise SystemExit(main())
