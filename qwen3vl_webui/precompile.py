"""`python -m qwen3vl_webui.precompile [the app's flags]`: compile the decode step ahead of time and save its artifacts.

It takes the flags the app will be started with (the model, --precision, --max-concurrency and --max-context size the
compiled step; --cache-dir says where the artifacts go), loads the weights as the engine process would, compiles every
batch bucket before returning and writes `<cache dir>/compiled/decode-<hash>.artifacts`. A later start of the app with
the same flags on the same kind of GPU and the same versions loads them and compiles nothing (the Dockerfile says how
to bake them into an image, or keep them on a volume).
"""

from __future__ import annotations

import logging
import sys
import time


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
    decoder = RemoteDecoder(settings.max_concurrency, settings.max_context, settings.cache_dir, settings.attn)
    spec = decoder.spec(source, precision, device)
    if spec["options"].get("compile") is False:
        print("nothing to compile: --compile off")
        return 0
    options = BatchOptions(**{**spec["options"], "background_compile": False})  # every bucket before returning
    loaded = loading.load_model(source, precision, device, settings.attn, lambda text: logging.info("%s", text))
    with BatchEngine(loaded, options) as engine:
        state, outcome, key = engine.compile_state, engine.artifacts, engine.core.graphs.artifact_key()
        error = engine.compile_error
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


if __name__ == "__main__":
    raise SystemExit(main())
