"""Settings: defaults, environment variables and validation with errors that name the valid range."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3vl_webui import precisions, ranges

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
ATTENTION = ("sdpa", "eager", "flash_attention_2")
WARMUP_MODES = ("auto", "full", "quick", "off")
COMPILE_MODES = ("background", "before-serving", "off")
RANDOM_WEIGHTS = ("off", "4b", "tiny")
ENGINES = ("auto", "generate", "batch", "batch-inproc")
ENV_PREFIX = "QWEN3VL_"
MAX_HOURLY_COST = 1000.0  # USD an hour: beyond any one GPU's price


class SettingsError(ValueError):
    """A setting outside its valid range; the message names the setting, the value and the range."""


def _request_range(name: str) -> tuple[int, int]:
    """A flag that caps a per-request value takes that value's whole range (ranges.REQUEST)."""
    r = ranges.REQUEST[name]
    return int(r.lo), int(r.hi)


# name -> (valid range or choices, help). The single table that flags, env vars and checks read.
_RULES: dict[str, tuple[Any, str]] = {
    "precision": (
        precisions.CHOICES,
        "weights precision; int4 = our W4A16 kernels (4-bit weights, bf16 compute), fp8 = block-scaled FP8 weights "
        "(GPUs of compute capability 8.9+), int8wo = int8 weight-only, int8 / int4-bnb = bitsandbytes LLM.int8 / nf4; "
        "auto picks the fastest that fits the free VRAM (CPU: fp32)",
    ),
    "attn": (ATTENTION, "attention kernel (flash_attention_2 needs the flash-attn package)"),
    "max_concurrency": ((1, 64), "generations running on the GPU at once"),
    "queue_size": ((0, 1024), "requests allowed to wait before new ones are refused as busy"),
    "max_context": (_request_range("max_context"), "prompt + answer tokens per request (bounds KV-cache memory)"),
    "max_new_tokens": (_request_range("max_new_tokens"), "upper bound of the answer-length slider"),
    "port": ((1, 65535), "HTTP port"),
    "max_files_per_turn": ((1, 64), "images + videos allowed in one message"),
    "max_file_mb": ((1, 10240), "largest upload accepted, in MB"),
    "max_requests_per_client": (
        (0, 1024),
        "chats one client address may have running or waiting at once, every front door together; the operator is "
        "exempt; 0 = no cap",
    ),
    "event_rate_limit": (
        (0, 10000),
        "gradio events (chat, panel, sliders, uploads) per second one client address may send, bursts of 3 s "
        "allowed; over it a call waits 1 s and gets 429; not applied when the app listens on loopback only; 0 = off",
    ),
    "max_history_turns": ((1, 10000), "earlier turns the server keeps per conversation (older ones are forgotten)"),
    "max_files_per_chat": ((1, 1024), "images + videos the server keeps per conversation (older turns are forgotten)"),
    "engine": (
        ENGINES,
        "decoder: batch = continuous batching with CUDA-graph decode in its own process (it owns the GPU), "
        "batch-inproc = the same engine on a thread of the web server's process, generate = transformers generate "
        "per request; auto = batch on a GPU, generate on a CPU or ZeroGPU",
    ),
    "request_timeout": ((0, 86400), "wall-clock seconds one chat request may take, waiting included; 0 = no limit"),
    "grace_seconds": ((0, 3600), "on SIGTERM, seconds running chats get to finish before they are stopped"),
    "compile": (
        COMPILE_MODES,
        "the batch engine's compiled decode step (GPU): background = answer at once from eager CUDA graphs and swap "
        "each batch size's compiled graph in as it is built, except where the fused decode layers serve every layer "
        "(their eager step is the faster: nothing compiles); before-serving = compile them all before the first "
        "answer (seconds with matching compile artifacts, minutes without); off = eager CUDA graphs only",
    ),
    "warmup": (
        WARMUP_MODES,
        "start-up warm-up: full = the worst case the sliders allow (lowers max context if it does not fit), "
        "quick = a short text + image turn, auto = full on a GPU, quick on a CPU",
    ),
    "upload_max_age_minutes": ((0, 525600), "uploaded files are deleted this long after upload; 0 = no age limit"),
    "upload_cache_mb": (
        (0, 10485760),
        "total size of gradio's upload folder; over it the oldest uploads are deleted first (none younger than 2 "
        "minutes); 0 = no cap",
    ),
    "random_weights": (
        RANDOM_WEIGHTS,
        "BENCHMARKING ONLY: serve random weights of this architecture (4b = Qwen3-VL-4B-Instruct's), built in "
        "memory with no download, instead of --model; every answer is random words",
    ),
}


@dataclass(frozen=True)
class Settings:
    """Everything the app is started with; built once by `cli`, validated in `__post_init__`."""

    model: str = DEFAULT_MODEL
    precision: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    max_concurrency: int = 1
    queue_size: int = 16
    max_context: int = 16384
    max_new_tokens: int = 1024
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    demo: bool = False
    max_files_per_turn: int = 8
    max_file_mb: int = 200
    cache_dir: str | None = field(default=None)
    engine: str = "auto"
    request_timeout: int = 600
    grace_seconds: int = 30
    warmup: str = "auto"
    compile: str = "background"
    random_weights: str = "off"
    max_requests_per_client: int = 2
    max_history_turns: int = 100
    event_rate_limit: int = 10
    max_files_per_chat: int = 32
    # "user:password"; kept out of repr so settings can be logged.
    auth: str | None = field(default=None, repr=False)
    auth_file: str | None = None
    # The OpenAI-compatible API's bearer key (/v1); with a UI login and no key the API stays closed unless open_api.
    api_key: str | None = field(default=None, repr=False)
    open_api: bool = False
    allowed_media_domains: str = ""  # hosts whose http(s) media URLs the API may fetch, comma-separated
    served_model_name: str | None = None
    # The operator's "user:password": server-wide actions (precision switch, memory release) are theirs alone.
    admin_auth: str | None = field(default=None, repr=False)
    upload_max_age_minutes: int = 60
    upload_cache_mb: int = 2048
    # Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For is believed; "" = none.
    trusted_proxies: str = ""
    # /metrics without --api-key or the login (for a scraper inside a private network).
    metrics_public: bool = False
    # The GPU's price per hour in USD, for the panel's and /metrics' cost per million output tokens; None = not set.
    gpu_hourly_cost: float | None = None
    # A remote OpenAI-compatible server (vLLM, SGLang, another instance of this app) that runs the model: this app is
    # then its front end and loads nothing (engine/backend/). Its model: --backend-model, else its /v1/models' first.
    backend_url: str | None = field(default=None, repr=False)  # may hold user:password
    backend_model: str | None = None
    backend_api_key: str | None = field(default=None, repr=False)  # sent to the backend as a bearer key

    def __post_init__(self) -> None:
        for name, (rule, _) in _RULES.items():
            check(name, getattr(self, name), rule)
        self.credentials()  # validates --auth / --auth-file / --admin-auth
        if self.max_files_per_chat < self.max_files_per_turn:
            raise SettingsError(
                f"--max-files-per-chat must be at least --max-files-per-turn ({self.max_files_per_turn}), "
                f"got {self.max_files_per_chat}"
            )
        if self.max_new_tokens >= self.max_context:
            raise SettingsError(
                f"--max-new-tokens must be below --max-context ({self.max_context}), got {self.max_new_tokens}"
            )
        in_memory = [p for p in precisions.CHOICES if p == "auto" or p in precisions.IN_MEMORY]
        if self.random_weights != "off" and (self.demo or self.precision not in in_memory):
            raise SettingsError(
                f"--random-weights {self.random_weights} builds its weights in memory: it takes --precision "
                f"{', '.join(in_memory[:-1])} or {in_memory[-1]} and no --demo; got --precision {self.precision}"
                f"{' --demo' if self.demo else ''}"
            )
        check_networks("trusted_proxies", self.trusted_proxies)
        if self.gpu_hourly_cost is not None and not (
            isinstance(self.gpu_hourly_cost, (int, float)) and 0 <= self.gpu_hourly_cost <= MAX_HOURLY_COST
        ):
            raise SettingsError(
                f"--gpu-hourly-cost must be a price in USD from 0 to {MAX_HOURLY_COST:g}, got {self.gpu_hourly_cost!r}"
            )
        check_backend(self)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise SettingsError(f"--device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def local_only(self) -> bool:
        """Only this machine can reach the app: it listens on loopback and opens no public share link."""
        host = self.host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            loopback = False
        return loopback and not self.share

    def admin_user(self) -> str | None:
        """The operator's user name (--admin-auth), if one is set."""
        return parse_credential(self.admin_auth, "--admin-auth")[0] if self.admin_auth else None

    def credentials(self) -> list[tuple[str, str]]:
        """(user, password) pairs from --auth, --auth-file and --admin-auth; empty when the app is open to all.

        gradio's login covers the whole app, so with --admin-auth alone the page asks everyone for a login:
        give visitors their own accounts with --auth / --auth-file.
        """
        pairs: list[tuple[str, str]] = []
        if self.admin_auth:
            pairs.append(parse_credential(self.admin_auth, "--admin-auth"))
        if self.auth:
            pairs.append(parse_credential(self.auth, "--auth"))
        if self.auth_file:
            try:
                text = Path(self.auth_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise SettingsError(f"--auth-file {self.auth_file!r} cannot be read: {exc.strerror}") from None
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    pairs.append(parse_credential(line.strip(), f"--auth-file line {number}"))
            if not pairs:
                raise SettingsError(f"--auth-file {self.auth_file!r} holds no user:password line")
        return pairs


def parse_credential(text: str, where: str) -> tuple[str, str]:
    """'user:password' -> (user, password); the error never repeats the password."""
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise SettingsError(f"{where} must be user:password with both parts non-empty")
    return user.strip(), password


def check(name: str, value: Any, rule: Any) -> None:
    """Raises SettingsError unless `value` is in `rule` (a tuple of choices or an (lo, hi) int range)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(rule, tuple) and len(rule) == 2 and all(isinstance(x, int) for x in rule):
        lo, hi = rule
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SettingsError(f"{flag} must be an integer from {lo} to {hi}, got {value!r}")
    elif value not in rule:
        raise SettingsError(f"{flag} must be one of {', '.join(rule)}; got {value!r}")


def _without_login(url: str) -> str:
    """`url` with any user:password@ cut out (an error message is printed and may be logged)."""
    import re

    return re.sub(r"^([^/]*//)?[^/@]*@", r"\1", url)


def check_backend(settings: Settings) -> None:
    """--backend-url must be an http(s) URL with a host, and excludes the flags that load a model here."""
    if not settings.backend_url:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(settings.backend_url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        parts = parts._replace(scheme="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SettingsError(
            "--backend-url must be an http(s) URL such as http://host:8000/, "
            f"got {_without_login(settings.backend_url)!r}"
        )
    if settings.demo or settings.random_weights != "off":
        flag = "--demo" if settings.demo else "--random-weights"
        raise SettingsError(f"--backend-url runs the model on the backend: it takes no {flag}")


def check_networks(name: str, value: str) -> None:
    """Raises SettingsError unless `value` is a comma-separated list of IP addresses or networks (or empty)."""
    import ipaddress

    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            ipaddress.ip_network(item)  # strict, as uvicorn parses it: 10.0.0.0/8, not 10.0.0.1/8
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise SettingsError(
                f"{flag} must be IP addresses or networks separated by commas (e.g. 127.0.0.1,10.0.0.0/8); got {item!r}"
            ) from None


def rule_help(name: str) -> str:
    rule, text = _RULES[name]
    if isinstance(rule, tuple) and len(rule) == 2 and all(isinstance(x, int) for x in rule):
        return f"{text} ({rule[0]}..{rule[1]})"
    return text


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def env_default(name: str, default: Any) -> Any:
    """The environment's value for setting `name` (QWEN3VL_NAME), parsed to the type of `default`."""
    raw = os.environ.get(env_name(name))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{env_name(name)} must be an integer, got {raw!r}") from None
    return raw
