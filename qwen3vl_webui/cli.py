"""Flags and environment variables -> Settings; `main` parses them and starts the app (`wiring.run`)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from qwen3vl_webui import precisions
from qwen3vl_webui.config import (
    ATTENTION,
    COMPILE_MODES,
    DEFAULT_MODEL,
    ENGINES,
    RANDOM_WEIGHTS,
    WARMUP_MODES,
    Settings,
    SettingsError,
    env_default,
    env_name,
)
from qwen3vl_webui.config import rule_help as _rule


def build_parser() -> argparse.ArgumentParser:
    d = Settings.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Qwen3-VL chat in the browser on one GPU. Every flag can also be set as an environment "
        "variable QWEN3VL_<NAME> (e.g. QWEN3VL_PRECISION=int4).",
    )

    def add(flag: str, name: str, help_text: str, **kw: Any) -> None:
        default = env_default(name, d[name].default)
        p.add_argument(
            flag, dest=name, default=default, help=f"{help_text} [env {env_name(name)}; default {default}]", **kw
        )

    add("--model", "model", f"Hugging Face id or local directory of a Qwen3-VL checkpoint (default {DEFAULT_MODEL})")
    add("--precision", "precision", _rule("precision"), choices=precisions.CHOICES)
    add("--device", "device", "auto, cpu, cuda or cuda:N")
    add("--attn", "attn", _rule("attn"), choices=ATTENTION)
    add("--engine", "engine", _rule("engine"), choices=ENGINES)
    add("--max-concurrency", "max_concurrency", _rule("max_concurrency"), type=int, metavar="N")
    add("--queue-size", "queue_size", _rule("queue_size"), type=int, metavar="M")
    add("--max-context", "max_context", _rule("max_context"), type=int, metavar="TOKENS")
    add("--max-new-tokens", "max_new_tokens", _rule("max_new_tokens"), type=int, metavar="TOKENS")
    add("--max-files-per-turn", "max_files_per_turn", _rule("max_files_per_turn"), type=int, metavar="N")
    add("--max-file-mb", "max_file_mb", _rule("max_file_mb"), type=int, metavar="MB")
    add("--max-requests-per-client", "max_requests_per_client", _rule("max_requests_per_client"), type=int, metavar="N")
    add("--event-rate-limit", "event_rate_limit", _rule("event_rate_limit"), type=int, metavar="PER_S")
    add("--max-history-turns", "max_history_turns", _rule("max_history_turns"), type=int, metavar="N")
    add("--max-files-per-chat", "max_files_per_chat", _rule("max_files_per_chat"), type=int, metavar="N")
    add("--host", "host", "address to listen on (0.0.0.0 for the LAN / containers)")
    add("--port", "port", _rule("port"), type=int)
    add("--share", "share", "also open a public gradio.live link", action="store_true")
    add("--demo", "demo", "start the built-in tiny random-weight model (offline, no download)", action="store_true")
    add("--cache-dir", "cache_dir", "where the demo checkpoint, the inductor cache and the compile artifacts are "
        "written (default ~/.cache/qwen3vl-webui)")
    add("--request-timeout", "request_timeout", _rule("request_timeout"), type=int, metavar="SECONDS")
    add("--grace-seconds", "grace_seconds", _rule("grace_seconds"), type=int, metavar="SECONDS")
    add("--warmup", "warmup", _rule("warmup"), choices=WARMUP_MODES)
    add("--compile", "compile", _rule("compile"), choices=COMPILE_MODES)
    add("--random-weights", "random_weights", _rule("random_weights"), choices=RANDOM_WEIGHTS)
    add("--upload-max-age-minutes", "upload_max_age_minutes", _rule("upload_max_age_minutes"), type=int, metavar="MIN")
    add("--upload-cache-mb", "upload_cache_mb", _rule("upload_cache_mb"), type=int, metavar="MB")
    add("--trusted-proxies", "trusted_proxies", "reverse proxies (IPs or networks, comma-separated) whose "
        "X-Forwarded-For names the client, e.g. for the login limit; default none", metavar="IPS")  # fmt: skip
    # Never echo a password into --help: these two show only where the value comes from.
    p.add_argument(
        "--auth", dest="auth", default=env_default("auth", None), metavar="USER:PASSWORD",
        help=f"require this login for the page and every API route [env {env_name('auth')}; "
        "a flag is visible in `ps`, prefer the env var or --auth-file]",
    )  # fmt: skip
    p.add_argument(
        "--auth-file", dest="auth_file", default=env_default("auth_file", None), metavar="PATH",
        help=f"file of user:password lines (# comments allowed) [env {env_name('auth_file')}]",
    )  # fmt: skip
    p.add_argument(
        "--api-key", dest="api_key", default=env_default("api_key", None), metavar="KEY",
        help=f"bearer key the OpenAI-compatible API (/v1) requires [env {env_name('api_key')}; prefer the env var]",
    )  # fmt: skip
    add("--metrics-public", "metrics_public", "serve /metrics without --api-key or the login (a scraper inside a "
        "private network)", action="store_true")
    add("--gpu-hourly-cost", "gpu_hourly_cost", "what the GPU costs an hour in USD: the panel and /metrics show the "
        "cost per million output tokens and the cost so far", type=_price, metavar="USD")
    add("--open-api", "open_api", "serve /v1 without a key even though --auth protects the page", action="store_true")
    add("--allowed-media-domains", "allowed_media_domains", "hosts whose http(s) image/video URLs the API may "
        "fetch, comma-separated (never a private or loopback address); default none: data: URIs only", metavar="HOSTS")  # fmt: skip
    add("--served-model-name", "served_model_name", "the model name the API answers to (default: --model, or "
        "qwen3vl-demo with --demo)", metavar="NAME")  # fmt: skip
    add("--backend-url", "backend_url", "an OpenAI-compatible server (vLLM, SGLang, another instance of this app) "
        "that runs the model: this app becomes its front end and loads no model", metavar="URL")  # fmt: skip
    add("--backend-model", "backend_model", "the backend's model name (default: the first of its /v1/models)",
        metavar="NAME")
    p.add_argument(
        "--backend-api-key", dest="backend_api_key", default=env_default("backend_api_key", None), metavar="KEY",
        help=f"bearer key sent to --backend-url [env {env_name('backend_api_key')}; prefer the env var]",
    )  # fmt: skip
    p.add_argument(
        "--admin-auth", dest="admin_auth", default=env_default("admin_auth", None), metavar="USER:PASSWORD",
        help=f"the operator's login: precision switch and memory release are theirs alone (without it, only when "
        f"the app listens on 127.0.0.1); it turns the login on for the whole page [env {env_name('admin_auth')}]",
    )  # fmt: skip
    return p


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a price in USD such as 1.25, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite price in USD, got {text!r}")
    return value


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags and env vars -> Settings; a bad value exits with code 2 and one line naming the valid range."""
    try:
        parser = build_parser()  # env values are parsed here
        args = parser.parse_args(argv)
        return Settings(**vars(args))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """`python app.py`: parses the flags (a bad one exits 2 with one line), then serves until SIGTERM (exit 0)."""
    from qwen3vl_webui.wiring import prespawn_engine, run

    settings = parse_settings(argv)
    prespawn_engine(settings)  # the engine process imports torch and the model's code while this one starts the page
    raise SystemExit(run(settings))
