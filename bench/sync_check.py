"""Where the batch engine's thread still waits for the GPU: torch's sync debug mode over a closed-loop-like run.

The engine enqueues each decode step before it handles the last one's tokens, and reads tokens back by event
(docs/engine.md v10); any other host sync (a pageable copy in, `tensor[i] = number`, `.item()`, torch.multinomial's
input check) makes the host wait for the step in flight and leaves the GPU idle while it then works. With
`torch.cuda.set_sync_debug_mode("warn")` torch warns at every such sync; this run counts them by the engine's own
innermost frame (file:line function), while streams join mid-answer, leave at different lengths and sample at the
API's defaults (temperature 0.7, repetition penalty 1.05, one seeded stream). Reading a step's tokens waits on a CUDA
event, which the debug mode does not flag: an empty table is the goal.

    python -m bench.sync_check --out $OUT/sync_check.json              # GPU, random 4B weights in memory
    python -m bench.sync_check --model random-weights:tiny --device cpu --out /tmp/s.json   # plumbing (no CUDA)
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from bench import common

ENGINE = str(Path(__file__).resolve().parents[1] / "qwen3vl_webui")


def parse_args(argv: list[str] | None = None) -> Any:
    ap = common.model_args(__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8, help="streams at once (half first, half joining mid-answer)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48, help="the longest answer; the others end earlier")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--compile", choices=("on", "off"), default="off", help="the decode step's compile (default off: "
                    "the host's syncs do not depend on it, and a cold compile takes minutes)")  # fmt: skip
    return ap.parse_args(argv)


def _engine_frame(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame inside qwen3vl_webui: which line of the engine asked for the sync."""
    for frame in reversed(stack):
        if frame.filename.startswith(ENGINE):
            return f"{Path(frame.filename).relative_to(Path(ENGINE).parent)}:{frame.lineno} {frame.name}"
    return "outside qwen3vl_webui"


def _run(engine: Any, prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    """Half the streams first; the other half once those decode; lengths staggered so they leave one by one."""
    from qwen3vl_webui.engine.request import SamplingParams

    def sampling(i: int) -> SamplingParams:
        tokens = max(2, new_tokens - 5 * i)
        seed = 11 if i == 1 else None
        return SamplingParams(max_new_tokens=tokens, temperature=0.7, top_p=0.8, repetition_penalty=1.05, seed=seed)

    got: list[int] = [0] * len(prompts)

    def read(i: int, stream: Any) -> None:
        for _ in stream:
            got[i] += 1

    half = max(1, len(prompts) // 2)
    threads = []
    for i, prompt in enumerate(prompts):
        if i == half:  # the rest join while the first half is mid-answer
            while min(got[:half]) < 3 and any(t.is_alive() for t in threads):
                time.sleep(0.001)
        stream = engine.submit_tokens(prompt, sampling(i), threading.Event())
        threads.append(threading.Thread(target=read, args=(i, stream)))
        threads[-1].start()
    for t in threads:
        t.join()
    return {"tokens": got, "asked": [sampling(i).max_new_tokens for i in range(len(prompts))]}


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    loaded = common.load(args.model, args.precision, args.device)
    vocab = common.ordinary_vocab(loaded)
    engine, info = common.start_engine(
        loaded, max_batch=args.max_batch, token_budget=args.max_batch * 2048, compile=args.compile == "on"
    )
    report: dict[str, Any] = {**common.environment(args.device), "engine": info, "cuda": False, "syncs": {}}
    try:
        _run(engine, common.make_prompts(args.streams, args.prompt_tokens, vocab, seed=1), 8)  # warm-up, unwatched
        found: collections.Counter[str] = collections.Counter()
        engine_thread = engine.worker_thread
        shown = warnings.showwarning

        def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if threading.current_thread() is engine_thread and "synchroniz" in str(message):
                found[_engine_frame(traceback.extract_stack()[:-1])] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        cuda = str(loaded.device).startswith("cuda")
        before = engine.snapshot()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run = _run(engine, common.make_prompts(args.streams, args.prompt_tokens, vocab, seed=2), args.new_tokens)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        after = engine.snapshot()
        report.update(cuda=cuda, run=run, steps=after.steps - before.steps, syncs=dict(found.most_common()),
                      sync_total=sum(found.values()))  # fmt: skip
    finally:
        engine.close()
    common.write_json(args.out, report)
    print(f"{report['steps']} decode steps; host syncs on the engine thread: {report['sync_total']}"
          + ("" if report["cuda"] else " (no CUDA: nothing to flag, plumbing only)"))  # fmt: skip
    for where, count in report["syncs"].items():
        print(f"{count:6d}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
