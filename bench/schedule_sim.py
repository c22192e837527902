"""The batch engine's schedule under a closed loop, simulated: the real `Scheduler` on a clock of GPU costs (issue 12).

    python -m bench.schedule_sim --out bench/results/cpu/schedule_sim.json

Why: through the app, 32 chats on the H200 made 78% of the engine's 32-stream figure (bench/RESULTS.md, plan a),
and the app's waves took 2.01 s against the matrix's 1.58 s with the same engine. Device time is scarce; this asks,
on a CPU, which part of that the schedule explains, and what other policies would give, before a GPU run tries one.

What runs: `engine/batch/scheduler.py`'s `Scheduler` (the engine's own admission and prefill policy, no torch), fed
`Request`s, stepped as `EngineCore.step` steps it (admit, at most the planned prefill forward(s), then a decode step),
with time advanced by a cost model instead of a GPU. The costs are the H200's, from files in this repository:
decode step 2.95 ms at 1 row (`matrix_bf16_a.json`, 339 tok/s decode-only) to 4.33 ms at 32 (7,391 tok/s); prefill
`--us-per-token` 24.7 us a prompt token (the matrix's burst: 2 forwards of 16 x 512 tokens, TTFT p95 0.405 s); a
batched short-text forward is eager and takes at least `--eager-ms` 30 ms of host launches (docs/engine.md); a single
first chunk replays a CUDA graph (`--graph-ms` 1 ms of its own). Clients: N chats, closed loop, each answer 256 tokens
(ignore_eos), prompts of 512 tokens, the next send `--turnaround-ms` (58 ms median, sd 12: `load_test_a.json`) after
an answer ends.

Scenarios: `matrix` (one wave, all sent at once: checks the cost model against the matrix's 1.58 s and TTFT) and
`closed` (the load test's loop: compare with the app's 4,062 tok/s, TTFT p50 0.365 s, wave 2.01 s). Policies: `now`
(the engine's), and what-ifs that are not built: `budget2x` (twice the prefill tokens a forward may take while
streams decode), `two_forwards` (up to two prefill forwards between two decode steps while 4 or more prompts wait),
`graphs_only` (short prompts mid-answer one at a time, each from a graph, never an eager batch), `mixed` (an upper
bound of the chunked prefill mixed into the decode step: a step that carries a prefill costs the larger of the two).
A model, not a measurement: it says which lever is worth a device run, nothing more.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass
from typing import Any

POLICIES = ("now", "budget2x", "two_forwards", "graphs_only", "mixed")


@dataclass
class Costs:
    decode_1_ms: float = 2.95
    decode_32_ms: float = 4.33
    us_per_token: float = 24.7
    eager_ms: float = 30.0
    graph_ms: float = 1.0

    def decode(self, rows: int) -> float:
        return (self.decode_1_ms + (self.decode_32_ms - self.decode_1_ms) * (rows - 1) / 31) / 1000

    def prefill(self, tokens: int, batched: bool) -> float:
        gpu = tokens * self.us_per_token / 1e6
        return max(self.eager_ms / 1000, gpu) if batched else gpu + self.graph_ms / 1000


def simulate(policy: str, scenario: str, chats: int, seconds: float, costs: Costs, args: Any) -> dict[str, Any]:
    from qwen3vl_webui.engine.batch.requests import Request
    from qwen3vl_webui.engine.batch.scheduler import Scheduler
    from qwen3vl_webui.engine.request import SamplingParams

    rng = random.Random(args.seed)
    chunk = args.prefill_chunk * (2 if policy == "budget2x" else 1)
    sched = Scheduler(chats, chunk, idle_prefill_factor=4 * args.prefill_chunk // chunk, burst_forwards=2)
    if policy == "budget2x":  # the idle budget stays the engine's (4 chunks of 2,048)
        sched.prefill_chunk = chunk
    now, sampling = 0.0, SamplingParams(max_new_tokens=args.new_tokens)
    arrivals: list[tuple[float, int]] = [(0.0, c) for c in range(chats)]  # (time, chat)
    sent: dict[int, float] = {}
    chat_of: dict[int, int] = {}
    done: list[dict[str, float]] = []
    steps = rows_total = forwards = 0
    horizon = seconds if scenario == "closed" else float("inf")

    def send(at: float, chat: int) -> None:
        req = Request(None, sampling, length=args.prompt_tokens)
        req.submitted_at = at
        sent[req.id], chat_of[req.id] = at, chat
        sched.add(req)

    def finish(req: Any, at: float) -> None:
        done.append({"sent": sent[req.id], "ttft": req.first_at - sent[req.id], "end": at,
                     "per_token": (at - req.first_at) / (args.new_tokens - 1)})  # fmt: skip
        if scenario == "closed" and at < horizon:
            turnaround = max(0.03, rng.gauss(args.turnaround_ms, args.turnaround_sd_ms)) / 1000
            arrivals.append((at + turnaround, chat_of[req.id]))

    while True:
        arrivals.sort()
        while arrivals and arrivals[0][0] <= now:
            send(*arrivals.pop(0))
        if not sched.running and not sched.prefilling and not sched.waiting_load()[0]:
            if not arrivals:
                break
            now = arrivals[0][0]
            continue
        for req in sched.admit().admitted:  # type: ignore[union-attr]
            sched.start_prefill(req)
        waiting = len(sched.prefilling)
        forwards_now = 2 if policy == "two_forwards" and waiting >= 4 and sched.mid_answer() else 1
        prefill_s = 0.0
        for _ in range(forwards_now):
            plan = sched.next_prefill()
            if plan is None or not plan.jobs:
                break
            jobs = plan.jobs
            if policy == "graphs_only" and len(jobs) > 1 and sched.mid_answer():
                jobs = jobs[:1]  # the others stay queued for the next forward
            tokens = sum(j.length for j in jobs)
            prefill_s += costs.prefill(tokens, batched=len(jobs) > 1)
            forwards += 1
            for job in jobs:
                sched.prefill_done(job)
                sched.join(job.req)
                job.req.tokens.append(0)
                job.req.first_at = now + prefill_s
        if policy != "mixed":
            now += prefill_s
        if sched.decode_now():
            sched.launched()
            rows = len(sched.running)
            step_s = costs.decode(rows)
            now += max(step_s, prefill_s) if policy == "mixed" else step_s
            steps += 1
            rows_total += rows
            for slot in reversed(range(rows)):
                req = sched.running[slot]
                req.tokens.append(0)
                if len(req.tokens) >= args.new_tokens:
                    sched.release(slot)
                    finish(req, now)
        elif policy == "mixed":
            now += prefill_s
        if scenario == "matrix" and not sched.running and not sched.prefilling:
            break
        if scenario == "closed" and now > horizon + 30:
            break
    window = [d for d in done if d["sent"] >= args.warmup_s and d["end"] <= horizon] if scenario == "closed" else done
    if not window:
        return {"error": "nothing finished in the window"}
    start, end = min(d["sent"] for d in window), max(d["end"] for d in window)
    ttfts = sorted(d["ttft"] for d in window)
    return {
        "policy": policy, "scenario": scenario, "chats": chats, "answers": len(window),
        "total_tok_s": round(len(window) * args.new_tokens / (end - start), 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3),
        "rows_per_step": round(rows_total / steps, 2) if steps else 0, "decode_steps": steps,
        # after its first token, each answer's time per token (the app's 6.21 ms through the API, load_test_a.json)
        "ms_per_token_after_first": round(1000 * statistics.median(d["per_token"] for d in window), 2),
        "prefill_forwards": forwards, "wall_s": round(end - start, 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chats", default="32,64")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seconds", type=float, default=120.0, help="closed loop: simulated seconds")
    ap.add_argument("--warmup-s", type=float, default=10.0, help="closed loop: answers sent before this are left out")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--turnaround-ms", type=float, default=58.0)
    ap.add_argument("--turnaround-sd-ms", type=float, default=12.0)
    ap.add_argument("--decode-1-ms", type=float, default=Costs.decode_1_ms)
    ap.add_argument("--decode-32-ms", type=float, default=Costs.decode_32_ms)
    ap.add_argument("--us-per-token", type=float, default=Costs.us_per_token)
    ap.add_argument("--eager-ms", type=float, default=Costs.eager_ms)
    ap.add_argument("--graph-ms", type=float, default=Costs.graph_ms)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    costs = Costs(args.decode_1_ms, args.decode_32_ms, args.us_per_token, args.eager_ms, args.graph_ms)
    report: dict[str, Any] = {"command": " ".join(["python -m bench.schedule_sim", *(argv or sys.argv[1:])]),
                              "costs": costs.__dict__, "runs": []}  # fmt: skip
    for chats in [int(c) for c in args.chats.split(",")]:
        matrix = simulate("now", "matrix", chats, 0, costs, args)
        report["runs"].append(matrix)
        print(json.dumps(matrix), flush=True)
        base = None
        for policy in args.policies.split(","):
            row = simulate(policy, "closed", chats, args.seconds, costs, args)
            base = base or row
            row["vs_now"] = round(row["total_tok_s"] / base["total_tok_s"], 3)
            row["vs_matrix"] = round(row["total_tok_s"] / matrix["total_tok_s"], 3)
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from bench import common

        common.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
