"""Session 13's raw-HTTP probe of the gradio door (no gradio_client): N threads, each a closed loop of
POST /gradio_api/queue/join, then GET /gradio_api/queue/data read to the end; TTFT = join to the first
`process_generating` that is not a ⏳ status. The join body is one gradio_client sent to /chat (captured with an httpx
hook into JOIN_BODY); this sets max_new_tokens 64 and temperature 0.7.

    python bench/results/cpu/s13_sse_probe.py URL JOIN_BODY CHATS SECONDS
"""

import json
import sys
import threading
import time
import uuid

import httpx

url, body_path, chats, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
base = json.load(open(body_path))
base["data"][9], base["data"][3] = 64, 0.7  # /chat's max_new_tokens and temperature inputs
ttfts: list[float] = []


def worker() -> None:
    with httpx.Client(base_url=url) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body = dict(base, session_hash=uuid.uuid4().hex[:11])
            t0 = time.monotonic()
            http.post("/gradio_api/queue/join", json=body)
            first = None
            with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": body["session_hash"]}) as s:
                for line in s.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:]).get("msg")
                    if msg == "process_generating" and first is None and "⏳" not in line and "\\u23f3" not in line:
                        first = time.monotonic() - t0
                    if msg in ("process_completed", "close_stream"):
                        break
            if first is not None:
                ttfts.append(first)


threads = [threading.Thread(target=worker) for _ in range(chats)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ttfts.sort()
print(json.dumps({"chats": chats, "seconds": seconds, "answers": len(ttfts),
                  "ttft_p50": round(ttfts[len(ttfts) // 2], 4), "ttft_p95": round(ttfts[int(len(ttfts) * 0.95)], 4)}))
