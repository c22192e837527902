"""What the decode step's compile costs, whole against regional (one decoder layer compiled, every layer running it).

    python -m bench.compile_check --device cpu --precision fp32 --layers 36 --out bench/results/cpu/compile_check.json
    python -m bench.compile_check --out $OUT/compile_check.json           # GPU: random 4B weights, bf16

Each mode runs in a fresh process of its own (an empty inductor cache dir, a fresh dynamo) with the same model, the
same engine options and the same work: the batch engine is built with every bucket compiled before it serves
(`background_compile` off, as the precompile command does), then greedy streams decode the same prompts at each
stream count (`--streams`, median of `--runs`). Reported per mode: the engine's start-up, each bucket's compile +
warm-up seconds, the graphs dynamo made, tok/s per stream count, and whether the greedy tokens of both modes agree
(exact in fp32; bf16 may part at near-ties, as any two compiles may). Ratios are regional / whole.

`--layers N` (CPU): the tiny preset with N text layers, written to a temp dir: compile time grows with the number of
layers, the width barely matters, so a narrow 36-layer model shows the 4B model's layer count at CPU cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

MODES = ("whole", "regional")
MARK = "COMPILE_CHECK_RESULT "


def _model(args: Any, work: Path) -> str:
    if not args.layers:
        return args.model
    from qwen3vl_webui.weights import tiny_model

    tiny_model.PRESETS["tiny"]["text"]["num_hidden_layers"] = args.layers
    path = work / f"tiny-{args.layers}-layers"
    if not (path / "config.json").exists():
        tiny_model.write_checkpoint(path, "tiny")
    return str(path)


def child(args: Any) -> dict[str, Any]:
    """One mode, in this (fresh) process."""
    from torch._dynamo.utils import counters

    loaded = common.load(args.model, args.precision, args.device)
    prompts = common.make_prompts(max(args.streams), args.prompt_len, common.ordinary_vocab(loaded))
    inputs = prompts
    engine, info = common.start_engine(
        loaded, max_batch=max(args.streams), token_budget=max(args.streams) * args.max_len, compile=True,
        regional_compile=args.child == "regional", compile_cache_dir=os.environ["TORCHINDUCTOR_CACHE_DIR"],
    )  # fmt: skip
    graphs = engine.core.graphs
    out: dict[str, Any] = {
        "mode": args.child, **info, "graphs": counters["stats"]["unique_graphs"],
        "regional": graphs.regional, "regional_error": graphs.regional_error,  # a failed regional compile fell back
    }  # fmt: skip
    try:
        out["compile_s"] = round(sum(info["warmup_s"].values()), 2)
        for n in args.streams:
            common.run_engine(engine, inputs[:n], 4)  # the same warm-up for both modes
            rows = [common.run_engine(engine, inputs[:n], args.new_tokens) for _ in range(args.runs)]
            out[f"streams_{n}"] = common.median_row(rows)
        out["tokens"] = _greedy_tokens(engine, inputs[: min(4, len(inputs))], args.new_tokens)
        check = common.greedy_check(loaded, engine, inputs[0], args.new_tokens)
        out["equal_to_generate"] = {k: check[k] for k in ("identical", "equal_prefix", "distinct_tokens")}
    finally:
        engine.close()
    return out


def _greedy_tokens(engine: Any, prompts: list[Any], new_tokens: int) -> list[list[int]]:
    import threading

    return [list(engine.submit_tokens(p, common.greedy(new_tokens), threading.Event())) for p in prompts]


def main() -> None:
    ap = common.model_args(__doc__)
    ap.add_argument("--layers", type=int, default=0, help="CPU: the tiny preset with this many text layers")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512, help="KV tokens per slot")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", choices=MODES, help=argparse_hidden())
    args = ap.parse_args()
    args.streams = [int(s) for s in str(args.streams).split(",")]
    if args.child:
        result = child(args)
        print(MARK + json.dumps(result, default=str), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="compile-check-"))
    model = _model(args, work)
    report: dict[str, Any] = {
        "environment": common.environment(args.device), "model": args.model if not args.layers else
        f"tiny preset, {args.layers} text layers", "precision": args.precision, "device": args.device,
        "streams": args.streams, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "runs": args.runs,
        "command": " ".join(sys.argv), "modes": {},
    }  # fmt: skip
    for mode in args.modes.split(","):
        cache = tempfile.mkdtemp(prefix=f"inductor-{mode}-", dir=work)
        argv = [sys.executable, "-m", "bench.compile_check", "--child", mode, "--model", model, "--device",
                args.device, "--precision", args.precision, "--streams", ",".join(map(str, args.streams)),
                "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--max-len",
                str(args.max_len), "--runs", str(args.runs)]  # fmt: skip
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=common.ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            report["modes"][mode] = {"error": f"exit {proc.returncode}"}
            continue
        result = json.loads(lines[-1][len(MARK) :])
        result["process_s"] = round(time.perf_counter() - started, 1)
        report["modes"][mode] = result
        print(f"{mode:9s} start-up {result['startup_s']:7.1f} s  compile+warm-up per bucket {result['warmup_s']}  "
              f"graphs {result['graphs']}", flush=True)  # fmt: skip
        common.write_json(args.out, report)
    whole, regional = report["modes"].get("whole", {}), report["modes"].get("regional", {})
    if "startup_s" in whole and "startup_s" in regional:
        ratios: dict[str, Any] = {
            "startup": round(regional["startup_s"] / whole["startup_s"], 3),
            "compile": round(regional["compile_s"] / whole["compile_s"], 3),
        }
        for n in args.streams:
            key = f"streams_{n}"
            ratios[f"tok_s_{n}"] = round(regional[key]["total_tok_s"] / whole[key]["total_tok_s"], 3)
        ratios["greedy_tokens_equal"] = bool(whole["tokens"]) and whole["tokens"] == regional["tokens"]
        # The regional mode fell back to the whole step (its compile failed): the ratios then compare two whole steps.
        ratios["regional_fell_back"] = not regional.get("regional", True)
        report["regional_vs_whole"] = ratios
        print("regional / whole:", json.dumps(ratios), flush=True)
        for n in args.streams:
            key = f"streams_{n}"
            print(f"  {n:3d} streams: whole {whole[key]['total_tok_s']:8.1f} tok/s, regional "
                  f"{regional[key]['total_tok_s']:8.1f} tok/s", flush=True)  # fmt: skip
    common.write_json(args.out, report)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
