"""Soak test: the --demo app under mixed concurrent text / image / video traffic, on loopback only.

    python -m bench.soak --seconds 600 --clients 6 --json bench/results/cpu/soak.json

Starts `python app.py --demo` as a child process on 127.0.0.1 (2 GPU slots, a short wait line so
some requests are refused as busy), then runs `--clients` threads of gradio_client conversations
(1-3 turns each; 50% text, 25% image, 15% video, 10% deliberately bad files) until the time or the
request count runs out. It reports accepted / refused (busy) / refused (bad input, as expected) /
failed, the server's RSS at the start (after one turn of each kind) and at the end, the temp files
and child processes the server left, and the exit code and time of a SIGTERM at the end.
It exits 1 if any accepted request failed or anything leaked.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import ROOT, WARNING, start_server, wait_until_serving

MB = 2**20
KINDS = {"text": 50, "image": 25, "video": 15, "bad": 10}
PROMPTS = ["Describe it.", "What colours do you see?", "Tell me a short story.", "Summarise that in a line.", "Why?"]


def _media(folder: Path) -> dict[str, list[Path]]:
    """Good and bad files to upload: generated images, the example video, a fake PNG, a cut MP4."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, size in enumerate([(320, 240), (1280, 720), (96, 96)]):
        path = folder / f"image{i}.png"
        Image.linear_gradient("L").resize(size).convert("RGB").rotate(30 * i).save(path)
        images.append(path)
    video = folder / "clip.mp4"
    shutil.copy(ROOT / "assets" / "example.mp4", video)
    fake = folder / "fake.png"
    fake.write_text("not an image\n" * 50)
    cut = folder / "cut.mp4"
    cut.write_bytes(video.read_bytes()[:3000])
    return {"image": images, "video": [video], "bad": [fake, cut]}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome == "failed" and len(self.failures) < 20:
                self.failures.append(detail[:300])


def _one_conversation(
    url: str, rng: random.Random, media: dict[str, list[Path]], tally: Tally, mix: dict[str, int]
) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        files = [handle_file(str(rng.choice(media[kind])))] if kind != "text" else []
        message = {"text": rng.choice(PROMPTS), "files": files}
        try:
            reply = client.predict(
                message, max_new_tokens=rng.choice([16, 32, 64]), temperature=rng.choice([0.0, 0.7]),
                api_name="/chat",
            )  # fmt: skip
        except Exception as exc:
            text = str(exc)
            tally.add("refused_busy" if "Queue is full" in text else "failed", f"{kind}: {type(exc).__name__}: {text}")
            return  # a refused or broken conversation ends here
        if not isinstance(reply, str) or not reply:
            tally.add("failed", f"{kind}: empty reply {reply!r}")
        elif kind == "bad":
            tally.add("refused_bad_input" if reply.startswith(WARNING) else "failed", f"bad file answered: {reply}")
        elif reply.startswith(WARNING):
            tally.add("refused_busy" if "busy" in reply else "failed", f"{kind}: {reply}")
        else:
            tally.add("accepted")


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def run_soak(
    seconds: float,
    clients: int = 6,
    max_requests: int = 20_000,
    queue_size: int = 3,
    cache_dir: str | None = None,
    workdir: str | None = None,
    seed: int = 0,
    mix: dict[str, int] | None = None,
) -> dict[str, Any]:
    import psutil

    work = Path(workdir or tempfile.mkdtemp(prefix="qwen3vl-soak-"))
    server_tmp, uploads = work / "server-tmp", work / "gradio"
    server_tmp.mkdir(parents=True, exist_ok=True)
    media = _media(work / "media")
    flags = [
        "--demo", "--cache-dir", str(cache_dir or work / "cache"), "--max-concurrency", "2",
        "--queue-size", str(queue_size), "--max-new-tokens", "256", "--request-timeout", "120", "--grace-seconds", "30",
    ]  # fmt: skip
    server, url, log_path = start_server(flags, work, server_tmp)
    proc = psutil.Process(server.pid)
    report: dict[str, Any] = {
        "seconds": seconds, "clients": clients, "queue_size": queue_size, "max_concurrency": 2, "mix": mix or KINDS,
    }  # fmt: skip
    try:
        wait_until_serving(url, server, log_path, 120)
        tally = Tally()
        warm = random.Random(seed)
        for kind in ("text", "image", "video"):  # one of each first: the baseline includes warm caches
            _one_conversation_of(url, kind, warm, media, tally)
        if tally.counts["accepted"] != 3:
            raise RuntimeError(f"warm-up requests failed: {tally.failures}")
        rss_start = proc.memory_info().rss
        samples: list[tuple[float, int]] = []
        tally = Tally()
        started = time.monotonic()
        stop_at = started + seconds
        issued = [0]
        issued_lock = threading.Lock()

        def client_loop(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < stop_at:
                with issued_lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                _one_conversation(url, rng, media, tally, mix or KINDS)
                time.sleep(rng.uniform(0.0, 0.3))

        def sample() -> None:
            while time.monotonic() < stop_at:
                samples.append((time.monotonic() - started, proc.memory_info().rss))
                time.sleep(5)

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
        sampler = threading.Thread(target=sample, daemon=True)
        for thread in [*threads, sampler]:
            thread.start()
        for thread in threads:
            thread.join(seconds + 300)
        elapsed = time.monotonic() - started
        time.sleep(3)  # idle: decoders exit, temp folders are removed
        rss_end = proc.memory_info().rss
        children = proc.children(recursive=True)
        leftover = _files_under(server_tmp)
        upload_files = _files_under(uploads)
        report.update(
            elapsed_s=round(elapsed, 1),
            conversations=issued[0],
            accepted=tally.counts["accepted"],
            refused_busy=tally.counts["refused_busy"],
            refused_bad_input=tally.counts["refused_bad_input"],
            failed=tally.counts["failed"],
            failures=tally.failures,
            rss_start_mb=round(rss_start / MB, 1),
            rss_end_mb=round(rss_end / MB, 1),
            rss_max_mb=round(max([rss_end, *(r for _, r in samples)]) / MB, 1),
            rss_samples_mb=[(round(t), round(r / MB, 1)) for t, r in samples],
            children_left=len(children),
            children_cmdlines=[" ".join(c.cmdline())[:120] for c in children],
            temp_files_left=len(leftover),
            temp_files=[str(p.relative_to(server_tmp)) for p in leftover[:10]],
            upload_cache_files=len(upload_files),
            upload_cache_mb=round(sum(p.stat().st_size for p in upload_files) / MB, 2),
            server_threads=proc.num_threads(),
        )
        term = time.monotonic()
        server.send_signal(signal.SIGTERM)
        report["exit_code"] = server.wait(timeout=90)
        report["sigterm_to_exit_s"] = round(time.monotonic() - term, 1)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    report["ok"] = (
        report.get("failed") == 0 and report.get("children_left") == 0 and report.get("temp_files_left") == 0
        and report.get("exit_code") == 0 and report.get("accepted", 0) > 0
    )  # fmt: skip
    return report


def _one_conversation_of(url: str, kind: str, rng: random.Random, media: dict[str, list[Path]], tally: Tally) -> None:
    from gradio_client import Client, handle_file

    files = [handle_file(str(media[kind][0]))] if kind != "text" else []
    reply = Client(url, verbose=False).predict({"text": "Hello.", "files": files}, max_new_tokens=16, api_name="/chat")
    tally.add(
        "accepted" if isinstance(reply, str) and reply and not reply.startswith(WARNING) else "failed", str(reply)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to send traffic (default 600)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent client threads (default 6)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="stop after this many conversations")
    parser.add_argument("--queue-size", type=int, default=3, help="the server's --queue-size (default 3)")
    parser.add_argument("--cache-dir", help="where the demo checkpoint is (or is written)")
    parser.add_argument("--mix", default=",".join(f"{k}:{v}" for k, v in KINDS.items()), help="kind:weight,...")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 24 * 3600:
        parser.error("--clients must be 1..64 and --seconds 1..86400")
    mix = {k: int(v) for k, v in (item.split(":") for item in args.mix.split(","))}
    if not set(mix) <= set(KINDS):
        parser.error(f"--mix kinds are {', '.join(KINDS)}")
    report = run_soak(args.seconds, args.clients, args.max_requests, args.queue_size, args.cache_dir, mix=mix)
    summary = {k: v for k, v in report.items() if k not in ("rss_samples_mb", "failures", "temp_files")}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if report["failures"]:
        print("failures:", *report["failures"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
