"""`python -m qwen3vl_webui.precompile [the app's flags]`: build ahead of time what the app's start builds, and save it.

It takes the flags the app will be started with (the model, --precision, --max-concurrency, --max-context and
--compile size the engine; --cache-dir says where the artifacts go), loads the weights as the engine process would and
starts the engine as the app does:
- where it would not compile its decode step (the fused eager layers serve every layer, the default on a GPU they
  run on, or `--compile off`), the start-up builds our Triton kernels and precompile writes them to
  `<cache dir>/compiled/kernels-<hash>.artifacts` (seconds);
- where it would compile, every batch bucket is compiled before returning and
  `<cache dir>/compiled/decode-<hash>.artifacts` is written beside the kernels' file.
A later start of the app with the same flags on the same kind of GPU and the same versions loads them: it builds and
compiles nothing (the Dockerfile says how to bake them into an image, or keep them on a volume).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions, compiled
    from qwen3vl_webui.engine.remote.decoder import RemoteDecoder
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.weights import loading, random_weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    device = loading.resolve_device(settings.device)
    source = settings.model if settings.random_weights == "off" else random_weights.source_for(settings.random_weights)
    if settings.demo:
        from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

        source = str(ensure_demo_checkpoint(settings.cache_dir))
    # The precision the app would pick (auto: what fits this GPU), through the app's own rule.
    manager = ModelManager(source, settings.precision, device, settings.attn, Scheduler(1, 0))
    precision = manager.resolve_precision(device)
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "bf16"
    if not compiled.should_compile(None, device, precision):
        print(f"nothing to compile: the batch engine does not compile its decode step for {precision} on {device}")
        return 0
    # The options the app's engine process is built with, from the same code: the same key, the same artifact file.
    decoder = RemoteDecoder(
        settings.max_concurrency, settings.max_context, settings.cache_dir, settings.attn, compile_mode=settings.compile
    )
    spec = decoder.spec(source, precision, device)
    loaded = loading.load_model(source, precision, device, settings.attn, lambda text: logging.info("%s", text))
    # First the engine exactly as the app starts it. A background compile waits at the gate (none is wanted here: it
    # would be the foreground's below, made once).
    gate = threading.Semaphore(0)
    with BatchEngine(loaded, BatchOptions(**spec["options"]), compile_gate=gate) as engine:
        if engine.compile_state == "none":  # nothing compiles with these flags (a failed compile is "failed")
            return _kernels_only(engine, decoder.artifacts_dir, time.perf_counter() - started)
        state, outcome, key, error = _outcome(engine)
    del engine  # its memory, before the next one's
    if state in ("waiting", "compiling"):  # the app compiles in the background (held at the gate): here, at once
        gc.collect()
        options = BatchOptions(**{**spec["options"], "background_compile": False})
        with BatchEngine(loaded, options) as engine:
            state, outcome, key, error = _outcome(engine)
    seconds = time.perf_counter() - started
    if state != "done":
        print(f"precompile failed after {seconds:.0f} s: {error or state}", file=sys.stderr)
        return 1
    from qwen3vl_webui.engine.batch import artifacts

    path = artifacts.path_for(decoder.artifacts_dir, key)
    if outcome == "loaded":
        print(f"already compiled: {path} matches this setup (nothing compiled, {seconds:.0f} s)")
    elif path.exists():
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s for {key['gpu']}, {precision}")
    else:
        print(f"compiled in {seconds:.0f} s but no artifacts were written (see the log)", file=sys.stderr)
        return 1
    return 0


def _outcome(engine: Any) -> tuple[str, str, dict[str, str], str | None]:
    """The compile's state, its artifacts' outcome and key, its error; once a kernels' save under way has ended (a
    file half written when the process exits would stay behind as a temporary file)."""
    if engine.kernel_artifacts == "saving":
        engine.core.graphs.kernels_settled.wait(KERNELS_SAVE_WAIT_S)
    return engine.compile_state, engine.artifacts, engine.core.graphs.artifact_key(), engine.compile_error


def _kernels_only(engine: Any, folder: str, seconds: float) -> int:
    """The app's start compiles nothing with these flags: its kernels' builds are what there is to carry."""
    graphs = engine.core.graphs
    why = graphs.compile_skipped or "--compile off"
    if not graphs.kernels_settled.wait(KERNELS_SAVE_WAIT_S):
        print(f"the engine's kernel builds were not saved within {KERNELS_SAVE_WAIT_S:.0f} s", file=sys.stderr)
        return 1
    from qwen3vl_webui.engine.batch import artifacts

    path = artifacts.kernels_path_for(folder, artifacts.kernels_key(engine.loaded.device))
    state = engine.kernel_artifacts
    if state == "loaded":
        print(f"already built: {path} matches this GPU (nothing compiled: {why}; {seconds:.0f} s)")
    elif state == "saved":
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): our kernels' builds; nothing compiled ({why})")
    elif state == "off":
        print(f"nothing to compile or carry: {why}, and no kernels are built off CUDA")
    else:
        print(f"the engine's kernel builds were not saved ({state}; see the log)", file=sys.stderr)
        return 1
    return 0


KERNELS_SAVE_WAIT_S = 120.0


if __name__ == "__main__":
    raise SystemExit(main())
