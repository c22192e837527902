"""Load test: N concurrent chats through the app's front doors, closed loop; TTFT and tokens/s percentiles.

    python -m bench.load_test --chats 1,32 --mixed 32 --seconds 60 --json $OUT/load_test.json -- --random-weights 4b \\
        --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 --max-context 2048 \\
        --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache
    python -m bench.load_test --url http://127.0.0.1:7860/ --tokenizer Qwen/Qwen3-VL-4B-Instruct --chats 8

Without --url it starts `python app.py FLAGS` itself (the flags after `--`) on 127.0.0.1 and a free port, waits for
the first answer (model load, compile, warm-up) and stops it with SIGTERM at the end. Loopback only: the app's
per-client cap (--max-requests-per-client) and event rate limit do not apply to a client on the app's own machine
(the operator's exemption), so N chats from one address are not capped; a capped request would fail the run.

For each value of --chats and each door in --doors it runs that many threads, each with its own connection (a
connection keeps the chat history, so each request starts a new conversation unless --turns says otherwise),
sending requests until --requests were issued or --seconds passed; requests in flight then finish. Each request is
a text of --prompt-tokens tokens (distinct per request). Then each value of --mixed runs a mixed scenario: that many
chats, of which --image-share (default a quarter) also send a 1280x720 JPEG with each request (distinct pictures
from a pool, so no request reuses another's image prefix).
- TTFT: from the send to the first partial answer the client receives (queue, upload, prompt building, prefill
  and the network hop included);
- tokens: what the door reports, else the final text re-tokenized with the checkpoint's tokenizer. With
  `--random-weights` the app only emits tokens that its tokenizer splits back the same way, so that is exact;
- per-chat tokens/s: a request's tokens after its first output over the time from first to last output;
- total tokens/s: all answered tokens over the scenario's wall time (first send to last answer);
- CPU cores busy: the app's process, its child processes, and this client, over the scenario.
In a mixed run the figures are also given per kind (`by_kind`: text, image).

Doors: `gradio` (gradio_client on `/chat`, the endpoint the browser UI drives). A door is a class with `name` and
`connect() -> Chat`; a Chat has `new_conversation()`, `stream(text, image, new_tokens, temperature, timeout)` that
yields the answer's text so far and raises `Refused` for an answer that is a refusal, and `usage` (the answer's
token count if the door reports one, else None). Register a new one in DOORS (an OpenAI-compatible
`/v1/chat/completions` door over httpx streaming is the next).
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.common import WARNING, gpu_name, percentile, start_server, wait_until_serving, write_image

WAITING = "⏳ "
_WORDS = (
    "the quick brown fox jumps over a lazy dog while a red circle and a blue square sit on a white "
    "background and a green triangle moves from left to right in the video describe what you see count "
    "the objects read the text in the picture and tell me a short story about the colours numbers and shapes"
).split()
STATUSES = ("ok", "refused_busy", "refused_per_client", "refused", "error")


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds since the scenario started."""

    chat: int
    index: int
    status: str  # one of STATUSES: ok; refused as busy; refused by the per-client cap; another refusal; error
    submitted_s: float
    kind: str = "text"  # text, or image (the text and a picture)
    ttft_s: float | None = None
    duration_s: float | None = None  # send to last output
    decode_s: float | None = None  # first to last output
    prompt_tokens: int = 0  # the text's, before the chat template (and any image)
    tokens: int = 0
    outputs: int = 0  # partial answers received
    detail: str = ""


class Refused(Exception):
    """The app answered with a refusal; `status` says which kind (see STATUSES)."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def refusal_status(text: str) -> str:
    """The kind of refusal an answer that starts with ⚠️ is."""
    if "You already have" in text:
        return "refused_per_client"
    return "refused_busy" if "busy" in text else "refused"


class Chat(Protocol):
    usage: int | None

    def new_conversation(self) -> None: ...

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]: ...  # fmt: skip


class Door(Protocol):
    name: str

    def connect(self) -> Chat: ...


class GradioChat:
    """One gradio_client connection: a Client keeps its session's chat history until `reset_session`."""

    def __init__(self, client: Any, poll_s: float) -> None:
        self.client, self.poll_s = client, poll_s
        self.usage: int | None = None  # the gradio API returns text only

    def new_conversation(self) -> None:
        self.client.reset_session()

    def stream(self, text: str, image: str | None, new_tokens: int, temperature: float, timeout: float) -> Iterator[str]:  # fmt: skip
        from gradio_client import handle_file

        message = {"text": text, "files": [handle_file(image)] if image else []}
        started = time.monotonic()
        job = self.client.submit(message, api_name="/chat", max_new_tokens=new_tokens, temperature=temperature)
        seen, last = 0, ""
        # Not `for item in job`: a job refused at the queue (HTTP 503) never reports FINISHED, and that loop spins.
        while True:
            done = job.done()  # read before the outputs, so no output lands unseen after the last look
            outputs = job.outputs()
            for item in outputs[seen:]:
                if isinstance(item, str) and item and not item.startswith((WAITING, WARNING)):
                    last = item
                    yield item
            seen = len(outputs)
            if done:
                break
            if time.monotonic() - started > timeout:
                job.cancel()
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            time.sleep(self.poll_s)
        try:
            final = job.result(timeout=0)  # raises what the job raised (e.g. "Queue is full")
        except Exception as exc:
            if "Queue is full" in str(exc):
                raise Refused("refused_busy", f"{type(exc).__name__}: {exc}") from exc
            raise
        if isinstance(final, str) and final.startswith(WARNING):
            raise Refused(refusal_status(final), final)
        if isinstance(final, str) and final and final != last:
            yield final


class GradioDoor:
    """gradio_client on the `/chat` endpoint (the one the browser UI drives)."""

    name = "gradio"

    def __init__(self, url: str, poll_s: float) -> None:
        self.url, self.poll_s = url, poll_s

    def connect(self) -> GradioChat:
        from gradio_client import Client

        return GradioChat(Client(self.url, verbose=False), self.poll_s)


DOORS = {"gradio": GradioDoor}


def load_tokenizer(name: str) -> Any:
    """'tiny': the project's generated tokenizer (--demo, --random-weights); else a Hugging Face id or directory."""
    if name == "tiny":
        from qwen3vl_webui.weights.tiny_model import build_tokenizer

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


def image_chats(chats: int, share: float) -> set[int]:
    """Which chats send an image: `share` of them (at least one if share > 0), spread evenly (0.25 of 32: 0, 4, ...)."""
    count = min(chats, max(1, round(chats * share))) if share > 0 else 0
    return {k * chats // count for k in range(count)}


def image_pool(folder: Path, count: int, picture: str | None = None) -> list[str]:
    """`count` distinct 1280x720 JPEGs (or the one `picture` given), made before any clock starts."""
    if picture:
        return [picture]
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write_image(folder / f"picture_{k}.jpg", seed=k)) for k in range(count)]


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


def one_request(chat: Chat, text: str, image: str | None, options: dict[str, Any], tokenizer: Any, out: Outcome,
                t0: float, timeout: float) -> None:  # fmt: skip
    """Sends one message through `chat` and fills `out` with what the client saw."""
    started = time.monotonic()
    out.submitted_s = started - t0
    first = last = None
    answer = ""
    try:
        for partial in chat.stream(text, image, options["max_new_tokens"], options["temperature"], timeout):
            answer = partial
            now = time.monotonic()
            first = first or now
            last = now
            out.outputs += 1
    except Refused as exc:
        out.status, out.detail = exc.status, str(exc)[:300]
        return
    except Exception as exc:
        out.status, out.detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        return
    if not answer:
        out.status, out.detail = "error", "empty answer"
        return
    out.status = "ok"
    out.tokens = chat.usage if chat.usage is not None else count_tokens(tokenizer, answer)
    out.ttft_s = first - started if first else None
    out.duration_s = (last or time.monotonic()) - started
    out.decode_s = (last - first) if first and last else None


class _CpuClock:
    """CPU seconds of this process, the app's process and its live child processes (an engine process, a decoder)."""

    def __init__(self, server_pid: int | None) -> None:
        import psutil

        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None
        self.start = self._read()

    def _read(self) -> dict[str, Any]:
        def spent(p: Any) -> float:
            t = p.cpu_times()
            return t.user + t.system

        read: dict[str, Any] = {"client": spent(self.me)}
        if self.server is not None:
            read["server"] = spent(self.server)
            read["children"] = {}
            for child in self.server.children(recursive=True):
                try:
                    read["children"][child.pid] = spent(child)
                except Exception:  # gone meanwhile
                    pass
        return read

    def shares(self, wall: float) -> dict[str, float]:
        """Cores busy over `wall` seconds (1.0 = one core)."""
        end, wall = self._read(), max(wall, 1e-9)
        out = {"client": round((end["client"] - self.start["client"]) / wall, 2)}
        if "server" in end:
            out["server"] = round((end["server"] - self.start["server"]) / wall, 2)
            before = self.start["children"]
            out["server_children"] = round(sum(t - before.get(pid, 0.0) for pid, t in end["children"].items()) / wall, 2)  # fmt: skip
        return out


def run_scenario(
    url: str,
    chats: int,
    tokenizer: Any,
    *,
    requests: int,
    seconds: float,
    prompt_tokens: int,
    new_tokens: int,
    door: str = "gradio",
    image_share: float = 0.0,
    images: list[str] | None = None,
    temperature: float = 0.7,
    turns: int = 1,
    request_timeout: float = 600.0,
    seed: int = 0,
    server_pid: int | None = None,
    poll_s: float = 0.005,
) -> dict[str, Any]:
    """`chats` threads of chats through `door` against `url`, bounded by `requests` and `seconds`."""
    entrance = DOORS[door](url, poll_s)
    connections = [entrance.connect() for _ in range(chats)]  # not timed: connecting is not a request
    with_image = image_chats(chats, image_share) if images else set()
    pictures = iter(range(1 << 30))
    prompts: dict[int, tuple[str, int]] = {}
    options = {"max_new_tokens": new_tokens, "temperature": temperature}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = threading.Barrier(chats + 1)
    t0 = [0.0]
    tickets = _Tickets(requests, float("inf"))

    def chat_loop(i: int) -> None:
        chat, done_turns = connections[i], 0
        start.wait()
        while (k := tickets.take()) is not None:
            if done_turns == turns:
                chat.new_conversation()  # the server forgets this connection's history
                done_turns = 0
            text, length = prompts[k] if k in prompts else make_prompt(tokenizer, prompt_tokens, seed * 100_003 + k)
            image = None
            if i in with_image and images:
                with lock:
                    image = images[next(pictures) % len(images)]
            out = Outcome(chat=i, index=k, status="error", submitted_s=0.0, kind="image" if image else "text",
                          prompt_tokens=length)  # fmt: skip
            one_request(chat, text, image, options, tokenizer, out, t0[0], request_timeout)
            done_turns += 1
            with lock:
                outcomes.append(out)

    for k in range(min(requests, chats)):  # the first wave's prompts are ready before the clock starts
        prompts[k] = make_prompt(tokenizer, prompt_tokens, seed * 100_003 + k)
    threads = [threading.Thread(target=chat_loop, args=(i,), daemon=True) for i in range(chats)]
    for thread in threads:
        thread.start()
    cpu = _CpuClock(server_pid)
    t0[0] = time.monotonic()
    tickets.stop_at = t0[0] + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + request_timeout + 30)
    wall = time.monotonic() - t0[0]
    result = summarize(outcomes, chats, wall, prompt_tokens, new_tokens, tickets.issued, cpu.shares(wall))
    result.update(door=door, image_chats=len(with_image))
    if with_image:
        result["by_kind"] = {
            kind: {k: v for k, v in summarize([o for o in outcomes if o.kind == kind], chats, wall, prompt_tokens,
                                              new_tokens).items() if k not in ("requests", "cpu_cores_busy")}
            for kind in ("text", "image")
        }  # fmt: skip
    return result


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
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}

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
        "errors": sorted({o.detail for o in outcomes if o.status not in ("ok", "refused_busy")})[:10],
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


def print_table(report: dict[str, Any]) -> None:
    print(f"{'door':>6} {'chats':>5} {'img':>3} {'ok':>5} {'busy':>4} {'err':>4} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
          f"{'chat tok/s p5':>13} {'p50':>6} {'p95':>6} {'total tok/s':>11} {'cpu srv+kids/cli':>16}")  # fmt: skip
    for s in report.get("scenarios", []):
        t, r, cpu = s["ttft_s"], s["chat_tok_s"], s["cpu_cores_busy"]
        bad = s["error"] + s["refused"] + s["refused_per_client"]
        cores = f"{cpu.get('server', '-')}+{cpu.get('server_children', '-')}/{cpu.get('client', '-')}"
        print(f"{s['door']:>6} {s['chats']:>5} {s['image_chats']:>3} {s['ok']:>5} {s['refused_busy']:>4} {bad:>4} "
              f"{_f(t['p50'], 3):>9} {_f(t['p95'], 3):>7} {_f(t['p99'], 3):>7} {_f(r['p5'], 1):>13} "
              f"{_f(r['p50'], 1):>6} {_f(r['p95'], 1):>6} {_f(s['total_tok_s'], 0):>11} {cores:>16}")  # fmt: skip
        for kind, k in s.get("by_kind", {}).items():
            print(f"{'':>6} {kind:>9} {k['ok']:>5} TTFT p50 {_f(k['ttft_s']['p50'], 3)} p95 {_f(k['ttft_s']['p95'], 3)}"
                  f" chat tok/s p50 {_f(k['chat_tok_s']['p50'], 1)}")  # fmt: skip


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
    images = image_pool(work / "pictures", args.image_pool, args.image) if args.mixed else None
    server = log_path = None
    launched = time.monotonic()
    report: dict[str, Any] = {
        "url": args.url, "app_flags": app_flags, "doors": args.doors, "tokenizer": tokenizer_name,
        "token_count": "the door's count if it reports one, else the final answer text re-tokenized with the tokenizer "
        "above", "client_poll_ms": args.client_poll_ms, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "mixed": args.mixed, "image_share": args.image_share, "image": args.image or (
            f"{args.image_pool} generated 1280x720 JPEGs" if images else None),
        "temperature": args.temperature, "turns": args.turns, "seconds": args.seconds, "requests": args.requests,
        "per_client_cap": "not applied: the app listens on 127.0.0.1 (operator exemption)" if not args.url else "as the app at --url says",  # fmt: skip
        "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
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
        shared = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, temperature=args.temperature,
                      poll_s=poll_s, images=images)  # fmt: skip
        for door in args.doors:  # first use of the prompt's shapes (and of an image), not measured
            for k in range(args.warm_requests):
                share = 1.0 if images and k == args.warm_requests - 1 else 0.0
                run_scenario(url, 1, tokenizer, requests=1, seconds=600, door=door, image_share=share, seed=999 + k,
                             **shared)  # fmt: skip
        report["scenarios"] = []
        scenarios = [(n, 0.0) for n in args.chats] + [(n, args.image_share) for n in args.mixed]
        for n, share in scenarios:
            for door in args.doors:
                result = run_scenario(
                    url, n, tokenizer, requests=args.requests, seconds=args.seconds, door=door, image_share=share,
                    turns=args.turns, request_timeout=args.request_timeout, seed=n + (1000 if share else 0),
                    server_pid=server.pid if server else None, **shared,
                )  # fmt: skip
                report["scenarios"].append(result)
                brief = {k: v for k, v in result.items() if k not in ("requests", "errors", "by_kind")}
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


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the load test's options, the app's flags: what follows `--`)."""
    argv = sys.argv[1:] if argv is None else argv
    app_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Flags after -- go to app.py.")
    parser.add_argument("--url", help="an app already running (default: start `python app.py FLAGS` on loopback)")
    parser.add_argument("--doors", default="gradio", help=f"front doors, comma-separated: {', '.join(DOORS)}")
    parser.add_argument("--chats", default="4", help="concurrent chats; a comma list runs one scenario each (1,16,32)")
    parser.add_argument("--mixed", default="", help="chats of mixed scenarios (text and image chats), comma list")
    parser.add_argument("--requests", type=int, default=1000, help="requests per scenario at most (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop issuing after this long (default 60)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens of each prompt's text (default 512)")
    parser.add_argument("--new-tokens", type=int, default=256, help="max new tokens per answer (default 256)")
    parser.add_argument("--image-share", type=float, default=0.25, help="in mixed scenarios: the share of chats that send an image")
    parser.add_argument("--image", help="the picture image chats send (default: generated 1280x720 JPEGs)")
    parser.add_argument("--image-pool", type=int, default=64, help="distinct generated pictures (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--turns", type=int, default=1, help="requests per conversation before a new one (default 1)")
    parser.add_argument("--tokenizer", default="auto", help="tiny, a HF id or a directory (auto: from the app flags)")
    parser.add_argument("--warm-requests", type=int, default=2, help="unmeasured requests per door before the first scenario")  # fmt: skip
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the first answer")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="client-side limit per request")
    parser.add_argument("--client-poll-ms", type=float, default=5.0, help="gradio_client's queue poll (stock 50)")
    parser.add_argument("--workdir", help="server log, uploads and pictures (default: a temp dir)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(own)
    try:
        args.chats = [int(n) for n in str(args.chats).split(",") if n.strip()]
        args.mixed = [int(n) for n in str(args.mixed).split(",") if n.strip()]
    except ValueError:
        parser.error(f"--chats and --mixed must be integers separated by commas, got {args.chats!r} {args.mixed!r}")
    args.doors = [d.strip() for d in args.doors.split(",") if d.strip()]
    if not args.doors or not set(args.doors) <= set(DOORS):
        parser.error(f"--doors must name doors among {', '.join(DOORS)}, got {','.join(args.doors)!r}")
    if not args.chats + args.mixed or not all(1 <= n <= 256 for n in args.chats + args.mixed):
        parser.error("--chats and --mixed must be 1..256 each, at least one scenario")
    if not 1 <= args.requests <= 1_000_000:
        parser.error("--requests must be 1..1000000")
    if not 0 < args.seconds <= 24 * 3600 or args.prompt_tokens < 1 or not 16 <= args.new_tokens <= 32768:
        parser.error("--seconds must be 1..86400, --prompt-tokens >= 1 and --new-tokens 16..32768 (the slider's floor)")
    if not 0 < args.image_share <= 1 or args.image_pool < 1:
        parser.error("--image-share must be in (0, 1] and --image-pool >= 1")
    if args.url and app_flags:
        parser.error("give either --url or app flags after --, not both")
    return args, app_flags


def main(argv: list[str] | None = None) -> int:
    args, app_flags = parse_args(argv)
    report = run(args, app_flags)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_table(report)
    scenarios = report.get("scenarios", [])
    failed = sum(s["error"] + s["refused_per_client"] + s["unfinished"] for s in scenarios)
    return 1 if failed or not scenarios or not all(s["ok"] for s in scenarios) else 0


if __name__ == "__main__":
    raise SystemExit(main())
