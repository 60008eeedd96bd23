"""The package layout keeps its promises (docs/architecture.md): imports point down the layers,
no import cycles, no module touches another module's private names, no file over 500 lines.

Read from the source with `ast` (nothing is imported), so the test is fast and exact.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "tierflow"

# Lowest first: a module may import its own layer and the layers before it.
LAYERS = [
    ("base", ["tierflow.errors", "tierflow.config", "tierflow.version"]),
    ("core", ["tierflow.core"]),
    ("memory", ["tierflow.memory"]),
    ("dist", ["tierflow.dist"]),
    ("runtime", ["tierflow.runtime"]),
    ("services", ["tierflow.checkpoint", "tierflow.infer"]),
    ("api", ["tierflow", "tierflow.api", "tierflow.models", "tierflow.data"]),
    ("integrations", ["tierflow.integrations"]),
    ("apps", ["tierflow.cli", "tierflow.bench", "tierflow.__main__"]),
]
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return rank


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str):
    """(imported tierflow module, [names imported from it], line) for every import, anywhere."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tierflow"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if not target.startswith("tierflow"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for sub in submodules:
                yield sub, [], node.lineno
            others = [n for n in names if f"{target}.{n}" not in MODULES]
            if others or not submodules:
                yield target, others, node.lineno


def known(target: str) -> str:
    """The module an import refers to (a name imported from a package is the package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_the_layers():
    upward = []
    for module in MODULES:
        if module == "tierflow":  # the package's front door re-exports the API of every layer
            continue
        for target, _names, line in imports_of(module):
            target = known(target)
            if target and layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target} "
                              f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: sorted({known(t) for t, _n, _l in imports_of(m) if known(t) and known(t) != m})
             for m in MODULES if m != "tierflow"}
    graph = {m: [t for t in targets if t != "tierflow"] for m, targets in graph.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _private_names() -> set[str]:
    """Private names tierflow defines: module-level functions, classes and assignments, methods,
    and attributes set on self."""
    names = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_touches_another_modules_private_names():
    private = _private_names()
    found = []
    for module, path in MODULES.items():
        for target, names, line in imports_of(module):
            found += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")
                      and not n.startswith("__")]
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{module}:{node.lineno} reads .{node.attr} of another object")
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it by responsibility"


def test_the_engine_only_coordinates():
    lines = len(MODULES["tierflow.runtime.engine"].read_text().splitlines())
    assert lines <= 265, f"runtime/engine.py has {lines} lines: move work into the part it belongs to"


def test_the_core_runs_no_threads_and_no_gpu_work():
    """core/ is pure planning: figures in, placement out."""
    banned = ("threading", "concurrent", "torch.cuda.Stream", "torch.cuda.Event", "record_stream")
    for module, path in MODULES.items():
        if module.startswith("tierflow.core"):
            text = path.read_text()
            assert not [b for b in banned if b in text], f"{module} uses {[b for b in banned if b in text]}"
