"""Where a gradio chat request's time goes between /queue/join and our handler's first line (tiny model, CPU).

    python bench/results/cpu/s17_gradio_path_probe.py CACHE_DIR [CHATS]    # QWEN3VL_GRADIO_INLINE=0: gradio's threads

Session 17's probe (bench/RESULTS.md): wraps gradio's Queue.process_events, call_process_api, process_api,
preprocess_data, call_function and the handler's first line with timestamps, runs CHATS closed-loop chats through the
page's protocol for 12 s and prints each stage's p50 / p90. CACHE_DIR holds the tiny checkpoint (demo-tiny-v1).
"""
import contextvars
import functools
import statistics
import sys
import threading
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from pathlib import Path

import gradio.blocks as gb
import gradio.queueing as gq
import gradio.route_utils as ru

from qwen3vl_webui.service import metrics as sm

CV = contextvars.ContextVar("probe", default=None)
ROWS = []
LOCK = threading.Lock()

def stamp(name):
    d = CV.get()
    if d is not None and name not in d:
        d[name] = time.monotonic()

def wrap_async(owner, attr, name):
    orig = getattr(owner, attr)
    @functools.wraps(orig)
    async def w(*a, **k):
        stamp(name + ">")
        try:
            return await orig(*a, **k)
        finally:
            stamp(name + "<")
    setattr(owner, attr, w)

orig_pe = gq.Queue.process_events
async def pe(self, events, batch, begin_time, fn):
    d = {"pe": time.monotonic(), "enq": events[0].enqueue_time if hasattr(events[0], "enqueue_time") else None}
    req = events[0].request
    d["arrived"] = sm.arrived_at(req) if req is not None else None
    CV.set(d)
    try:
        return await orig_pe(self, events, batch, begin_time, fn)
    finally:
        if d.get("handler"):
            with LOCK:
                ROWS.append(d)
gq.Queue.process_events = pe
orig_push = gq.Queue.push
async def push(self, body, request, username):
    r = await orig_push(self, body, request, username)
    return r
wrap_async(ru, "call_process_api", "cpa")
wrap_async(gb.Blocks, "process_api", "papi")
wrap_async(gb.Blocks, "preprocess_data", "pre")
wrap_async(gb.Blocks, "call_function", "call")
wrap_async(gb.Blocks, "postprocess_data", "post")
orig_started = sm.DoorMetrics.started
def started(self, door, arrived, now=None):
    stamp("handler")
    return orig_started(self, door, arrived, now)
sm.DoorMetrics.started = started

from bench import load_test  # noqa: E402 - after sys.path names the repository
from tests.conftest import start_app  # noqa: E402

ckpt = Path(sys.argv[1])
chats = int(sys.argv[2]) if len(sys.argv) > 2 else 16
app, url = start_app(ckpt, "--engine", "batch", "--max-concurrency", str(chats), "--queue-size", str(2 * chats), "--max-new-tokens", "64")
stop = time.monotonic() + 12
def one():
    chat = load_test.GradioRawDoor(url, 0.0).connect()
    try:
        while time.monotonic() < stop:
            list(chat.stream("Name the colours you see in this long sentence please.", None, 64, 0.7, 120))
    finally:
        chat.close()
ts = [threading.Thread(target=one) for _ in range(chats)]
for t in ts:
    t.start()
for t in ts:
    t.join()
for fn in app.demo.fns.values():
    if fn.api_name == "chat":
        print("chat fn inputs", len(fn.inputs), [type(b).__name__ for b in fn.inputs], "outputs", [type(b).__name__ for b in fn.outputs])
app.close()
keys = ["arrived", "pe", "cpa>", "papi>", "pre>", "pre<", "call>", "handler"]
print(len(ROWS), "requests")
for a, b in zip(keys, keys[1:]):
    v = [r[b] - r[a] for r in ROWS if r.get(a) is not None and r.get(b) is not None]
    if v:
        v.sort()
        print(f"{a:>8} -> {b:<8} p50 {1000*statistics.median(v):7.1f} ms  p90 {1000*v[int(0.9*len(v))]:7.1f} ms  n={len(v)}")
