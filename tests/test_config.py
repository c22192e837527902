"""Flags, environment variables and validation: bad values exit 2 with one line naming the range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_webui.cli import parse_settings
from qwen3vl_webui.config import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def run_app(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_defaults_match_the_documented_ones() -> None:
    s = parse_settings([])
    assert (s.model, s.precision, s.host, s.port) == ("Qwen/Qwen3-VL-4B-Instruct", "auto", "127.0.0.1", 7860)
    assert (s.max_concurrency, s.queue_size, s.attn, s.demo) == (1, 16, "sdpa", False)


def test_flags_are_parsed_into_settings() -> None:
    s = parse_settings(
        ["--precision", "int4", "--max-concurrency", "3", "--queue-size", "5", "--max-context", "8192",
         "--max-new-tokens", "256", "--host", "0.0.0.0", "--port", "9000", "--demo", "--attn", "eager"]
    )  # fmt: skip
    assert (s.precision, s.max_concurrency, s.queue_size, s.max_context) == ("int4", 3, 5, 8192)
    assert (s.max_new_tokens, s.host, s.port, s.demo, s.attn) == (256, "0.0.0.0", 9000, True, "eager")


def test_environment_variables_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3VL_PRECISION", "int8")
    monkeypatch.setenv("QWEN3VL_MAX_CONCURRENCY", "4")
    monkeypatch.setenv("QWEN3VL_DEMO", "true")
    s = parse_settings([])
    assert (s.precision, s.max_concurrency, s.demo) == ("int8", 4, True)
    assert parse_settings(["--max-concurrency", "2"]).max_concurrency == 2  # a flag beats the env var


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("max_concurrency", 0, "from 1 to 64"),
        ("queue_size", -1, "from 0 to 1024"),
        ("max_context", 100, "from 256 to 262144"),
        ("precision", "int3", "auto, bf16, fp16, fp8, int8, int8wo, int4, int4-bnb"),
        ("attn", "flash", "sdpa, eager, flash_attention_2"),
        ("device", "tpu", "auto, cpu, cuda, cuda:N"),
    ],
)
def test_invalid_settings_name_the_valid_range(field: str, value: object, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings(**{field: value})


def test_max_new_tokens_must_leave_room_for_a_prompt() -> None:
    with pytest.raises(SettingsError, match="below --max-context"):
        Settings(max_context=1024, max_new_tokens=1024)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-concurrency", "0"], "--max-concurrency must be an integer from 1 to 64, got 0"),
        (["--port", "70000"], "--port must be an integer from 1 to 65535"),
        (["--max-context", "64"], "--max-context must be an integer from 256 to 262144"),
    ],
)
def test_bad_flag_exits_2_with_one_line(args: list[str], fragment: str) -> None:
    done = run_app(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr


def test_bad_environment_value_exits_2() -> None:
    done = run_app(env={"QWEN3VL_MAX_CONCURRENCY": "lots"})
    assert done.returncode == 2
    assert "QWEN3VL_MAX_CONCURRENCY must be an integer" in done.stderr


def test_help_lists_every_flag_and_module_entry_point_matches() -> None:
    out = run_app("--help").stdout
    for flag in ["--model", "--precision", "--device", "--attn", "--max-concurrency", "--queue-size",
                 "--max-context", "--max-new-tokens", "--host", "--port", "--share", "--demo"]:  # fmt: skip
        assert flag in out
    assert "QWEN3VL_PRECISION" in out
    module = subprocess.run(
        [sys.executable, "-m", "qwen3vl_webui", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert module.returncode == 0 and module.stdout == out
