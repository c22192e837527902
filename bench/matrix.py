"""Issue 3's benchmark matrix for ONE precision: plain `generate` against the BatchEngine in the same run.

At 1, 8 and 32 concurrent streams (512-token prompts, 256 new tokens for the engine; plain `generate`'s rate
is flat in length, so it decodes fewer): TTFT p50/p95, tok/s per stream and in total, decode-only tok/s, peak
VRAM, and the share of the memory limit (the copy bandwidth measured in this run over the bytes one decode
step must read: the text weights once plus every stream's KV). Then a 1280x720 image prompt's TTFT (generate;
engine idle; engine while 31 text streams decode), a 32-stream mix of 24 text and 8 image prompts, a
follow-up turn's TTFT with and without prefix reuse, and the engine's greedy tokens against `generate`'s.

    python bench/matrix.py --precision bf16 --write --out $OUT/matrix_bf16.json   # on the GPU, one precision per call
    python bench/matrix.py --preset tiny --device cpu --precision fp32 --write --prompt-tokens 64 \
        --new-tokens 16 --generate-new-tokens 8 --streams 1,4 --out /tmp/m.json          # smoke, CPU

eos is disabled (random weights stop anywhere) so every stream decodes the same length.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import (  # noqa: E402  (bench/ is not a package)
    GIB,
    _free,
    _greedy,
    _peak_gib,
    _reset_peak,
    arrivals_while_decoding,
    common_args,
    copy_bandwidth,
    engine_ttft,
    first_token_s,
    forget_prefixes,
    generate_ttft,
    greedy_check,
    image_path,
    make_image_prompt,
    make_prompts,
    run_engine,
    run_generate,
    start_engine,
)


def decode_bytes(loaded: Any) -> int:
    """Bytes one decode step must read once: the text model's weights and the output head (the vision tower
    and the embedding gather are not read per token; a tied head is counted once)."""
    model = loaded.model
    seen: set[int] = set()
    total = 0
    embed = model.model.language_model.embed_tokens.weight
    tensors = [*model.model.language_model.parameters(), *model.model.language_model.buffers(), *model.lm_head.parameters()]  # fmt: skip
    for t in tensors:
        if t is embed and t is not model.lm_head.weight:
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for module in model.model.language_model.modules():  # bnb nf4: absmax & co. live in the quant state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def kv_bytes_per_token(loaded: Any) -> int:
    text = loaded.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, 16-bit


def memory_limit_tok_s(loaded: Any, copy_gb_s: float | None, streams: int, mean_kv_tokens: float) -> float | None:
    """Tokens/s in total if a step took only the time to read its bytes at the measured copy bandwidth."""
    if not copy_gb_s:
        return None
    step_bytes = decode_bytes(loaded) + streams * mean_kv_tokens * kv_bytes_per_token(loaded)
    return streams * copy_gb_s * 1e9 / step_bytes


def follow_up(engine: Any, loaded: Any, path: str, new_tokens: int) -> dict[str, Any]:
    """Turn 2 of a chat about the image at `path`: its TTFT right after turn 1 (turn 1's KV retained), and with
    nothing retained (the same prompt prefilled whole, vision tower included). Medians of 3 each, after a warm-up
    of each, with retained prefixes dropped before every run (the engine is idle between runs)."""
    from qwen3vl_webui.conversation import Turn, UserMessage
    from qwen3vl_webui.engine.generation import ChatRequest, build_prompt

    first = ChatRequest(UserMessage("Describe this image in detail.", (path,)), sampling=_greedy(new_tokens))
    p1 = build_prompt(loaded, first)

    def turn1() -> str:
        forget_prefixes(engine)
        *_, (answer, _stats) = engine.submit(p1, _greedy(new_tokens), threading.Event())
        return answer

    answer = turn1()
    second = ChatRequest(
        UserMessage("And what colours dominate it?", ()),
        history=[Turn(UserMessage("Describe this image in detail.", (path,)), answer)],
        sampling=_greedy(4),
    )
    p2 = build_prompt(loaded, second)

    def turn2() -> tuple[float, dict[str, int]]:
        before = engine.snapshot()
        ttft = first_token_s(engine, p2)
        after = engine.snapshot()
        keys = ("prefix_hits", "prefix_tokens_reused", "prefill_tokens")
        return ttft, {k: getattr(after, k) - getattr(before, k) for k in keys if hasattr(after, k)}

    reuse, cold = [], []
    reused: dict[str, int] = {}
    for _ in range(4):
        turn1()  # greedy: the same answer, so the same turn-2 prompt
        ttft, reused = turn2()
        reuse.append(ttft)
        forget_prefixes(engine)
        cold.append(turn2()[0])
    return dict(
        turn1_tokens=p1.tokens, turn2_tokens=p2.tokens, turn2_ttft_s=round(statistics.median(reuse[1:]), 4),
        turn2_ttft_without_reuse_s=round(statistics.median(cold[1:]), 4), turn2_ttft_samples_s=[round(t, 4) for t in reuse],
        turn2_ttft_without_reuse_samples_s=[round(t, 4) for t in cold], **reused,
    )  # fmt: skip


def main() -> None:
    ap = common_args(__doc__, generate_new_tokens=64, slot_tokens=1280)  # 1,280: a 720p image (910) + 256 fit
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the engine's torch.compile")
    ap.add_argument("--cache-dir", default="/tmp/qwen3vl-inductor")
    ap.add_argument("--sections", default="generate,engine,image,mix,followup,greedy")
    ap.add_argument("--out", default="matrix.json")
    args = ap.parse_args()
    t0 = time.perf_counter()

    import torch

    from qwen3vl_webui.engine.loading import load_model

    if args.write and not (Path(args.checkpoint) / "config.json").exists():
        from qwen3vl_webui.testing.tiny_model import write_checkpoint

        dtype = "bfloat16" if args.preset == "4b" else None
        write_checkpoint(args.checkpoint, preset=args.preset, dtype=dtype, device=args.device)
        print(f"wrote the random {args.preset} checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
    sections = set(args.sections.split(","))
    device = args.device
    on_cuda = device.startswith("cuda")
    started = time.perf_counter()
    loaded = load_model(args.checkpoint, args.precision, device)
    loaded.model.generation_config.eos_token_id = None
    load_s = time.perf_counter() - started
    copy_gb_s = copy_bandwidth(device)
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__,
        transformers=__import__("transformers").__version__, precision=args.precision, load_s=round(load_s, 2),
        weights_gib=round(loaded.weights_bytes / GIB, 2), decode_bytes_gib=round(decode_bytes(loaded) / GIB, 3),
        copy_gb_s=copy_gb_s, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        generate_new_tokens=args.generate_new_tokens, errors={},
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    streams = [int(s) for s in args.streams.split(",")]
    vocab = len(loaded.processor.tokenizer) - 32
    prompts = make_prompts(max(streams), args.prompt_tokens, vocab)
    image = make_image_prompt(loaded, 64)
    report["image_prompt_tokens"] = image.tokens
    mean_kv = args.prompt_tokens + args.new_tokens / 2

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    def guarded(name: str, fn: Any) -> None:
        if name not in sections:
            return
        print(f"--- {name} at {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report["errors"][name] = traceback.format_exc(limit=4)[-2000:]
        save()

    def generate() -> None:
        run_generate(loaded, prompts[:1], 4)  # warm-up
        report["generate"] = []
        for n in streams:
            row = run_generate(loaded, prompts[:n], args.generate_new_tokens)
            row["memory_limit_tok_s"] = memory_limit_tok_s(loaded, copy_gb_s, n, args.prompt_tokens + args.generate_new_tokens / 2)  # fmt: skip
            report["generate"].append(row)
            print("generate", json.dumps(row), flush=True)
        report["generate_image_ttft_s"] = generate_ttft(loaded, image)

    guarded("generate", generate)

    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    kwargs = dict(
        max_batch=max(streams), token_budget=max(streams) * args.slot_tokens, buckets=tuple(streams),
        compile=compile_flag, compile_cache_dir=args.cache_dir,
    )  # fmt: skip
    _reset_peak(device)
    engine, report["engine_startup"] = start_engine(loaded, **kwargs)
    try:

        def engine_rows() -> None:
            warm = make_prompts(1, args.prompt_tokens, vocab, seed=7)
            run_engine(engine, warm, 8)  # warm-up: first prefill shapes
            run_engine(engine, warm, 8)  # and a retained-prefix hit's
            report["engine"] = []
            for n in streams:
                # Fresh prompts for each row: none shares a prefix with a retained one, so every prompt is prefilled.
                fresh = make_prompts(n, args.prompt_tokens, vocab, seed=100 + n)
                row = run_engine(engine, fresh, args.new_tokens)
                row["memory_limit_tok_s"] = memory_limit_tok_s(loaded, copy_gb_s, n, mean_kv)
                report["engine"].append(row)
                print("engine", json.dumps(row), flush=True)
                save()

        guarded("engine", engine_rows)

        def image_ttft() -> None:
            report["engine_image_ttft_idle_s"] = engine_ttft(engine, image)
            others = max(streams) - 1
            report["engine_image_while_decoding"] = arrivals_while_decoding(
                engine, prompts[:others], args.new_tokens, [image], [64]
            )
            print("image", report["engine_image_ttft_idle_s"], json.dumps(report["engine_image_while_decoding"]), flush=True)  # fmt: skip

        guarded("image", image_ttft)

        def mix() -> None:
            n = max(streams)
            images = max(1, n // 4)
            batch = [image] * images + prompts[: n - images]
            row = run_engine(engine, batch, args.new_tokens)
            row.update(images=images, texts=n - images)
            report["engine_mix"] = row
            print("mix", json.dumps(row), flush=True)

        guarded("mix", mix)

        def followup() -> None:
            # Eager prefill pays a one-time cost per new shape (hundreds of ms on a cold process, bench/reuse_probe.py):
            # a first chat about another image of the same size takes it, the second is measured.
            import numpy as np
            from PIL import Image

            noise = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
            Image.fromarray(noise).save("/tmp/bench_720p_other.png")
            report["followup_first_chat"] = follow_up(engine, loaded, "/tmp/bench_720p_other.png", 12)
            report["followup"] = follow_up(engine, loaded, str(image_path()), 12)
            print("follow-up", json.dumps(report["followup"]), flush=True)

        guarded("followup", followup)

        def greedy() -> None:
            report["greedy"] = [greedy_check(loaded, engine, p, args.check_tokens) for p in (prompts[0], image)]
            for r in report["greedy"]:
                print("greedy", json.dumps({k: v for k, v in r.items() if k != "engine_tokens"}), flush=True)

        guarded("greedy", greedy)
        report["engine_peak_gib"] = _peak_gib(device)
        report["engine_snapshot"] = {k: v for k, v in vars(engine.snapshot()).items() if isinstance(v, (int, float, str))}  # fmt: skip
    finally:
        engine.close()
        _free(engine)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    prec = report["precision"]
    base = {r["streams"]: r for r in report.get("generate", [])}
    print(f"\n{'path':18} {'N':>3} {'tok/s/stream':>12} {'total tok/s':>11} {'decode tok/s':>12} {'TTFT p50':>9} "
          f"{'TTFT p95':>9} {'peak GiB':>8} {'limit share':>11} {'vs generate':>11}")  # fmt: skip

    def line(label: str, r: dict[str, Any], b: dict[str, Any] | None) -> None:
        ratio = f"{r['total_tok_s'] / b['total_tok_s']:.1f}x" if b and b is not r else "-"
        rate = r.get("decode_tok_s", r["total_tok_s"])
        share = f"{rate / r['memory_limit_tok_s']:.0%}" if r.get("memory_limit_tok_s") else "-"
        dec = f"{r['decode_tok_s']:12.0f}" if "decode_tok_s" in r else f"{'-':>12}"
        print(f"{label:18} {r['streams']:3d} {r['per_stream_tok_s']:12.1f} {r['total_tok_s']:11.1f} {dec} "
              f"{r['ttft_p50_s']:9.3f} {r['ttft_p95_s']:9.3f} {r['peak_gib'] or 0:8.2f} {share:>11} {ratio:>11}")  # fmt: skip

    for r in report.get("generate", []):
        line(f"{prec} generate", r, r)
    for r in report.get("engine", []):
        line(f"{prec} engine", r, base.get(r["streams"]))
    if "engine_mix" in report:
        m = report["engine_mix"]
        line(f"{prec} mix {m['images']}img", m, None)
    s = report.get("engine_startup", {})
    print(f"engine start-up {s.get('startup_s')} s (per bucket {s.get('warmup_s')}), {s.get('decode_path')}")
    mix = report.get("engine_image_while_decoding", {})
    print(f"image ({report.get('image_prompt_tokens')} tokens) TTFT: generate {report.get('generate_image_ttft_s')} s, "
          f"engine idle {report.get('engine_image_ttft_idle_s')} s, while {mix.get('running')} decode {mix.get('ttft_s')} s "
          f"(their max gap {mix.get('max_gap_during_s')} s)")  # fmt: skip
    if "followup" in report:
        print("follow-up turn:", json.dumps(report["followup"]))
    for r in report.get("greedy", []):
        gap = f", parts at a gap of {r.get('gap_ref_vs_engine_token')} (top-2 gap {r.get('gap_top1_top2')})" if not r["identical"] else ""  # fmt: skip
        print(f"greedy: {r['equal_prefix']}/{r['tokens']} equal{gap}")
    if report.get("errors"):
        print("errors in:", list(report["errors"]))
    print(f"device: {report['device']}, {prec}, weights {report['weights_gib']} GiB (decode reads "
          f"{report['decode_bytes_gib']} GiB), copy {report['copy_gb_s']} GB/s, load {report['load_s']} s, "
          f"torch {report['torch']}, transformers {report['transformers']}, wall {report.get('wall_s')} s")  # fmt: skip


if __name__ == "__main__":
    main()
