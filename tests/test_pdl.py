"""Programmatic dependent launch (kernels/pdl.py): what each decode kernel compiles to for the device's GPUs (sm_90) in
each mode, and when the launches ask for it."""

from __future__ import annotations

import importlib.util
import re
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _order(ptx: str) -> dict[str, int | None]:
    """The PTX line of the first wait, the first trigger, the first global access (a load or an async copy), and the
    first and last global store (or atomic) and tensor-core instruction."""
    lines = [line.strip() for line in ptx.splitlines() if line.strip()]

    def where(pattern: str, last: bool = False) -> int | None:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        return (found[-1] if last else found[0]) if found else None

    return {
        "wait": where(r"griddepcontrol\.wait"),
        "trigger": where(r"griddepcontrol\.launch_dependents"),
        "triggers": sum(1 for line in lines if "griddepcontrol.launch_dependents" in line),
        "access": where(r"\bld\.global|\bcp\.async\.c[ag]\.|\bld\.global\.nc"),
        "store": where(r"\bst\.global|\b(?:atom|red)\.global"),
        "last_store": where(r"\bst\.global|\b(?:atom|red)\.global", last=True),
        "last_trigger": where(r"griddepcontrol\.launch_dependents", last=True),
        "last_mma": where(r"wgmma\.mma_async|\bmma\.sync", last=True),
    }


def _decode_kernels(mode: int) -> dict[str, object]:
    """Each kernel of the decode step compiled as it launches at one row of the 4B (bf16), with PDL `mode`."""
    from bench.kernel_asm import compile_offline, w4_args
    from qwen3vl_webui.kernels import attention_triton, fp8_triton, layer_triton, matmul_triton, splitk
    from qwen3vl_webui.kernels import w4a16_triton as wk

    hidden, heads, kv_heads, dim = 2560, 32, 8, 128
    pdl = {"PDL": mode}
    fp8 = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", s_ptr="*fp32", N=2560, K=9728, stride_xm=9728, stride_wn=9728,
               stride_sn=76)  # fmt: skip
    w4 = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", y_ptr="*fp32", N=2560, K=9728, stride_xm=9728,
              stride_wn=1216, stride_sn=76, groups_per_split=19)  # fmt: skip
    swap = wk.W4Config(16, 64, 1, 4, 3, 6)
    return {
        "int4 swap": compile_offline(wk._swap_kernel, w4_args(1, 2560, 4096),
                                     dict(BLOCK_M=16, BLOCK_N=64, G=128, **wk.swap_constexprs(swap), **pdl), 4, 3),
        "bf16 gemv": compile_offline(matmul_triton._gemv_kernel,
                                     dict(x_ptr="*bf16", w_ptr="*bf16", s_ptr="*bf16", y_ptr="*bf16", N=6144, K=2560,
                                          stride_xm=2560, stride_wn=2560, stride_ym=6144),
                                     dict(BLOCK_N=8, BLOCK_K=512, EVEN_K=True, FAST_CVT=False, HAS_SCALE=False, **pdl),
                                     4, 1),
        "fp8 atomic gemv": compile_offline(fp8_triton._atomic_gemv_kernel,
                                           dict(x_ptr="*bf16", w_ptr="*fp8e4nv", s_ptr="*fp32", y_ptr="*fp32", N=2560,
                                                K=9728, stride_xm=9728, stride_wn=9728, stride_sn=76, stride_ym=2560),
                                           dict(BLOCK_N=16, B=128, BLOCKS=4, **pdl), 2, 1),
        "add_rms_norm": compile_offline(layer_triton.add_rms_norm,
                                        dict(X="*fp32", R="*bf16", W="*bf16", Out="*bf16", Sum="*bf16", eps=1e-6,
                                             n=hidden, inv_n=1.0 / hidden, sx_p=hidden, sx=hidden, sr=hidden,
                                             so=hidden, ss=hidden),
                                        dict(HAS_R=True, SPLIT=4, BLOCK=4096, **pdl), 8, 1),
        "attention": compile_offline(attention_triton.split_kv_partials,
                                     dict(Q="*bf16", K="*bf16", V="*bf16", Lens="*i32", Out="*bf16", Part="*fp32",
                                          Lse="*fp32", scale_log2=0.1275, num_splits=4, sq_r=heads * dim, sq_h=dim,
                                          sk_r=kv_heads * 1280 * dim, sk_h=1280 * dim, sk_n=dim,
                                          sv_r=kv_heads * 1280 * dim, sv_h=1280 * dim, sv_n=dim, so_r=heads * dim,
                                          so_h=dim),
                                     dict(GROUP=4, BLOCK_H=16, BLOCK_N=64, BLOCK_D=128, DIM=128, DIRECT=False,
                                          IEEE=False, **pdl), 4, 2),
        "split-K sum": compile_offline(splitk._reduce_kernel, dict(p_ptr="*fp32", y_ptr="*bf16", total=2560),
                                       dict(SPLIT=8, BLOCK=splitk.BLOCK, **pdl), 4, 1),
        "zero fill": compile_offline(splitk._zero_kernel, dict(y_ptr="*fp32", total=2560),
                                     dict(BLOCK=splitk.BLOCK, **pdl), 4, 1),
        "qk_norm_rope_kv": compile_offline(layer_triton.qk_norm_rope_kv,
                                           dict(QKV="*fp32", QW="*bf16", KW="*bf16", Cos="*bf16", Sin="*bf16",
                                                Q="*bf16", Keys="*bf16", Values="*bf16", Index="*i32", eps=1e-6,
                                                s_part=6144, s_row=6144, s_cos=128, s_q=4096),
                                           dict(HEADS=32, KV_HEADS=8, DIM=128, SPLIT=2, **pdl), 1, 1),
        "silu_mul": compile_offline(layer_triton.silu_mul, dict(P="*fp32", Out="*bf16", n=9728, sp=19456, sr=19456,
                                    so=9728), dict(SPLIT=2, BLOCK=1024, PRECISE=True, **pdl), 4, 1),
        "add_product": compile_offline(layer_triton.add_product, dict(R="*bf16", P="*fp32", Out="*bf16", n=2560,
                                       sr=2560, sp=2560, spr=2560, so=2560), dict(SPLIT=2, BLOCK=1024, **pdl), 4, 1),
        "combine_splits": compile_offline(attention_triton.combine_splits, dict(Part="*fp32", Lse="*fp32",
                                          Out="*bf16", num_splits=4, so_r=4096, so_h=128),
                                          dict(HEADS=32, BLOCK_S=4, BLOCK_D=128, DIM=128, **pdl), 4, 1),
        "fp8 gemv": compile_offline(fp8_triton._gemv_kernel, dict(fp8, y_ptr="*bf16", stride_ym=2560),
                                    dict(BLOCK_N=16, B=128, **pdl), 4, 1),
        "fp8 skinny": compile_offline(fp8_triton._skinny_kernel, dict(fp8, y_ptr="*bf16", M=16, stride_ym=2560),
                                      dict(BLOCK_M=16, BLOCK_N=64, B=128, **pdl), 4, 2),
        "fp8 swap": compile_offline(fp8_triton._swap_kernel, dict(fp8, y_ptr="*bf16", M=16, stride_ys=16 * 2560,
                                    stride_ym=2560, blocks_per_split=76), dict(BLOCK_M=16, BLOCK_N=64, B=128, **pdl),
                                    4, 3),
        "int4 gemv": compile_offline(wk._gemv_kernel, dict(w4, stride_ys=2560, stride_ym=2560),
                                     dict(BLOCK_N=16, G=128, **pdl), 4, 2),
        "int4 skinny": compile_offline(wk._skinny_kernel, dict(w4, M=16, stride_ys=16 * 2560, stride_ym=2560),
                                       dict(BLOCK_M=16, BLOCK_N=64, G=128, **pdl), 4, 2),
        "int4 tile": compile_offline(wk._tile_kernel, dict(w4, M=16, stride_ys=16 * 2560, stride_ym=2560),
                                     dict(BLOCK_M=16, BLOCK_N=64, G=128, **pdl), 4, 2),
        "int8 gemv": compile_offline(matmul_triton._gemv_kernel, dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32",
                                     y_ptr="*bf16", N=9728, K=2560, stride_xm=2560, stride_wn=2560, stride_ym=9728),
                                     dict(BLOCK_N=16, BLOCK_K=256, EVEN_K=True, FAST_CVT=True, **pdl), 4, 1),
        "int8 skinny": compile_offline(matmul_triton._skinny_kernel, dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32",
                                       y_ptr="*bf16", M=16, N=9728, K=2560, stride_xm=2560, stride_wn=2560,
                                       stride_ym=9728), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, EVEN_K=True,
                                       FAST_CVT=False, **pdl), 4, 4),
    }  # fmt: skip


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_each_decode_kernel_waits_for_the_one_before_before_touching_memory(mode: int) -> None:
    """Every kernel that takes PDL (the decode step's eighteen: the fused layer's, the attention's, each precision's
    products, the split-K sum and the zero fill; the 16-bit GEMV twice, on bf16 and on int8 weights)."""
    from triton.runtime.jit import JITFunction

    from qwen3vl_webui.kernels import attention_triton, fp8_triton, layer_triton, matmul_triton, splitk
    from qwen3vl_webui.kernels import w4a16_triton as wk

    modules = (attention_triton, fp8_triton, layer_triton, matmul_triton, splitk, wk)
    with_pdl = [
        name for m in modules for name, fn in vars(m).items() if isinstance(fn, JITFunction) and "PDL" in fn.arg_names
    ]
    kernels = _decode_kernels(mode)
    assert len(with_pdl) == 18 and len(kernels) == 19, (with_pdl, list(kernels))
    for name, kernel in kernels.items():
        at = _order(kernel.asm["ptx"])
        assert at["store"] is not None, (name, at)
        first = min(i for i in (at["access"], at["store"]) if i is not None)  # its first global read or write
        if mode == 0:  # launched as before: no grid dependency control at all
            assert at["wait"] is None and at["trigger"] is None, (name, at)
            continue
        assert at["wait"] is not None and at["wait"] < first, (name, at)
        if mode == 1:  # early: the next kernel may launch as soon as this one's programs have all started
            assert at["triggers"] == 1 and at["trigger"] < first, (name, at)
        else:  # late: once this one's work is done, before its stores (qk_norm_rope_kv: once in each branch)
            assert at["triggers"] == (3 if name == "qk_norm_rope_kv" else 1), (name, at)
            assert at["trigger"] > (at["access"] if at["access"] is not None else at["wait"]), (name, at)
            assert at["last_trigger"] < at["last_store"], (name, at)
            if at["last_mma"] is not None:
                assert at["trigger"] > at["last_mma"], (name, at)


def test_launches_ask_for_pdl_only_on_a_gpu_that_has_it_and_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from qwen3vl_webui.kernels import pdl

    gpu = SimpleNamespace(device=torch.device("cuda", 0), get_device=lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "available", lambda index: True)
    monkeypatch.setattr(pdl, "_default", pdl.DEFAULT)  # as `use_for` leaves it for bf16
    try:
        for env, expected in (("", {"PDL": pdl.DEFAULT, "launch_pdl": True}), ("0", {}), ("1", {"PDL": 1, "launch_pdl": True}),
                              ("2", {"PDL": 2, "launch_pdl": True}), ("yes", {"PDL": pdl.DEFAULT, "launch_pdl": True})):  # fmt: skip
            monkeypatch.setenv("QWEN3VL_PDL", env)
            assert pdl.args(gpu) == expected, env
            assert pdl.args(torch.zeros(1)) == {}, env  # a CPU tensor: never
        monkeypatch.setenv("QWEN3VL_PDL", "2")
        monkeypatch.setattr(pdl, "available", lambda index: False)  # a GPU before Hopper, or an older Triton
        assert pdl.args(gpu) == {}
        monkeypatch.setattr(pdl, "available", lambda index: True)
        monkeypatch.setenv("QWEN3VL_PDL_SKIP", "fp8, attention")  # families launched as before (an A/B)
        pdl._skipped.cache_clear()
        assert pdl.args(gpu, "fp8") == {} and pdl.args(gpu, "attention") == {}
        assert pdl.args(gpu, "int4") == {"PDL": 2, "launch_pdl": True}
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs no PTX
        assert pdl.args(gpu, "int4") == {}
    finally:
        pdl._skipped.cache_clear()


def test_pdl_needs_compute_capability_9(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from qwen3vl_webui.kernels import pdl

    for capability, expected in (((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        pdl.available.cache_clear()
        assert pdl.available(0) is expected, capability
    pdl.available.cache_clear()


def test_the_engine_launches_with_pdl_only_for_the_precisions_that_gained_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 26 (H100): bf16 and int4 decoded faster with it, fp8 slower; QWEN3VL_PDL set applies to all."""
    import torch

    from qwen3vl_webui.kernels import pdl

    gpu = SimpleNamespace(device=torch.device("cuda", 0), get_device=lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QWEN3VL_PDL", raising=False)
    monkeypatch.setattr(pdl, "available", lambda index: True)
    monkeypatch.setattr(pdl, "_default", pdl.DEFAULT)
    for precision, expected in (("bf16", pdl.LATE), ("int4", pdl.LATE), ("fp8", pdl.OFF), ("int8wo", pdl.OFF),
                                ("int4-bnb", pdl.OFF), ("fp16", pdl.LATE)):  # fmt: skip
        assert pdl.use_for(precision) == expected, precision
        assert pdl.args(gpu, "layer") == ({"PDL": expected, "launch_pdl": True} if expected else {}), precision
    # fp8 in kernels/fp8_mma.py's layout gained (session 30): on where its weights took it, as the engine counts
    assert pdl.use_for("fp8", mma_layout=True) == pdl.LATE and pdl.use_for("fp8", mma_layout=False) == pdl.OFF
    monkeypatch.setenv("QWEN3VL_PDL", "1")
    assert pdl.use_for("fp8") == pdl.EARLY and pdl.args(gpu, "fp8") == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("QWEN3VL_PDL", "0")
    assert pdl.use_for("bf16") == pdl.OFF and pdl.args(gpu, "int4") == {}


def test_the_one_row_graph_launches_early_and_the_others_late_where_pdl_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 27 (H100): at one stream early mode gained bf16 1.08x against late's 1.04x, at 32 it lost 1-2%: each
    batch size's graph keeps the mode its launches were captured with (`step_rows`, per thread)."""
    import threading

    import torch

    from qwen3vl_webui.kernels import pdl

    gpu = SimpleNamespace(device=torch.device("cuda", 0), get_device=lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QWEN3VL_PDL", raising=False)
    monkeypatch.setattr(pdl, "available", lambda index: True)
    monkeypatch.setattr(pdl, "_default", pdl.OFF)
    monkeypatch.setattr(pdl, "_one_row", pdl.OFF)
    late, early = {"PDL": pdl.LATE, "launch_pdl": True}, {"PDL": pdl.EARLY, "launch_pdl": True}
    assert pdl.use_for("bf16") == pdl.LATE and pdl.describe() == "late; early at one row"
    assert pdl.args(gpu, "layer") == late  # outside any step: prefill, probes
    seen = []
    with pdl.step_rows(1):
        assert pdl.args(gpu, "layer") == early and pdl.mode() == pdl.EARLY
        other = threading.Thread(target=lambda: seen.append(pdl.args(gpu, "layer")))  # another thread: its own
        other.start()
        other.join()
        with pdl.step_rows(32):
            assert pdl.args(gpu, "int4") == late
        assert pdl.args(gpu, "int4") == early  # back to the one-row step's
    assert seen == [late] and pdl.args(gpu, "layer") == late
    for rows in (2, 16, 32):
        with pdl.step_rows(rows):
            assert pdl.args(gpu, "gemv") == late, rows
    pdl.use_for("fp8", mma_layout=False)  # fp8 in its own layout: no gain measured, off in every step
    with pdl.step_rows(1):
        assert pdl.args(gpu, "fp8") == {} and pdl.describe() == "off"
    monkeypatch.setenv("QWEN3VL_PDL", "2")  # a mode set applies to every step
    pdl.use_for("bf16")
    with pdl.step_rows(1):
        assert pdl.args(gpu, "layer") == late and pdl.describe() == "late"


_ZERO_INTERPRETED = """
import torch
from qwen3vl_webui.kernels import splitk
poisoned = torch.full((3, 700), 7.0)  # more than one program's block (BLOCK 1024) once flattened: 2,100 values
splitk._zero_kernel[(3,)](poisoned, poisoned.numel(), BLOCK=splitk.BLOCK)
assert torch.equal(poisoned, torch.zeros(3, 700)), poisoned.sum()
assert torch.equal(splitk.zeros((1, 2, 5), "cpu", {}), torch.zeros(1, 2, 5))  # PDL off: torch's zeros
print("ok")
"""


def test_the_atomic_products_output_is_cleared_by_a_kernel_launched_like_them() -> None:
    """fp8's one-row atomic GEMV adds into zeros: with PDL on they come from our kernel, launched with PDL too (a
    torch fill in between broke the chain), which waits before it writes; its arithmetic runs in the interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bench.kernel_asm import compile_offline
    from qwen3vl_webui.kernels import splitk

    for mode in (1, 2):
        kernel = compile_offline(splitk._zero_kernel, dict(y_ptr="*fp32", total=2560), dict(BLOCK=splitk.BLOCK, PDL=mode),
                                 4, 1)  # fmt: skip
        at = _order(kernel.asm["ptx"])
        assert at["wait"] is not None and at["wait"] < at["store"] and at["trigger"] < at["store"], (mode, at)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _ZERO_INTERPRETED], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_engine_imports_triton_only_where_its_kernels_run() -> None:
    """kernels/pdl.py imports Triton; the engine reaches it inside a CUDA branch, so importing the engine (every CPU
    start, and every machine without Triton) stays without it."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, qwen3vl_webui.engine.batch.engine, qwen3vl_webui.engine.batch.graphs; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "False", (proc.stdout, proc.stderr[-2000:])
