"""bench.load_test against the real app (gradio queue, ChatService, engine), and --random-weights on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import _free_port

from bench import load_test


def _check_sane(s: dict[str, Any], issued: int, chats: int) -> None:
    assert s["chats"] == chats and s["issued"] == issued, s
    assert s["ok"] + s["refused_busy"] + s["refused_per_client"] + s["refused"] + s["error"] + s["unfinished"] == issued, s
    assert s["ok"] >= 1 and s["error"] == 0 and s["unfinished"] == 0 and s["refused_per_client"] == 0, s
    assert len(s["requests"]) == issued and {r["index"] for r in s["requests"]} == set(range(issued))
    ok = [r for r in s["requests"] if r["status"] == "ok"]
    assert s["answer_tokens"] == sum(r["tokens"] for r in ok) > 0
    t, rate = s["ttft_s"], s["chat_tok_s"]
    assert 0 < t["min"] <= t["p50"] <= t["p95"] <= t["p99"] <= t["max"], t
    assert 0 < rate["p5"] <= rate["p50"] <= rate["p95"], rate
    for r in ok:  # a first output comes after the submit and no later than the last one
        assert 0 < r["ttft_s"] <= r["duration_s"] and r["decode_s"] >= 0 and r["outputs"] >= 1, r
    assert 0 < s["total_tok_s"] and s["wall_s"] > 0
    assert s["prompt_tokens_mean"] == pytest.approx(s["prompt_tokens_target"], abs=2)


def _run(tmp_path: Path, checkpoint: Path, load_flags: list[str], app_flags: list[str]) -> dict[str, Any]:
    """`bench.load_test` against the --demo app it starts (the tiny checkpoint, one slot, one waiting place unless
    `app_flags` say otherwise), 6 requests per scenario of 48-token prompts; its report, after checking it exited 0."""
    out = tmp_path / "report.json"
    code = load_test.main([
        *load_flags, "--requests", "6", "--seconds", "120", "--prompt-tokens", "48", "--warm-requests", "1",
        "--workdir", str(tmp_path / "work"), "--json", str(out),
        "--", "--demo", "--cache-dir", str(checkpoint.parent), "--max-concurrency", "1", "--queue-size", "1", *app_flags,
    ])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0, report
    return report


def test_load_test_drives_the_demo_app_and_counts_answers_and_refusals(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # One slot and one waiting place: three chats at once must see some "Queue is full" refusals. gradio_client as
    # it comes and as the README advises for http:// (ssl_verify=False): the same counts.
    flags = ["--doors", "gradio,gradio-noverify", "--chats", "1,3", "--new-tokens", "32"]
    report = _run(tmp_path, tiny_checkpoint, flags, [])
    assert report["tokenizer"] == "tiny" and report["exit_code"] == 0, report
    assert report["startup_s"] >= report["first_answer_s"] > 0
    scenarios = report["scenarios"]
    assert [(s["door"], s["chats"]) for s in scenarios] == [
        ("gradio", 1), ("gradio-noverify", 1), ("gradio", 3), ("gradio-noverify", 3)
    ]  # fmt: skip
    for one in scenarios[:2]:
        _check_sane(one, 6, 1)
        assert one["ok"] == 6 and one["refused_busy"] == 0  # one chat alone never finds the queue full
    for three in scenarios[2:]:
        _check_sane(three, 6, 3)
        assert three["refused_busy"] >= 1, three
    assert any("Ready: demo model" in line for line in report["server_log"]), report["server_log"]


def test_load_test_drives_the_demo_app_through_the_openai_door_with_its_engine_process(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # The same counts through /v1/chat/completions: 429 is a busy refusal, usage gives the tokens, ignore_eos makes
    # every answer exactly as long as asked; three chats run in two client processes; the engine's own process is
    # found and its CPU counted apart from the front end's.
    report = _run(tmp_path, tiny_checkpoint, ["--doors", "openai", "--chats", "1,3", "--new-tokens", "32",
                                              "--chats-per-process", "2"], ["--engine", "batch"])  # fmt: skip
    assert report["exit_code"] == 0 and report["app_processes"]["engine"], report["app_processes"]
    one, three = report["scenarios"]
    assert one["door"] == three["door"] == "openai"
    assert one["client_processes"] == 1 and three["client_processes"] == 2
    _check_sane(one, 6, 1)
    assert one["ok"] == 6 and one["refused_busy"] == 0
    _check_sane(three, 6, 3)
    assert three["refused_busy"] >= 1, three
    assert all("HTTP 429" in r["detail"] for r in three["requests"] if r["status"] == "refused_busy"), three
    for s in (one, three):  # usage.completion_tokens, and no answer ended early
        assert s["short_answers"] == 0 and all(r["tokens"] == 32 for r in s["requests"] if r["status"] == "ok"), s
        cores = s["cpu_cores_busy"]
        assert cores["engine"] > 0 and cores["engine_pids"] == [report["app_processes"]["engine"]], cores
        assert cores["server_children"] >= cores["engine"] and cores["server"] > 0, cores
    assert "client_process_max" in three["cpu_cores_busy"]
    # The app's own figures over each scenario (GET /metrics before and after): the answers it finished, counted by
    # its finish reason, and its TTFT; the client's wait for the response's headers comes before its first text.
    server = one["server"]
    assert server["requests"]["length"] == one["ok"] == 6 and server["output_tokens_per_s"] > 0, server
    assert server["ttft_p50_s"] > 0 and server["engine"]["decode_steps"] > 0, server
    ok = [r for r in one["requests"] if r["status"] == "ok"]
    assert all(0 < r["stages"]["headers"] <= r["ttft_s"] for r in ok), ok
    # The stream's end after its last text ([DONE]): how long the client waits for it, beside the first text's wait.
    assert all(r["stages"]["last_text"] >= r["stages"]["headers"] and r["stages"]["end_gap"] >= 0 for r in ok), ok
    assert set(one["stages_s"]) == {"headers", "last_text", "end_gap"}


def test_stacks_summary_and_the_budget_arithmetic() -> None:
    lines = [
        "thread (1): MainThread;main (app.py:10);loop (a.py:5);step (b.py:7) 6",
        "thread (1): MainThread;main (app.py:10);loop (a.py:6);step (b.py:9) 2",
        "thread (2): engine-reader;read (c.py:3) 2",
        "garbage",
    ]
    s = load_test.summarize_stacks(lines)
    assert s["samples"] == 10 and s["threads"][0] == ["thread (1): MainThread", 8, 0.8]
    assert s["self"][0] == ["step (b.py)", 8, 0.8] and ["read (c.py)", 2, 0.2] in s["self"]
    assert ["main (app.py)", 8, 0.8] in s["total"] and load_test.summarize_stacks([]) == {"samples": 0}
    args, _ = load_test.parse_args(["--chats", "64", "--mixed", "32", "--profile", "32", "--doors", "gradio,openai",
                                    "--seconds", "30", "--min-seconds", "10", "--scenario-overhead-s", "10"])  # fmt: skip
    todo = load_test.scenarios_of(args)
    assert [s.label for s in todo] == ["gradio-64", "openai-64", "gradio-32-mixed", "openai-32-mixed",
                                       "gradio-32-profiled", "openai-32-profiled"]  # fmt: skip
    assert load_test.fit_seconds(args, 1000, todo) == (30, 6)  # room: full length
    seconds, fit = load_test.fit_seconds(args, 4 * 20 + 2 * 25 + 60, todo)  # 60 s to spare over the minimum
    assert fit == 6 and seconds == 20
    assert load_test.fit_seconds(args, 4 * 20 + 10, todo) == (12.5, 4)  # the last (profiled) ones dropped
    assert load_test.fit_seconds(args, 15, todo) == (0, 0)


def test_random_weights_app_answers_words_whose_tokens_the_load_test_counts_exactly(tmp_path: Path) -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.ui.panels import format_status
    from qwen3vl_webui.wiring import build_app

    port = _free_port()
    settings = parse_settings([
        "--random-weights", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-concurrency", "2",
        "--max-context", "1024", "--max-new-tokens", "64", "--warmup", "quick",
    ])  # fmt: skip
    app = build_app(settings)
    app.launch(prevent_thread_lock=True, quiet=True)
    try:
        loaded = app.service.manager.wait_ready(120)
        app.service.warmed.wait(120)
        status = format_status(app.service.snapshot())
        assert "Benchmarking only: random weights" in status and "random-weights:tiny" in status
        assert loaded.source == "random-weights:tiny" and not loaded.is_demo
        tokenizer = load_test.load_tokenizer("tiny")
        url = f"http://127.0.0.1:{port}/"
        report = load_test.run_scenario(url, 2, tokenizer, requests=4, seconds=120, prompt_tokens=40, new_tokens=24)
        # A mixed run: one of three chats sends a 1280x720 picture with each message. Three chats from one address
        # with 2 slots: the app's per-client cap (--max-requests-per-client, default 2) would refuse the third, but
        # the app listens on loopback only, where this machine's clients are exempt.
        assert settings.max_requests_per_client == 2 and settings.local_only
        pictures = load_test.image_pool(tmp_path / "pictures", 2)
        mixed = load_test.run_scenario(
            url, 3, tokenizer, requests=6, seconds=120, prompt_tokens=40, new_tokens=24, image_share=0.34, images=pictures
        )
    finally:
        app.close()
    _check_sane(report, 4, 2)
    # No end-of-turn token can be drawn and every answer token re-tokenizes to itself: exactly 24 each.
    assert report["ok"] == 4 and all(r["tokens"] == 24 for r in report["requests"]), report["requests"]
    assert report["door"] == "gradio" and report["image_chats"] == 0 and "by_kind" not in report
    assert mixed["image_chats"] == 1 and {r["kind"] for r in mixed["requests"]} == {"text", "image"}, mixed
    _check_sane(mixed, 6, 3)  # no request refused by the per-client cap
    assert mixed["ok"] == 6 and all(r["tokens"] == 24 for r in mixed["requests"]), mixed["requests"]
    for kind in ("text", "image"):  # the figures per kind, from that kind's requests alone
        assert mixed["by_kind"][kind]["ok"] == sum(r["kind"] == kind for r in mixed["requests"]) >= 1, mixed
        assert mixed["by_kind"][kind]["ttft_s"]["p50"] > 0


def test_random_weights_settings_refuse_quantized_precisions_and_demo() -> None:
    from qwen3vl_webui.config import Settings, SettingsError

    assert Settings(random_weights="4b", precision="bf16").random_weights == "4b"
    for quantized in ("int8wo", "int4", "fp8"):  # quantized in memory by our kernels
        assert Settings(random_weights="4b", precision=quantized).precision == quantized
    with pytest.raises(SettingsError, match="--random-weights 4b .* --precision int4-bnb"):
        Settings(random_weights="4b", precision="int4-bnb")
    with pytest.raises(SettingsError, match="--demo"):
        Settings(random_weights="tiny", demo=True)
    with pytest.raises(SettingsError, match="--random-weights must be one of off, 4b, tiny"):
        Settings(random_weights="7b")


def test_percentiles_interpolate_between_ranks() -> None:
    percentile = load_test.percentile
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(101)), 95) == 95


def test_the_raw_gradio_door_gets_what_gradio_client_gets(demo_app_server: tuple[Any, str]) -> None:
    # gradio's queue protocol spoken with plain httpx (what the page does) against gradio_client on the same /chat
    # event: the same greedy answers, with a picture, and on a second turn of the same session (its history counts).
    _, url = demo_app_server
    raw_door = load_test.GradioRawDoor(url, 0.0)
    raw, client = raw_door.connect(), load_test.GradioDoor(url, 0.005).connect()
    template = raw_door.template
    assert template is not None
    assert template["join"].endswith("/queue/join") and template["data"].endswith("/queue/data")
    assert len({template["message_at"], template["tokens_at"], template["temperature_at"]}) == 3
    picture = str(Path(__file__).resolve().parents[1] / "assets" / "example.png")
    connections: set[int] = set()  # the raw chat's keep-alive connections (httpcore's pool), seen after each request

    def seen() -> None:
        connections.update(id(c) for c in raw.http._transport._pool.connections)

    try:
        for text, image in (("Name the colours you see.", None), ("What is in the picture?", picture)):
            got = [list(chat.stream(text, image, 12, 0.0, 120)) for chat in (raw, client)]
            seen()
            assert got[0] and got[1] and got[0][-1] == got[1][-1], got
            assert all(not g.startswith((load_test.WAITING, load_test.WARNING)) for g in got[0]), got[0]
            # partial answers grow: each diff applied to the one before
            assert all(later.startswith(earlier) for earlier, later in zip(got[0], got[0][1:])), got[0]
            second = [list(chat.stream("And then?", None, 12, 0.0, 120))[-1] for chat in (raw, client)]
            assert second[0] == second[1], second
            seen()
            raw.new_conversation()
            client.new_conversation()
        # Each event stream was read to its end, so one connection carried every join, upload and stream.
        assert len(connections) == 1, connections
    finally:
        raw.close()
        client.client.close()


def test_gradio_text_diffs_apply_as_gradio_client_applies_them() -> None:
    from gradio_client.utils import apply_diff

    steps = [
        None,
        "⏳ waiting",
        [["replace", [], "Hel"]],
        [["append", [], "lo"]],
        [["append", [], ""], ["append", [], "!"]],
    ]
    mine = theirs = None
    for step in steps:
        mine = load_test.apply_text_diff(mine, step)
        theirs = step if not isinstance(step, list) else apply_diff(theirs, step)
        assert mine == theirs
    assert mine == "Hello!"
    with pytest.raises(ValueError, match="inside a text"):
        load_test.apply_text_diff("a", [["replace", [0], "b"]])
    with pytest.raises(ValueError, match="unknown diff action"):
        load_test.apply_text_diff("a", [["delete", [], None]])


def test_load_test_through_the_raw_gradio_door_counts_refusals_and_pictures(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # One slot and one waiting place: three chats see busy refusals ("Queue is full" at /queue/join, or the app's);
    # a mixed scenario uploads its pictures through /upload as the page does.
    flags = ["--doors", "gradio-raw", "--chats", "1,3", "--mixed", "2", "--image-share", "0.5", "--image-pool", "2"]
    report = _run(tmp_path, tiny_checkpoint, [*flags, "--new-tokens", "16"], [])
    one, three, mixed = report["scenarios"]
    assert one["door"] == three["door"] == mixed["door"] == "gradio-raw"
    _check_sane(one, 6, 1)
    assert one["ok"] == 6 and one["refused_busy"] == 0
    # The protocol's milestones before the first text: the join answered, a worker took the event, its first update.
    ok = [r for r in one["requests"] if r["status"] == "ok"]
    assert all(0 < r["stages"]["joined"] <= r["stages"]["stream_open"] <= r["stages"]["first_message"]
               <= r["stages"]["started"] <= r["stages"]["first_update"] <= r["ttft_s"] for r in ok), ok  # fmt: skip
    assert all(r["stages"]["last_update"] >= r["stages"]["first_update"] and r["stages"]["end_gap"] >= 0 for r in ok)
    assert set(one["stages_s"]) == {"joined", "stream_open", "first_message", "started", "first_update", "last_update",
                                    "end_gap"}  # fmt: skip
    assert one["server"]["requests"]["stop"] + one["server"]["requests"]["length"] == 6, one["server"]
    _check_sane(three, 6, 3)
    assert three["refused_busy"] >= 1, three
    busy = [r["detail"] for r in three["requests"] if r["status"] == "refused_busy"]
    # gradio's own queue (HTTP 503 at the join) or the app's admission (a ⚠️ answer) said no
    assert all(d.startswith("HTTP 503") and "Queue is full" in d or "busy" in d for d in busy), busy
    _check_sane(mixed, 6, 2)
    pictures = [r for r in mixed["requests"] if r["kind"] == "image"]
    assert pictures and any(r["status"] == "ok" for r in pictures), mixed["requests"]
    assert mixed["image_requests"] == len(pictures), mixed


def test_client_gaps_are_per_chat_from_an_answer_end_to_the_next_send() -> None:
    from bench.load_test import Outcome, client_gaps

    outcomes = [
        Outcome(chat=0, index=0, status="ok", submitted_s=0.0, duration_s=1.0),
        Outcome(chat=1, index=1, status="ok", submitted_s=0.1, duration_s=2.0),
        Outcome(chat=0, index=2, status="ok", submitted_s=1.02, duration_s=1.0),
        Outcome(chat=1, index=3, status="error", submitted_s=2.2),  # an error's end is unknown: no gap after it
        Outcome(chat=1, index=4, status="ok", submitted_s=2.5, duration_s=1.0),
    ]
    assert sorted(round(g, 3) for g in client_gaps(outcomes)) == [0.02, 0.1]


def test_client_processes_tokenize_as_the_checkpoints_tokenizer_without_torch(tmp_path: Path) -> None:
    """A client process gets the tokenizer's serialized backend: the same prompts and token counts as the
    checkpoint's tokenizer, and neither transformers nor torch imported (each of 32 client processes paid 3-4 s of
    imports for them on an H100 host)."""
    import subprocess
    import sys

    from bench.common import ROOT

    tokenizer = load_test.load_tokenizer("tiny")
    kind, serialized = load_test.client_tokenizer(tokenizer, "tiny")
    assert kind == "backend"
    backend = load_test.BackendTokenizer(serialized)
    for seed in range(20):
        assert load_test.make_prompt(backend, 128, seed) == load_test.make_prompt(tokenizer, 128, seed)
    answer = load_test.make_prompt(tokenizer, 300, 99)[0]
    assert load_test.count_tokens(backend, answer) == load_test.count_tokens(tokenizer, answer) > 250
    (tmp_path / "tokenizer.json").write_text(serialized)
    code = ("import sys; from bench import load_test as lt; "
            f"t = lt._tokenizer_from(('backend', open({str(tmp_path / 'tokenizer.json')!r}).read())); "
            "print(lt.make_prompt(t, 64, 7)[1], 'torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(load_test.make_prompt(tokenizer, 64, 7)[1]), "False", "False"]
    assert load_test.client_tokenizer(object(), "some/checkpoint") == ("name", "some/checkpoint")  # no backend: loaded
