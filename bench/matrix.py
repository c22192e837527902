"""Plain `generate` against the BatchEngine for ONE precision, in one process, doing the same work.

At each stream count (default 1, 8, 32; 512-token prompts): both paths decode the same `--new-tokens` (default 256,
greedy, eos off), both get the same warm-up at that stream count (`--warmup-tokens` with the same number of streams),
and every figure is the median of `--runs` measured runs (default 3) with fresh prompts per run, the same prompts
for both paths. `generate` is one batched `model.generate` (one row at one stream); the engine gets every stream
submitted at once, each read by its own thread. Reported: tok/s per stream and in total, decode-only tok/s, TTFT
p50/p95, peak VRAM, and the share of the memory limit (the copy bandwidth measured in this run over the bytes one
decode step must read: the text weights once plus every stream's KV).

Optional sections (`--sections`): `image` (a 1280x720 image prompt's TTFT: `generate`, engine idle, engine while the
other streams decode), `mix` (the largest stream count with a quarter of them image prompts), `followup` (a follow-up
turn's TTFT with and without the retained prefix), `greedy` (the engine's greedy tokens against `generate`'s in this
precision; bench/greedy.py is the fp32 equality check).

    python -m bench.matrix --precision bf16 --out $OUT/matrix_bf16.json                  # GPU, random 4B in memory
    python -m bench.matrix --sections generate,engine,image,mix,followup,greedy --out m.json   # everything
    python -m bench.matrix --model /tmp/q4b --write 4b --precision int4 --out m.json     # bitsandbytes: a checkpoint
    python -m bench.matrix --model random-weights:tiny --device cpu --precision fp32 --streams 1,2 \\
        --prompt-tokens 32 --new-tokens 8 --warmup-tokens 2 --runs 1 --out /tmp/m.json   # plumbing, CPU, seconds
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import traceback
from typing import Any

from bench import common


def decode_bytes(loaded: Any) -> int:
    """Bytes one decode step must read once: the text model's weights and the output head (the vision tower
    and the embedding gather are not read per token; a tied head is counted once)."""
    model = loaded.model
    lm = model.model.language_model
    embed = lm.embed_tokens.weight
    # int4 in kernels/w4_mma.py's layout decodes from its words and its table: its scales and zeros are not read
    seen = {t.data_ptr() for m in lm.modules() if getattr(m, "table", None) is not None for t in (m.scales, m.zeros)}
    total = 0
    for t in [*lm.parameters(), *lm.buffers(), *model.lm_head.parameters()]:
        if (t is embed and t is not model.lm_head.weight) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for module in lm.modules():  # bnb nf4: absmax & co. live in the quant state
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


def measured_rows(run: Any, args: Any, vocab: int, runs: int) -> list[dict[str, Any]]:
    """For each stream count: one warm-up run of `--warmup-tokens`, then `runs` measured runs; medians per count.

    Prompts are fresh per run (seed from the stream count and the run), so an engine never reuses a retained prefix,
    and they are the same for `generate` and the engine.
    """
    rows = []
    for n in args.streams:
        run(common.make_prompts(n, args.prompt_tokens, vocab, seed=10_000 + n), args.warmup_tokens)
        measured = []
        for r in range(runs):
            measured.append(run(common.make_prompts(n, args.prompt_tokens, vocab, seed=100 * n + r), args.new_tokens))
            print(f"  {n} streams, run {r + 1}: {measured[-1]['total_tok_s']:.1f} tok/s", flush=True)
        rows.append(common.median_row(measured))
    return rows


def follow_up(engine: Any, loaded: Any, path: str, new_tokens: int) -> dict[str, Any]:
    """Turn 2 of a chat about the image at `path`: its TTFT right after turn 1 (turn 1's KV retained), and with
    nothing retained (the same prompt prefilled whole, vision tower included). Medians of 3 each, after a warm-up
    of each, with retained prefixes dropped before every run (the engine is idle between runs)."""
    from qwen3vl_webui.conversation import Turn, UserMessage
    from qwen3vl_webui.service.prompt import ChatRequest, build_prompt

    question = UserMessage("Describe this image in detail.", (path,))
    p1 = build_prompt(loaded, ChatRequest(question, sampling=common.greedy(new_tokens)))

    def turn1() -> str:
        engine.forget_prefixes()
        *_, (answer, _stats) = engine.submit(p1, common.greedy(new_tokens), threading.Event())
        return answer

    second = ChatRequest(
        UserMessage("And what colours dominate it?", ()),
        history=[Turn(question, turn1())],
        sampling=common.greedy(4),
    )
    p2 = build_prompt(loaded, second)

    def turn2() -> tuple[float, dict[str, int]]:
        before = engine.snapshot()
        ttft = common.first_token_s(engine, p2)
        after = engine.snapshot()
        keys = ("prefix_hits", "prefix_tokens_reused", "prefill_tokens")
        return ttft, {k: getattr(after, k) - getattr(before, k) for k in keys if hasattr(after, k)}

    reuse, cold = [], []
    reused: dict[str, int] = {}
    for _ in range(1 + common.RUNS):
        turn1()  # greedy: the same answer, so the same turn-2 prompt
        ttft, reused = turn2()
        reuse.append(ttft)
        engine.forget_prefixes()
        cold.append(turn2()[0])
    return dict(
        turn1_tokens=p1.tokens, turn2_tokens=p2.tokens, turn2_ttft_s=round(statistics.median(reuse[1:]), 4),
        turn2_ttft_without_reuse_s=round(statistics.median(cold[1:]), 4),
        turn2_ttft_samples_s=[round(t, 4) for t in reuse], turn2_ttft_without_reuse_samples_s=[round(t, 4) for t in cold],
        **reused,
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Any:
    ap = common.model_args(__doc__)
    ap.add_argument("--streams", default="1,8,32", help="stream counts, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens each stream decodes, on both paths")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="the warm-up run's tokens at each stream count")
    ap.add_argument("--runs", type=int, default=common.RUNS, help="measured runs per stream count (median)")
    ap.add_argument("--generate-runs", type=int, help="measured runs of `generate` (default: --runs)")
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy section: tokens compared")
    ap.add_argument("--slot-tokens", type=int, default=1280, help="KV tokens per engine slot (a 720p image + 256 fit)")
    ap.add_argument("--max-batch", type=int, help="engine slots (default: the largest stream count)")
    ap.add_argument("--buckets", help="engine graph buckets, comma-separated (default: the engine's, as the app)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the engine's torch.compile")
    ap.add_argument("--cache-dir", default="/tmp/qwen3vl-cache/inductor", help="inductor cache (the app's is CACHE_DIR/inductor)")  # fmt: skip
    ap.add_argument("--sections", default="generate,engine", help="also: image, mix, followup, greedy")
    args = ap.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.sections = set(args.sections.split(","))
    unknown = args.sections - {"generate", "engine", "image", "mix", "followup", "greedy"}
    if unknown or min(args.streams) < 1 or args.runs < 1 or args.new_tokens < 2:
        ap.error(f"bad --sections {sorted(unknown)} / --streams / --runs / --new-tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    loaded = common.load(args.model, args.precision, args.device, args.write)
    device = args.device
    copy_gb_s = common.copy_bandwidth(device)
    report: dict[str, Any] = dict(
        **common.environment(device), model=args.model, precision=args.precision,
        load_s=round(loaded.load_seconds, 2), weights_gib=round(loaded.weights_bytes / common.GIB, 2),
        decode_bytes_gib=round(decode_bytes(loaded) / common.GIB, 3), copy_gb_s=copy_gb_s,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup_tokens=args.warmup_tokens,
        runs=args.runs, generate_runs=args.generate_runs or args.runs, streams=args.streams,
        sections=sorted(args.sections), errors={}, int4_mma_layers=common.int4_mma_layers(loaded),
        fp8_mma_layers=common.fp8_mma_layers(loaded),
    )  # fmt: skip
    print(json.dumps(report), flush=True)
    vocab = common.ordinary_vocab(loaded)
    biggest = max(args.streams)
    image = common.make_image_prompt(loaded, 64) if args.sections & {"image", "mix"} else None
    mean_kv = args.prompt_tokens + args.new_tokens / 2

    def section(name: str, fn: Any) -> None:
        if name not in args.sections:
            return
        print(f"--- {name} at {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            fn()
        except Exception:
            traceback.print_exc()
            report["errors"][name] = traceback.format_exc(limit=4)[-2000:]
        common.write_json(args.out, report)

    def generate() -> None:
        rows = measured_rows(lambda p, n: common.run_generate(loaded, p, n), args, vocab, args.generate_runs or args.runs)
        for row in rows:
            row["memory_limit_tok_s"] = memory_limit_tok_s(loaded, copy_gb_s, row["streams"], mean_kv)
        report["generate"] = rows
        if image is not None and "image" in args.sections:
            report["generate_image_ttft_s"] = common.generate_ttft(loaded, image)

    section("generate", generate)

    needs_engine = args.sections - {"generate"}
    if needs_engine:
        options: dict[str, Any] = dict(
            max_batch=args.max_batch or biggest, token_budget=(args.max_batch or biggest) * args.slot_tokens,
            compile={"auto": None, "on": True, "off": False}[args.compile], compile_cache_dir=args.cache_dir,
        )  # fmt: skip
        if args.buckets:
            options["buckets"] = tuple(int(b) for b in args.buckets.split(","))
        engine, report["engine_startup"] = common.start_engine(loaded, **options)
        try:
            run_engine(engine, loaded, args, report, section, vocab, image, copy_gb_s, mean_kv)
            report["engine_peak_gib"] = common.peak_gib(device)
            snapshot = vars(engine.snapshot())
            report["engine_snapshot"] = {k: v for k, v in snapshot.items() if isinstance(v, (int, float, str))}
        finally:
            engine.close()
            common.free(engine)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    common.write_json(args.out, report)
    print_table(report)
    return 1 if report["errors"] else 0


def run_engine(
    engine: Any, loaded: Any, args: Any, report: dict[str, Any], section: Any, vocab: int, image: Any,
    copy_gb_s: float | None, mean_kv: float,
) -> None:  # fmt: skip
    """The engine's sections, in order, on one engine."""
    biggest = max(args.streams)

    def rows() -> None:
        def run(prompts: list[Any], tokens: int) -> dict[str, Any]:
            engine.forget_prefixes()  # every run starts from the same (empty) pool
            return common.run_engine(engine, prompts, tokens)

        report["engine"] = measured_rows(run, args, vocab, args.runs)
        for row in report["engine"]:
            row["memory_limit_tok_s"] = memory_limit_tok_s(loaded, copy_gb_s, row["streams"], mean_kv)

    def image_ttft() -> None:
        report["engine_image_ttft_idle_s"] = common.engine_ttft(engine, image)
        others = common.make_prompts(biggest - 1, args.prompt_tokens, vocab, seed=7) if biggest > 1 else []
        if others:
            report["engine_image_while_decoding"] = common.arrivals_while_decoding(
                engine, others, args.new_tokens, [image], [64]
            )

    def mix() -> None:
        images = max(1, biggest // 4)
        texts = common.make_prompts(biggest - images, args.prompt_tokens, vocab, seed=8)
        engine.forget_prefixes()
        common.run_engine(engine, [image] * images + texts, args.warmup_tokens)
        engine.forget_prefixes()
        row = common.run_engine(engine, [image] * images + texts, args.new_tokens)
        row.update(images=images, texts=biggest - images)
        report["engine_mix"] = row

    def followup() -> None:
        # A first chat about another image of the same size pays the new shapes' one-time costs; the second is measured.
        other = common.write_image("/tmp/bench_720p_other.png", seed=1)
        report["followup_first_chat"] = follow_up(engine, loaded, str(other), 12)
        report["followup"] = follow_up(engine, loaded, str(common.image_path()), 12)

    def greedy() -> None:
        prompts = [common.make_prompts(1, args.prompt_tokens, vocab, seed=1)[0]]
        if image is not None:
            prompts.append(image)
        report["greedy"] = [common.greedy_check(loaded, engine, p, args.check_tokens) for p in prompts]

    section("engine", rows)
    if image is not None:
        section("image", image_ttft)
        section("mix", mix)
    section("followup", followup)
    section("greedy", greedy)


def print_table(report: dict[str, Any]) -> None:
    prec = report["precision"]
    base = {r["streams"]: r for r in report.get("generate", [])}
    print(f"\n{'path':18} {'N':>3} {'tok/s/stream':>12} {'total tok/s':>11} {'decode tok/s':>12} {'TTFT p50':>9} "
          f"{'TTFT p95':>9} {'peak GiB':>8} {'limit share':>11} {'vs generate':>11}")  # fmt: skip

    def line(label: str, r: dict[str, Any], b: dict[str, Any] | None) -> None:
        ratio = f"{r['total_tok_s'] / b['total_tok_s']:.2f}x" if b and b is not r else "-"
        rate = r.get("decode_tok_s", r["total_tok_s"])
        share = f"{rate / r['memory_limit_tok_s']:.0%}" if r.get("memory_limit_tok_s") else "-"
        dec = f"{r['decode_tok_s']:12.0f}" if "decode_tok_s" in r else f"{'-':>12}"
        print(f"{label:18} {int(r['streams']):3d} {r['per_stream_tok_s']:12.1f} {r['total_tok_s']:11.1f} {dec} "
              f"{r['ttft_p50_s']:9.3f} {r['ttft_p95_s']:9.3f} {r['peak_gib'] or 0:8.2f} {share:>11} {ratio:>11}")  # fmt: skip

    for r in report.get("generate", []):
        line(f"{prec} generate", r, r)
    for r in report.get("engine", []):
        line(f"{prec} engine", r, base.get(r["streams"]))
    if "engine_mix" in report:
        m = report["engine_mix"]
        line(f"{prec} mix {m['images']}img", m, None)
    s = report.get("engine_startup", {})
    if s:
        print(f"engine start-up {s.get('startup_s')} s (per bucket {s.get('warmup_s')}), {s.get('decode_path')}, "
              f"PDL mode {s.get('pdl_mode')} ({s.get('pdl', '-')})")
    if "engine_image_ttft_idle_s" in report:
        mix = report.get("engine_image_while_decoding", {})
        print(f"image TTFT: generate {report.get('generate_image_ttft_s')} s, engine idle "
              f"{report['engine_image_ttft_idle_s']} s, while {mix.get('running')} decode {mix.get('ttft_s')} s "
              f"(their max gap {mix.get('max_gap_during_s')} s)")  # fmt: skip
    if "followup" in report:
        print("follow-up turn:", json.dumps(report["followup"]))
    for r in report.get("greedy", []):
        print(f"greedy: {r['equal_prefix']}/{r['tokens']} equal to generate, {r['distinct_tokens']} distinct tokens, "
              f"teacher-forced ranks > 0: {sum(1 for k in r['ranks'] if k)}")  # fmt: skip
    if report.get("errors"):
        print("errors in:", list(report["errors"]))
    print(f"device: {report['device']}, {prec}, weights {report['weights_gib']} GiB (decode reads "
          f"{report['decode_bytes_gib']} GiB), copy {report['copy_gb_s']} GB/s, {report['runs']} runs per figure "
          f"({report['generate_runs']} for generate), commit {report['commit']}, wall {report.get('wall_s')} s")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
