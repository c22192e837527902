"""What the decode kernels' launch configs are keyed by, and a sweep's best configs read back from its report."""

from __future__ import annotations

import json
import os
from typing import Any


def row_class(rows: int) -> int:
    """The row classes the kernels are tuned for: one row (GEMV), up to 16, more (skinny tiles)."""
    return 1 if rows == 1 else 16 if rows <= 16 else 32


MIN_PROGRAMS = 264  # two per SM of an H100 / H200: below it the decode kernels' defaults split K


def default_split(programs: int, units: int, least: int) -> int:
    """How many ways to split K's `units` (groups, blocks) so that about MIN_PROGRAMS programs run (1 where the tiles
    alone give that many), each split keeping `least` units at least."""
    split = 1
    while programs * split < MIN_PROGRAMS and units // (split * 2) >= least:
        split *= 2
    return split


def split_k(asked: int, programs: int, units: int, least: int) -> tuple[int, int]:
    """(splits, units per split) for a launch of `programs` tiles over K's `units`: `asked` ways (0: default_split's),
    at most one per unit, and none empty."""
    split = max(1, min(asked or default_split(programs, units, least), units))
    per_split = -(-units // split)
    return -(-units // per_split), per_split


def load(fmt: str, make: Any, table: dict[tuple[int, int, int], Any], path: str | None = None) -> int:
    """Adds `fmt`'s best configs from a `bench.quant_check` report (its "tuned" section) to `table`, each built by
    `make(*cfg)`; returns how many. `path` defaults to $QWEN3VL_KERNEL_TUNING, so a run can use the sweep it just
    made (the tuned tables in the kernel modules are the kept copy); none named, or no such file: nothing."""
    path = path or os.environ.get("QWEN3VL_KERNEL_TUNING")
    if not path or not os.path.isfile(path):
        return 0
    with open(path) as f:
        found = json.load(f).get("tuned", {}).get(fmt, {})
    for shape, cfg in found.items():
        m, n, k = (int(v) for v in shape.split(","))
        table[(m, n, k)] = make(*cfg)
    return len(found)
