"""Cost per million output tokens from measured engine figures: the seed's cost table, reproduced from result files.

    python -m bench.cost --gpu-hourly-cost 3.50 bench/results/h200/matrix_bf16_q.json bench/results/h200/matrix_int4_q.json

For each matrix file (one precision each) and each stream count it prints total tok/s and what a million output
tokens cost at the stated price per GPU hour, when the GPU is kept busy at that rate (the same arithmetic as the
panel's and /metrics' `qwen3vl:` cost figures: service/metrics.py `cost_per_million`). A price is an assumption you
state; the tok/s are the files'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qwen3vl_webui.service.metrics import cost_per_million


def rows(paths: list[str], hourly: float) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        for row in report.get("engine", []):
            tok_s = float(row["total_tok_s"])
            out.append(dict(file=Path(path).name, device=report.get("device"), precision=report.get("precision"),
                            streams=int(row["streams"]), tok_s=tok_s, weights_gib=report.get("weights_gib"),
                            usd_per_million=round(cost_per_million(hourly, tok_s), 4)))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench.matrix JSON files")
    ap.add_argument("--gpu-hourly-cost", type=float, required=True, help="USD per GPU hour (your price)")
    args = ap.parse_args(argv)
    table = rows(args.files, args.gpu_hourly_cost)
    print(f"at ${args.gpu_hourly_cost:.2f} per GPU hour")
    print(f"{'precision':10} {'streams':>7} {'tok/s':>9} {'USD / M tokens':>15} {'weights GiB':>11}  file")
    for r in table:
        print(f"{r['precision']:10} {r['streams']:7d} {r['tok_s']:9.1f} {r['usd_per_million']:15.4f} "
              f"{r['weights_gib'] or 0:11.2f}  {r['file']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
