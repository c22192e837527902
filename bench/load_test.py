"""Load test: N concurrent gradio_client chats against the running app on loopback; TTFT and tokens/s percentiles.

    python bench/load_test.py --chats 1,16,32 --seconds 60 --prompt-tokens 512 --new-tokens 256 \\
        --json bench/load_test.h100.json -- --random-weights 4b --precision bf16 --max-concurrency 32 \\
        --max-context 1024 --max-new-tokens 256 --warmup quick
    python bench/load_test.py --url http://127.0.0.1:7860/ --tokenizer Qwen/Qwen3-VL-4B-Instruct --chats 8

Without --url it starts `python app.py FLAGS` itself (the flags after `--`) on 127.0.0.1 and a free port, waits
for the first answer (model load, compile, warm-up) and stops it with SIGTERM at the end. For each value of
--chats it runs that many threads, each with its own `gradio_client.Client` (a Client keeps the chat history, so
each request starts a new conversation with `reset_session()` unless --turns says otherwise), sending requests
until --requests were issued or --seconds passed; requests in flight then finish. Each request is a text prompt
of --prompt-tokens tokens (distinct per request; plus --image if given) streamed with `client.submit`:
- TTFT: from `submit` to the first partial answer the client receives (queue, upload, prompt building, prefill
  and the SSE hop included);
- tokens: the answer's final text counted with the checkpoint's tokenizer (the app's API returns text only).
  With `--random-weights` the app only emits tokens that its tokenizer splits back the same way, so the count
  is exact there; for a real model it is the re-tokenized length of the answer;
- per-chat tokens/s: a request's tokens after its first output over the time from first to last output;
- total tokens/s: all answered tokens over the scenario's wall time (first submit to last answer).
Refusals: "Queue is full" from gradio and the app's "busy" answer; other ⚠️ answers and exceptions are errors.
gradio_client checks for new messages every 50 ms, which would quantise every timing to 50 ms; --client-poll-ms
(default 5) shortens that sleep inside gradio_client for this process only, and the script looks as often.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from soak import start_server, wait_until_serving  # noqa: E402  (bench/ is not a package)

WARNING = "⚠️ "
WAITING = "⏳ "
_WORDS = (
    "the quick brown fox jumps over a lazy dog while a red circle and a blue square sit on a white "
    "background and a green triangle moves from left to right in the video describe what you see count "
    "the objects read the text in the picture and tell me a short story about the colours numbers and shapes"
).split()


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds since the scenario started."""

    chat: int
    index: int
    status: str  # ok, refused_busy, refused (another ⚠️ answer), error
    submitted_s: float
    ttft_s: float | None = None
    duration_s: float | None = None  # submit to last output
    decode_s: float | None = None  # first to last output
    prompt_tokens: int = 0  # the text's, before the chat template (and any image)
    tokens: int = 0
    outputs: int = 0  # partial answers received
    detail: str = ""


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def load_tokenizer(name: str) -> Any:
    """'tiny': the project's generated tokenizer (--demo, --random-weights); else a Hugging Face id or directory."""
    if name == "tiny":
        from qwen3vl_webui.testing.tiny_model import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def tokenizer_for(app_flags: list[str]) -> str:
    """The tokenizer of the checkpoint the app flags select."""
    if "--demo" in app_flags or any(f.startswith("--random-weights") for f in app_flags):
        return "tiny"
    if "--model" in app_flags:
        return app_flags[app_flags.index("--model") + 1]
    from qwen3vl_webui.config import DEFAULT_MODEL

    return os.environ.get("QWEN3VL_MODEL", DEFAULT_MODEL)


def make_prompt(tokenizer: Any, tokens: int, seed: int) -> tuple[str, int]:
    """A text of about `tokens` tokens (distinct per seed) and its token count."""
    rng = random.Random(seed)
    words = [f"Request {seed}:"]
    ids: list[int] = []
    while len(ids) < tokens:
        words += rng.choices(_WORDS, k=max(8, tokens // 2))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    text = tokenizer.decode(ids[:tokens]).strip()
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


def shorten_client_polling(ms: float) -> None:
    """gradio_client sleeps 50 ms between looks at its message queue; cap that sleep at `ms` (this process only)."""
    import gradio_client.utils as client_utils

    class _Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            time.sleep(min(seconds, ms / 1000))

    client_utils.time = _Clock()  # type: ignore[assignment]


class _Tickets:
    """Hands out request numbers until `limit` were issued or `stop_at` passed."""

    def __init__(self, limit: int, stop_at: float) -> None:
        self.limit, self.stop_at, self.issued = limit, stop_at, 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self.issued >= self.limit or time.monotonic() >= self.stop_at:
                return None
            self.issued += 1
            return self.issued - 1


def _one_request(client: Any, message: dict[str, Any], options: dict[str, Any], tokenizer: Any, out: Outcome,
                 t0: float, timeout: float, poll_s: float) -> None:  # fmt: skip
    started = time.monotonic()
    out.submitted_s = started - t0
    first = last = None
    text = ""
    try:
        job = client.submit(message, api_name="/chat", **options)
        seen = 0
        # Not `for item in job`: a job refused at the queue (HTTP 503) never reports FINISHED, and that loop spins.
        while True:
            done = job.done()  # read before the outputs, so no output lands unseen after the last look
            outputs = job.outputs()
            for item in outputs[seen:]:
                if isinstance(item, str) and item and not item.startswith(WAITING):
                    now = time.monotonic()
                    first = first or now
                    last, text = now, item
                    out.outputs += 1
            seen = len(outputs)
            if done:
                break
            if time.monotonic() - started > timeout:
                job.cancel()
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            time.sleep(poll_s)
        final = job.result(timeout=0)  # raises what the job raised (e.g. "Queue is full")
        if isinstance(final, str) and final:
            text = final
    except Exception as exc:
        busy = "Queue is full" in str(exc)
        out.status, out.detail = ("refused_busy" if busy else "error"), f"{type(exc).__name__}: {exc}"[:300]
        return
    if not text:
        out.status, out.detail = "error", "empty answer"
    elif text.startswith(WARNING):
        out.status, out.detail = ("refused_busy" if "busy" in text else "refused"), text[:300]
    else:
        out.status = "ok"
        out.tokens = count_tokens(tokenizer, text)
        out.ttft_s = first - started if first else None
        out.duration_s = (last or time.monotonic()) - started
        out.decode_s = (last - first) if first and last else None


def run_scenario(
    url: str,
    chats: int,
    tokenizer: Any,
    *,
    requests: int,
    seconds: float,
    prompt_tokens: int,
    new_tokens: int,
    image: str | None = None,
    temperature: float = 0.7,
    turns: int = 1,
    request_timeout: float = 600.0,
    seed: int = 0,
    server_pid: int | None = None,
    poll_s: float = 0.005,
) -> dict[str, Any]:
    """`chats` threads of gradio_client chats against `url`, bounded by `requests` and `seconds`."""
    import psutil
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False) for _ in range(chats)]  # not timed: connecting is not a request
    prompts: dict[int, tuple[str, int]] = {}
    options = {"max_new_tokens": new_tokens, "temperature": temperature}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(chats + 1)
    t0 = [0.0]
    tickets = _Tickets(requests, float("inf"))

    def chat_loop(i: int) -> None:
        client, done_turns = clients[i], 0
        start.wait()
        while (k := tickets.take()) is not None:
            if done_turns == turns:
                client.reset_session()  # a new conversation: the server forgets this client's history
                done_turns = 0
            text, length = prompts[k] if k in prompts else make_prompt(tokenizer, prompt_tokens, seed * 100_003 + k)
            files = [handle_file(image)] if image else []
            out = Outcome(chat=i, index=k, status="error", submitted_s=0.0, prompt_tokens=length)
            message = {"text": text, "files": files}
            _one_request(client, message, options, tokenizer, out, t0[0], request_timeout, poll_s)
            done_turns += 1
            with lock:
                outcomes.append(out)

    for k in range(min(requests, chats)):  # the first wave's prompts are ready before the clock starts
        prompts[k] = make_prompt(tokenizer, prompt_tokens, seed * 100_003 + k)
    threads = [threading.Thread(target=chat_loop, args=(i,), daemon=True) for i in range(chats)]
    for thread in threads:
        thread.start()
    me = psutil.Process()
    server = psutil.Process(server_pid) if server_pid else None
    cpu0 = (me.cpu_times(), server.cpu_times() if server else None)
    t0[0] = time.monotonic()
    tickets.stop_at = t0[0] + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + request_timeout + 30)
    wall = time.monotonic() - t0[0]
    cpu = {"client": _cpu_share(cpu0[0], me.cpu_times(), wall)}
    if server is not None and cpu0[1] is not None:
        cpu["server"] = _cpu_share(cpu0[1], server.cpu_times(), wall)
    return summarize(outcomes, chats, wall, prompt_tokens, new_tokens, tickets.issued, cpu)


def _cpu_share(before: Any, after: Any, wall: float) -> float:
    """CPU seconds per wall second (1.0 = one core busy)."""
    return round((after.user + after.system - before.user - before.system) / max(wall, 1e-9), 2)


def summarize(
    outcomes: list[Outcome],
    chats: int,
    wall: float,
    prompt_tokens: int,
    new_tokens: int,
    issued: int | None = None,
    cpu: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The scenario's figures; `issued` (requests handed out) minus outcomes = requests that never finished."""
    ok = [o for o in outcomes if o.status == "ok"]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    rates = [(o.tokens - 1) / o.decode_s for o in ok if o.decode_s and o.tokens > 1]
    end_to_end = [o.tokens / o.duration_s for o in ok if o.duration_s]
    tokens = sum(o.tokens for o in ok)
    span = max((o.submitted_s + (o.duration_s or 0) for o in ok), default=wall)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "refused_busy", "refused", "error")}

    def pct(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
        return {f"p{q}": _round(percentile(values, q)) for q in qs}

    return {
        "chats": chats,
        "issued": len(outcomes) if issued is None else issued,
        **counts,
        "unfinished": 0 if issued is None else issued - len(outcomes),
        "wall_s": round(wall, 2),
        "prompt_tokens_target": prompt_tokens,
        "prompt_tokens_mean": _round(sum(o.prompt_tokens for o in outcomes) / len(outcomes) if outcomes else None),
        "new_tokens_asked": new_tokens,
        "answer_tokens": tokens,
        "answer_tokens_mean": _round(tokens / len(ok) if ok else None),
        "ttft_s": {
            **pct(ttft, (50, 95, 99)),
            "min": _round(min(ttft, default=None)),
            "max": _round(max(ttft, default=None)),
        },
        "chat_tok_s": pct(rates, (5, 50, 95)),
        "chat_end_to_end_tok_s": pct(end_to_end, (5, 50, 95)),
        "total_tok_s": _round(tokens / span if span > 0 else None),
        "cpu_cores_busy": cpu or {},
        "errors": sorted({o.detail for o in outcomes if o.status in ("error", "refused")})[:10],
        "requests": [asdict(o) for o in sorted(outcomes, key=lambda o: o.index)],
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def first_answer(url: str, timeout: float, server: subprocess.Popen | None, log_path: Path | None) -> float:
    """Sends a short chat until one is answered (model loaded, compiled, warmed up); returns the seconds it took."""
    from gradio_client import Client

    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode}; see {log_path}")
        try:
            reply = Client(url, verbose=False).predict(
                {"text": "Hello.", "files": []}, max_new_tokens=16, api_name="/chat"
            )
            if isinstance(reply, str) and reply and not reply.startswith(WARNING):
                return time.monotonic() - started
            last = str(reply)
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(2)
    raise RuntimeError(f"no answer within {timeout:.0f} s (last: {last[:200]}); see {log_path}")


def _server_lines(log_path: Path) -> list[str]:
    """The start-up lines worth keeping: what loaded, how long the decoder and warm-up took."""
    keep = re.compile(r"Ready:|warm-up|Benchmarking only|Starting the decoder|compil|batch engine|error", re.I)
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return [line[:300] for line in lines if keep.search(line)][:40]


def _gpu_name() -> str | None:
    """The GPU the app (on this machine) will see, if nvidia-smi answers."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except OSError:
        return None


def print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'chats':>5} {'ok':>5} {'busy':>4} {'err':>4} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
        f"{'chat tok/s p5':>13} {'p50':>6} {'p95':>6} {'total tok/s':>11} {'cpu srv/cli':>11}"
    )
    print(head)
    for s in report["scenarios"]:
        t, r, cpu = s["ttft_s"], s["chat_tok_s"], s["cpu_cores_busy"]
        print(
            f"{s['chats']:>5} {s['ok']:>5} {s['refused_busy']:>4} {s['error'] + s['refused']:>4} "
            f"{_f(t['p50'], 3):>9} {_f(t['p95'], 3):>7} {_f(t['p99'], 3):>7} {_f(r['p5'], 1):>13} {_f(r['p50'], 1):>6} "
            f"{_f(r['p95'], 1):>6} {_f(s['total_tok_s'], 0):>11} {cpu.get('server', '-')!s:>5}/{cpu.get('client', '-')!s:<5}"
        )


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def run(args: argparse.Namespace, app_flags: list[str]) -> dict[str, Any]:
    if args.client_poll_ms > 0:
        shorten_client_polling(args.client_poll_ms)
    poll_s = (args.client_poll_ms or 50) / 1000
    tokenizer_name = args.tokenizer if args.tokenizer != "auto" else tokenizer_for(app_flags)
    tokenizer = load_tokenizer(tokenizer_name)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qwen3vl-load-"))
    work.mkdir(parents=True, exist_ok=True)
    server = log_path = None
    launched = time.monotonic()
    report: dict[str, Any] = {
        "url": args.url, "app_flags": app_flags, "tokenizer": tokenizer_name, "token_count": "client: final answer "
        "text re-tokenized with the tokenizer above (the API returns text only)", "client_poll_ms": args.client_poll_ms,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "image": args.image,
        "temperature": args.temperature, "turns": args.turns, "seconds": args.seconds, "requests": args.requests,
        "gpu": _gpu_name(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    try:
        url = args.url
        if not url:
            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
            server, url, log_path = start_server(app_flags, work)
            wait_until_serving(url, server, log_path, args.startup_timeout)
        report["page_up_s"] = round(time.monotonic() - launched, 1)
        report["first_answer_s"] = round(first_answer(url, args.startup_timeout, server, log_path), 1)
        report["startup_s"] = round(time.monotonic() - launched, 1)
        print(f"app answering after {report['startup_s']} s", flush=True)
        for _ in range(args.warm_requests):  # first use of the prompt's shapes, not measured
            run_scenario(url, 1, tokenizer, requests=1, seconds=600, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens, image=args.image, temperature=args.temperature, seed=999, poll_s=poll_s)  # fmt: skip
        report["scenarios"] = []
        for n in args.chats:
            result = run_scenario(
                url, n, tokenizer, requests=args.requests, seconds=args.seconds, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, image=args.image, temperature=args.temperature, turns=args.turns,
                request_timeout=args.request_timeout, seed=n, server_pid=server.pid if server else None, poll_s=poll_s,
            )  # fmt: skip
            report["scenarios"].append(result)
            brief = {k: v for k, v in result.items() if k not in ("requests", "errors")}
            print(json.dumps(brief), flush=True)
            if args.json:  # after each scenario: a run cut short still leaves what it measured
                Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    finally:
        if server is not None:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    report["exit_code"] = server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    report["exit_code"] = server.wait()
            report["server_log"] = _server_lines(log_path) if log_path else []
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    app_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Flags after -- go to app.py.")
    parser.add_argument("--url", help="an app already running (default: start `python app.py FLAGS` on loopback)")
    parser.add_argument("--chats", default="4", help="concurrent chats; a comma list runs one scenario each (1,16,32)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario at most (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop issuing after this long (default 60)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens of each prompt's text (default 512)")
    parser.add_argument("--new-tokens", type=int, default=256, help="max new tokens per answer (default 256)")
    parser.add_argument("--image", help="also attach this image file to every request")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--turns", type=int, default=1, help="requests per conversation before a new one (default 1)")
    parser.add_argument("--tokenizer", default="auto", help="tiny, a HF id or a directory (auto: from the app flags)")
    parser.add_argument("--warm-requests", type=int, default=2, help="unmeasured requests before the first scenario")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the first answer")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="client-side limit per request")
    parser.add_argument("--client-poll-ms", type=float, default=5.0, help="gradio_client's queue poll (stock 50)")
    parser.add_argument("--workdir", help="server log and uploads (default: a temp dir)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(own)
    try:
        args.chats = [int(n) for n in str(args.chats).split(",")]
    except ValueError:
        parser.error(f"--chats must be integers separated by commas, got {args.chats!r}")
    if not all(1 <= n <= 256 for n in args.chats) or not 1 <= args.requests <= 1_000_000:
        parser.error("--chats must be 1..256 each and --requests 1..1000000")
    if not 0 < args.seconds <= 24 * 3600 or args.prompt_tokens < 1 or not 16 <= args.new_tokens <= 32768:
        parser.error("--seconds must be 1..86400, --prompt-tokens >= 1 and --new-tokens 16..32768 (the slider's floor)")
    if args.url and app_flags:
        parser.error("give either --url or app flags after --, not both")
    report = run(args, app_flags)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_table(report)
    failed = sum(s["error"] for s in report["scenarios"])
    return 1 if failed or not all(s["ok"] for s in report["scenarios"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
