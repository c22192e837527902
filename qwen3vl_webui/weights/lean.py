"""Keeps transformers from importing optional packages that a process of ours never uses: seconds of every start.

transformers imports an optional package wherever it is installed, whether the process needs it or not:
- scipy, in every process that loads a model or a processor: `modeling_utils` imports the losses, whose object-
  detection matchers import `scipy.optimize` (0.4 s of a 2-core VM's 3.5 s import of the processor's modules);
- torchvision, in the engine process too, which never preprocesses a picture (the front end does): the losses import
  `image_transforms`, which imports torchvision (0.4 s more, and torchvision's models import `torch._dynamo`).

`skip(*packages)` makes transformers' availability checks answer False for those packages in this process, before
transformers' modules that ask are imported (modules bind the check when they import, so it must come first: the
engine process hides both first thing in `worker.main`; `load_front`, `load_model` and the demo's writer hide scipy
before their transformers imports). It never
hides a package from anything but transformers, and changes no behaviour that this app uses: no object-detection
loss is ever computed, and the engine process loads a tokenizer, not the processor (`load_model(tokenizer_only=
True)`), so nothing there reaches for torchvision. `QWEN3VL_LEAN_IMPORTS=0` turns it off (every package imported,
as before), for an A/B (`python -m bench.import_check`) or should a future transformers need one of them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

NEVER_USED = ("scipy",)  # by any process of ours (the front end's processor needs torchvision: its video processor)
ENGINE_PROCESS = ("scipy", "torchvision")  # a model's forward and a tokenizer: neither is used
# transformers' availability check of each package (transformers/utils/import_utils.py)
_CHECKS = {"scipy": "is_scipy_available", "torchvision": "is_torchvision_available"}


def enabled() -> bool:
    return os.environ.get("QWEN3VL_LEAN_IMPORTS", "1") != "0"


def _unavailable(*_args: Any, **_kwargs: Any) -> bool:
    return False


def skip(*packages: str) -> list[str]:
    """transformers treats `packages` as not installed in this process from now on; returns the ones it applied to
    (none when turned off, or when a module that would have imported one is already in: too late to help)."""
    if not enabled():
        return []
    import transformers.utils as exported
    import transformers.utils.import_utils as checks

    done = []
    for package in packages:
        name = _CHECKS[package]
        if getattr(checks, name) is _unavailable:
            done.append(package)
            continue
        if package in sys.modules:  # already imported by someone: hiding it now saves nothing
            log.debug("lean imports: %s is already imported; transformers keeps using it", package)
            continue
        setattr(checks, name, _unavailable)  # import_utils' own helpers look the name up when called
        setattr(exported, name, _unavailable)  # what `from ..utils import is_x_available` binds
        done.append(package)
    return done


def hidden(package: str) -> bool:
    """Whether `skip` hides `package` from transformers in this process."""
    import transformers.utils.import_utils as checks

    return getattr(checks, _CHECKS[package]) is _unavailable
