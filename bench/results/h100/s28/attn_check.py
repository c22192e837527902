"""Session 28: the decode attention with the last program combining (the default) against the torch reference on the
4B's head shapes, eagerly and replayed from a CUDA graph 50 times as positions grow, with the counters checked back at
zero. Prints one JSON line."""

import json

import torch

from qwen3vl_webui.kernels import attention

torch.manual_seed(0)
out = []
for rows, max_len in ((1, 4096), (32, 2048)):
    q = torch.randn(rows, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, 8, max_len, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(rows, 8, max_len, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(100, 900, (rows,), device="cuda")
    res = torch.empty(rows, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    attention.decode_attention_triton(q, k, v, lengths, 128**-0.5, out=res)  # eager: makes the pool
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention.decode_attention_triton(q, k, v, lengths, 128**-0.5, out=res)
        graph.capture_begin()
        attention.decode_attention_triton(q, k, v, lengths, 128**-0.5, out=res)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    worst = 0.0
    for _ in range(50):
        lengths += 7
        graph.replay()
        ref = attention.decode_attention_reference(q, k, v, lengths, 128**-0.5).float()
        worst = max(worst, float((res.float() - ref).norm() / ref.norm()))
    torch.cuda.synchronize()
    counters = attention._counters_of.get(str(q.device))
    zero = counters is not None and int(counters.pool.abs().sum()) == 0
    zero = zero and all(int(c.abs().sum()) == 0 for c in counters.streams.values())
    out.append(dict(rows=rows, splits=attention.num_splits(rows, 8, max_len, torch.cuda.get_device_properties(0).multi_processor_count),
                    worst_relative_error=worst, counters_zero=zero, last_combines=attention.last_combines()))
print(json.dumps(out))
