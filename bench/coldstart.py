"""Cold start of the whole app (issue 14): launch -> page up -> /ready -> first answer -> full compiled speed, and
tok/s at 1 and N streams while the decode step compiles in the background and after; then the precompile command
into a fresh cache dir and a launch with only those artifacts (launch -> first answer, at full speed already?).

    python -m bench.coldstart --out $OUT                       # GPU: random 4B weights, bf16, the engine process
    python -m bench.coldstart --out /tmp/cs --cpu              # CPU plumbing: the tiny model, seconds
    python -m bench.coldstart --out $OUT --keep-artifacts $OUT/artifacts   # and keep precompile's files ...
    python -m bench.coldstart --out $OUT --artifacts-from DIR  # ... to launch with them first on a fresh machine

Each launch is `python app.py` as a user would start it (`--random-weights 4b --engine batch`), with caches of its
own: an empty --cache-dir (the inductor cache and compile artifacts live there) and an empty TRITON_CACHE_DIR, so
nothing compiled earlier on the machine helps. Streams go through the OpenAI door (/v1/chat/completions, streamed,
`ignore_eos`), clients spread over processes of 8 chats. /ready is polled every 0.2 s in the background: its JSON
(state, decode path, compiled batch sizes) dates every stage; the app's own "start-up:" log lines are kept too.

Greedy tokens across a swap: after the while-compiling streams, the cold launch answers a few fixed prompts greedily
(temperature 0, no repetition penalty, `ignore_eos`, all at once) round after round until every batch size is
compiled, /ready's compiled count read just before and after each round; then the same prompts twice more at full
speed (the reference, and a repeat that shows the comparison itself is deterministic). A round whose count moved
decoded across a swap; its answers must equal the reference (report["cold"]["greedy_swap"]). Rounds that are
entirely eager may part from it at a bf16 near-tie (eager and compiled steps round differently), not because of a
swap. Only the text comes back through /v1: answers are compared as text. Where the compile ends within the
while-compiling streams (sessions 16-18: no round crossed a swap), `--greedy-first` runs the rounds right after the
first answer instead; the streams then come after full speed (the compiled figures, no while-compiling ones).

Before the first launch the packages on PYTHONPATH (a device call's carried wheels, installed with `--no-compile`)
are compiled to bytecode, as a pip install or a Docker build does (`--no-bytecode` skips it; sessions before 23 did
not, so their cold launches also compiled transformers' and gradio's modules).

Writes coldstart.json (the timelines, tok/s per phase, the targets of issue 14 checked), coldstart.log,
server_cold.log, precompile.log, server_artifacts.log into --out. The run ends itself within --deadline-s: the
second launch is skipped when too little time is left, and each scenario shortens first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, gpu_name

TARGETS = {"cold_first_answer_s": 25.0, "cold_full_speed_s": 183.0, "artifacts_first_answer_s": 15.0}
GPU_FLAGS = ["--random-weights", "4b", "--engine", "batch", "--max-concurrency", "32", "--max-context", "2048",
             "--max-new-tokens", "512", "--queue-size", "64"]  # fmt: skip
GREEDY_PROMPTS = ("Count from one to forty in words.", "Describe a lighthouse at night.",
                  "List ten fruits and the colour of each.", "Explain how a hash map finds a key.")  # fmt: skip
CPU_FLAGS = ["--demo", "--engine", "batch", "--device", "cpu", "--max-concurrency", "2", "--max-context", "1024",
             "--max-new-tokens", "64", "--warmup", "quick"]  # fmt: skip


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {text}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


class ReadyWatch:
    """Polls /health and /ready every 0.2 s from launch: when each answered, and every change of /ready's JSON."""

    def __init__(self, url: str, launched: float) -> None:
        self.url, self.launched = url, launched
        self.page_up_s: float | None = None
        self.ready_s: float | None = None
        self.full_speed_s: float | None = None
        self.changes: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        client = httpx.Client(base_url=self.url, timeout=2, trust_env=False)
        seen: tuple[Any, ...] = ()
        while not self._stop.wait(0.2):
            now = round(time.monotonic() - self.launched, 2)
            try:
                if self.page_up_s is None and client.get("/health").status_code == 200:
                    self.page_up_s = now
                reply = client.get("/ready")
            except httpx.HTTPError:
                continue
            try:
                body = reply.json()
            except ValueError:
                continue
            self.last = body
            if reply.status_code == 200 and self.ready_s is None:
                self.ready_s = now
            if body.get("ready") and body.get("full_speed") and self.full_speed_s is None:
                self.full_speed_s = now
            key = (body.get("state"), body.get("decode"), body.get("compile"), body.get("compiled_batch_sizes"))
            if key != seen:
                seen = key
                self.changes.append({"at_s": now, **{k: body.get(k) for k in (
                    "state", "decode", "compile", "compiled_batch_sizes", "batch_sizes", "full_speed")}})  # fmt: skip

    def wait(self, what: str, timeout: float, server: subprocess.Popen | None = None) -> float | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"the app exited with code {server.returncode} (see its log)")
            value = getattr(self, what)
            if value is not None:
                return value
            time.sleep(0.1)
        return getattr(self, what)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def launch(flags: list[str], cache: Path, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    """`python app.py FLAGS --cache-dir CACHE` on a free loopback port with its own empty Triton cache."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(cache / "gradio"), "TRITON_CACHE_DIR": str(cache / "triton")}  # fmt: skip
    for name in ("QWEN3VL_FAULTS", "QWEN3VL_AUTH", "QWEN3VL_ADMIN_AUTH", "TORCHINDUCTOR_CACHE_DIR", "QWEN3VL_CACHE_DIR"):
        env.pop(name, None)
    command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache), *flags]
    cache.mkdir(parents=True, exist_ok=True)
    launched = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}/", launched


class StartProfile:
    """py-spy on a launched app from its first moments to its first answer (`--py-spy`): every process of it (the
    front end, the engine process, their children), every busy thread, non-blocking, into `startup_<name>.txt`
    (collapsed stacks, `process PID:"cmd";thread (tid): name;frames... count`). `finish` stops it and summarizes:
    per process and thread, the samples, the modules whose import the thread was in (the outermost import of each
    sample) and our own functions on the stack."""

    def __init__(self, exe: str, pid: int, path: Path, rate: int = 100) -> None:
        self.path, self.rate = path, rate
        command = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--threads", "--rate",
                   str(rate), "--format", "raw", "--output", str(path)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            output, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        return {"file": self.path.name, "rate_hz": self.rate, "exit_code": self.proc.returncode,
                "output": (output or "")[-400:].strip(), "processes": summarize_start(lines, self.rate)}  # fmt: skip


_PROCESS = re.compile(r'^process (\d+):"([^"]*)"$')
_MODULE = re.compile(r"^<module> \((.+?)(?::\d+)?\)$")


def process_role(command: str) -> str:
    """Which of the app's processes a py-spy `process` frame's command line is."""
    if "qwen3vl_webui.engine.remote.worker" in command:
        return "engine"
    if "media_child" in command:
        return "media child"
    return "frontend" if "app.py" in command or "qwen3vl_webui" in command else "other"


def summarize_start(lines: list[str], rate: int, top: int = 15) -> dict[str, Any]:
    """Collapsed stacks from `py-spy record --subprocesses --threads` -> {role (pid): {thread: {samples, seconds,
    imports: [[module file, samples]...], ours: [[function, samples]...]}}}. A sample's import is the outermost
    `<module>` frame outside this project (the package a line of ours imported); `ours` is the innermost frame of
    ours (qwen3vl_webui/, app.py) in it."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [m for m in (_PROCESS.match(f) for f in frames) if m]
        if not processes:
            continue
        pid, command = processes[-1].groups()  # the innermost process: the one sampled
        frames = [f for f in frames if not _PROCESS.match(f)]
        thread = frames[0] if frames and frames[0].startswith("thread (") else "?"
        thread = re.sub(r"^thread \((\d+)\):? ?", "", thread) or "?"
        n = int(count)
        entry = out.setdefault(f"{process_role(command)} ({pid})", {}).setdefault(
            thread, {"samples": 0, "imports": {}, "ours": {}}
        )
        entry["samples"] += n
        calls = frames[1:] if frames and frames[0].startswith("thread (") else frames
        modules = [m.group(1) for m in map(_MODULE.match, calls) if m]
        if thread in ("MainThread", "?"):  # its outermost <module> is the script's (app.py, the -m engine worker)
            modules = modules[1:]
        module = next((m for m in modules if "qwen3vl_webui/" not in m), None)
        if module:
            entry["imports"][module] = entry["imports"].get(module, 0) + n
        own = [f for f in calls if _ours(f)]
        if own:
            name = re.sub(r":\d+\)$", ")", own[-1])
            entry["ours"][name] = entry["ours"].get(name, 0) + n
    for threads in out.values():
        for entry in threads.values():
            entry["seconds"] = round(entry["samples"] / rate, 2)
            for key in ("imports", "ours"):
                best = sorted(entry[key].items(), key=lambda kv: -kv[1])[:top]
                entry[key] = [[name, n, round(n / rate, 2)] for name, n in best]
    return out


def _ours(frame: str) -> bool:
    return "qwen3vl_webui/" in frame or "(app.py" in frame


def start_profile(args: argparse.Namespace, pid: int, path: Path) -> StartProfile | None:
    """With --py-spy: py-spy on the app just launched (None without the flag; an error if py-spy is missing)."""
    if not getattr(args, "py_spy", False):
        return None
    from bench.load_test import find_py_spy

    exe = find_py_spy()
    if exe is None:
        raise RuntimeError("--py-spy: py-spy is not installed (pip install py-spy, or carry its wheel)")
    return StartProfile(exe, pid, path)


def stop(server: subprocess.Popen, timeout: float = 30.0) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def first_answer(url: str, timeout: float) -> float:
    """One short chat through /v1 until it is answered; the monotonic time it came back."""
    import httpx

    client = httpx.Client(base_url=url, timeout=60, trust_env=False)
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        try:
            model = client.get("v1/models").json()["data"][0]["id"]
            reply = client.post("v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 8,
            })  # fmt: skip
            if reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]:
                return time.monotonic()
            last = f"HTTP {reply.status_code}: {reply.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(f"no answer within {timeout:.0f} s (last: {last})")


def streams(url: str, chats: int, seconds: float, args: argparse.Namespace, watch: ReadyWatch, server_pid: int,
            tokenizer: Any) -> dict[str, Any]:  # fmt: skip
    """`chats` streams for `seconds` through /v1; the phase (decode path, compiled sizes) at its start and end."""
    from bench.load_test import run_scenario

    before = dict(watch.last)
    result = run_scenario(
        url, chats, tokenizer, requests=chats * 1000, seconds=seconds, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, door="openai", temperature=0.7, server_pid=server_pid, poll_s=0.005,
        processes=max(1, chats // 8) if not args.cpu else 1, tokenizer_name=args.tokenizer,
    )  # fmt: skip
    after = dict(watch.last)
    keep = ("chats", "ok", "errors", "wall_s", "answer_tokens", "total_tok_s", "chat_tok_s", "ttft_s", "cpu_cores_busy")
    phase = [f"{s.get('decode')} {s.get('compiled_batch_sizes')}/{s.get('batch_sizes')}" for s in (before, after)]
    return {**{k: result.get(k) for k in keep}, "phase_start": phase[0], "phase_end": phase[1]}


def greedy_round(url: str, prompts: tuple[str, ...], max_tokens: int) -> dict[str, Any]:
    """`prompts` answered greedily at once through /v1; /ready's compiled batch sizes just before and just after."""
    import httpx

    def ready() -> Any:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            return client.get("ready").json().get("compiled_batch_sizes")

    answers: list[str | None] = [None] * len(prompts)
    errors: list[str] = []

    def ask(k: int, model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": prompts[k]}], "max_tokens": max_tokens,
                "temperature": 0.0, "repetition_penalty": 1.0, "ignore_eos": True}  # fmt: skip
        try:
            with httpx.Client(base_url=url, timeout=300, trust_env=False) as client:
                reply = client.post("v1/chat/completions", json=body)
            if reply.status_code == 200:
                answers[k] = reply.json()["choices"][0]["message"]["content"]
            else:
                errors.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        model = client.get("v1/models").json()["data"][0]["id"]
    before = ready()
    threads = [threading.Thread(target=ask, args=(k, model)) for k in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"compiled_before": before, "compiled_after": ready(), "answers": answers, "errors": errors[:3]}


def own_bucket(flags: list[str], streams: int) -> int:
    """Buckets swap in ascending order: the compiled count at which `streams` rows decode compiled (1-based)."""
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.engine.batch.options import BatchOptions

    try:
        buckets = BatchOptions(max_batch=parse_settings(flags).max_concurrency).slot_buckets
    except (SystemExit, ValueError):  # flags this code cannot read: no round is judged on its own bucket
        return 0
    return 1 + next((i for i, b in enumerate(buckets) if b >= streams), len(buckets) - 1)


def greedy_summary(rounds: list[dict[str, Any]], reference: dict[str, Any] | None,
                   repeat: dict[str, Any] | None, own: int = 0) -> dict[str, Any]:  # fmt: skip
    """Each round's answers against the reference round (the same prompts once every batch size is compiled).

    `own`: the compiled count at which the rounds' own bucket (all prompts decoding) is swapped in; a round across
    that swap switched decode paths mid-stream (/ready is polled, so a swap just before a round may count as in it)."""
    if reference is None or repeat is None:
        return {"skipped": "full compiled speed was not reached: no reference", "rounds": len(rounds)}
    expected = reference["answers"]

    def parted_at(answers: list[str | None]) -> list[int | None]:
        """Per prompt: None where equal to the reference, else the first character where it parts (-1: no answer)."""
        places: list[int | None] = []
        for got, want in zip(answers, expected):
            if got is None or want is None:
                places.append(-1)
            elif got == want:
                places.append(None)
            else:
                places.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want))))
        return places

    listed = []
    for r in rounds:
        before, after = r["compiled_before"], r["compiled_after"]
        kind = "across a swap" if before != after else "eager" if not before else "partly compiled"
        if before == after and reference["compiled_before"] == before:
            kind = "compiled"
        places = parted_at(r["answers"])
        listed.append({"kind": kind, "compiled": f"{before}->{after}", "equal": places.count(None),
                       "of": len(places), "parted_at": places, "errors": r["errors"],
                       "own_bucket_swapped": bool(own) and before < own <= after})  # fmt: skip
    across = [r for r in listed if r["kind"] == "across a swap"]
    own_rounds = [r for r in listed if r["own_bucket_swapped"]]
    eager = [r for r in listed if r["kind"] == "eager"]
    return {
        "prompts": len(expected),
        "reference_compiled": reference["compiled_before"],
        "reference_errors": reference["errors"],
        "reference_answers": [a[:120] if a else a for a in expected],
        "reference_repeat_equal": parted_at(repeat["answers"]).count(None) == len(expected),
        "across_swap_rounds": len(across),
        "across_swap_equal": all(r["equal"] == r["of"] for r in across) if across else None,
        "own_bucket": own,
        "across_own_swap_rounds": len(own_rounds),
        "across_own_swap_equal": all(r["equal"] == r["of"] for r in own_rounds) if own_rounds else None,
        "eager_rounds": len(eager),
        "eager_rounds_equal": all(r["equal"] == r["of"] for r in eager) if eager else None,
        "rounds": listed,
    }


def greedy_until_full_speed(name: str, url: str, args: argparse.Namespace, watch: ReadyWatch,
                            server: subprocess.Popen, deadline: float, log: Log) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy rounds until every batch size is compiled (or the time kept for what follows runs out)."""
    left = deadline - time.monotonic() - args.reserve_s
    log(f"{name}: greedy rounds for up to {left:.0f} s, until full compiled speed")
    end = time.monotonic() + max(0.0, left)
    rounds = []
    while watch.full_speed_s is None and time.monotonic() < end and server.poll() is None:
        rounds.append(greedy_round(url, args.greedy_prompts, args.greedy_tokens))
    watch.wait("full_speed_s", max(0.0, end - time.monotonic()), server)
    return rounds


def app_stages(log_path: Path) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    keep = ("start-up:", "compile artifacts", "kernel builds", "decode steps ready", "decode step compiled",
            "swapped in", "Ready:", "warm-up", "error")  # fmt: skip
    return [line[:300] for line in lines if any(k in line for k in keep)][:60]


def run_launch(name: str, flags: list[str], cache: Path, out: Path, args: argparse.Namespace, log: Log,
               deadline: float, measure_compiled: bool) -> dict[str, Any]:  # fmt: skip
    """One launch: its timeline, and streams at 1 and N while compiling and once at full speed (time allowing)."""
    from bench.load_test import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    log_path = out / f"server_{name}.log"
    server, url, launched = launch(flags, cache, log_path)
    try:
        profile = start_profile(args, server.pid, out / f"startup_{name}.txt")
    except BaseException:  # e.g. --py-spy without py-spy: the app just launched must not outlive the run
        stop(server)
        raise
    watch = ReadyWatch(url, launched)
    report: dict[str, Any] = {"flags": flags, "phases": {}}
    try:
        ready = watch.wait("ready_s", max(10.0, deadline - time.monotonic() - 30), server)
        if ready is None:
            raise RuntimeError(f"/ready never answered 200; see {log_path}")
        answered = first_answer(url, max(10.0, deadline - time.monotonic() - 30))
        report["first_answer_s"] = round(answered - launched, 2)
        if profile is not None:
            report["start_profile"], profile = profile.finish(), None
        report["full_speed_at_first_answer"] = bool(watch.last.get("full_speed"))
        log(f"{name}: page up {watch.page_up_s} s, ready {watch.ready_s} s, first answer {report['first_answer_s']} s "
            f"({watch.last.get('decode')}, {watch.last.get('compiled_batch_sizes')}/{watch.last.get('batch_sizes')})")
        phase = "at start" if watch.full_speed_s is not None else "while compiling"
        greedy: list[dict[str, Any]] = []
        if args.greedy_first and measure_compiled and phase == "while compiling":
            # Rounds from the first answer on, while the compile swaps buckets in: some decode across a swap.
            greedy = greedy_until_full_speed(name, url, args, watch, server, deadline, log)
            if watch.full_speed_s is not None:
                phase = "compiled"  # the streams below are then the compiled figures
        for chats in (1, args.chats):
            seconds = min(args.seconds, max(2.0, (deadline - time.monotonic() - 60) / 6))
            report["phases"].setdefault(phase, {})[str(chats)] = streams(url, chats, seconds, args, watch, server.pid,
                                                                          tokenizer)  # fmt: skip
            log(f"{name} {phase}: {chats} streams {report['phases'][phase][str(chats)]['total_tok_s']} tok/s")
        if measure_compiled and watch.full_speed_s is None:
            greedy += greedy_until_full_speed(name, url, args, watch, server, deadline, log)
        if measure_compiled and watch.full_speed_s is not None:
            reference = greedy_round(url, args.greedy_prompts, args.greedy_tokens)
            repeat = greedy_round(url, args.greedy_prompts, args.greedy_tokens)
            own = own_bucket(flags, len(args.greedy_prompts))
            report["greedy_swap"] = greedy_summary(greedy, reference, repeat, own)
        elif measure_compiled:
            report["greedy_swap"] = greedy_summary(greedy, None, None)
        if "greedy_swap" in report:
            summary = report["greedy_swap"]
            log(
                f"{name} greedy: {summary.get('across_swap_rounds')} round(s) across a swap, equal: "
                f"{summary.get('across_swap_equal')}; repeat at full speed equal: {summary.get('reference_repeat_equal')}"
            )
        if measure_compiled and watch.full_speed_s is not None and phase == "while compiling":
            for chats in (1, args.chats):
                seconds = min(args.seconds, max(2.0, (deadline - time.monotonic() - args.reserve_s) / 3))
                report["phases"].setdefault("compiled", {})[str(chats)] = streams(url, chats, seconds, args, watch,
                                                                                   server.pid, tokenizer)  # fmt: skip
                log(f"{name} compiled: {chats} streams {report['phases']['compiled'][str(chats)]['total_tok_s']} tok/s")
    finally:
        if profile is not None:
            report["start_profile"] = profile.finish()
        watch.stop()
        report.update(page_up_s=watch.page_up_s, ready_s=watch.ready_s, full_speed_s=watch.full_speed_s,
                      ready_changes=watch.changes, last_ready=watch.last)  # fmt: skip
        stop(server)
        report["app_stages"] = app_stages(log_path)
    return report


def first_answer_only(name: str, flags: list[str], cache: Path, out: Path, deadline: float) -> dict[str, Any]:
    log_path = out / f"server_{name}.log"
    server, url, launched = launch(flags, cache, log_path)
    watch = ReadyWatch(url, launched)
    report: dict[str, Any] = {"flags": flags}
    try:
        watch.wait("ready_s", max(10.0, deadline - time.monotonic() - 20), server)
        report["first_answer_s"] = round(first_answer(url, max(10.0, deadline - time.monotonic() - 20)) - launched, 2)
        report["full_speed_at_first_answer"] = bool(watch.last.get("full_speed"))
    finally:
        watch.stop()
        report.update(page_up_s=watch.page_up_s, ready_s=watch.ready_s, full_speed_s=watch.full_speed_s,
                      ready_changes=watch.changes)  # fmt: skip
        stop(server)
        report["app_stages"] = app_stages(log_path)
    return report


def precompile(flags: list[str], cache: Path, out: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache / "triton"), "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    started = time.monotonic()
    with open(out / "precompile.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "qwen3vl_webui.precompile", "--cache-dir", str(cache), *flags],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
    files = sorted(p.name for p in (cache / "compiled").glob("*.artifacts")) if (cache / "compiled").exists() else []
    size = sum(p.stat().st_size for p in (cache / "compiled").glob("*.artifacts")) if files else 0
    return {"seconds": round(time.monotonic() - started, 1), "exit_code": proc.returncode, "files": files,
            "bytes": size}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for coldstart.json and the logs")
    ap.add_argument("--precision", help="--precision of the app and of precompile (default bf16; --cpu: auto)")
    ap.add_argument("--cpu", action="store_true", help="plumbing on a CPU with the tiny model (seconds, not figures)")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="the whole run ends within this (default 540)")
    ap.add_argument("--chats", type=int, default=32, help="the many-streams figure (default 32; --cpu: 2)")
    ap.add_argument("--seconds", type=float, default=15.0, help="traffic per scenario at most (default 15)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--greedy-tokens", type=int, default=192, help="tokens per greedy answer (default 192; --cpu: 8)")
    ap.add_argument("--reserve-s", type=float, default=200.0,
                    help="time kept for the precompile + artifacts launch when waiting for full speed (default 200)")
    ap.add_argument("--cold-only", action="store_true", help="the cold launch alone (no precompile, no second launch)")
    ap.add_argument("--keep-artifacts", type=Path,
                    help="copy the files precompile wrote into this folder (e.g. $OUT/artifacts), to carry them to "
                         "another machine of the same kind")  # fmt: skip
    ap.add_argument("--artifacts-from", type=Path,
                    help="the first launch is the artifacts launch, with these files (written by precompile on an "
                         "earlier machine, --keep-artifacts) as its only cache: issue 14's protocol on a fresh "
                         "machine. No cold launch, no precompile")  # fmt: skip
    ap.add_argument("--greedy-first", action="store_true",
                    help="greedy rounds from the first answer until full speed, before the streams (which are then "
                         "the compiled figures): rounds that cross a swap, where the compile ends within the streams")  # fmt: skip
    ap.add_argument("--py-spy", action="store_true",
                    help="py-spy on each launch (every process, non-blocking) from launch to its first answer: "
                         "startup_<launch>.txt and a summary per process and thread in the report")  # fmt: skip
    ap.add_argument("--no-bytecode", action="store_true",
                    help="skip compiling PYTHONPATH's packages to bytecode before the first launch (see `bytecode`)")
    ap.add_argument("--commit", default="", help="the tree's commit, recorded in the report")
    ap.add_argument("app_flags", nargs="*", help="extra app flags after --")
    args = ap.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "coldstart.log")
    args.tokenizer = "tiny"  # --demo and --random-weights use the project's tokenizer
    args.precision = args.precision or ("auto" if args.cpu else "bf16")  # auto: fp32 on a CPU
    if args.cpu:
        args.chats, args.seconds, args.new_tokens, args.prompt_tokens = min(args.chats, 2), min(args.seconds, 2.0), 16, 32
        args.reserve_s = min(args.reserve_s, 20.0)
        args.greedy_tokens = min(args.greedy_tokens, 8)
    args.greedy_prompts = GREEDY_PROMPTS[:2] if args.cpu else GREEDY_PROMPTS
    flags = [*(CPU_FLAGS if args.cpu else GPU_FLAGS), "--precision", args.precision, *args.app_flags]
    work = Path(tempfile.mkdtemp(prefix="qwen3vl-coldstart-"))
    report: dict[str, Any] = {"gpu": gpu_name(), "commit": args.commit, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "precision": args.precision, "cpu_plumbing": args.cpu, "flags": flags,
                              "targets": TARGETS}  # fmt: skip

    def save() -> None:
        (out / "coldstart.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    try:
        if not args.no_bytecode:
            report["bytecode"] = bytecode(log)
        if args.artifacts_from is not None:
            carried = work / "carried"
            report["carried"] = carry(args.artifacts_from, carried / "compiled")
            log(f"launch with the carried artifacts only: {report['carried']}")
            report["artifacts"] = run_launch("artifacts", flags, carried, out, args, log, deadline,
                                             measure_compiled=False)  # fmt: skip
            return 0
        log(f"cold launch: {' '.join(flags)} (empty cache dir and Triton cache)")
        report["cold"] = run_launch("cold", flags, work / "cold", out, args, log, deadline, measure_compiled=True)
        save()
        left = deadline - time.monotonic()
        if args.cold_only:
            report["skipped"] = "precompile + artifacts launch: --cold-only"
        elif left < 90:
            report["skipped"] = f"precompile + artifacts launch: {left:.0f} s left"
            log(report["skipped"])
        else:
            log("precompile into a fresh cache dir")
            report["precompile"] = precompile(flags, work / "pre", out, max(30.0, left - 45))
            log(f"precompile: {report['precompile']}")
            save()
            # Only the artifact file travels: a third, empty cache dir gets the compiled/ folder and nothing else.
            carried = work / "carried"
            if (work / "pre" / "compiled").exists():
                shutil.copytree(work / "pre" / "compiled", carried / "compiled")
                if args.keep_artifacts is not None and any((work / "pre" / "compiled").glob("*.artifacts")):
                    report["kept"] = carry(work / "pre" / "compiled", args.keep_artifacts)
            # As on another machine: nothing the precompile left may be found (a carried Triton build whose paths
            # still pointed into its folder would otherwise be found there).
            shutil.rmtree(work / "pre", ignore_errors=True)
            log("launch with the precompiled artifacts only")
            report["artifacts"] = run_launch("artifacts", flags, carried, out, args, log, deadline,
                                             measure_compiled=False)  # fmt: skip
            save()
            # The same artifacts, compiled before serving (--compile before-serving): the first answer then waits for
            # dynamo's re-trace but comes at full speed. First answer only, if a minute is left, and only where the
            # precompile compiled (where the fused layers serve it writes our kernels' builds alone: a launch that
            # compiles before serving would compile cold).
            compiled_too = any(name.startswith("decode-") for name in report["precompile"]["files"])
            if compiled_too and deadline - time.monotonic() > 60:
                shutil.rmtree(carried / "inductor", ignore_errors=True)
                shutil.rmtree(carried / "triton", ignore_errors=True)
                log("launch with the precompiled artifacts, --compile before-serving")
                report["artifacts_before_serving"] = first_answer_only(
                    "artifacts_before_serving", [*flags, "--compile", "before-serving"], carried, out, deadline
                )
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        log(f"failed: {report['error']}")
    finally:
        report["checks"] = checks(report)
        report["seconds"] = round(time.monotonic() - started, 1)
        save()
        shutil.rmtree(work, ignore_errors=True)
        log(f"done in {report['seconds']} s: {report['checks']}")
    return 1 if "error" in report else 0


def carry(source: Path, dest: Path) -> list[str]:
    """The artifact files of `source` (precompile's compiled/ folder, or a folder they were carried in) copied into
    `dest`; their names. None there: an error, since a launch without them measures a cold start."""
    files = sorted(p for p in Path(source).glob("*.artifacts") if p.is_file())
    if not files:
        raise RuntimeError(f"no *.artifacts file in {source}")
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, dest / path.name)
    return [p.name for p in files]


def bytecode(log: Log, packages: tuple[str, ...] = ("torch",)) -> dict[str, Any]:
    """Compiles the packages on PYTHONPATH to bytecode, as `pip install` (and so a Docker build) does at install time,
    and the site-packages folder of each of `packages` that was installed without any (the device's torch: its venv
    holds no .pyc and the device sets PYTHONDONTWRITEBYTECODE, so every launch compiled torch's and numpy's modules
    from source: 5.3 s against 2.7 s for `import torch` on session 27's H100, measured; a user's pip install of
    requirements.txt compiles them once). A device call carries its wheels installed with `--no-compile` (faster to
    install), which left the first launch compiling every module it imported (transformers' and gradio's), a cost no
    user's launch pays. Outside every launch's timeline; its seconds are reported."""
    dirs = [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if d and Path(d).is_dir() and Path(d).resolve() != ROOT.resolve()]  # fmt: skip
    for name in packages:
        spec = importlib.util.find_spec(name)  # no import: the package's folder
        if spec is None or not spec.origin:
            continue
        package = Path(spec.origin).parent
        if not Path(importlib.util.cache_from_source(spec.origin)).exists() and str(package.parent) not in dirs:
            dirs.append(str(package.parent))  # no bytecode of its __init__ for this Python
    started = time.monotonic()
    for folder in dirs:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", folder], capture_output=True, check=False)
    result = {"dirs": dirs, "seconds": round(time.monotonic() - started, 1)}
    log(f"bytecode compiled as an install would: {result}")
    return result


def checks(report: dict[str, Any]) -> dict[str, Any]:
    cold, warm = report.get("cold") or {}, report.get("artifacts") or {}
    before = report.get("artifacts_before_serving") or {}
    found = {
        "cold_first_answer_s": cold.get("first_answer_s"),
        "cold_full_speed_s": cold.get("full_speed_s"),
        "artifacts_first_answer_s": warm.get("first_answer_s"),
    }
    met = {k: (v is not None and v <= TARGETS[k]) for k, v in found.items()}
    met["artifacts_full_speed_at_first_answer"] = bool(warm.get("full_speed_at_first_answer"))
    greedy = cold.get("greedy_swap") or {}
    found["greedy_rounds_across_swap"] = greedy.get("across_swap_rounds")
    found["greedy_rounds_across_own_swap"] = greedy.get("across_own_swap_rounds")
    met["greedy_equal_across_swap"] = greedy.get("across_swap_equal")  # None: no round decoded across a swap
    met["greedy_equal_across_own_swap"] = greedy.get("across_own_swap_equal")  # the rounds' own bucket swapped
    if before:
        found["before_serving_first_answer_s"] = before.get("first_answer_s")
        met["before_serving_both"] = bool(before.get("full_speed_at_first_answer")) and (
            before.get("first_answer_s") is not None and before["first_answer_s"] <= TARGETS["artifacts_first_answer_s"]
        )
    return {"measured": found, "met": met}


if __name__ == "__main__":
    raise SystemExit(main())
