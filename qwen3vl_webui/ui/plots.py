"""The live plots' data: the service's 1 s load history (service/metrics.py) as DataFrames for gr.LinePlot."""

from __future__ import annotations

from typing import Any

from qwen3vl_webui.service.metrics import Sample

GIB = 1024**3
PLOTS = ("memory", "speed", "queue", "kv")  # the order of the plots in the layout and of `frames`' results


def frames(samples: list[Sample]) -> tuple[Any, Any, Any, Any]:
    """(GPU memory GiB, output tok/s, running and waiting chats, KV slots in use) against seconds ago (-300..0).

    Tokens a second come from consecutive samples' output counts; without a GPU the memory plot shows this process's
    resident memory instead (the model is in RAM there).
    """
    import pandas as pd

    if not samples:
        empty = pd.DataFrame({"seconds ago": [], "value": [], "series": []})
        return empty, empty, empty, empty
    now = samples[-1].t
    ago = [round(s.t - now, 1) for s in samples]
    gpu = samples[-1].gpu_used is not None
    memory = pd.DataFrame({
        "seconds ago": ago,
        "GiB": [((s.gpu_used if gpu else s.process_rss) or 0) / GIB for s in samples],
        "series": ["GPU memory used" if gpu else "RAM (this process, no GPU)"] * len(samples),
    })  # fmt: skip
    speed = pd.DataFrame({
        "seconds ago": ago[1:],
        "tok/s": [max(0, b.generated - a.generated) / max(1e-3, b.t - a.t) for a, b in zip(samples, samples[1:])],
        "series": ["output tokens/s"] * (len(samples) - 1),
    })  # fmt: skip
    queue = pd.DataFrame({
        "seconds ago": ago * 2,
        "chats": [s.running for s in samples] + [s.waiting for s in samples],
        "series": ["running"] * len(samples) + ["waiting"] * len(samples),
    })  # fmt: skip
    kv = pd.DataFrame({
        "seconds ago": ago * 2,
        "slots": [s.kv_used for s in samples] + [s.kv_total for s in samples],
        "series": ["in use"] * len(samples) + ["slots"] * len(samples),
    })  # fmt: skip
    return memory, speed, queue, kv
