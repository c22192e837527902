"""GPU check of the runtime precision switch and the live panel on the real 4B architecture.

    python -m bench.switch_check --checkpoint /tmp/qwen3vl-4b-random [--write]

1. loads int4 through ModelManager, shows the panel (NVML + torch figures);
2. switches int4 -> bf16 -> int4 and prints each report (VRAM before/after);
3. fills the GPU so that bf16 no longer fits, asks for bf16 again: it must be refused, int4 kept and working.
"""

from __future__ import annotations

import argparse
import sys

GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default="/tmp/qwen3vl-4b-random")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    from qwen3vl_webui.conversation import UserMessage
    from qwen3vl_webui.engine.request import SamplingParams
    from qwen3vl_webui.service.admission import Scheduler
    from qwen3vl_webui.service.chat import ChatService
    from qwen3vl_webui.service.manager import ModelManager, SwitchRefused
    from qwen3vl_webui.service.prompt import ChatRequest
    from qwen3vl_webui.telemetry import GenerationStats, GpuProbe
    from qwen3vl_webui.ui.panels import format_panel

    if args.write:
        from qwen3vl_webui.weights.tiny_model import write_checkpoint

        write_checkpoint(args.checkpoint, preset="4b", dtype="bfloat16", device="cuda")
    scheduler = Scheduler(1, 4)
    manager = ModelManager(args.checkpoint, "int4-bnb", "cuda", "sdpa", scheduler)
    service = ChatService(manager, scheduler, GenerationStats(), GpuProbe())
    manager.load()
    request = ChatRequest(UserMessage("Say something."), sampling=SamplingParams(max_new_tokens=16, temperature=0.0))
    list(service.chat(request))
    # Random 4B weights mostly pick ids beyond the tiny tokenizer's vocabulary (empty text): count tokens.
    print("int4 answer tokens:", service.stats.last.new_tokens)
    print(format_panel(service.snapshot()))
    for target in ("bf16", "int4-bnb"):
        report = manager.switch(target)
        print("SWITCH", report.describe())
        assert manager.current().precision == target
    free, total = torch.cuda.mem_get_info()
    # Leave 5 GiB free: int4 (3.3 GiB) is loaded, bf16 needs 8.3 GiB > 5 + 3.3 ... x 0.9 headroom.
    filler = torch.empty(free - 5 * GIB, dtype=torch.uint8, device="cuda")
    print(f"filled {filler.numel() / GIB:.1f} GiB; free now {torch.cuda.mem_get_info()[0] / GIB:.1f} GiB")
    try:
        manager.switch("bf16")
        print("REFUSAL CHECK FAILED: bf16 was loaded")
        sys.exit(1)
    except SwitchRefused as exc:
        print("REFUSED as expected:", exc)
    assert manager.current().precision == "int4-bnb"
    list(service.chat(request))
    print("after refusal, int4 still answers: tokens =", service.stats.last.new_tokens)
    del filler


if __name__ == "__main__":
    main()
