"""The fused decode layer (kernels/layer.py): its kernels against transformers' eager ops, the layer against
transformers' layer, the engine's decode through it against `generate`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
from qwen3vl_webui.engine.batch.kv import LayerSlotCache
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.kernels import attention
from qwen3vl_webui.kernels import layer as fused
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from tests.conftest import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)


def _layer_case(loaded: Any, rows: int, max_len: int = 24, seed: int = 0) -> dict[str, Any]:
    """Layer 1 of the tiny model with a decode step's inputs: hidden states, rotary tables, a slot cache, lengths."""
    text = loaded.model.model.language_model
    config = text.config
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden = torch.randn(rows, 1, config.hidden_size, generator=gen)
    positions = torch.randint(3, max_len - 2, (rows,), generator=gen)
    cos, sin = text.rotary_emb(hidden, positions.view(1, rows, 1).expand(3, rows, 1))
    slots = rows + 1
    keys = torch.randn(slots * kv_heads * max_len, dim, generator=gen)
    values = torch.randn(slots * kv_heads * max_len, dim, generator=gen)
    shape = (slots, kv_heads, max_len, dim)
    index = (torch.arange(rows).view(-1, 1) * kv_heads + torch.arange(kv_heads)) * max_len + positions.view(-1, 1)
    return dict(
        layer=text.layers[1], hidden=hidden, cos=cos, sin=sin, keys=keys, values=values, shape=shape, rows=rows,
        index=index.view(-1), lengths=positions + 1,
    )  # fmt: skip


def _run(case: dict[str, Any], forward: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys, values = case["keys"].clone(), case["values"].clone()
    cache = LayerSlotCache(keys, values, case["shape"], case["rows"], case["index"])
    with torch.inference_mode():
        out = forward(case["hidden"], position_embeddings=(case["cos"], case["sin"]), attention_mask=None,
                      past_key_values=cache, kv_lengths=case["lengths"])  # fmt: skip
    return out, keys, values


@pytest.fixture
def packed_attention(tiny_loaded: Any):
    """The text model's attention routed as the engine routes it (the decode op's reference on CPU)."""
    restore = attention.use_packed_decode_attention(tiny_loaded.model.config.text_config)
    yield
    restore()


@pytest.mark.parametrize("rows", [1, 3])
def test_the_fused_layer_equals_transformers_layer_with_the_kv_writes(
    tiny_loaded: Any, packed_attention, rows: int
) -> None:
    case = _layer_case(tiny_loaded, rows)
    layer = case["layer"]
    assert fused.fusable(layer) is None
    want, want_keys, want_values = _run(case, layer.forward)  # transformers' forward: the cache's update writes
    got, got_keys, got_values = _run(case, fused.decode_layer_forward(layer, layer.forward))
    assert torch.equal(got, want)  # fp32 on CPU: the references are transformers' ops in its order
    assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values)
    assert not torch.equal(got_keys, case["keys"])  # the step's K was written (the check above could not pass idle)


def test_the_fused_layer_gives_way_where_it_does_not_apply(tiny_loaded: Any, packed_attention) -> None:
    case = _layer_case(tiny_loaded, 2)
    layer = case["layer"]
    calls: list[str] = []

    def original(*args: Any, **kwargs: Any) -> Any:
        calls.append("original")
        return layer.forward(*args, **kwargs)

    forward = fused.decode_layer_forward(layer, original)
    _run(case, forward)
    assert calls == []  # a decode step: the fused path
    prefill = dict(case, hidden=torch.randn(1, 5, case["hidden"].shape[-1]))
    with torch.inference_mode():
        forward(prefill["hidden"], position_embeddings=(case["cos"][:1].expand(1, 5, -1), case["sin"][:1].expand(1, 5, -1)),
                attention_mask=None, past_key_values=None)  # fmt: skip
    assert calls == ["original"]  # several tokens, no kv_lengths, no slot cache: transformers' forward
    assert fused.fusable(torch.nn.Linear(2, 2)) == "not a Qwen3-VL text decoder layer"


def _prompts(loaded: Any, texts: tuple[str, ...]) -> list[Any]:
    return [build_prompt(loaded, ChatRequest(UserMessage(t), sampling=GREEDY)) for t in texts]


def _generate(loaded: Any, prompt: Any, tokens: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=tokens, eos_token_id=None)
    return out[0, prompt.inputs["input_ids"].shape[1] :].tolist()


def fused_route(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The engine's decode route on CPU as on a GPU (the split-KV decode op, so the fused layers apply); returns the
    rows of every head-norm + RoPE the fused layers' torch references run (two per layer and decode step)."""
    monkeypatch.setattr(attention, "decode_kernel_blocker", lambda *args: None)
    calls: list[int] = []
    reference = fused.norm_rope_reference

    def counted(x: Any, *args: Any) -> Any:
        calls.append(x.shape[0])
        return reference(x, *args)

    monkeypatch.setattr(fused, "norm_rope_reference", counted)
    return calls


@pytest.fixture(scope="module")
def tiny_int4(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint in our int4 (W4A16) on CPU: the fused layer takes its products as the Linears' parts."""
    from qwen3vl_webui.weights.loading import load_model

    return load_model(str(tiny_checkpoint), "int4", "cpu")


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_engine_decodes_through_the_fused_layers_as_generate(
    tiny_loaded: Any, tiny_int4: Any, monkeypatch, precision: str
) -> None:
    loaded = tiny_loaded if precision == "fp32" else tiny_int4
    calls = fused_route(monkeypatch)
    prompts = _prompts(loaded, ("hello there", "Count the objects"))
    expected = [_generate(loaded, prompts[0], 60), _generate(loaded, prompts[1], 40)]
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fused_layers=True)
    layers = loaded.model.model.language_model.layers
    with BatchEngine(loaded, options) as engine:
        assert engine.layers_path == "fused kernels"
        assert engine.pdl_mode == 0  # programmatic dependent launch: CUDA (Hopper and later) only
        first = engine.submit_tokens(
            prompts[0], SamplingParams(max_new_tokens=60, temperature=0.0, repetition_penalty=1.0), threading.Event()
        )
        head = [next(first) for _ in range(3)]
        joined = list(engine.submit_tokens(prompts[1], GREEDY, threading.Event()))  # joins mid-batch
        got = head + list(first)
        steps = engine.snapshot().steps
    assert got == expected[0] and joined == expected[1]
    # Every decode step (1 or 2 rows) ran the fused layer: q then k rotated per layer; prefill never did.
    assert len(calls) == 2 * len(layers) * steps and set(calls) == {1, 2}
    assert all("forward" not in vars(layer) for layer in layers)  # restored on close


def test_each_fused_layer_ends_in_the_next_norm_and_the_model_takes_its_final_norm_from_the_last(
    tiny_loaded: Any, monkeypatch
) -> None:
    """A decode step runs one `add_rms_norm` per layer boundary (the residual add and the next layer's input norm,
    or the final norm): 2 per layer and the first layer's input norm, no `add_product`, no final-norm torch ops.
    Each norm gets weights of its own here (the tiny checkpoint's are all ones), so a layer handed another layer's
    norm would change the tokens."""
    monkeypatch.setenv("QWEN3VL_NORM_HANDOFF", "1")
    fused_route(monkeypatch)
    text = tiny_loaded.model.model.language_model
    gen = torch.Generator().manual_seed(5)
    for norm in [layer.input_layernorm for layer in text.layers] + [text.norm]:
        weight = norm.weight
        monkeypatch.setattr(norm, "weight", torch.nn.Parameter(0.5 + torch.rand(weight.shape, generator=gen),
                                                               requires_grad=False))  # fmt: skip
    counts = {"add_rms_norm": 0, "add_product": 0, "final norm": 0}

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fused, "add_rms_norm", counted("add_rms_norm", fused.add_rms_norm))
    monkeypatch.setattr(fused, "add_product", counted("add_product", fused.add_product))
    norm_class = type(text.norm)
    own = norm_class.forward

    def norm_forward(self: Any, hidden_states: Any) -> Any:
        counts["final norm"] += self is text.norm
        return own(self, hidden_states)

    monkeypatch.setattr(norm_class, "forward", norm_forward)
    layers = len(text.layers)
    prompt = _prompts(tiny_loaded, ("hello there",))[0]
    expected = _generate(tiny_loaded, prompt, 12)
    options = BatchOptions(max_batch=1, token_budget=512, eos_token_ids=(), fused_layers=True)
    with BatchEngine(tiny_loaded, options) as engine:
        before = dict(counts)
        got = list(engine.submit_tokens(prompt, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                               repetition_penalty=1.0), threading.Event()))  # fmt: skip
        steps = engine.snapshot().steps
    assert got == expected
    assert steps >= 11 and counts["add_product"] == before["add_product"] == 0
    assert counts["add_rms_norm"] - before["add_rms_norm"] == steps * (2 * layers + 1)
    # the final norm's own forward ran for the prefill (and `generate`'s calls), never for a decode step
    assert counts["final norm"] - before["final norm"] == 1
    assert "forward" not in vars(text.norm)  # restored on close
    monkeypatch.setenv("QWEN3VL_NORM_HANDOFF", "0")  # the A/B's other side: each layer ends in its residual add
    with BatchEngine(tiny_loaded, options) as engine:
        before = dict(counts)
        got = list(engine.submit_tokens(prompt, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                               repetition_penalty=1.0), threading.Event()))  # fmt: skip
        steps = engine.snapshot().steps
    assert got == expected and counts["add_product"] - before["add_product"] == steps * layers
    assert counts["final norm"] - before["final norm"] == 1 + steps


def test_the_handoff_gives_the_norm_only_for_the_tensor_it_was_left_for() -> None:
    handoff = fused.Handoff()
    hidden, normed = torch.randn(2, 1, 8), torch.randn(2, 8)
    handoff.put(hidden, normed)
    assert handoff.take(hidden) is normed
    assert handoff.take(hidden) is None  # taken once
    handoff.put(hidden, normed)
    assert handoff.take(hidden.clone()) is None  # e.g. deepstack's clone between layers
    assert handoff.take(hidden) is None  # a miss clears it too
    handoff.put(hidden, normed)
    hidden.add_(1.0)  # changed in place since
    assert handoff.take(hidden) is None
    with torch.inference_mode():  # the engine's tensors: no version counter, the identity decides
        served = torch.randn(2, 1, 8)
    handoff.put(served, normed)
    assert handoff.take(served) is normed


def test_the_engine_keeps_transformers_layers_when_turned_off_or_without_the_decode_kernel(tiny_loaded: Any) -> None:
    with BatchEngine(tiny_loaded, BatchOptions(max_batch=1, token_budget=512, fused_layers=True)) as engine:
        assert engine.layers_path == "transformers (the fused layer needs the split-KV decode attention)"
    with BatchEngine(tiny_loaded, BatchOptions(max_batch=1, token_budget=512)) as engine:
        assert engine.layers_path == "transformers (turned off)"  # None: on CUDA only


def test_the_probe_refuses_off_cuda() -> None:
    assert fused.probe("cpu", torch.bfloat16, 4, 2, 16) == "not on CUDA"


INTERPRETER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
sys.path.insert(0, sys.argv[1])
from qwen3vl_webui.kernels import layer as fused

results = []
for dtype in (torch.float32, torch.float16):  # the interpreter's bf16 casts truncate (the GPU's probe checks bf16)
    for split in (1, 3):  # the product itself, or a split-K product's fp32 partial sums
        assert fused._triton(torch.zeros(1)) is not None
        errors = fused.check("cpu", dtype, 4, 2, 32, split, seed=split)
        results.append(dict(dtype=str(dtype), split=split, errors=errors))
print("RESULTS " + json.dumps(results))
"""

# Bit for bit wherever no norm's sum is involved: the residual sum, v's copy, the cache rows the step does not own.
EXACT = ("add", "rms_norm's x", "v", "cache rows outside the step")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_kernels_under_the_interpreter_match_transformers_ops() -> None:
    """The real kernels on CPU through Triton's interpreter (fp32, fp16), reading products whole or as fp32 partial
    sums, strided rows, a cache whose other rows must stay as they were (`layer.check`, what the GPU probe runs)."""
    results = run_interpreted(INTERPRETER_SCRIPT, str(ROOT))
    assert [(r["dtype"], r["split"]) for r in results] == [
        ("torch.float32", 1), ("torch.float32", 3), ("torch.float16", 1), ("torch.float16", 3)
    ]  # fmt: skip
    for r in results:
        assert set(r["errors"]) >= {"add_rms_norm", "rms_norm", "q", "k", "silu_mul", "add_product", *EXACT}, r
        for name, error in r["errors"].items():
            # fp32: the sums' order alone; fp16: a rounding apart where a norm's sum tips one
            assert error == 0.0 if name in EXACT else error < (1e-6 if r["dtype"] == "torch.float32" else 1e-2), (
                name,
                r,
            )


LAYER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
sys.path.insert(0, sys.argv[1])
from qwen3vl_webui.kernels import attention, fusion
from qwen3vl_webui.kernels import layer as fused
from qwen3vl_webui.weights.loading import load_model
from tests.test_fused_layer import _layer_case, _run

loaded = load_model(sys.argv[2], "fp32", "cpu")
restore = attention.use_packed_decode_attention(loaded.model.config.text_config)
results = []
for fuse in (False, True):  # q/k/v apart (concatenated), then one fused product whose slices the kernel reads
    if fuse:
        fusion.fuse_projections(loaded.model.model.language_model)
    for rows in (1, 3):
        case = _layer_case(loaded, rows, seed=rows)
        layer = case["layer"]
        want, want_keys, want_values = _run(case, layer.forward)
        grouped = getattr(layer.self_attn.q_proj, "_qwen3vl_group", None) is not None
        got, got_keys, got_values = _run(case, fused.decode_layer_forward(layer, layer.forward))
        err = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
        results.append(dict(fuse=fuse, rows=rows, out=err(got, want), keys=err(got_keys, want_keys),
                            values=bool(torch.equal(got_values, want_values)), triton=fused._triton(case["hidden"]) is not None,
                            grouped=grouped))
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_fused_layer_with_its_triton_kernels_under_the_interpreter_equals_transformers_layer(
    tiny_checkpoint: Path,
) -> None:
    """The layer's Triton path end to end on CPU (fp32): q/k/v apart (concatenated) and as one fused product, K and V
    written into the flat cache by the kernel, against transformers' layer and the cache's own update."""
    results = run_interpreted(LAYER_SCRIPT, str(ROOT), str(tiny_checkpoint))
    assert [(r["fuse"], r["rows"]) for r in results] == [(False, 1), (False, 3), (True, 1), (True, 3)]
    for r in results:
        assert r["triton"] and r["values"] and r["grouped"] == r["fuse"], r
        assert r["out"] < 1e-5 and r["keys"] < 1e-6, r


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_launch_count_bench_counts_both_layers(tmp_path: Path) -> None:
    """`bench.layer_launches`: transformers' decode layer launches ~53 kernels, the fused one ~10 (its Triton launches
    counted under the interpreter, the products and the attention op once each)."""
    out = tmp_path / "launches.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.layer_launches", "--rows", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = json.loads(out.read_text())["layers"]
    plain, fast = layers["transformers"], layers["fused"]
    assert fast["ops"]["linear"] == plain["ops"]["linear"] == 4  # q/k/v and gate/up fused, o, down: the same products
    assert fast["ops"]["qk_norm_rope_kv (Triton)"] == 1 and fast["ops"]["add_rms_norm (Triton)"] == 2
    assert fast["ops"]["silu_mul (Triton)"] == fast["ops"]["add_product (Triton)"] == 1
    assert plain["launches"] >= 40 and fast["launches"] <= 12, (plain, fast)


def test_partials_of_a_fused_quantized_group_are_its_members_products(tiny_checkpoint: Path) -> None:
    """int4's fused q/k/v and gate/up hand the layer one product (their group's), unfused Linears their own."""
    from qwen3vl_webui.kernels import fusion
    from qwen3vl_webui.kernels.int4 import Int4Linear
    from qwen3vl_webui.weights.loading import load_model

    loaded = load_model(str(tiny_checkpoint), "int4", "cpu")
    layer = loaded.model.model.language_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, loaded.model.config.text_config.hidden_size)
    with torch.inference_mode():
        apart = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        alone = fused.partials([attn.q_proj, attn.k_proj, attn.v_proj], x)
        assert alone.shape == (1, *apart.shape) and torch.equal(alone[0], apart)  # not fused: each, concatenated
        assert fusion.fuse_projections(loaded.model.model.language_model) > 0
        assert type(attn.q_proj) is Int4Linear and attn.q_proj._qwen3vl_group.members == [
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
        ]
        group = fused.partials([attn.q_proj, attn.k_proj, attn.v_proj], x)
        torch.testing.assert_close(group[0], apart, rtol=1e-5, atol=1e-5)  # one product over the fused rows
        gate_up = fused.partials([mlp.gate_proj, mlp.up_proj], x)
        torch.testing.assert_close(
            gate_up[0], torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1), rtol=1e-5, atol=1e-5
        )
        down = fused.partials([mlp.down_proj], torch.randn(2, mlp.down_proj.in_features))
        assert down.shape[0] == 1  # on CPU a quantized product is one part (CUDA: its split-K partial sums)
    fusion.unfuse(loaded.model)
    assert "_qwen3vl_group" not in vars(attn.q_proj)


def test_a_warm_up_failure_of_the_fused_layers_turns_them_off_and_warms_up_again(tiny_loaded: Any, monkeypatch) -> None:
    """Their probe checks the kernels at small shapes; should a build at the step's own shapes fail in the warm-up,
    the engine goes on with transformers' layer forward rather than failing to start."""
    monkeypatch.setattr(attention, "decode_kernel_blocker", lambda *args: None)
    options = BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=(), fused_layers=True)
    with BatchEngine(tiny_loaded, options) as engine:
        graphs = engine.core.graphs
        runs: list[bool] = []

        def forward(rows: int) -> None:
            runs.append(graphs._fused_layers.on)
            if graphs._fused_layers.on:
                raise RuntimeError("PassManager::run failed")  # what a Triton build failure raises

        graphs._warm_up(forward, None)
        assert runs[0] is True and set(runs[1:]) == {False} and len(runs) == 1 + 2 * len(graphs.buckets)
        assert engine.layers_path.startswith("transformers (the fused kernels failed in the warm-up: RuntimeError")
        prompt = _prompts(tiny_loaded, ("hello there",))[0]
        got = list(engine.submit_tokens(prompt, GREEDY, threading.Event()))  # decodes on, through transformers' layers
    assert got == _generate(tiny_loaded, prompt, GREEDY.max_new_tokens)
