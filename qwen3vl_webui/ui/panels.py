"""Formats the engine's plain-data snapshots as Markdown for the live panel (no gradio, no torch)."""

from __future__ import annotations

from qwen3vl_webui.service.chat import PanelSnapshot
from qwen3vl_webui.telemetry import format_bytes

DEMO_BANNER = "**demo model: random weights** — answers are gibberish; the app, queue and panel are real."


def _opt(value: float | None, fmt: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def format_panel(snap: PanelSnapshot, queued: int = 0) -> str:
    """`queued`: requests still in gradio's queue, which hands the engine at most its slot count."""
    rows: list[tuple[str, str]] = []
    if snap.backend is not None:
        rows += _backend_rows(snap)
    elif snap.gpu is not None:
        g = snap.gpu
        rows += [
            ("GPU", f"{g.name} (#{g.index})"),
            ("VRAM (NVML)", f"{format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"),
            (
                "this process (torch)",
                f"alloc {format_bytes(g.torch_allocated)} · reserved {format_bytes(g.torch_reserved)} · "
                f"peak {format_bytes(g.torch_peak)}",
            ),
            (
                "util · temp · power",
                f"{_opt(g.utilization_pct, '.0f', '%')} · {_opt(g.temperature_c, '.0f', ' °C')} · "
                f"{_opt(g.power_w, '.0f', ' W')}",
            ),
        ]
    else:
        rows.append(("GPU", _no_gpu(snap.gpu_reason)))
    s = snap.system
    rows += [
        ("CPU · RAM", f"{s.cpu_pct:.0f}% · {format_bytes(s.ram_used)} / {format_bytes(s.ram_total)}"),
        ("process RSS", format_bytes(s.process_rss)),
    ]
    if snap.backend is None:  # a front end's model, precision and decoder are the backend's (its rows above)
        rows += [
            ("precision", f"{snap.precision or 'loading…'}" + (f" on {snap.device}" if snap.device else "")),
            ("decoder", snap.decoder or "—"),
        ]
    rows += [
        *_prefix_rows(snap),
        (
            "jobs",
            f"{snap.queue.running} running / {snap.queue.max_concurrency} slot{'s' if snap.queue.max_concurrency != 1 else ''} · "
            f"{snap.queue.waiting + queued} waiting",
        ),
    ]
    rows += _cost_rows(snap)
    last = snap.last
    if last is not None:
        rows += [
            ("last answer", f"{last.new_tokens} tokens · {last.tokens_per_s:.1f} tok/s · TTFT {last.ttft_s:.2f} s"),
            (
                "last prompt",
                f"{last.prompt_tokens:,} tokens = {last.prompt_text_tokens:,} text + "
                f"{last.prompt_image_tokens:,} image + {last.prompt_video_tokens:,} video",
            ),
            (
                f"average of {min(snap.requests, 20)}",
                f"{_opt(snap.rolling_tokens_per_s, '.1f', ' tok/s')} · TTFT {_opt(snap.rolling_ttft_s, '.2f', ' s')}",
            ),
        ]
    else:
        rows.append(("last answer", "no request yet"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return "| live | |\n|---|---|\n" + table


BACKEND_LINE = "the model runs there: precision, memory and GPU controls are the backend's (hidden here)"


def _backend_rows(snap: PanelSnapshot) -> list[tuple[str, str]]:
    """A front end (--backend-url): the backend's address and model, and its serving figures from its /metrics."""
    b = snap.backend
    assert b is not None
    if b.reachable is None:
        state = "connecting…"
    elif b.problem:
        state = f"⚠️ {plain_markdown(b.problem)}"
    else:
        state = "reachable"
    # Every visitor sees the panel: the backend's address stays in the log; its model name and words are its own text
    model = plain_markdown(b.model) if b.model else "model not known yet"
    rows = [("backend", f"the model server · {model} · {state}"), ("local GPU", BACKEND_LINE)]
    load = b.load
    if b.metrics is False:
        rows.append(("backend figures", "it serves no Prometheus /metrics (vLLM does; SGLang with --enable-metrics)"))
    elif load is not None and load.figures.known:
        f = load.figures
        kv = "—" if f.kv_usage is None else f"{f.kv_usage * 100:.0f}%"
        rows += [
            ("backend requests", f"{f.running:.0f} running · {f.waiting:.0f} waiting · KV cache {kv} in use"),
            ("backend speed", f"{_opt(load.tokens_per_s, ',.1f', ' output tok/s')} · TTFT {_opt(load.ttft_s, '.2f', ' s')}"),
        ]  # fmt: skip
        if f.gpu_memory_total:
            used = f.gpu_memory_used or 0
            rows.append(("backend GPU memory", f"{format_bytes(used)} / {format_bytes(f.gpu_memory_total)}"))
        if f.precision:
            rows.append(("backend precision", plain_markdown(f.precision[:80])))
    return rows


def plain_markdown(text: str) -> str:
    """Text from the backend as plain Markdown text: a table cell, a chat message (no links, images, HTML or new
    cells; whitespace runs become one space)."""
    text = " ".join(text.split())
    return "".join("\\" + c if c in "\\`*_{}[]()<>#+-.!|~&" else c for c in text)


def _no_gpu(reason: str | None) -> str:
    """A person's words for a missing GPU: NVML's exception names (NVMLError_LibraryNotFound...) stay in the log."""
    if not reason or reason.startswith(("no GPU (NVML", "no GPU (pynvml")) or "NVMLError" in reason:
        return "no NVIDIA GPU found"
    return reason if reason.startswith("no GPU") else f"no GPU ({reason})"


def _usd(value: float | None) -> str:
    if value is None:
        return "—"
    return f"${value:,.2f}" if value >= 0.1 else f"${value:.4f}"


def _cost_rows(snap: PanelSnapshot) -> list[tuple[str, str]]:
    """Cost per million output tokens at the current (10 s) and rolling (5 min) throughput, and so far."""
    c = snap.cost
    if c is None:
        return []
    if c.hourly_usd is None:
        return [("cost", "set `--gpu-hourly-cost USD` (or `QWEN3VL_GPU_HOURLY_COST`) to see the cost per million "
                         "output tokens")]  # fmt: skip
    now = (f"{_usd(c.per_million_current)} now ({c.current_tokens_per_s:,.0f} tok/s)"
           if c.per_million_current is not None else "idle now")  # fmt: skip
    rolling = (f"{_usd(c.per_million_rolling)} at the 5-min rate ({c.rolling_tokens_per_s:,.0f} tok/s)"
               if c.per_million_rolling is not None else "no output in the last 5 min")  # fmt: skip
    return [
        (f"cost per 1M output tokens (GPU at {_usd(c.hourly_usd)}/h)", f"{now} · {rolling}"),
        ("cost so far", f"{_usd(c.cost_so_far)} in {c.uptime_s / 3600:.2f} h · "
                        f"{_usd(c.per_million_so_far)} per 1M output tokens so far"),
    ]  # fmt: skip


def _prefix_rows(snap: PanelSnapshot) -> list[tuple[str, str]]:
    """The batch engine's prefix reuse: how much prefill follow-up turns and regenerations saved."""
    e = snap.engine
    if e is None or not e.prefix_slots:
        return []
    return [
        (
            "prefix reuse",
            f"{e.prefix_hits:,} hits · {e.prefix_tokens_reused:,} prompt tokens reused, "
            f"{e.prefill_tokens:,} prefilled · {e.prefix_entries}/{e.prefix_slots} kept",
        )
    ]


def format_status(snap: PanelSnapshot) -> str:
    lines = [f"<span id='model-status'>{snap.status}</span>"]
    if snap.notice:
        lines.append(snap.notice)
    if snap.is_demo:
        lines.append(DEMO_BANNER)
    return "  \n".join(lines)
