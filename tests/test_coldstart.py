"""Issue 14 on the tiny real Qwen3-VL (CPU): serve at once from the eager decode path, swap compiled buckets in
mid-stream (dynamo with its "eager" backend stands in for inductor), compile artifacts that are damaged or made for
another setup are ignored with one log line."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions, EngineOutputs, artifacts, compiled
from qwen3vl_webui.engine.request import PreparedPrompt, SamplingParams
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from qwen3vl_webui.service.timeline import decode_progress
from qwen3vl_webui.weights.loading import load_model
from qwen3vl_webui.weights.model import LoadedModel
from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
BUCKETS = (1, 2, 4)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(ensure_demo_checkpoint(tmp_path_factory.mktemp("coldstart"))), "fp32", "cpu")


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedPrompt]:
    image = tmp_path_factory.mktemp("media") / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(image)
    messages = {
        "text": UserMessage("hello there"),
        "count": UserMessage("Count the objects"),
        "image": UserMessage("Describe the image.", (str(image),)),
    }
    return {k: build_prompt(loaded, ChatRequest(m, sampling=GREEDY)) for k, m in messages.items()}


def reference(loaded: LoadedModel, prompt: PreparedPrompt) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(
            **prompt.inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens, repetition_penalty=1.0
        )
    return out[0, prompt.inputs["input_ids"].shape[1] :].tolist()


def options(tmp_path: Path, **changes: Any) -> BatchOptions:
    base = dict(
        max_batch=4, token_budget=4 * 512, eos_token_ids=(), buckets=BUCKETS, compile=True, background_compile=True,
        compile_backend="eager", compile_cache_dir=tmp_path / "inductor", artifacts_dir=tmp_path / "compiled",
        compile_delay_s=0.0, regional_compile=True,  # as on a GPU, where decode steps replay graphs
    )  # fmt: skip
    return BatchOptions(**{**base, **changes})


def _hold_until_the_next_swap(graphs: Any) -> None:
    """In an engine listener (the engine thread): waits until a compiled bucket is ready to swap in, or all are in."""
    deadline = time.monotonic() + 120
    while graphs.swapped < len(BUCKETS) and not graphs.swap_pending and time.monotonic() < deadline:
        time.sleep(0.01)


def _swap_mid_stream(
    engine: BatchEngine, prompts: dict[str, PreparedPrompt], names: list[str], gate: threading.Semaphore, after: int,
    record: Any,
) -> tuple[dict[str, list[int]], Any, list[Any]]:  # fmt: skip
    """Streams `names` together. After `after` published steps the gate lets every bucket compile, and from then on
    the engine thread holds at each step boundary until the next bucket is ready: one swap per boundary, mid-stream.
    Returns each stream's tokens, the snapshot at the end, and `record(outputs)` of every published step."""
    graphs = engine.core.graphs
    seen: list[Any] = []

    def listener(outputs: EngineOutputs) -> None:
        seen.append(record(outputs))
        if len(seen) == after:
            gate.release(len(BUCKETS))
        if len(seen) >= after:
            _hold_until_the_next_swap(graphs)

    engine.add_listener(listener)
    with engine.hold_admission():
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
    got = {n: list(s) for n, s in streams.items()}
    return got, engine.snapshot(), seen


def test_the_swap_from_the_fused_eager_layers_to_the_compiled_step_keeps_generates_tokens(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a GPU: the eager step's layers run the fused layer (kernels/layer.py, its torch references here) and
    the split-KV decode op; the compiled regions trace transformers' layer. Streams that cross the swap keep
    `generate`'s greedy tokens, and the fused layers served the steps before it."""
    from tests.test_fused_layer import fused_route

    fused_steps = fused_route(monkeypatch)
    names = ["text", "count"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    gate = threading.Semaphore(0)
    with BatchEngine(loaded, options(tmp_path, fused_layers=True), compile_gate=gate) as engine:
        assert engine.layers_path == "fused kernels"
        graphs = engine.core.graphs
        got, snap, seen = _swap_mid_stream(engine, prompts, names, gate, 5, lambda outputs: len(graphs.compiled_at))
        assert engine.compile_error is None
    assert got == expected
    assert snap.compile_done == len(BUCKETS) and seen[0] == 0 and seen[-1] == len(BUCKETS)
    layers = loaded.model.model.language_model.layers
    assert fused_steps and len(fused_steps) % (2 * len(layers)) == 0  # whole eager steps through the fused layers
    assert all("forward" not in vars(layer) for layer in layers)  # the regional and fused forwards both undone


def compiles_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compiled.should_compile` answers as for bf16 on CUDA: BatchOptions.compile None compiles, as in the app."""
    from qwen3vl_webui.engine.batch import compiled

    on_a_gpu = compiled.should_compile
    monkeypatch.setattr(
        compiled, "should_compile", lambda requested, device, precision: on_a_gpu(requested, "cuda", "bf16")
    )


def test_where_the_fused_layers_serve_the_default_background_compile_is_not_started(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's default (`--compile background`: BatchOptions.compile None) on a GPU, where the fused eager layers
    were faster than the compiled step (bench/RESULTS.md, H100 session 24): nothing compiles, the engine is at full
    speed from the start and keeps `generate`'s tokens. With transformers' layers the same options still compile."""
    from tests.test_fused_layer import fused_route

    fused_steps = fused_route(monkeypatch)
    compiles_as_on_a_gpu(monkeypatch)
    names = ["text", "count"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    with BatchEngine(loaded, options(tmp_path, compile=None, fused_layers=True)) as engine:
        assert engine.layers_path == "fused kernels" and engine.compile_state == "none"
        assert engine.core.graphs.compile_skipped and engine.snapshot().full_speed
        # what the status line says: full speed, and why nothing compiles
        assert decode_progress(engine.snapshot()) == "decode: eager, fused layers (full speed, nothing to compile)"
        with engine.hold_admission():
            streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        got = {n: list(s) for n, s in streams.items()}
        time.sleep(0.3)  # a background compile, had one been started, would be under way by now
        assert engine.compile_state == "none" and not engine.core.graphs.compiled_at
    assert got == expected and fused_steps
    with BatchEngine(
        loaded, options(tmp_path, compile=None, fused_layers=False), compile_gate=threading.Semaphore(0)
    ) as engine:
        assert engine.compile_state in ("waiting", "compiling") and not engine.core.graphs.compile_skipped
        assert decode_progress(engine.snapshot()) == "decode: eager; compiling decode graphs: 0 of 3 batch sizes"


def test_fused_layers_that_fail_their_warm_up_give_the_skipped_compile_back(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compile was skipped because the fused layers serve; should they fail in the warm-up (a build at the
    step's own shapes), transformers' layers serve and the background compile is the fast path again: it runs."""
    from tests.test_fused_layer import fused_route

    fused_route(monkeypatch)
    compiles_as_on_a_gpu(monkeypatch)
    with BatchEngine(loaded, options(tmp_path, compile=None, fused_layers=True)) as engine:
        graphs = engine.core.graphs
        assert graphs.compile_skipped and engine.compile_state == "none"

        def forward(rows: int) -> None:
            if graphs._fused_layers.on:
                raise RuntimeError("PassManager::run failed")  # what a Triton build failure raises

        graphs._warm_up(forward, None)
        assert engine.layers_path.startswith("transformers (the fused kernels failed")
        assert graphs.compile and not graphs.compile_skipped and graphs.compile_pending
        graphs.start_now()
        deadline = time.monotonic() + 120
        while engine.compile_state not in ("done", "failed") and time.monotonic() < deadline:
            list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))  # steps swap compiled buckets in
        assert engine.compile_state == "done" and engine.compile_error is None


def test_compiled_buckets_swap_in_mid_stream_and_every_stream_keeps_generates_tokens(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine serves before anything is compiled; after a few steps the compile thread builds every bucket
    while the engine waits (so the swaps land mid-stream deterministically); each bucket is swapped in at a step
    boundary, and every stream's greedy tokens still equal `generate`'s. The code compiled on the scratch inputs
    serves the real ones without a second compile."""
    from torch._dynamo.utils import counters

    names = ["text", "count", "image"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    gate = threading.Semaphore(0)
    caplog.set_level(logging.INFO)
    with BatchEngine(loaded, options(tmp_path), compile_gate=gate) as engine:
        graphs = engine.core.graphs
        snap = engine.snapshot()
        assert snap.compile_state in ("waiting", "compiling")  # the thread waits at the gate
        assert (snap.compile_done, snap.compile_total, snap.decode_mode) == (0, 3, "eager")
        assert not snap.full_speed and "compiling 0 of 3 batch sizes" in snap.decode_path

        def record(outputs: EngineOutputs) -> tuple[int, int, str]:  # (tokens in it, buckets compiled, decode mode)
            return sum(len(o.new_token_ids) for o in outputs.outputs), len(graphs.compiled_at), graphs.decode_mode

        got, snap, seen = _swap_mid_stream(engine, prompts, names, gate, 6, record)  # compiles after 6 steps
        assert engine.compile_error is None
    assert got == expected
    assert (snap.compile_state, snap.compile_done, snap.decode_mode, snap.full_speed) == ("done", 3, "compiled", True)
    assert snap.decode_path == "torch.compile (no graphs)"
    swapped = [i for i, (_, done, _) in enumerate(seen) if done == len(BUCKETS)]
    assert swapped and 6 <= swapped[0] and any(tokens for tokens, _, _ in seen[swapped[0] :]), seen
    assert any(done == 0 and tokens for tokens, done, _ in seen[:6])  # tokens came before any compile
    assert not [r for r in caplog.records if "recompiled" in r.getMessage()]
    assert graphs.recompiled == 0 and counters["stats"]["unique_graphs"] >= 1
    # The artifacts were looked for once (none yet; dynamo's eager backend leaves none to save).
    assert sum("compile artifacts: none in" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other setup"])
def test_a_damaged_or_foreign_artifact_is_ignored_with_one_log_line(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:  # fmt: skip
    """Whatever lies in the artifact file, the engine starts, says so in one line, and answers as before."""
    gate = threading.Semaphore(0)  # never released: nothing compiles, the eager path serves
    with BatchEngine(loaded, options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2)), gate) as engine:
        key = engine.core.graphs.artifact_key()
    path = artifacts.path_for(tmp_path / "compiled", key)
    path.parent.mkdir(parents=True, exist_ok=True)
    good = {"format": artifacts.FORMAT, "key": key, "bytes": 4, "sha256": "0" * 64}
    if damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":  # a valid header whose payload was cut short
        path.write_bytes(artifacts.MAGIC + repr(good).replace("'", '"').encode() + b"\n" + b"ab")
    else:
        import json

        other = dict(good, key={**key, "gpu": "NVIDIA H200 (sm_90)", "torch": "2.11.0"})
        path.write_bytes(artifacts.MAGIC + json.dumps(other).encode() + b"\n" + b"abcd")
    caplog.clear()
    caplog.set_level(logging.INFO)
    with BatchEngine(loaded, options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2)), gate) as engine:
        assert _artifacts_looked_for(engine) == "ignored"  # by the compile thread, before its gate
        tokens = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
    lines = [r.getMessage() for r in caplog.records if "compile artifacts" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"compile artifacts: ignoring {path}"), lines
    reason = {"garbage": "not a compile-artifact file", "truncated": "damaged", "other setup": "differs in gpu, torch"}
    assert reason[damage] in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "compile artifacts" not in r.getMessage()]
    assert tokens == reference(loaded, prompts["text"])


def _artifacts_looked_for(engine: BatchEngine, timeout: float = 30.0) -> str:
    """The engine's artifacts state once they were looked for (in the background: by the compile thread)."""
    deadline = time.monotonic() + timeout
    while engine.artifacts == "off" and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.artifacts


@pytest.mark.parametrize("background", [True, False])
def test_the_first_answer_does_not_wait_for_the_artifacts_load_in_the_background_mode(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    background: bool,
) -> None:  # fmt: skip
    """Loading the artifacts (reading, checking, unpickling into inductor's caches) was on the engine thread before
    the eager graphs: the first answer waited for it (~3 s from "Starting the batch engine" to "artifacts loaded" on
    the H200). In the background mode the compile thread loads them, before its first compile; before-serving
    (precompile, --compile before-serving) still loads them before it compiles on the engine thread."""
    release = threading.Event()
    calls: list[str] = []
    real_load = artifacts.load

    def slow_load(folder: Any, key: dict[str, str]) -> str:
        calls.append(threading.current_thread().name)
        if background:
            release.wait(20)  # a slow load: the engine must serve meanwhile
        return real_load(folder, key)

    monkeypatch.setattr(artifacts, "load", slow_load)
    gate = threading.Semaphore(0)  # nothing compiles in the background
    opts = options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2), background_compile=background)
    started = time.monotonic()
    with BatchEngine(loaded, opts, gate) as engine:
        if background:
            assert time.monotonic() - started < 15, "the engine waited for the artifacts before serving"
            tokens = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
            assert engine.artifacts == "off" and calls == ["decode-compile"]  # still loading: answered meanwhile
            release.set()
            assert _artifacts_looked_for(engine) == "absent"
        else:
            # looked for on the engine thread and none found; what the compile made is then saved if torch has any
            # artifacts to give (it may, after other tests' compiles in this process: "saved")
            assert (calls, engine.compile_state) == (["batch-engine"], "done") and engine.artifacts in (
                "absent",
                "saved",
            )
            tokens = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
    release.set()
    assert tokens == reference(loaded, prompts["text"]) and len(calls) == 1


@pytest.mark.skipif(not os.environ.get("QWEN3VL_SLOW_TESTS"), reason="compiles with inductor on CPU (~1 min)")
def test_a_start_with_matching_artifacts_compiles_nothing(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Inductor for real: a foreground compile (what precompile runs) writes the artifact file; a later engine with
    an empty inductor cache and only that file loads it and finds every graph in the cache (no miss)."""
    from torch._dynamo.utils import counters

    first = options(tmp_path, max_batch=1, token_budget=512, buckets=(1,), compile_backend="inductor",
                    background_compile=False, compile_cache_dir=tmp_path / "inductor-a")  # fmt: skip
    with BatchEngine(loaded, first) as engine:
        assert (engine.compile_state, engine.artifacts) == ("done", "saved"), engine.compile_error
        expected = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
    torch._dynamo.reset()
    misses = counters["inductor"]["fxgraph_cache_miss"]
    hits = counters["inductor"]["fxgraph_cache_hit"]
    caplog.set_level(logging.INFO)
    second = dataclasses.replace(first, compile_cache_dir=tmp_path / "inductor-b")  # empty: only the artifacts help
    with BatchEngine(loaded, second) as engine:
        assert (engine.compile_state, engine.artifacts) == ("done", "loaded"), engine.compile_error
        got = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
    assert counters["inductor"]["fxgraph_cache_miss"] == misses and counters["inductor"]["fxgraph_cache_hit"] > hits
    assert any("compile artifacts: loaded" in r.getMessage() for r in caplog.records)
    assert got == expected == reference(loaded, prompts["text"])


def test_an_artifact_file_anyone_could_write_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The payload is a pickle: a world-writable file is refused before it is read, in one line."""
    key = {"gpu": "cpu", "torch": torch.__version__}
    path = artifacts.path_for(tmp_path, key)
    path.write_bytes(artifacts.MAGIC + b'{"format": 1, "key": {}}\n')
    path.chmod(0o666)
    caplog.set_level(logging.INFO)
    assert artifacts.load(tmp_path, key) == "ignored"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "writable by every user" in lines[0], lines


def test_the_compile_flag_reaches_the_engine_process_and_precompile_uses_its_options(tmp_path: Path) -> None:
    """--compile -> the engine process's BatchOptions; precompile builds its options with the same code."""
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.engine.remote.decoder import RemoteDecoder

    def options(*flags: str) -> BatchOptions:
        s = parse_settings(["--max-concurrency", "4", "--max-context", "2048", "--cache-dir", str(tmp_path), *flags])
        decoder = RemoteDecoder(s.max_concurrency, s.max_context, s.cache_dir, compile_mode=s.compile)
        return BatchOptions(**decoder.spec("random-weights:4b", "bf16", "cuda")["options"])

    default, before, off = options(), options("--compile", "before-serving"), options("--compile", "off")
    assert (default.background_compile, default.compile) == (None, None)  # background wherever it compiles on CUDA
    assert (before.background_compile, off.compile) == (False, False)
    assert default.artifacts_dir == str(tmp_path / "compiled") and default.max_len == 2048 and default.max_batch == 4
    assert default.kernel_cache_dir == str(tmp_path / "triton")  # our Triton kernels' builds live with the rest
    with pytest.raises(SystemExit):
        parse_settings(["--compile", "later"])


def test_the_background_compile_waits_for_the_first_idle_moment(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path
) -> None:
    """Not while the first requests (the app's warm-up) prefill: it starts once the engine is idle after them."""
    gate = threading.Semaphore(0)  # holds it at its first bucket: nothing compiles here
    opts = options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2), compile_delay_s=600.0)
    with BatchEngine(loaded, opts, gate) as engine:
        graphs = engine.core.graphs
        assert graphs.compile_pending and engine.compile_state == "waiting"
        with engine.hold_admission():
            streams = [engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in ("text", "count")]
            assert graphs.compile_pending
        assert [len(list(s)) for s in streams] == [GREEDY.max_new_tokens] * 2
        deadline = time.monotonic() + 10
        while engine.compile_state != "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not graphs.compile_pending and engine.compile_state == "compiling"  # started, held at the gate


class _StandInChunkGraphs:
    """engine/batch/prefill.ChunkGraphs whose 'capture' of a length records when it ran and makes a stand-in replay
    (the forward rerun on the static buffers; CPU has no CUDA graphs)."""

    def __new__(cls, graphs: Any, log: list[tuple[int, str]]) -> Any:
        from qwen3vl_webui.engine.batch import prefill

        class StandIn(prefill.ChunkGraphs):
            def _capture_one(self, n: int) -> None:
                log.append((n, graphs.compile_state))
                forward = functools.partial(prefill.chunk_forward, *self._args(n))
                out = self._hidden[:, :n]
                self._graphs[n] = type("Replay", (), {"replay": lambda _: out.copy_(forward()[0])})()

        return StandIn


def test_first_chunk_graphs_are_captured_between_steps_after_the_first_answers_and_before_the_compile(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the decode step compiles in the background, the first-chunk graphs are not captured before the engine
    serves (~3.5 s on an H100): a prompt prefills eagerly until its length is captured, the captures come one per
    step boundary (longest first) while a stream decodes, the background compile asked for meanwhile starts only
    after the last, and every answer equals `generate`'s before, during and after."""
    from qwen3vl_webui.engine.batch import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "PREFILL_CAPTURE_GAP_S", 0.0)  # one capture at every boundary while busy
    names = ["text", "count"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    captured: list[tuple[int, str]] = []  # (length, compile state) at each capture
    gate = threading.Semaphore(0)  # the compile, once started, waits at its first bucket
    opts = options(tmp_path, compile_delay_s=600.0, prefill_chunk=64, prefix_slots=0)
    with BatchEngine(loaded, opts, gate) as engine:
        graphs, runner = engine.core.graphs, engine.core.runner
        assert runner.chunk_graphs is None  # CPU: none of its own
        # The engine thread is idle (blocked for work): nothing reads these two attributes until a request arrives.
        graphs.defer_prefill_capture(runner.new_chunk_graphs((32, 64), _StandInChunkGraphs(graphs, captured)))
        assert "capturing, 0 of 2 lengths" in engine.prefill_path
        graphs.start_now()  # as the compile's timer would: held until the captures are done
        assert engine.compile_state == "waiting" and captured == []
        kinds = dict(engine.snapshot().prefill_kinds)
        first = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        during = dict(engine.snapshot().prefill_kinds)
        deadline = time.monotonic() + 10
        while engine.compile_state != "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.compile_state == "compiling"  # started after the last capture, held at the gate
        second = {n: list(engine.submit_tokens(prompts[n], GREEDY, threading.Event())) for n in names}
        after = dict(engine.snapshot().prefill_kinds)
        path = engine.prefill_path
        chunk_graphs = runner.chunk_graphs
    assert first == expected["text"] and second == expected
    assert [n for n, _ in captured] == [64, 32] and {state for _, state in captured} == {"waiting"}
    assert during.get("eager", 0) == kinds.get("eager", 0) + 1  # the first prompt: before any capture, eagerly
    assert after.get("graphed", 0) - during.get("graphed", 0) == 2  # later ones replay their length's graph
    assert path == "cuda graphs (first chunks) + eager" and chunk_graphs.capture_s > 0  # both captures timed


def test_with_this_setups_artifacts_on_disk_the_compile_goes_before_the_captures_left_and_they_follow_it(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From artifacts the compile takes seconds: it starts when asked for, the first-chunk captures left wait while it
    runs (none beside its GPU work), prompts prefill eagerly meanwhile, and the captures resume once every bucket is
    swapped in. Answers equal `generate`'s throughout. Without such a file the captures go first (the tests above)."""
    from qwen3vl_webui.engine.batch import graphs as graphs_module

    monkeypatch.setattr(graphs_module, "PREFILL_CAPTURE_GAP_S", 0.0)
    opts = options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2), compile_delay_s=600.0,
                   prefill_chunk=64, prefix_slots=0)  # fmt: skip
    gate = threading.Semaphore(0)
    with BatchEngine(loaded, opts, gate) as engine:
        key = engine.core.graphs.artifact_key()
    path = artifacts.path_for(tmp_path / "compiled", key)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": artifacts.FORMAT, "key": key, "bytes": 4, "sha256": "0" * 64}  # its payload: cut short
    path.write_bytes(artifacts.MAGIC + json.dumps(header).encode() + b"\n" + b"ab")
    expected = reference(loaded, prompts["text"])
    captured: list[tuple[int, str]] = []
    with BatchEngine(loaded, opts, gate) as engine:
        graphs, runner = engine.core.graphs, engine.core.runner
        graphs.defer_prefill_capture(runner.new_chunk_graphs((32, 64), _StandInChunkGraphs(graphs, captured)))
        graphs.start_now()  # as the first idle moment after the warm-up would: at once, the captures left waiting
        assert engine.compile_state == "compiling" and graphs.prefill_capturing
        during = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        assert captured == [] and graphs.prefill_capturing  # held at the gate: still compiling, nothing captured
        gate.release(2)
        deadline = time.monotonic() + 60
        while (graphs.prefill_capturing or engine.compile_state == "compiling") and time.monotonic() < deadline:
            time.sleep(0.01)
        after = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        state, looked = engine.compile_state, engine.artifacts
    # Its damaged payload compiled past, as without it ("saved": what the compile made replaced it, where torch had
    # artifacts to give after other tests' compiles in this process).
    assert state == "done" and looked in ("ignored", "saved")
    assert [n for n, _ in captured] == [64, 32] and {s for _, s in captured} == {"done"}
    assert during == after == expected


def test_an_idle_engine_captures_every_first_chunk_graph_and_leaves_the_compile_for_after_its_first_requests(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    """At start-up nobody is served yet: the engine nudges itself from capture to capture until every length is
    captured. The background compile, asked for meanwhile, does not start at those idle steps (with compile
    artifacts it would then share the GIL with the app's warm-up): only after a request has been decoded."""
    captured: list[tuple[int, str]] = []
    gate = threading.Semaphore(0)
    opts = options(tmp_path, compile_delay_s=600.0, prefill_chunk=64, prefix_slots=0)
    with BatchEngine(loaded, opts, gate) as engine:
        graphs, runner = engine.core.graphs, engine.core.runner
        graphs.defer_prefill_capture(runner.new_chunk_graphs((32, 64), _StandInChunkGraphs(graphs, captured)))
        graphs.start_now()  # as the compile's timer would: held until the captures are done
        engine.core.scheduler.nudge()  # what EngineCore.start does when it leaves captures for later
        deadline = time.monotonic() + 10
        while graphs.prefill_capturing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not graphs.prefill_capturing and [n for n, _ in captured] == [64, 32]
        assert engine.compile_state == "compiling"  # asked for before the captures: started after the last
    captured.clear()
    with BatchEngine(loaded, opts, gate) as engine:
        graphs, runner = engine.core.graphs, engine.core.runner
        graphs.defer_prefill_capture(runner.new_chunk_graphs((32, 64), _StandInChunkGraphs(graphs, captured)))
        engine.core.scheduler.nudge()
        deadline = time.monotonic() + 10
        while graphs.prefill_capturing and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # idle steps after the captures: none may start the compile
        assert not graphs.prefill_capturing and engine.compile_state == "waiting"
        assert len(list(engine.submit_tokens(build_prompt(loaded, ChatRequest(UserMessage("hi"), sampling=GREEDY)),
                                             GREEDY, threading.Event()))) == GREEDY.max_new_tokens  # fmt: skip
        deadline = time.monotonic() + 10
        while engine.compile_state != "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.compile_state == "compiling"  # the first idle moment after a decoded request


def test_an_engine_on_a_gpu_defers_its_prefill_graphs_only_where_the_compile_is_in_the_background() -> None:
    """The choice itself (BatchOptions -> DecodeGraphs.defer_prefill): on by default where decode compiles in the
    background, off for `--compile before-serving` and for compiled prompt chunks, and as the option says."""
    from qwen3vl_webui.engine.batch.graphs import DecodeGraphs

    def defer(**changes: Any) -> bool:
        graphs = DecodeGraphs.__new__(DecodeGraphs)
        opts = BatchOptions(max_batch=2, token_budget=2 * 512, **changes)
        graphs.background = True if opts.background_compile is None else opts.background_compile  # a CUDA engine's
        graphs.compile_prefill = opts.compile_prefill
        return DecodeGraphs._defers_prefill(graphs, opts)

    assert defer() and defer(compile=False)
    assert not defer(background_compile=False) and not defer(compile_prefill=True)
    assert not defer(defer_prefill_graphs=False) and defer(background_compile=False, defer_prefill_graphs=True)


# ------------------------------------------------------------ a compile that takes its time (second reader's items)

SLOW = "qwen3vl-test-slow"
_slow_now: list[Any] = []  # the SlowBackend the registered name forwards to (the registry outlives a test)


class SlowBackend:
    """Stands in for inductor: dynamo traces, then the backend holds the compile session open (as inductor does for
    a minute per bucket on a GPU) until `release`; the step then runs as dynamo's "eager" backend would."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        self.calls += 1
        self.inside.set()
        self.release.wait(120)
        return gm.forward


@pytest.fixture
def slow() -> Iterator[SlowBackend]:
    """A SlowBackend behind the backend name SLOW (dynamo's registry is per process: the name forwards to it)."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    backend = SlowBackend()
    if SLOW not in list_backends(exclude_tags=()):
        register_backend(lambda gm, inputs: _slow_now[0](gm, inputs), SLOW)
    _slow_now[:] = [backend]
    torch._dynamo.reset()  # the engines' decode steps share one code object: start from no cache entry
    yield backend
    backend.release.set()


def test_a_compile_on_the_compile_thread_is_not_seen_by_the_engine_thread(
    loaded: LoadedModel, slow: SlowBackend
) -> None:
    """torch (>= 2.14) holds one process-wide "compiling" flag for a whole compile session: transformers'
    `is_torchdynamo_compiling()` / `is_tracing()` read it, so a compile on another thread would send the engine
    thread's eager forwards down transformers' tracing paths (here: the batched text prefill's causal mask is
    materialised instead of left to SDPA's causal flag). Inside `compiled.private_compile_session` (what the
    background compile runs in) the other threads keep seeing False, while the traced code still sees True."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.utils.import_utils import is_torchdynamo_compiling, is_tracing

    text = loaded.model.config.text_config
    ids = (torch.arange(3, 40) % text.vocab_size).view(1, -1)
    ones = torch.ones_like(ids)

    def prefill() -> tuple[Any, Any]:  # the engine's batched text prefill: transformers' own forward and masks
        with torch.inference_mode():
            cache = DynamicCache(config=text)
            mask = create_causal_mask(text, loaded.model.model.language_model.embed_tokens(ids), ones, cache)
            out = loaded.model.model(input_ids=ids, attention_mask=ones, past_key_values=cache, use_cache=True)
        return mask, out.last_hidden_state

    reference_mask, reference = prefill()
    assert reference_mask is None  # no padding: SDPA's causal flag, no mask tensor
    step = torch.compile(lambda x: x * 2 if torch.compiler.is_compiling() else x, backend=SLOW)
    results: list[Any] = []

    def compile_thread(private: bool) -> None:
        with compiled.private_compile_session() if private else contextlib.nullcontext():
            results.append(step(torch.ones(2)))

    thread = threading.Thread(target=compile_thread, args=(True,))
    thread.start()
    try:
        assert slow.inside.wait(60)  # the compile thread is inside its compile session now
        flags = (is_torchdynamo_compiling(), is_tracing())
        mask, out = prefill()
    finally:
        slow.release.set()
        thread.join(60)
    assert flags == (False, False) and mask is None and torch.equal(out, reference)
    assert results[0].tolist() == [2.0, 2.0]  # the code dynamo traced saw is_compiling() True
    # Without the private session (a compile on the engine thread, or any other), torch's behaviour is unchanged.
    if hasattr(torch.compiler, "_compile_session_context"):
        torch._dynamo.reset()
        slow.inside.clear()
        slow.release.clear()
        thread = threading.Thread(target=compile_thread, args=(False,))
        thread.start()
        try:
            assert slow.inside.wait(60)
            leaked = is_torchdynamo_compiling()
        finally:
            slow.release.set()
            thread.join(60)
        assert leaked, "torch no longer leaks its compiling flag across threads: private_compile_session can go"


def test_streams_decode_while_the_compile_runs_and_keep_generates_tokens_across_the_swap(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, slow: SlowBackend
) -> None:
    """Decode steps are served WHILE the (slow, stand-in) compile runs on its thread: the engine thread never sees
    torch "compiling" meanwhile; then the compile finishes mid-stream, each bucket is swapped in at a step boundary,
    every stream's greedy tokens equal `generate`'s, and the compile's cached memory is freed once, after the last
    swap."""
    from transformers.utils.import_utils import is_torchdynamo_compiling

    names = ["text", "count", "image"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    seen: list[tuple[int, int, bool, bool]] = []  # per publish: tokens, buckets compiled, compiling now, flag seen
    with BatchEngine(loaded, options(tmp_path, compile_backend=SLOW)) as engine:
        graphs = engine.core.graphs
        freed: list[int] = []
        graphs._free_compile_memory = lambda: freed.append(graphs.swapped)  # type: ignore[method-assign]
        assert slow.inside.wait(60)  # started at the first idle moment: inside its first compile now

        def listener(outputs: EngineOutputs) -> None:
            compiling = not slow.release.is_set()
            tokens = sum(len(o.new_token_ids) for o in outputs.outputs)
            seen.append((tokens, len(graphs.compiled_at), compiling, is_torchdynamo_compiling()))
            if compiling and sum(t for t, _, c, _ in seen if c) >= 8 * len(names):
                slow.release.set()  # eight steps' worth decoded during the compile: let it finish now
            elif not compiling:  # hold the engine thread until the next bucket is compiled: one swap per boundary
                _hold_until_the_next_swap(graphs)

        engine.add_listener(listener)
        with engine.hold_admission():
            streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        got = {n: list(s) for n, s in streams.items()}
        snap = engine.snapshot()
        assert engine.compile_error is None
    assert got == expected
    during = [entry for entry in seen if entry[2]]
    assert sum(t for t, *_ in during) >= 8 * len(names) and all(done == 0 for _, done, *_ in during), seen
    assert not any(flag for *_, flag in seen), "the engine thread saw torch compiling"
    swapped = [i for i, (_, done, _, _) in enumerate(seen) if done == len(BUCKETS)]
    assert swapped and any(tokens for tokens, *_ in seen[swapped[0] :]), seen  # the last swap came mid-stream
    assert (snap.compile_state, snap.compile_done, snap.decode_mode) == ("done", 3, "compiled")
    assert freed == [len(BUCKETS)] and graphs.recompiled == 0


def test_a_close_leaves_the_compile_gate_as_it_found_it(loaded: LoadedModel, tmp_path: Path) -> None:
    """A close stops a compile thread waiting at its gate without releasing the gate: a release left over would let
    the next engine on the same gate compile (and still be compiling at its own close)."""
    gate = threading.Semaphore(0)
    with BatchEngine(loaded, options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2)), gate) as engine:
        graphs = engine.core.graphs
        deadline = time.monotonic() + 10
        while engine.compile_state != "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not graphs.compiling_now and not gate.acquire(blocking=False)
    assert loaded.model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("in_time", [True, False], ids=["safe-point-in-time", "still-compiling"])
def test_a_close_during_a_compile_never_changes_the_model_under_it(
    loaded: LoadedModel, tmp_path: Path, slow: SlowBackend, caplog: pytest.LogCaptureFixture, in_time: bool
) -> None:
    """A close while the compile thread is inside a compile: the thread is asked to stop at its next safe point and
    waited for; if it gets there in time the model is restored, else it is left as the engine changed it (with a log
    line) and restored once the thread has ended. Either way the thread runs no further step and hands nothing over."""
    from qwen3vl_webui.kernels.attention import PACKED_DECODE_ATTENTION

    text = loaded.model.config.text_config
    assert text._attn_implementation == "sdpa"
    engine = BatchEngine(
        loaded, options(tmp_path, max_batch=2, token_budget=2 * 512, buckets=(1, 2), compile_backend=SLOW)
    )
    graphs = engine.core.graphs
    graphs.stop_timeout_s = 30.0 if in_time else 0.3
    assert slow.inside.wait(60)  # tracing done, inside the (stand-in) inductor compile of bucket 1's first step
    later_steps: list[int] = []
    step = graphs._compiled
    graphs._compiled = lambda rows, kv: (later_steps.append(rows), step(rows, kv))[1]  # type: ignore[method-assign]
    assert text._attn_implementation == PACKED_DECODE_ATTENTION
    caplog.set_level(logging.INFO)
    if in_time:
        threading.Timer(0.5, slow.release.set).start()  # the compile returns while the close waits
    engine.close()
    layers = list(loaded.model.model.language_model.layers)
    # The regional compile's routing goes at once, even mid-compile (its region never reads the instance's forward).
    assert not any("forward" in vars(layer) for layer in layers)
    if not in_time:
        assert graphs.compiling_now and text._attn_implementation == PACKED_DECODE_ATTENTION  # left as it is
        assert any("still compiling: the model keeps its decode changes" in r.getMessage() for r in caplog.records)
        slow.release.set()
        graphs._compiler.join(60)  # type: ignore[union-attr]
        assert graphs.restore()
    assert not graphs.compiling_now and text._attn_implementation == "sdpa"
    assert later_steps == [] and graphs.swapped == 0 and not graphs.swap_pending and graphs.artifacts == "absent"
    # A next engine on the same model (an in-process re-attach after the warm-up's re-size) starts and compiles.
    again = options(tmp_path / "again", max_batch=2, token_budget=2 * 512, buckets=(1, 2), background_compile=False)
    with BatchEngine(loaded, again) as engine:
        assert engine.compile_state == "done", engine.compile_error


def test_the_compile_thread_gets_a_device_index_torch_accepts(monkeypatch: Any) -> None:
    """`torch.cuda.set_device` refuses a bare "cuda" (the H200 run saw the background compile fail on it, leaving the
    engine eager for good): the compile thread is given an index, the current device's for a bare "cuda"."""
    import torch

    from qwen3vl_webui.engine.batch.graphs import cuda_index

    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._get_device_index(torch.device("cuda"), optional=False)  # what set_device does with it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_index("cuda") == 3
    assert cuda_index("cuda:1") == 1 and cuda_index(torch.device("cuda", 2)) == 2


@pytest.mark.parametrize("fuse", [False, True])
def test_regional_compile_traces_one_decoder_layer_for_all_of_them(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, fuse: bool
) -> None:
    """The decode step compiles one decoder layer as a region that every layer runs (compiled.RegionalDecode): as many
    graphs as batch-size classes (bucket 1, then one symbolic for 2 and 4), not that many per layer, with every
    stream's greedy tokens still `generate`'s, with the projections fused as on a GPU or not; the layers get their own
    forward back when the engine closes."""
    from torch._dynamo.utils import counters

    layers = list(loaded.model.model.language_model.layers)
    assert len(layers) >= 3
    names = ["text", "count", "image"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with BatchEngine(loaded, options(tmp_path, background_compile=False, fuse=fuse)) as engine:
        assert engine.compile_state == "done", engine.compile_error
        assert (engine.fused_groups > 0) == fuse
        assert counters["stats"]["unique_graphs"] - before == 2  # a compile per layer would make 2 x len(layers)
        assert all("forward" in vars(layer) for layer in layers)
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        assert {n: list(s) for n, s in streams.items()} == expected
    assert not any("forward" in vars(layer) for layer in layers)


def test_the_regional_compile_is_made_by_the_compile_thread_not_before_serving(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile's wrapper (it imports AOT autograd and dynamo's debugging modules: ~1 s of an H100 host's start)
    is made at the first compiled call, on the compile thread: the engine serves before any exists, and the compiled
    buckets still answer as `generate` does."""
    made: list[str] = []
    real = torch.compile

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counted)
    expected = reference(loaded, prompts["text"])
    torch._dynamo.reset()
    with BatchEngine(loaded, options(tmp_path, background_compile=True, compile_delay_s=30.0)) as engine:
        assert engine.compile_state == "waiting" and made == []  # serving, nothing compiled or wrapped yet
        assert list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event())) == expected
        engine.core.graphs.start_now()
        deadline = time.monotonic() + 300
        while engine.compile_state not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.compile_state == "done", engine.compile_error
        assert made == ["decode-compile"]  # one wrapper, every layer's region, on the compile thread
        assert isinstance(engine.core.graphs._compiled, compiled.RegionalDecode)
        assert list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event())) == expected


def test_our_triton_kernels_cache_under_the_cache_dir_unless_the_environment_says_otherwise(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRITON_CACHE_DIR (our kernels' JIT builds) goes to the engine's kernel_cache_dir, so that a Docker volume or a
    Space's /data mounted at --cache-dir keeps them; an operator's own TRITON_CACHE_DIR wins."""
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    plain = dict(max_batch=1, token_budget=512, eos_token_ids=(), buckets=(1,), compile=False)
    with BatchEngine(loaded, BatchOptions(**plain, kernel_cache_dir=tmp_path / "triton")):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton") and (tmp_path / "triton").is_dir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    with BatchEngine(loaded, BatchOptions(**plain, kernel_cache_dir=tmp_path / "other")):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and not (tmp_path / "other").exists()


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_regional_compile_gives_way_to_the_whole_steps(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, background: bool,
) -> None:  # fmt: skip
    """The regional compile is the default on a GPU; if it fails there (a model or a torch version it does not
    trace), the whole step is compiled instead, before serving or in the background, and the layers get their own
    forward back: the engine still reaches full speed, with `generate`'s tokens, and says why in one line."""

    def broken(self: Any, rows: int, kv: Any) -> Any:
        raise RuntimeError("stand-in: dynamo could not trace the decoder layer")

    monkeypatch.setattr(compiled.RegionalDecode, "__call__", broken)
    names = ["text", "count"]
    expected = {n: reference(loaded, prompts[n]) for n in names}
    layers = list(loaded.model.model.language_model.layers)
    caplog.set_level(logging.WARNING)
    with BatchEngine(loaded, options(tmp_path, background_compile=background)) as engine:
        graphs = engine.core.graphs
        deadline = time.monotonic() + 120
        while graphs.compile_state not in ("done", "failed") and time.monotonic() < deadline:
            streams = [engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names]  # steps for swaps
            [list(s) for s in streams]
        assert graphs.compile_state == "done" and len(graphs.compiled_at) == len(BUCKETS), graphs.compile_error
        assert not graphs.regional and "could not trace the decoder layer" in (graphs.regional_error or "")
        assert not any("forward" in vars(layer) for layer in layers)
        streams = {n: engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in names}
        assert {n: list(s) for n, s in streams.items()} == expected
    said = [r.getMessage() for r in caplog.records if "regional compile" in r.getMessage()]
    assert len(said) == 1 and "compiling the whole step instead" in said[0], said


def _fake_triton_cache(root: Path) -> dict[str, bytes]:
    """A Triton cache with one entry of ours (split-KV attention's partials: its group file names its files by
    absolute path, as Triton's FileCacheManager writes it), Triton's cuda_utils and another program's entry."""
    ours = root / "abcdef0123456789ABCD"
    names = ("split_kv_partials.cubin", "split_kv_partials.json")
    group = {"child_paths": {name: str(ours / name) for name in names}}
    files = {
        "abcdef0123456789ABCD/__grp__split_kv_partials.json": json.dumps(group).encode(),
        "abcdef0123456789ABCD/split_kv_partials.cubin": np.random.default_rng(1).bytes(3000),
        "abcdef0123456789ABCD/split_kv_partials.json": b'{"name": "split_kv_partials"}',
        "cudautils0123456789A/cuda_utils.cpython-312-x86_64-linux-gnu.so": b"\x7fELF stand-in",
        "ZZZZdef0123456789XYZ/__grp__someone_elses_kernel.json": b"{}",
        "ZZZZdef0123456789XYZ/someone_elses_kernel.cubin": b"not ours",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_our_kernels_builds_travel_with_the_artifacts_and_never_overwrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What the engine's first-serving path would otherwise build before its first answer (5.4 s on an H200): packed
    # after a compile, unpacked into an empty Triton cache at the next start; another program's entries stay home.
    assert {"split_kv_partials", "combine_splits", "_gemv_kernel", "_tile_kernel"} <= artifacts.kernel_names()
    key = {"kind": "triton kernels", "gpu": "NVIDIA H200 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.6"}
    files = _fake_triton_cache(tmp_path / "made")
    caplog.set_level(logging.INFO)
    assert artifacts.load_kernels(tmp_path / "compiled", key, tmp_path / "fresh") == "absent"
    path = artifacts.save_kernels(tmp_path / "compiled", key, tmp_path / "made")
    assert path is not None and path.name.startswith(artifacts.KERNELS_PREFIX)
    assert artifacts.read_header(path)[0]["entries"] == {"triton entries": 2}
    assert artifacts.load_kernels(tmp_path / "compiled", key, tmp_path / "fresh") == "loaded"
    fresh = tmp_path / "fresh"
    got = {str(p.relative_to(fresh)): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    grp = "abcdef0123456789ABCD/__grp__split_kv_partials.json"
    carried = {k: v for k, v in files.items() if not k.startswith("ZZZZ") and k != grp}
    assert {k: v for k, v in got.items() if k != grp} == carried
    # Triton finds a group's files by the absolute paths in it: they now point into this cache, not the one it was made in
    children = json.loads(got[grp])["child_paths"]
    assert children == {name: str(tmp_path / "fresh" / "abcdef0123456789ABCD" / name) for name in children}
    assert len(children) == 2 and all(Path(p).is_file() for p in children.values())
    mine = tmp_path / "fresh" / "abcdef0123456789ABCD" / "split_kv_partials.json"
    mine.write_bytes(b"built here")  # a build already in the cache is never replaced
    caplog.clear()
    assert artifacts.load_kernels(tmp_path / "compiled", key, tmp_path / "fresh") == "loaded"
    assert mine.read_bytes() == b"built here"
    assert [r.getMessage() for r in caplog.records][-1].endswith("(0 files new)")
    # another GPU's file is not this one's (each GPU and version set has its own file name)
    other = {**key, "gpu": "NVIDIA L4 (sm_89, CUDA 13.0)"}
    assert artifacts.kernels_path_for(tmp_path / "compiled", other) != path
    assert artifacts.load_kernels(tmp_path / "compiled", other, tmp_path / "l4") == "absent"


def test_the_engine_process_prepares_tritons_cache_once_before_any_kernel_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """engine.prepare_kernels (the engine process calls it before its weights load, for the early probes; the engine
    again when it starts): Triton's cache pointed at the engine's folder, the carried builds unpacked into it once;
    a file that was absent is looked for again; nothing off CUDA."""
    from qwen3vl_webui.engine.batch import engine

    key = {"kind": "triton kernels", "gpu": "NVIDIA H100 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.8"}
    monkeypatch.setattr(artifacts, "kernels_key", lambda device: key)
    monkeypatch.setattr(engine, "_prepared_kernels", set())
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache = tmp_path / "cache" / "triton"
    opts = BatchOptions(kernel_cache_dir=cache, artifacts_dir=tmp_path / "compiled")
    assert engine.prepare_kernels(opts, "cuda:0") == "absent"
    assert os.environ["TRITON_CACHE_DIR"] == str(cache)
    _fake_triton_cache(tmp_path / "made")
    assert artifacts.save_kernels(tmp_path / "compiled", key, tmp_path / "made") is not None  # a compile saved since
    caplog.set_level(logging.INFO)
    assert engine.prepare_kernels(opts, "cuda:0") == "loaded"
    assert (cache / "abcdef0123456789ABCD" / "split_kv_partials.json").is_file()
    unpacked = [r for r in caplog.records if "kernel builds:" in r.getMessage()]
    assert len(unpacked) == 1 and "files new" in unpacked[0].getMessage()
    assert engine.prepare_kernels(opts, "cuda:0") == "loaded"  # the engine's own call: already done
    assert [r for r in caplog.records if "kernel builds:" in r.getMessage()] == unpacked
    assert engine.prepare_kernels(opts, "cpu") == "off"


@pytest.mark.parametrize(
    "damage", ["flipped byte", "path outside an entry", "group naming another entry", "another setup"]
)
def test_a_damaged_or_hostile_kernels_file_is_ignored_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    import io
    import tarfile

    key = {"kind": "triton kernels", "gpu": "NVIDIA H200 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.6"}
    _fake_triton_cache(tmp_path / "made")
    path = artifacts.save_kernels(tmp_path / "compiled", key, tmp_path / "made")
    assert path is not None
    if damage == "flipped byte":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "path outside an entry":  # a valid header and checksum around a tar naming ../
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in ("abcdef0123456789ABCD/ok.json", "abcdef0123456789ABCD/../../escaped.txt"):
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
        artifacts._write(path, key, buffer.getvalue(), {})
    elif damage == "group naming another entry":  # a group file pointing Triton at a file it did not carry
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in (("abcdef0123456789ABCD/k.cubin", b"hi"), ("abcdef0123456789ABCD/__grp__k.json",
                               json.dumps({"child_paths": {"k.cubin": "/etc/passwd"}}).encode())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        artifacts._write(path, key, buffer.getvalue(), {})
    else:  # this setup's file name, another setup's file (a copy renamed by hand)
        artifacts._write(path, {**key, "triton": "3.4"}, path.read_bytes(), {})
    caplog.set_level(logging.INFO)
    assert artifacts.load_kernels(tmp_path / "compiled", key, tmp_path / "cache" / "triton") == "ignored"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(f"kernel builds: ignoring {path}"), lines
    reason = {"flipped byte": "damaged", "path outside an entry": "not a Triton cache file",
              "group naming another entry": "outside its entry", "another setup": "differs in triton"}  # fmt: skip
    assert reason[damage] in lines[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.*"))
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "cache" / "escaped.txt").exists()


def test_carried_kernel_builds_are_found_by_tritons_own_cache_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Triton's FileCacheManager writes a kernel's group file with absolute paths and rebuilds the kernel when one is
    # missing: after the folder it was made in is gone, Triton itself must find the carried build in the new cache.
    import shutil

    from triton.runtime.cache import FileCacheManager

    made, fresh, entry = tmp_path / "made", tmp_path / "fresh", "ABCDEFGH12345678abcdefgh87654321"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(made))
    cache = FileCacheManager(entry)
    children = {"split_kv_partials.cubin": cache.put(b"\x00cubin", "split_kv_partials.cubin"),
                "split_kv_partials.json": cache.put('{"name": "split_kv_partials"}', "split_kv_partials.json")}  # fmt: skip
    cache.put_group("split_kv_partials.json", children)
    key = {"kind": "triton kernels", "gpu": "NVIDIA H100 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.8"}
    assert artifacts.save_kernels(tmp_path / "compiled", key) is not None  # from TRITON_CACHE_DIR, as the engine
    shutil.rmtree(made)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(fresh))
    assert artifacts.load_kernels(tmp_path / "compiled", key) == "loaded"
    found = FileCacheManager(entry).get_group("split_kv_partials.json")
    assert found == {name: str(fresh / entry / name) for name in children}
    assert (fresh / entry / "split_kv_partials.cubin").read_bytes() == b"\x00cubin"


def test_where_nothing_compiles_the_start_up_saves_our_kernels_and_precompile_writes_only_them(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fused layers serve, so the app's start compiles nothing (above): no compile's end saves our kernels'
    builds, so the start-up saves them once they are all built, off the engine thread; precompile with the app's
    flags then writes that file alone and compiles nothing; a start given the folder unpacks them (CPU: a stand-in
    Triton cache and GPU key, as a CUDA start would see them)."""
    from qwen3vl_webui import precompile
    from qwen3vl_webui.engine.batch import engine as engine_module
    from tests.test_fused_layer import fused_route

    fused_route(monkeypatch)
    compiles_as_on_a_gpu(monkeypatch)
    key = {"kind": "triton kernels", "gpu": "NVIDIA H100 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.8"}
    monkeypatch.setattr(artifacts, "kernels_key", lambda device: key)
    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    _fake_triton_cache(cache)  # what the start-up's warm-ups built
    monkeypatch.setattr(
        engine_module, "prepare_kernels", lambda opts, device: artifacts.load_kernels(opts.artifacts_dir, key)
    )
    folder = tmp_path / "compiled"
    with BatchEngine(loaded, options(tmp_path, compile=None, fused_layers=True, artifacts_dir=folder)) as engine:
        assert engine.compile_state == "none"
        assert engine.core.graphs.kernels_settled.wait(30) and engine.kernel_artifacts == "saved"
        assert set(engine.warmup_s) == set(BUCKETS)  # saved once built: every batch size warmed up first
    path = artifacts.kernels_path_for(folder, key)
    assert path.is_file() and artifacts.read_header(path)[0]["entries"] == {"triton entries": 2}
    assert not list(folder.glob("decode-*"))  # nothing compiled, so no compile artifacts
    with BatchEngine(loaded, options(tmp_path, compile=None, fused_layers=True, artifacts_dir=folder)) as engine:
        assert engine.kernel_artifacts == "loaded" and engine.core.graphs.kernels_settled.is_set()

    # precompile, with the flags the app would get: the same engine start, this file, no compile
    from qwen3vl_webui.engine.batch import options as options_module

    background = options_module.compile_options("background")
    assert background == {}  # BatchOptions' defaults: on CUDA, the background compile and the fused layers; here too
    gpu_defaults = {"background_compile": True, "fused_layers": True}
    real_options = options_module.compile_options
    monkeypatch.setattr(options_module, "compile_options", lambda mode: {**gpu_defaults, **real_options(mode)})
    monkeypatch.setattr(compiled, "compile_decode", _no_compile)
    monkeypatch.setattr(compiled, "RegionalDecode", _no_compile)
    checkpoint = str(loaded.source)
    flags = ["--model", checkpoint, "--cache-dir", str(tmp_path / "pre"), "--max-concurrency", "2"]
    flags += ["--max-context", "256", "--max-new-tokens", "64", "--device", "cpu"]
    assert precompile.main(flags) == 0
    written = artifacts.kernels_path_for(tmp_path / "pre" / "compiled", key)
    assert f"wrote {written}" in capsys.readouterr().out and written.is_file()
    assert sorted(p.name for p in (tmp_path / "pre" / "compiled").iterdir()) == [written.name]
    assert precompile.main(flags) == 0  # again: the file is there and the start loaded it
    assert "already built" in capsys.readouterr().out

    # asked to compile before serving, where the compile fails: a failure, not "nothing to compile"
    def failing_compile(*args: Any, **kwargs: Any) -> Any:
        def step(*args: Any) -> Any:
            raise RuntimeError("inductor failed")

        return step

    monkeypatch.setattr(compiled, "compile_decode", failing_compile)
    assert precompile.main([*flags, "--compile", "before-serving"]) == 1
    assert "precompile failed" in capsys.readouterr().err


def _no_compile(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("precompile compiled, where the app's start compiles nothing")


def test_a_compile_that_fails_before_serving_says_failed_and_decodes_as_generate(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--compile before-serving` whose compile fails: the engine serves uncompiled, says "failed" with the error and
    keeps `generate`'s tokens; nothing is marked compiled and no artifact is written."""

    def failing_compile(*args: Any, **kwargs: Any) -> Any:
        def step(*args: Any) -> Any:
            raise RuntimeError("inductor failed")

        return step

    monkeypatch.setattr(compiled, "compile_decode", failing_compile)
    expected = reference(loaded, prompts["text"])
    opts = options(tmp_path, compile=True, background_compile=False, regional_compile=False)
    with BatchEngine(loaded, opts) as engine:
        assert engine.compile_state == "failed" and "inductor failed" in (engine.compile_error or "")
        assert not engine.core.graphs.compiled_at and not engine.snapshot().full_speed
        assert list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event())) == expected
    assert not list((tmp_path / "compiled").glob("decode-*"))


def test_where_the_app_would_compile_in_the_background_precompile_compiles_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers' layers serve (the fused ones turned off), so the app would compile in the background: precompile
    starts that engine with its compile held at the gate, closes it, compiles every batch size in a second one and
    writes the compile artifacts beside our kernels' builds (CPU: a stand-in compile, cache artifacts, Triton cache
    and GPU key, where a GPU has inductor's)."""
    from qwen3vl_webui import precompile
    from qwen3vl_webui.engine.batch import engine as engine_module
    from qwen3vl_webui.engine.batch import options as options_module

    compiles_as_on_a_gpu(monkeypatch)
    real_options = options_module.compile_options
    gpu_defaults = {"background_compile": True, "fused_layers": False}
    monkeypatch.setattr(options_module, "compile_options", lambda mode: {**gpu_defaults, **real_options(mode)})
    steps: list[int] = []

    def stand_in_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def step(rows: int, *rest: Any) -> Any:
            steps.append(rows)
            return fn(rows, *rest)

        return step

    monkeypatch.setattr(compiled, "compile_decode", stand_in_compile)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"inductor's entries", None))
    key = {"kind": "triton kernels", "gpu": "NVIDIA H100 (sm_90, CUDA 13.0)", "torch": "2.11", "triton": "3.8"}
    monkeypatch.setattr(artifacts, "kernels_key", lambda device: key)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    _fake_triton_cache(tmp_path / "triton")
    monkeypatch.setattr(
        engine_module, "prepare_kernels", lambda opts, device: artifacts.load_kernels(opts.artifacts_dir, key)
    )
    flags = ["--model", str(ensure_demo_checkpoint(tmp_path / "demo")), "--cache-dir", str(tmp_path / "pre")]
    flags += ["--max-concurrency", "2", "--max-context", "256", "--max-new-tokens", "64", "--device", "cpu"]
    assert precompile.main([*flags, "--precision", "auto"]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "pre" / "compiled").iterdir())
    assert [n.split("-")[0] for n in written] == ["decode", "kernels"] and f"wrote {tmp_path}" in out
    assert set(steps) == {1, 2}  # every batch size went through the compiled step, in the foreground engine


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (kernels/pdl.py)")
def test_each_decode_step_launches_in_its_batch_sizes_pdl_mode(
    loaded: LoadedModel, prompts: dict[str, PreparedPrompt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 27: the one-row decode graph runs PDL's early mode, the others late (kernels/pdl.py `step_rows`).
    Captures need a GPU; here the steps run without graphs (a CPU), each inside its batch size's `step_rows`, as
    the warm-ups, captures and compiled swaps are on a GPU. A CPU engine itself never imports pdl (Triton)."""
    from qwen3vl_webui.kernels import pdl

    steps: list[int] = []

    @contextlib.contextmanager
    def recorded(rows: int) -> Iterator[None]:
        steps.append(rows)
        yield

    monkeypatch.setattr(pdl, "step_rows", recorded)
    with BatchEngine(loaded, options(tmp_path, compile=False)) as engine:
        graphs = engine.core.graphs
        assert graphs.pdl_name == "off"  # a CPU: no launch takes PDL, and pdl is left alone
        one = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        assert one and steps == []
        graphs.pdl_name = "late; early at one row"  # as on a GPU with PDL
        one = list(engine.submit_tokens(prompts["text"], GREEDY, threading.Event()))
        with engine.hold_admission():
            both = [engine.submit_tokens(prompts[n], GREEDY, threading.Event()) for n in ("text", "count")]
        both = [list(s) for s in both]
    assert len(one) == GREEDY.max_new_tokens and all(len(s) == GREEDY.max_new_tokens for s in both)
    assert 1 in steps and 2 in steps, sorted(set(steps))  # one stream's steps, then the two streams'
    assert set(steps) <= {1, 2}, sorted(set(steps))
