"""Decode attention over live KV lengths: the torch reference vs SDPA, the custom op, the Triton kernel under
Triton's interpreter, and the batch engine routed through the op (CPU)."""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.kernels import attention
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from tests.conftest import run_interpreted

ROOT = Path(__file__).resolve().parents[1]


def slot_case(
    rows: int, heads: int, kv_heads: int, dim: int, max_len: int, dtype: Any = torch.float64, seed: int = 0
) -> tuple[Any, Any, Any, Any]:
    """q as the attention layer makes it; K/V as the engine passes them: views of flat per-layer tensors that hold
    more slots than rows (so row strides skip whole slots); lengths from 1 to max_len."""
    gen = torch.Generator().manual_seed(seed)
    slots = rows + 3
    flat_k = torch.randn(slots * kv_heads * max_len, dim, generator=gen, dtype=dtype)
    flat_v = torch.randn(slots * kv_heads * max_len, dim, generator=gen, dtype=dtype)
    k = flat_k.view(slots, kv_heads, max_len, dim)[1 : rows + 1]
    v = flat_v.view(slots, kv_heads, max_len, dim)[1 : rows + 1]
    q = torch.randn(rows, 1, heads, dim, generator=gen, dtype=dtype).transpose(1, 2)
    lengths = torch.randint(1, max_len + 1, (rows,), generator=gen)
    lengths[0] = 1
    lengths[-1] = max_len
    return q, k, v, lengths


def sdpa_masked(q: Any, k: Any, v: Any, lengths: Any, scale: float) -> Any:
    """What the engine did before: SDPA over every slot row, the dead tail hidden by a boolean mask, KV repeated."""
    group = q.shape[1] // k.shape[1]
    live = torch.arange(k.shape[2]).view(1, -1) < lengths.view(-1, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=live[:, None, None, :], scale=scale
    )


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 2), (32, 8)])
def test_reference_equals_masked_sdpa_for_gqa_groups_and_slot_views(heads: int, kv_heads: int) -> None:
    q, k, v, lengths = slot_case(rows=5, heads=heads, kv_heads=kv_heads, dim=16, max_len=96)
    assert not k.is_contiguous() or k.storage_offset() > 0
    got = attention.decode_attention_reference(q, k, v, lengths, 0.25)
    assert got.shape == (5, heads, 1, 16) and got.dtype == torch.float64
    torch.testing.assert_close(got, sdpa_masked(q, k, v, lengths, 0.25), rtol=1e-10, atol=1e-10)
    # Keys past a row's length do not matter: scribbling over them changes nothing.
    k2, v2 = k.clone(), v.clone()
    for row, n in enumerate(lengths.tolist()):
        k2[row, :, n:] = 1e4
        v2[row, :, n:] = -1e4
    torch.testing.assert_close(attention.decode_attention_reference(q, k2, v2, lengths, 0.25), got)


def test_custom_op_on_cpu_is_the_reference_and_compiles_as_one_opaque_call() -> None:
    op = attention.decode_attention_op()
    q, k, v, lengths = slot_case(rows=3, heads=8, kv_heads=2, dim=16, max_len=64, dtype=torch.float32)
    expected = attention.decode_attention_reference(q, k, v, lengths, 0.25)
    got = attention.decode_attention(q, k, v, lengths, 0.25)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.library.opcheck(op, (q, k, v, lengths, 0.25))  # schema, fake (meta) impl, dispatch

    graphs = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    def step(q: Any, k: Any, v: Any, lengths: Any) -> Any:
        return attention.decode_attention(q * 1.0, k, v, lengths + 0, 0.25).transpose(1, 2) + 1

    out = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, lengths)
    torch.testing.assert_close(out, expected.transpose(1, 2) + 1)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("qwen3vl_webui.decode_attention") for t in targets) == 1, targets


def test_split_count_fills_the_gpu_within_bounds() -> None:
    assert attention.num_splits(rows=1, kv_heads=8, max_len=4096, sms=132) == attention.MAX_SPLITS
    assert attention.num_splits(rows=32, kv_heads=8, max_len=4096, sms=132) == 2
    assert attention.num_splits(rows=64, kv_heads=8, max_len=4096, sms=132) == 1
    assert attention.num_splits(rows=1, kv_heads=8, max_len=128, sms=132) == 2  # never more splits than key blocks
    assert attention.kernel_blocker("cpu", torch.float32, 4, 2, 16) == "not on CUDA"


INTERPRETER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
sys.path.insert(0, sys.argv[1])
from tests.test_attention import slot_case
from qwen3vl_webui.kernels.attention import decode_attention_reference, decode_attention_triton

results = []
for dtype in (torch.float32, torch.float16):
    for rows, heads, kv_heads, dim, max_len, splits in [
        (3, 8, 2, 16, 160, 1), (3, 8, 2, 16, 160, 3), (2, 4, 4, 32, 130, None), (2, 12, 2, 24, 200, 8),
    ]:
        q, k, v, lengths = slot_case(rows, heads, kv_heads, dim, max_len, dtype=dtype, seed=rows * max_len)
        ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, dim**-0.5)
        for row, n in enumerate(lengths.tolist()):  # the kernel must never read past a row's length
            k[row, :, n:] = float("nan")
            v[row, :, n:] = float("nan")
        out = torch.full((rows, heads, 1, dim), float("nan"), dtype=dtype)  # poisoned: every element must be written
        decode_attention_triton(q, k, v, lengths, dim**-0.5, splits=splits, out=out)
        err = float((out.double() - ref).norm() / ref.norm())
        results.append(dict(dtype=str(dtype), shape=[rows, heads, kv_heads, dim, max_len], splits=splits,
                            nan=bool(out.isnan().any()), err=err))
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_under_the_interpreter_matches_the_reference() -> None:
    """The real kernels on CPU through Triton's interpreter (fp32 and fp16; its bf16 tl.dot is broken in Triton 3.8)."""
    results = run_interpreted(INTERPRETER_SCRIPT, str(ROOT))
    assert len(results) == 8
    for r in results:
        assert not r["nan"], r
        assert r["err"] < (1e-6 if r["dtype"] == "torch.float32" else 2e-3), r


GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)


def _generate(loaded: Any, prompt: Any, tokens: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=tokens, eos_token_id=None)
    return out[0, prompt.inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture
def kernel_route(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The engine takes the decode-kernel route on CPU (the op's reference impl); returns the op calls' q shapes."""
    calls: list[Any] = []
    reference = attention.decode_attention_reference

    def counted(q: Any, *args: Any) -> Any:
        calls.append(tuple(q.shape))
        return reference(q, *args)

    monkeypatch.setattr(attention, "decode_kernel_blocker", lambda *args: None)
    monkeypatch.setattr(attention, "decode_attention_reference", counted)
    return calls


def test_engine_routed_through_the_op_equals_generate(tiny_loaded: Any, kernel_route: list[Any]) -> None:
    from qwen3vl_webui.conversation import UserMessage

    prompts = [build_prompt(tiny_loaded, ChatRequest(UserMessage(t), sampling=GREEDY)) for t in ("hello there", "Count the objects")]  # fmt: skip
    long = SamplingParams(max_new_tokens=120, temperature=0.0, repetition_penalty=1.0)
    expected = [_generate(tiny_loaded, prompts[0], long.max_new_tokens), _generate(tiny_loaded, prompts[1], 40)]
    with BatchEngine(tiny_loaded, BatchOptions(max_batch=2, token_budget=2 * 512, eos_token_ids=())) as engine:
        assert engine.decode_attention == "split-KV triton"
        first = engine.submit_tokens(prompts[0], long, threading.Event())
        head = [next(first) for _ in range(3)]
        joined = list(engine.submit_tokens(prompts[1], GREEDY, threading.Event()))  # joins mid-batch
        got = head + list(first)
        steps = engine.snapshot().steps
    assert got == expected[0]
    assert joined == expected[1]
    text = tiny_loaded.model.config.text_config
    # Every decode step (1 or 2 rows) went through the op once per layer; prefill never did.
    assert len(kernel_route) == text.num_hidden_layers * steps
    assert {s[0] for s in kernel_route} == {1, 2} and all(s[1:3] == (text.num_attention_heads, 1) for s in kernel_route)
    assert text._attn_implementation == "sdpa"  # restored on close


def test_engine_on_cpu_keeps_sdpa_by_default(tiny_loaded: Any) -> None:
    text = tiny_loaded.model.config.text_config
    assert attention.decode_kernel_blocker("cpu", text, torch.float32) == "not on CUDA"
    with BatchEngine(tiny_loaded, BatchOptions(max_batch=1, token_budget=512)) as engine:
        assert engine.decode_attention == "sdpa (not on CUDA)"
        assert text._attn_implementation == "sdpa"


@pytest.mark.skipif(not os.environ.get("QWEN3VL_SLOW_TESTS"), reason="compiles with inductor on CPU (~2 min)")
def test_dynamic_batch_compiles_twice_for_three_buckets(tiny_loaded: Any, kernel_route: list[Any], tmp_path) -> None:
    from torch._dynamo.utils import counters

    from qwen3vl_webui.conversation import UserMessage

    prompts = [build_prompt(tiny_loaded, ChatRequest(UserMessage(t), sampling=GREEDY)) for t in ("hello there", "Count the objects", "a b c")]  # fmt: skip
    expected = [_generate(tiny_loaded, p, GREEDY.max_new_tokens) for p in prompts]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    with BatchEngine(tiny_loaded, BatchOptions(
        max_batch=4, token_budget=4 * 512, eos_token_ids=(), buckets=(1, 2, 4), compile=True,
        compile_cache_dir=tmp_path,
    )) as engine:  # fmt: skip
        assert engine.decode_path == "torch.compile (no graphs)", engine.compile_error
        assert counters["stats"]["unique_graphs"] - before == 2  # bucket 1 static, buckets 2 and 4 share one
        streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in prompts]
        assert [list(s) for s in streams] == expected
