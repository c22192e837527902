"""How many kernels one decoder layer launches for a decode step: transformers' eager layer against the fused one.

A CUDA graph replays every kernel the eager step launched, and at one stream each costs a few microseconds of an idle
GPU, so the eager step's speed is set by its launch count (docs/engine.md v15). This counts them on CPU, on the real
Qwen3-VL layer (the tiny model: the same code as the 4B's, fewer and narrower layers), with the engine's routing:
q/k/v and gate/up fused into one product each, the slot cache, the split-KV decode attention op.

- transformers' layer: every aten op that computes (views, reshapes and other aliasing ops launch nothing), counted
  with a TorchDispatchMode; the decode attention op counts as one launch whatever its CPU reference does (on CUDA it
  is one or two Triton kernels on either path).
- the fused layer (kernels/layer.py), its Triton kernels run by Triton's interpreter: the same aten count, plus one
  per Triton launch.

    python -m bench.layer_launches --out bench/results/cpu/layer_launches.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from typing import Any

# Ops that only alias or describe a tensor (no kernel on CUDA).
ALIASING = {
    "view", "_unsafe_view", "reshape", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "as_strided", "detach", "alias", "permute", "unbind", "chunk", "narrow",
    "empty", "empty_like", "empty_strided", "lift_fresh", "_to_copy_noop", "sym_size", "sym_stride", "is_same_size",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":  # Triton must be imported under it: a process of its own
        args = sys.argv[1:] if argv is None else argv
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "bench.layer_launches", *args], env=env)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="decode rows (streams) in the step")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench import common
    from qwen3vl_webui.engine.batch.kv import LayerSlotCache
    from qwen3vl_webui.kernels import attention, fusion
    from qwen3vl_webui.kernels import layer as fused

    loaded = common.load("random-weights:tiny", "fp32", "cpu")
    text = loaded.model.model.language_model
    fusion.fuse_projections(text)
    restore = attention.use_packed_decode_attention(loaded.model.config.text_config)
    config = text.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows, max_len = args.rows, 32
    layer = text.layers[0]

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()
            self.paused = 0

        def __torch_dispatch__(self, func: Any, types: Any, a: Any = (), kw: Any = None) -> Any:
            name = func.overloadpacket.__name__
            if not self.paused and name not in ALIASING:
                self.ops[name] += 1
            return func(*a, **(kw or {}))

    counter: Count | None = None
    reference = attention.decode_attention_reference

    def one_launch(*a: Any) -> Any:  # the attention op (counted once, as dispatched), whatever its CPU reference runs
        assert counter is not None
        counter.paused += 1
        try:
            return reference(*a)
        finally:
            counter.paused -= 1

    attention.decode_attention_reference = one_launch
    kernels = fused._kernels()
    jit = ("JITFunction", "InterpretedFunction")  # the interpreter's stand-in for @triton.jit functions
    launched = [n for n in dir(kernels) if not n.startswith("_") and type(getattr(kernels, n)).__name__ in jit]
    for name in launched:
        launcher = getattr(kernels, name)

        class Launch:
            def __init__(self, launcher: Any, name: str) -> None:
                self.launcher, self.name = launcher, name

            def __getitem__(self, grid: Any) -> Any:
                run = self.launcher[grid]

                def call(*a: Any, **kw: Any) -> Any:
                    assert counter is not None
                    counter.ops[f"{self.name} (Triton)"] += 1
                    counter.paused += 1
                    try:
                        return run(*a, **kw)
                    finally:
                        counter.paused -= 1

                return call

        setattr(kernels, name, Launch(launcher, name))

    def step(forward: Any) -> collections.Counter[str]:
        nonlocal counter
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(rows, 1, config.hidden_size, generator=gen)
        positions = torch.full((rows,), 5)
        cos, sin = text.rotary_emb(hidden, positions.view(1, rows, 1).expand(3, rows, 1))
        keys = torch.zeros((rows + 1) * kv_heads * max_len, dim)
        values = torch.zeros_like(keys)
        index = ((torch.arange(rows).view(-1, 1) * kv_heads + torch.arange(kv_heads)) * max_len + 5).view(-1)
        cache = LayerSlotCache(keys, values, (rows + 1, kv_heads, max_len, dim), rows, index)
        lengths = positions + 1
        counter = Count()
        with torch.inference_mode(), counter:
            forward(hidden, position_embeddings=(cos, sin), attention_mask=None, past_key_values=cache,
                    kv_lengths=lengths)  # fmt: skip
        return counter.ops

    plain = step(layer.forward)
    fast = step(fused.decode_layer_forward(layer, layer.forward))
    restore()
    report = dict(
        **common.environment("cpu"), model="random-weights:tiny (a Qwen3-VL text decoder layer, fp32)", rows=rows,
        layers=dict(
            transformers=dict(launches=sum(plain.values()), ops=dict(plain.most_common())),
            fused=dict(launches=sum(fast.values()), ops=dict(fast.most_common())),
        ),
        command="python -m bench.layer_launches" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    )  # fmt: skip
    layers = report["layers"]
    print(f"one decoder layer, one decode step of {rows} row(s): transformers {layers['transformers']['launches']} "
          f"launches, fused {layers['fused']['launches']}")  # fmt: skip
    for label, row in layers.items():
        print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in row["ops"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
