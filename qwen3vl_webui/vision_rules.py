"""Qwen's vision budget rules, from qwen-vl-utils (the library that defines them), without importing it.

qwen-vl-utils 0.0.14 has one module, `vision_process`, and importing it (even `qwen_vl_utils.smart_resize`) imports
torch, torchvision and requests: seconds and ~3 GB of address space, over the video decoder child's RLIMIT_AS, and
torch where the UI and the planner promise none. Its fetchers (`fetch_image`, `fetch_video`, `process_vision_info`)
also open any path or URL they are handed, without timeouts. So `rules()` compiles only its pure functions and
constants from its source (ast, no module code runs) and nothing else of it: the app decodes media itself
(media.py, the PyAV child) and uses these for the arithmetic. Stdlib only: the decoder child loads this file by path.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import math
import typing
from pathlib import Path
from types import SimpleNamespace

# Pure functions of qwen_vl_utils.vision_process: arithmetic on numbers and dicts of numbers, no I/O.
FUNCTIONS = ("round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize", "smart_nframes")
# Its module-level constants, all literals.
CONSTANTS = (
    "MAX_RATIO",  # largest aspect ratio it resizes (200)
    "SPATIAL_MERGE_SIZE",
    "IMAGE_MIN_TOKEN_NUM",
    "IMAGE_MAX_TOKEN_NUM",
    "VIDEO_MIN_TOKEN_NUM",
    "VIDEO_MAX_TOKEN_NUM",
    "FPS",  # frames sampled per second of video (2.0)
    "FRAME_FACTOR",  # frames come in pairs: one temporal patch holds two (2)
    "FPS_MIN_FRAMES",
    "FPS_MAX_FRAMES",
)


class RulesUnavailable(RuntimeError):
    """qwen-vl-utils is missing, or its source no longer has what this module compiles from it."""


def source_path() -> Path:
    """qwen_vl_utils/vision_process.py, found without importing the package (find_spec runs none of its code)."""
    spec = importlib.util.find_spec("qwen_vl_utils")
    if spec is None or not spec.submodule_search_locations:
        raise RulesUnavailable("qwen-vl-utils is not installed (pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "vision_process.py"


@functools.cache
def rules() -> SimpleNamespace:
    """qwen-vl-utils' pure functions and constants (names in FUNCTIONS and CONSTANTS), compiled from its source."""
    path = source_path()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    kept: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
            kept.append(node)
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in CONSTANTS
            and isinstance(node.value, ast.Constant)
        ):
            kept.append(node)
    # What the kept code refers to: math, its logger (smart_nframes warns), and typing names in its annotations.
    namespace: dict[str, typing.Any] = {"math": math, "logger": logging.getLogger("qwen_vl_utils")}
    namespace.update({name: getattr(typing, name) for name in ("Any", "Dict", "List", "Optional", "Tuple", "Union")})
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102 - its own source
    missing = [name for name in (*FUNCTIONS, *CONSTANTS) if name not in namespace]
    if missing:
        raise RulesUnavailable(f"{path} no longer defines {', '.join(missing)}")
    return SimpleNamespace(**{name: namespace[name] for name in (*FUNCTIONS, *CONSTANTS)})
