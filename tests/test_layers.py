"""The layers' import rules, read from the source: every import of every module (ast), at module level, inside
functions and under TYPE_CHECKING alike, so that they stay true.

    base     config, precisions, ranges, conversation, media (+ media_child), vision_rules, planner, telemetry,
             heap, zerogpu, workers: plain data, arithmetic and threads
    kernels  attention, GEMV, int8, fusion, vision attention: a leaf, imports nothing of ours but kernels
    weights  loading, the demo and random weights, the chat template
    engine   the batch engine, plain generate, the engine process
    service  ChatService, ModelManager, admission, warm-up, prompt building
    ui       gradio: layout, handlers, panels, gradio_compat
    server   the HTTP front door and the process lifecycle
    wiring   the composition root, the only module that imports every layer
    cli      parses the flags and starts (wiring.run); __main__ calls it
    precompile  python -m qwen3vl_webui.precompile: the app's flags -> the engine's compile artifacts, ahead of time
    jobs     python -m qwen3vl_webui.jobs: resumable batch jobs with the app's flags (service/jobs.py does the work)

A module imports its own layer or lower ones only. Function-level imports count: a lazy import is still a
dependency. Each rule is also run once against a tree with a violating line added, to show it catches one.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "qwen3vl_webui"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
BASE = {
    "config", "precisions", "ranges", "conversation", "media", "media_child", "vision_rules", "planner",
    "telemetry", "heap", "zerogpu", "plan", "documents", "workers",
}  # fmt: skip
RANKS = {"base": 0, "kernels": 1, "weights": 2, "engine": 3, "service": 4, "ui": 5, "server": 6, "wiring": 7,
         "cli": 8, "precompile": 8, "jobs": 8, "__main__": 9}  # fmt: skip
GRADIO = ("gradio", "gradio_client", "fastapi", "starlette", "uvicorn")
TORCH = ("torch", "transformers", "triton", "bitsandbytes", "torchvision")
# Modules kept only to re-export another's names under an old path (none now); each must do nothing else.
ALIASES: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module, ours or not (for `from m import name`: m.name if that is a module of ours, else m)
    name: str | None  # the name imported from `target`, when it is not a module
    line: int
    module_level: bool
    type_only: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_tree(root: Path = ROOT) -> dict[str, str]:
    """{module name: source} of every .py file of the package."""
    return {module_name(p, root): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(module: str, source: str, modules: set[str]) -> list[Import]:
    found: list[Import] = []
    package = module if f"{module}.__init__" in modules or _is_package(module, modules) else module.rpartition(".")[0]

    def visit(node: ast.AST, depth: int, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_function = depth > 0 or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            typed = type_only or _is_type_checking(child)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, None, child.lineno, depth == 0, typed))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        found.append(Import(module, sub, None, child.lineno, depth == 0, typed))
                    else:
                        found.append(Import(module, base, alias.name, child.lineno, depth == 0, typed))
            visit(child, depth + (1 if in_function and depth == 0 else 0) if in_function else depth, typed)

    visit(ast.parse(source), 0, False)
    return found


def _is_package(module: str, modules: set[str]) -> bool:
    return any(m.startswith(module + ".") for m in modules)


def layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    if module == PACKAGE or part in BASE:
        return "base"
    if module in ALIASES:
        return layer(ALIASES[module])
    return part


def defined_names(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def violations(tree: dict[str, str]) -> list[str]:
    """Every broken rule in `tree` ({module: source}), one line each."""
    modules = set(tree)
    graph = [imp for module, source in tree.items() for imp in imports_of(module, source, modules)]
    ours = [i for i in graph if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]
    problems: list[str] = []

    def where(i: Import) -> str:
        return f"{i.importer}:{i.line}"

    for module in modules:
        if layer(module) not in RANKS:
            problems.append(f"{module}: no layer (add it to BASE or RANKS in tests/test_layers.py)")
    for i in ours:  # every import of ours resolves
        if i.target not in modules:
            problems.append(f"{where(i)} imports {i.target}, which does not exist")
        elif i.name not in (None, "*") and i.name not in defined_names(tree[i.target]):
            problems.append(f"{where(i)} imports {i.name} from {i.target}, which does not define it")
    for i in ours:  # nothing imports upward
        a, b = layer(i.importer), layer(i.target)
        if a in RANKS and b in RANKS and RANKS[b] > RANKS[a]:
            problems.append(f"{where(i)}: {a} imports upward from {b} ({i.target})")
        if a == "kernels" and b != "kernels":
            problems.append(f"{where(i)}: kernels import nothing of ours but kernels ({i.target})")
        if a == "cli" and b not in ("base", "wiring"):
            problems.append(f"{where(i)}: cli only parses and starts, through wiring ({i.target})")
    for i in graph:  # third-party imports by layer
        top, a = i.target.split(".")[0], layer(i.importer)
        if top in GRADIO and RANKS.get(a, 99) < RANKS["ui"]:
            problems.append(f"{where(i)}: {a} imports {i.target} (gradio and the web stack live in ui/ and server/)")
        if top in TORCH and a == "ui":
            problems.append(f"{where(i)}: ui imports {i.target}")
    for module in (m for m in modules if layer(m) == "ui"):  # and nothing ui imports at module level pulls torch in
        for reached in _module_level_closure(module, graph):
            for i in graph:
                if i.importer == reached and i.module_level and not i.type_only and i.target.split(".")[0] in TORCH:
                    problems.append(f"{module} imports {reached}, which imports {i.target} at module level")
    spanning = {"weights", "engine", "service", "ui", "server"}
    for module in modules:  # the composition root is the only module importing every layer
        layers = {layer(i.target) for i in ours if i.importer == module}
        if module != f"{PACKAGE}.wiring" and spanning <= layers | {layer(module)}:
            problems.append(f"{module} imports every layer: only wiring does")
    if f"{PACKAGE}.wiring" in modules:
        missing = spanning - {layer(i.target) for i in ours if i.importer == f"{PACKAGE}.wiring"}
        if missing:
            problems.append(f"wiring no longer builds every layer: it imports nothing of {sorted(missing)}")
    for alias, target in ALIASES.items():
        body = [n for n in ast.parse(tree.get(alias, "")).body if not isinstance(n, ast.Expr)]
        if alias in tree and not all(isinstance(n, ast.ImportFrom) and n.module == target for n in body):
            problems.append(f"{alias} must only re-export {target}")
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(ours)]
    return sorted(set(problems))


def _module_level_closure(start: str, graph: list[Import]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [i.target for i in graph if i.importer == module and i.module_level and not i.type_only]
        parent = module.rpartition(".")[0]
        if parent.startswith(PACKAGE):
            todo.append(parent)  # importing a module runs its packages' __init__ first
    return seen


def _cycles(ours: list[Import]) -> list[list[str]]:
    """Circles among modules through any imports (a module importing its own package's __init__ aside)."""
    edges: dict[str, set[str]] = {}
    for i in ours:
        if i.target != i.importer and not i.importer.startswith(i.target + "."):
            edges.setdefault(i.importer, set()).add(i.target)
    found, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    return found


# ------------------------------------------------------------------------------- the rules hold


def test_the_package_keeps_its_layers() -> None:
    problems = violations(read_tree())
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer_and_wiring_builds_them_all() -> None:
    tree = read_tree()
    assert {layer(m) for m in tree} == set(RANKS)
    assert all(layer(m) in RANKS for m in tree)


# ------------------------------------------------------------------------------- and catch a break

BREAKS = {
    "engine imports gradio": (f"{PACKAGE}.engine.decoders", "def _f():\n    import gradio\n", "engine imports gradio"),
    "service imports gradio": (f"{PACKAGE}.service.chat", "import gradio as gr\n", "service imports gradio"),
    "ui imports torch": (f"{PACKAGE}.ui.panels", "def _f():\n    import torch\n", "ui imports torch"),
    "ui reaches torch": (
        f"{PACKAGE}.ui.panels", "from qwen3vl_webui.kernels import int8\n", "which imports torch at module level"
    ),
    "kernels import ours": (
        f"{PACKAGE}.kernels.fusion", "from qwen3vl_webui import ranges\n", "kernels import nothing of ours"
    ),
    "engine imports service": (
        f"{PACKAGE}.engine.generate", "def _f():\n    from qwen3vl_webui.service import chat\n", "engine imports upward"
    ),
    "an import circle": (
        f"{PACKAGE}.weights.model", "def _f():\n    from qwen3vl_webui.weights import loading\n", "import circle"
    ),
    "a dangling import": (
        f"{PACKAGE}.service.warmup", "from qwen3vl_webui.engine.generation import SamplingParams\n", "does not exist"
    ),
    "cli wires": (f"{PACKAGE}.cli", "from qwen3vl_webui.service import manager\n", "cli only parses and starts"),
}


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_a_violating_import_fails(rule: str) -> None:
    module, line, expected = BREAKS[rule]
    tree = read_tree()
    tree[module] = tree[module] + "\n" + line
    problems = violations(tree)
    assert any(expected in p for p in problems), problems
