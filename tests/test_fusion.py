"""Fused q/k/v and gate/up projections for decode: same memory, same function, the engine's tokens unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from qwen3vl_webui.conversation import UserMessage
from qwen3vl_webui.engine.batch import BatchEngine, BatchOptions
from qwen3vl_webui.engine.request import SamplingParams
from qwen3vl_webui.kernels import fusion, gemv
from qwen3vl_webui.service.prompt import ChatRequest, build_prompt
from qwen3vl_webui.weights.loading import load_model

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GREEDY = SamplingParams(max_new_tokens=32, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture()
def loaded(tiny_checkpoint: Path):
    return load_model(str(tiny_checkpoint), "fp32", "cpu")  # a private copy: fusing changes its modules


def _generate(loaded, prompt) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(**prompt.inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens)
    return out[0, prompt.inputs["input_ids"].shape[1] :].tolist()


def test_fusing_shares_one_buffer_per_group_and_computes_the_same_function(loaded) -> None:
    text = loaded.model.model.language_model
    before_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    ids = torch.randint(0, 200, (2, 40))
    with torch.inference_mode():
        ref_long = text(input_ids=ids).last_hidden_state
        ref_row = text(input_ids=ids[:, :1]).last_hidden_state
    layers = len(text.layers)
    assert fusion.fuse_projections(text, max_rows=8) == 2 * layers
    attn, mlp = text.layers[0].self_attn, text.layers[0].mlp
    base = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == base == attn.v_proj.weight.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in loaded.model.parameters()) == before_bytes  # views, no copy
    calls = []
    real_linear = torch.nn.functional.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return real_linear(x, w, b)

    with torch.inference_mode():
        long = text(input_ids=ids).last_hidden_state  # 80 rows > 8: each Linear alone, as before
        torch.nn.functional.linear = counting
        try:
            row = text(input_ids=ids[:, :1]).last_hidden_state  # 2 rows: one product per fused group
        finally:
            torch.nn.functional.linear = real_linear
    assert torch.equal(long, ref_long)
    torch.testing.assert_close(row, ref_row, rtol=1e-5, atol=1e-5)
    cfg = loaded.model.config.text_config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    assert calls.count((qkv, cfg.hidden_size)) == layers and calls.count((2 * cfg.intermediate_size, cfg.hidden_size)) == layers  # fmt: skip
    fusion.unfuse(text)
    assert not any("forward" in vars(m) for m in text.modules())


def test_quantized_or_mismatched_groups_are_left_alone(loaded) -> None:
    text = loaded.model.model.language_model
    attn = text.layers[0].self_attn
    attn.k_proj.bias = torch.nn.Parameter(torch.zeros(attn.k_proj.out_features))  # a biased projection
    fused = fusion.fuse_projections(text)
    assert fused == 2 * len(text.layers) - 1 and "forward" not in vars(attn.q_proj)


def test_the_engine_with_fused_projections_still_equals_generate(loaded) -> None:
    prompts = [
        build_prompt(loaded, ChatRequest(UserMessage(q, files), sampling=GREEDY))
        for q, files in (("hello there", ()), ("Describe the image.", (str(ASSETS / "example.png"),)))
    ]
    expected = [_generate(loaded, p) for p in prompts]
    with BatchEngine(loaded, BatchOptions(max_batch=2, token_budget=2 * 1024, fuse=True, prefix_slots=0)) as engine:
        assert engine.fused_groups == 2 * len(loaded.model.model.language_model.layers)
        streams = [engine.submit_tokens(p, GREEDY, threading.Event()) for p in prompts]
        got = [list(s) for s in streams]
    assert got == expected
    assert not any("forward" in vars(m) for m in loaded.model.modules())  # closing the engine unfuses
    assert not any(p.is_inference() for p in loaded.model.parameters())  # and leaves ordinary weights


def test_one_row_products_go_to_the_gemv_op_and_larger_ones_to_cublas(loaded, monkeypatch) -> None:
    """The routing around the Triton GEMV (CUDA-only; its numerics are checked on the GPU by bench/gemv_check.py):
    one-row products of every plain Linear, fused or not, and of lm_head reach the kernel, eagerly and through the
    custom op under torch.compile; prefill-sized ones never do; the results are the model's own."""

    class RecordingKernels:
        calls: list[tuple[int, int]] = []

        @staticmethod
        def gemv16(x, weight):
            RecordingKernels.calls.append(tuple(weight.shape))
            assert x.shape[0] == 1 and x.is_contiguous()
            return x @ weight.T

    monkeypatch.setattr(gemv, "_kernels", lambda: RecordingKernels)
    monkeypatch.setattr(gemv, "gemv_blocker", lambda weight: None)  # as on a GPU in bf16
    text, head = loaded.model.model.language_model, loaded.model.lm_head
    ids = torch.randint(0, 200, (2, 12))
    with torch.inference_mode():
        ref_row = head(text(input_ids=ids[:1, :1]).last_hidden_state)
        ref_long = head(text(input_ids=ids).last_hidden_state)
    layers = len(text.layers)
    assert fusion.fuse_projections(text, max_rows=8, gemv=True) == 2 * layers
    assert fusion.route_gemv([text, head]) == 2 * layers + 1  # o_proj, down_proj, lm_head
    cfg = loaded.model.config.text_config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    expected = {(qkv, cfg.hidden_size), (2 * cfg.intermediate_size, cfg.hidden_size), tuple(head.weight.shape)}
    try:
        with torch.inference_mode():
            long = head(text(input_ids=ids).last_hidden_state)  # 24 rows: cuBLAS throughout
            assert RecordingKernels.calls == []
            row = head(text(input_ids=ids[:1, :1]).last_hidden_state)
            eager_calls = list(RecordingKernels.calls)
            RecordingKernels.calls.clear()
            traced: list[str] = []

            def recording_backend(gm, example_inputs):  # what dynamo hands inductor, then run as traced
                traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
                return gm.forward

            step = torch.compile(
                lambda i: head(text(input_ids=i).last_hidden_state), backend=recording_backend, fullgraph=True
            )
            compiled_row = step(ids[:1, :1])
        assert len(eager_calls) == 4 * layers + 1 and expected <= set(eager_calls)
        # Compiled, each product is the opaque custom op in the graph (not the kernel's Python traced inline), and
        # the kernel runs when the graph does.
        assert sum("qwen3vl_webui.gemv16" in t for t in traced) == 4 * layers + 1, traced
        assert sorted(RecordingKernels.calls) == sorted(eager_calls)
        torch.testing.assert_close(long, ref_long, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row, ref_row, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_row, ref_row, rtol=1e-4, atol=1e-4)
    finally:
        fusion.unfuse(loaded.model)
    assert not any("forward" in vars(m) for m in loaded.model.modules())
