"""Fault injection for tests and device checks (a CUDA OOM or a delay at prefill or at each decode step), and the one
test of whether an error is an out-of-memory error, which every OOM path (the service, the warm-up, the batch engine)
asks.

A no-op unless armed, either in-process (`FaultInjector.arm`) or for a whole process through the
environment variable QWEN3VL_FAULTS, a comma-separated list of rules:

    oom@prefill            every prefill raises torch.cuda.OutOfMemoryError
    oom@prefill>1024       ... only when the prompt has more than 1024 tokens
    oom@decode*1           the first decode step of the next request raises, once
    delay@prefill=3        sleep 3 s before each prefill (a slow GPU, a long request)
    delay@decode=0.05      sleep 50 ms at every decode step

It exists so that the error paths (OOM recovery, timeouts, shutdown with running requests) run
for real on a CPU test machine: the code under test is the app's, only the failure is staged.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

ENV_VAR = "QWEN3VL_FAULTS"
# build: prompt building, before the request waits for a GPU slot.
POINTS = ("build", "prefill", "decode")
_RULE = re.compile(r"^(oom|delay)@(build|prefill|decode)(?:>(\d+))?(?:=([0-9.]+))?(?:\*(\d+))?$")


@dataclass
class _Rule:
    kind: str  # "oom" or "delay"
    point: str  # one of POINTS
    over_tokens: int = 0  # fires only when the prompt is longer than this
    seconds: float = 0.0  # for delays
    times: int | None = None  # None = every time


class FaultInjector:
    """Thread-safe; `fire(point, prompt_tokens)` is called by generation at each fault point."""

    def __init__(self, rules: list[_Rule] | None = None) -> None:
        self._rules = list(rules or [])
        self._lock = threading.Lock()
        self.fired = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultInjector:
        spec = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        return cls(parse_rules(spec))

    @property
    def armed(self) -> bool:
        return bool(self._rules)

    def arm(
        self, kind: str, point: str, *, over_tokens: int = 0, seconds: float = 0.0, times: int | None = None
    ) -> None:
        if kind not in ("oom", "delay") or point not in POINTS:
            raise ValueError(f"unknown fault {kind}@{point}")
        with self._lock:
            self._rules.append(_Rule(kind, point, over_tokens, seconds, times))

    def disarm(self) -> None:
        with self._lock:
            self._rules.clear()

    def fire(self, point: str, prompt_tokens: int) -> None:
        """Sleeps for matching delay rules, then raises for a matching OOM rule."""
        if not self._rules:  # the common case: nothing armed, no lock
            return
        delay, oom = 0.0, False
        with self._lock:
            for rule in list(self._rules):
                if rule.point != point or prompt_tokens <= rule.over_tokens:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                if rule.kind == "delay":
                    delay += rule.seconds
                else:
                    oom = True
                self.fired += 1
        if delay:
            time.sleep(delay)
        if oom:
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {point} by {ENV_VAR})"
            )


def parse_rules(spec: str) -> list[_Rule]:
    rules: list[_Rule] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = _RULE.match(item)
        if not match:
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r} (e.g. oom@prefill>1024, delay@decode=0.05, oom@decode*1)")
        kind, point, over, seconds, times = match.groups()
        rules.append(_Rule(kind, point, int(over or 0), float(seconds or 0.0), int(times) if times else None))
    return rules


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, real or injected here; torch is imported only to look."""
    import torch

    if getattr(exc, "out_of_memory", False):  # the engine process's, told across (protocol.RemoteError)
        return True
    return isinstance(exc, torch.OutOfMemoryError)  # torch.cuda.OutOfMemoryError is the same class
