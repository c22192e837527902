"""What one streamed update costs gradio's server: the gradio door's ceiling in updates a second (issue 12).

    python -m bench.gradio_updates --out bench/results/cpu/gradio_updates.json
    python -m bench.gradio_updates --clients 8,32 --interval-ms 50,0 --seconds 10

A chat page like the app's (a multimodal `gr.ChatInterface` around a `gr.Chatbot`, gradio's queue) whose answer is a
stand-in generator: it grows a text by one word every `--interval-ms` (0: as fast as gradio takes them) up to
`--words` words, in a worker thread as the app's handler does. No model runs: the only work in this process is
gradio's (the queue, process_api, the Chatbot's postprocess, the diff of each update, the event stream). N clients in
another process (plain HTTP: gradio's `call/chat` route and its event stream, httpx on asyncio, so the clients cost
little) ask for answers back to back. Reported per (clients, interval): the updates the clients received a second, the
answers, and this process's CPU seconds per update (getrusage: the server alone). At 32 chats streaming every 50 ms
the app's page asks for 640 updates a second; this says what that costs a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench import common

MARK = "GRADIO_UPDATES_CLIENTS "


def build(words: int, interval_s: float) -> Any:
    import gradio as gr

    vocabulary = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "again")

    def answer(message: Any, history: Any) -> Any:
        text = ""
        for i in range(words):
            if interval_s:
                time.sleep(interval_s)
            text += vocabulary[i % len(vocabulary)] + " "
            yield text

    with gr.Blocks() as demo:
        gr.ChatInterface(fn=answer, multimodal=True, chatbot=gr.Chatbot(), api_name="chat", concurrency_limit=None)
    return demo


async def _client(url: str, until: float, counts: dict[str, int]) -> None:
    import httpx

    body = {"data": [{"text": "hello", "files": []}]}
    async with httpx.AsyncClient(timeout=60) as http:
        while time.monotonic() < until:
            event = (await http.post(f"{url}gradio_api/call/chat", json=body)).json()["event_id"]
            kind = None
            async with http.stream("GET", f"{url}gradio_api/call/chat/{event}") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        if kind == "generating":
                            counts["updates"] += 1
                        elif kind == "complete":
                            counts["answers"] += 1
                            break
                        elif kind == "error":
                            counts["errors"] += 1
                            break


def clients_main(url: str, clients: int, seconds: float) -> None:
    counts = {"updates": 0, "answers": 0, "errors": 0}

    async def run() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(url, until, counts) for _ in range(clients)))

    started = time.monotonic()
    asyncio.run(run())
    counts["wall_s"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    print(MARK + json.dumps(counts), flush=True)


def measure(url: str, clients: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.gradio_updates", "--clients-of", url, "--clients", str(clients),
            "--seconds", str(seconds)]  # fmt: skip
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    proc = subprocess.run(argv, cwd=common.ROOT, capture_output=True, text=True, timeout=seconds + 120)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"clients failed: {proc.stderr[-2000:]}")
    counts = json.loads(lines[-1][len(MARK) :])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    updates = counts["updates"]
    return {
        "clients": clients, "updates": updates, "answers": counts["answers"], "errors": counts["errors"],
        "updates_per_s": round(updates / counts["wall_s"], 1), "server_cpu_s": round(cpu, 2),
        "server_cores": round(cpu / wall, 2),
        "server_cpu_ms_per_update": round(1000 * cpu / updates, 3) if updates else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--interval-ms", default="50,0", help="the stand-in's time between two words (0: none)")
    ap.add_argument("--words", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out")
    ap.add_argument("--clients-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.clients_of:
        clients_main(args.clients_of, int(args.clients), args.seconds)
        return
    import gradio

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    report: dict[str, Any] = {
        "environment": {**common.environment("cpu"), "gradio": gradio.__version__}, "words": args.words,
        "seconds": args.seconds, "command": " ".join(sys.argv), "runs": [],
    }  # fmt: skip
    for interval_ms in [float(x) for x in args.interval_ms.split(",")]:
        demo = build(args.words, interval_ms / 1000)
        port = common.free_port()
        demo.queue(default_concurrency_limit=None).launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            measure(url, 1, 2.0)  # warm-up: imports, the first compile of the page's config
            for clients in [int(x) for x in args.clients.split(",")]:
                row = {"interval_ms": interval_ms, **measure(url, clients, args.seconds)}
                row["offered_updates_per_s"] = round(clients * 1000 / interval_ms, 1) if interval_ms else None
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
                common.write_json(args.out, report)
        finally:
            demo.close()
    common.write_json(args.out, report)


if __name__ == "__main__":
    main()
