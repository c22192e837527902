"""The front door, attacked as a stranger would: login brute force, disk filling uploads, open containers, leaks."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import start_app, wait_for

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("alice", "correct horse battery staple")
PROXY = "127.0.0.2"  # the app below believes X-Forwarded-For from this address only


def _from(address: str, url: str) -> httpx.Client:
    """An HTTP client whose connections leave from `address` (any 127.x.y.z reaches a server on 127.0.0.1)."""
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=address))


def _login(http: httpx.Client, password: str, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    return http.post("login", data={"username": AUTH[0], "password": password}, headers=headers)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint: Path) -> Iterator[tuple[Any, str]]:
    """The demo app behind a login, trusting one reverse proxy (127.0.0.2)."""
    app, url = start_app(tiny_checkpoint.parent, "--auth", ":".join(AUTH), "--trusted-proxies", PROXY)
    try:
        yield app, url
    finally:
        app.close()


@pytest.fixture(scope="module")
def open_app(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """The demo app without a login, a 1 MB upload cap, and an upload folder of its own."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("uploads")))
        app, url = start_app(tiny_checkpoint.parent, "--upload-cache-mb", "1", "--upload-max-age-minutes", "60")
        try:
            yield app, url
        finally:
            app.close()


def test_the_mounted_app_keeps_what_launch_set_and_serves_no_schema_outside_the_login(guarded) -> None:
    from qwen3vl_webui.wiring import SESSION_CAPACITY

    app, url = guarded
    assert app.front.gradio_app.state_holder.capacity == SESSION_CAPACITY  # launch()'s state_session_capacity
    assert app.demo.max_file_size == app.settings.max_file_mb * 1024 * 1024 and app.demo.css_paths
    assert app.demo._queue.max_size == app.settings.queue_size and app.demo.show_error is False
    with httpx.Client(base_url=url, timeout=10) as anonymous:
        for path in ("openapi.json", "docs", "redoc"):
            assert anonymous.get(path).status_code == 404, path
        assert anonymous.get("gradio_api/openapi.json").status_code == 401
        assert anonymous.get("").status_code == 200  # the login page (the container's health check)


# ------------------------------------------------------------------------------- login limit


def test_login_brute_force_from_one_address_gets_429_while_other_clients_log_in(guarded) -> None:
    app, url = guarded
    limiter = app.front.limiter
    with _from("127.0.0.1", url) as attacker:
        # A forged X-Forwarded-For from an untrusted address changes nothing: the TCP peer is the client.
        codes = [_login(attacker, f"guess-{i}", forwarded_for=f"203.0.113.{i}").status_code for i in range(30)]
        blocked = _login(attacker, AUTH[1])  # the right password, too late: refused before it is checked
    assert codes.count(400) == 5 and codes.count(429) == 25 and codes[:5] == [400] * 5, codes
    assert blocked.status_code == 429 and "access-token" not in str(blocked.headers)
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert "Too many failed logins" in blocked.json()["detail"]
    # A second client logs in at once, and its cookie opens the app.
    with _from("127.0.0.3", url) as other:
        assert _login(other, AUTH[1]).status_code == 200
        assert other.get("config").status_code == 200
    # Parallel guesses from a fresh address: attempts count when they start, so no burst gets past 5.
    with _from("127.0.0.4", url) as burst, concurrent.futures.ThreadPoolExecutor(16) as pool:
        parallel = list(pool.map(lambda i: _login(burst, f"p{i}").status_code, range(32)))
    assert parallel.count(400) == 5 and parallel.count(429) == 27, parallel
    # Once the window has passed, the address may try again.
    limiter.window_s = 1.0
    try:
        time.sleep(1.1)
        with _from("127.0.0.1", url) as attacker:
            assert _login(attacker, "again").status_code == 400
            assert _login(attacker, AUTH[1]).status_code == 200
    finally:
        limiter.window_s = 60.0


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_login_limit(guarded) -> None:
    _, url = guarded
    with _from(PROXY, url) as proxy:
        codes = [_login(proxy, f"guess-{i}", forwarded_for="198.51.100.66").status_code for i in range(8)]
        victim = _login(proxy, AUTH[1], forwarded_for="198.51.100.7")  # another visitor, same proxy
        # A client cannot hide behind an address it puts in front of the proxy's: the proxy's entry counts.
        spoofed = _login(proxy, "guess", forwarded_for="192.0.2.1, 198.51.100.66")
    assert codes == [400] * 5 + [429] * 3, codes
    assert victim.status_code == 200
    assert spoofed.status_code == 429


# ----------------------------------------------------------------------------------- uploads


def _upload(http: httpx.Client, name: str, size: int) -> str:
    content = name.encode() * (size // len(name)) + b"\0" * (size % len(name))  # distinct per name
    response = http.post("gradio_api/upload", files={"files": (name, content, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()[0]


def _age(paths: list[str], seconds: float) -> None:
    for path in paths:
        stamp = os.stat(path).st_mtime - seconds
        os.utime(path, (stamp, stamp))


def test_uploads_over_the_size_cap_go_oldest_first_and_old_ones_go_by_age(open_app) -> None:
    app, url = open_app
    sweeper = app.front.sweeper
    folder = Path(app.front.upload_folder)
    kept = [p for p in app.front.sweeper.keep() if p.startswith(str(folder))]  # the page's cached examples
    assert kept, "the demo's example files should be cached in the upload folder"
    size = 250_000  # 1 MB cap = 1,048,576 bytes: four of these fit, five do not
    with httpx.Client(base_url=url, timeout=30) as http:
        first = [_upload(http, f"old{i}.png", size) for i in range(8)]
        # 2 MB now, but all of it younger than the minimum age: nothing may go (a chat may be reading them).
        done = sweeper.sweeps
        assert sweeper.wait_for_sweep(done, 10)
        assert all(os.path.exists(p) for p in first)
        # Ten minutes later (in file time), one more upload: the oldest go until the folder fits the cap.
        for i, path in enumerate(first):
            _age([path], 600 - i)  # old0 is the oldest
        _age(kept, 7200)  # the examples are older than any limit, and stay
        fresh = _upload(http, "fresh.png", size)
        assert wait_for(lambda: not os.path.exists(first[4]), 10), "the sweep after an upload did not run"
        remaining = [p for p in [*first, fresh] if os.path.exists(p)]
        assert remaining == [*first[5:], fresh]
        assert sum(os.path.getsize(p) for p in remaining) <= 1024 * 1024
        assert all(os.path.exists(p) for p in kept)
        # Two hours old: over --upload-max-age-minutes (60) though the folder is under its cap.
        _age([first[5]], 7200)
        _upload(http, "tiny.png", 100)
        assert wait_for(lambda: not os.path.exists(first[5]), 10)
        assert all(os.path.exists(p) for p in [*first[6:], fresh, *kept])
        # The server still serves what is left, and refuses what is gone.
        assert http.get(f"gradio_api/file={fresh}").status_code == 200
        assert http.get(f"gradio_api/file={first[0]}").status_code in (403, 404)
    assert sweeper.totals.deleted_files >= 6


def test_sweeper_never_deletes_young_files_or_anything_outside_its_folder(tmp_path: Path) -> None:
    from qwen3vl_webui.server.uploads import UploadSweeper

    folder, outside = tmp_path / "uploads", tmp_path / "elsewhere"
    (folder / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"x" * 5000)
    os.symlink(outside, folder / "link")  # a link to a folder is not followed
    young, old = folder / "a" / "young.bin", folder / "a" / "old.bin"
    young.write_bytes(b"y" * 5000)
    old.write_bytes(b"o" * 5000)
    _age([str(old)], 1000)
    result = UploadSweeper(folder, max_age_s=60, max_bytes=1, min_age_s=120).sweep()
    assert (result.deleted_files, young.exists(), old.exists()) == (1, True, False)
    assert (outside / "secret").exists()


# ------------------------------------------------------------------------- open server, port


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _run_app(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN3VL_AUTH", "QWEN3VL_AUTH_FILE", "QWEN3VL_HOST")}
    return subprocess.run(
        [sys.executable, "app.py", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_an_open_server_says_so_in_one_line_and_a_busy_port_is_one_line_and_exit_2() -> None:
    with _busy_port() as busy:
        port = str(busy.getsockname()[1])
        started = time.monotonic()
        # 0.0.0.0:port conflicts with the 127.0.0.1:port held here, so nothing ever listens on all interfaces.
        lan = _run_app("--demo", "--host", "0.0.0.0", "--port", port)
        local = _run_app("--demo", "--host", "127.0.0.1", "--port", port)
        elapsed = time.monotonic() - started
    lines = lan.stderr.strip().splitlines()
    assert lan.returncode == 2 and len(lines) == 2, lan.stderr
    assert lines[0].startswith(f"warning: serving without a login on 0.0.0.0:{port}")
    assert "QWEN3VL_AUTH" in lines[0] and "--auth-file" in lines[0]
    assert "--port" in lines[1] and "QWEN3VL_PORT" in lines[1] and "Traceback" not in lan.stderr
    assert local.returncode == 2 and local.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use: stop what listens there or pick another with --port "
        "(or QWEN3VL_PORT)"
    ]
    assert elapsed < 30  # refused before any model or gradio loads


def test_open_warning_covers_lan_hosts_and_share_links_not_loopback_or_a_login() -> None:
    from qwen3vl_webui.config import Settings
    from qwen3vl_webui.server.frontdoor import open_warning

    assert "on 0.0.0.0:7860:" in (open_warning(Settings(host="0.0.0.0")) or "")
    assert "on 192.168.1.5:7860:" in (open_warning(Settings(host="192.168.1.5")) or "")
    assert "public gradio.live link" in (open_warning(Settings(share=True)) or "")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert open_warning(Settings(host=host)) is None
    assert open_warning(Settings(host="0.0.0.0", auth="a:b")) is None


def test_launch_on_a_busy_port_raises_port_error_in_process(tiny_checkpoint: Path) -> None:
    from qwen3vl_webui.cli import parse_settings
    from qwen3vl_webui.server.frontdoor import PortError
    from qwen3vl_webui.wiring import build_app

    with _busy_port() as busy:
        port = str(busy.getsockname()[1])
        app = build_app(
            parse_settings(["--demo", "--port", port, "--cache-dir", str(tiny_checkpoint.parent)]), load=False
        )
        with pytest.raises(PortError, match="QWEN3VL_PORT"):
            app.launch(prevent_thread_lock=True, quiet=True)
    assert not app.is_running


def test_share_opens_gradios_tunnel_to_our_server_and_survives_a_failed_one(open_app, monkeypatch, capsys) -> None:
    from gradio import networking

    app, url = open_app
    for name in ("share", "share_url"):  # restored after the test
        monkeypatch.setattr(app.demo, name, getattr(app.demo, name))
    calls: list[tuple] = []

    def tunnel(*args: Any) -> str:
        calls.append(args)
        return "https://abc.gradio.live"

    monkeypatch.setattr(networking, "setup_tunnel", tunnel)
    app.front._open_share_link()  # what --share does once the server is up (the real tunnel needs the internet)
    assert calls == [("127.0.0.1", app.settings.port, app.demo.share_token, None, None)]
    assert "* Running on public URL: https://abc.gradio.live" in capsys.readouterr().out
    monkeypatch.setattr(networking, "setup_tunnel", lambda *a: (_ for _ in ()).throw(RuntimeError("offline")))
    app.front._open_share_link()
    assert "Could not create a share link: offline" in capsys.readouterr().out
    assert httpx.get(url + "gradio_api/info", timeout=10).status_code == 200


# ---------------------------------------------------------------------------- error details


def _call_chat(url: str, data: list[Any]) -> tuple[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as http:
        body = json.dumps({"data": data})
        event_id = http.post("gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
        with http.stream("GET", f"gradio_api/call/chat/{event_id.json()['event_id']}") as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind in ("error", "complete"):
                    return kind, json.loads(line.split(":", 1)[1])
    raise AssertionError("the event stream ended without a result")


def test_internal_exception_text_never_reaches_the_client_but_warnings_do(open_app) -> None:
    from gradio_client import Client

    app, url = open_app
    malformed = [123]  # one value where the chat event takes many: gradio raises inside the event
    assert _call_chat(url, malformed) == ("error", {"error": None})
    # The same request with gradio's show_error on (what the app used to set) hands out the server's internals.
    app.demo.show_error = True
    try:
        kind, leaked = _call_chat(url, malformed)
    finally:
        app.demo.show_error = False
    assert kind == "error" and "gradio.components" in leaked["error"] and " object at 0x" in leaked["error"]
    # The app's own refusals are answers, not errors: they still arrive, and the server keeps serving.
    client = Client(url, verbose=False)
    assert client.predict({"text": "   ", "files": []}, api_name="/chat").startswith("⚠️")
    assert not client.predict({"text": "hello", "files": []}, api_name="/chat").startswith("⚠️")


# ----------------------------------------------------------------------------- unknown events

UNKNOWN_EVENTS = {  # route, body: each a KeyError (HTTP 500 and a traceback) inside gradio before
    "queue/join": ({"data": [], "fn_index": 9999, "session_hash": "stranger01"}, "no event with fn_index 9999"),
    "run/predict": ({"data": [], "fn_index": 9999, "session_hash": "stranger01"}, "no event with fn_index 9999"),
    "api/predict": ({"data": [], "fn_index": -1}, "no event with fn_index -1"),
    "run/nosuch": ({"data": []}, "no API endpoint named 'nosuch'"),
    "call/nosuch": ({"data": []}, "no API endpoint named 'nosuch'"),
    "call/v2/nosuch": ({}, "no API endpoint named 'nosuch'"),
    # v2 looks a name up in the API docs alone: a hidden event's name was a KeyError too
    "call/v2/shown": ({}, "no API endpoint named 'shown'"),
}


def _event_index(app: Any, name: str) -> int:
    return next(int(index) for index, fn in app.demo.fns.items() if fn.name == name)


def test_an_unknown_event_is_a_404_with_a_sentence_and_known_ones_still_run(open_app, caplog) -> None:
    from gradio_client import Client

    app, url = open_app
    with caplog.at_level(logging.WARNING), httpx.Client(base_url=url, timeout=30) as http:
        for route, (body, sentence) in UNKNOWN_EVENTS.items():
            reply = http.post(f"gradio_api/{route}", json=body)
            assert reply.status_code == 404 and sentence in reply.json()["detail"], (route, reply.text)
        # gradio's own refusals of a malformed body stay its own.
        assert http.post("gradio_api/queue/join", json={"data": [], "session_hash": "s"}).status_code == 400
        assert http.post("gradio_api/queue/join", json={"data": [], "fn_index": "x", "session_hash": "s"}).status_code == 422
        # Every event the app has still runs, hidden ones included, by fn_index (as the page calls them) or by name.
        shown = _event_index(app, "shown")
        for route, body in (("run/predict", {"fn_index": shown}), ("run/shown", {})):
            reply = http.post(f"gradio_api/{route}", json={"data": [], "session_hash": "visitor1234", **body})
            assert reply.status_code == 200 and len(reply.json()["data"]) == 2, reply.text
        joined = http.post("gradio_api/queue/join", json={"data": [], "fn_index": shown, "session_hash": "visitor1234"})
        assert joined.status_code == 200 and joined.json()["event_id"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # no server error logged
    answer = Client(url, verbose=False).predict({"text": "hello", "files": []}, api_name="/chat")
    assert answer and not answer.startswith("⚠️")  # the server serves on


def test_behind_a_login_only_a_logged_in_caller_learns_an_event_is_unknown(guarded) -> None:
    app, url = guarded
    body, sentence = UNKNOWN_EVENTS["queue/join"]
    with httpx.Client(base_url=url, timeout=30) as anonymous:  # gradio's 401, as for an event that exists
        assert anonymous.post("gradio_api/queue/join", json=body).status_code == 401
        assert anonymous.post("gradio_api/call/nosuch", json={"data": []}).status_code == 401
    with _from("127.0.0.5", url) as user:  # an address of its own: the login-limit test's failures are not ours
        assert _login(user, AUTH[1]).status_code == 200
        reply = user.post("gradio_api/queue/join", json=body)
        assert reply.status_code == 404 and sentence in reply.json()["detail"]
        shown = {"data": [], "fn_index": _event_index(app, "shown"), "session_hash": "member1234"}
        assert user.post("gradio_api/run/predict", json=shown).status_code == 200


# ---------------------------------------------------------------------------- demo checkpoint


def test_demo_checkpoint_defaults_to_a_private_per_user_folder(tmp_path: Path, monkeypatch) -> None:
    from qwen3vl_webui.weights.tiny_model import ensure_demo_checkpoint, is_demo_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    target = ensure_demo_checkpoint(None)
    assert target.parent == tmp_path / ".cache" / "qwen3vl-webui" / "demo" and is_demo_checkpoint(target)
    assert target.parent.stat().st_mode & 0o777 == 0o700
    assert ensure_demo_checkpoint(None) == target  # found, checked, not written again


def test_demo_checkpoint_in_a_folder_others_can_write_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.manager import ModelManager
    from qwen3vl_webui.weights.tiny_model import UnsafeCheckpointDir, ensure_demo_checkpoint

    # Like /tmp: anyone may create entries, so a "demo checkpoint" there may have been planted by someone else.
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copytree(tiny_checkpoint, shared / tiny_checkpoint.name)  # the planted copy
    shared.chmod(0o777)
    with pytest.raises(UnsafeCheckpointDir, match="other users can write to it"):
        ensure_demo_checkpoint(shared)
    # The app's own loader refuses it with that one sentence in its status line.
    manager = ModelManager("unused", "auto", "cpu", "sdpa", Scheduler(1, 1), demo_dir=str(shared))
    with pytest.raises(UnsafeCheckpointDir):
        manager.load(use_demo=True)
    assert manager.status.startswith("Model failed to load: refusing to load the demo checkpoint from")
    # A private folder holding a checkpoint file others may rewrite is refused as well.
    private = tmp_path / "private"
    shutil.copytree(tiny_checkpoint, private / tiny_checkpoint.name)
    (private / tiny_checkpoint.name / "config.json").chmod(0o666)
    with pytest.raises(UnsafeCheckpointDir, match="config.json"):
        ensure_demo_checkpoint(private)
    if os.geteuid() == 0:  # only root can hand a folder to another user
        owned = tmp_path / "owned"
        shutil.copytree(tiny_checkpoint, owned / tiny_checkpoint.name)
        os.chown(owned / tiny_checkpoint.name, 12345, 12345)
        with pytest.raises(UnsafeCheckpointDir, match="belongs to another user"):
            ensure_demo_checkpoint(owned)


def test_the_servers_connections_send_small_writes_at_once_nagle_off(open_app) -> None:
    """Every streamed answer is many small writes (gradio's SSE messages, the API's chunks). With Nagle's algorithm
    on, each write after the first waits for the client's delayed ACK (~40 ms on Linux), so a chat's first token
    arrived with the queue's earlier messages in one bunch. asyncio turns Nagle off only for sockets whose proto
    says TCP; the listener's proto is what accepted connections inherit."""
    app, url = open_app
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("config").status_code == 200  # the keep-alive connection stays open for the look below
        connections = list(app.front.server.server_state.connections)
        assert connections, "uvicorn lists no open connection"
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_chats_inputs_reach_the_handler_without_a_thread_each(demo_app_server: tuple[Any, str]) -> None:
    # The page's protocol (as a browser speaks it): the chat's 15 converted inputs (the message, the sampling and
    # budget controls) are converted on the event loop, not in one worker thread each, and so is the call that makes
    # the handler's async generator; the answer streams.
    import gradio.blocks as blocks

    from bench import load_test

    _, url = demo_app_server
    to_thread = blocks.anyio.to_thread
    before = to_thread.inlined.copy()
    chat = load_test.GradioRawDoor(url, 0.0).connect()
    try:
        texts = list(chat.stream("Name the colours you see.", None, 6, 0.0, 120))
    finally:
        chat.close()
    added = to_thread.inlined - before
    inputs = {k: v for k, v in added.items() if k.endswith(".preprocess")}
    assert texts and inputs == {"MultimodalTextbox.preprocess": 1, "Textbox.preprocess": 2, "Slider.preprocess": 10,
                                "Number.preprocess": 1, "Checkbox.preprocess": 1}  # fmt: skip
    assert added["async generator"] == 1
