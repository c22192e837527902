"""The live plots' data: the service's 1 s load history (service/metrics.py) as gr.LinePlot values.

Built as gradio's plot payload directly (ui/gradio_compat.plot_payload), not as DataFrames: gradio turns a DataFrame
into that payload on every call (`to_json`, a dtype check per column) in ~35 ms for the four plots, and every open
tab asks every 2 s, as can anyone calling the event in a loop. One payload serves every caller for a second.
"""

from __future__ import annotations

from typing import Any

from qwen3vl_webui.service.metrics import Sample
from qwen3vl_webui.ui import gradio_compat

GIB = 1024**3
PLOTS = ("memory", "speed", "queue", "kv")  # the order of the plots in the layout and of `frames`' results
X = "seconds ago"


def frames(samples: list[Sample], every: int = 5) -> tuple[Any, Any, Any, Any]:
    """(memory GiB, output tok/s, running and waiting chats, KV slots in use) against seconds ago (-300..0), every
    `every`-th sample (the newest and the oldest always).

    Tokens a second come from consecutive kept samples' output counts; without a GPU the memory plot shows this
    process's resident memory instead (the model is in RAM there).
    """
    kept = samples[::-1][::every][::-1]
    if samples and kept[0] is not samples[0]:  # the oldest too: the plots span the whole history, rates start early
        kept.insert(0, samples[0])
    now = kept[-1].t if kept else 0.0
    ago = [round(s.t - now, 1) for s in kept]
    gpu = bool(kept) and kept[-1].gpu_used is not None
    memory_name = "GPU memory used" if gpu else "RAM (this process, no GPU)"
    memory = [(a, round(((s.gpu_used if gpu else s.process_rss) or 0) / GIB, 3), memory_name) for a, s in zip(ago, kept)]
    speed = [
        (a, round(max(0, s.generated - p.generated) / max(1e-3, s.t - p.t), 1), "output tokens/s")
        for a, p, s in zip(ago[1:], kept, kept[1:])
    ]
    queue = [(a, s.running, "running") for a, s in zip(ago, kept)] + [(a, s.waiting, "waiting") for a, s in zip(ago, kept)]
    kv = [(a, s.kv_used, "in use") for a, s in zip(ago, kept)] + [(a, s.kv_total, "slots") for a, s in zip(ago, kept)]
    return (
        gradio_compat.plot_payload([X, "GiB", "series"], memory),
        gradio_compat.plot_payload([X, "tok/s", "series"], speed),
        gradio_compat.plot_payload([X, "chats", "series"], queue),
        gradio_compat.plot_payload([X, "slots", "series"], kv),
    )
