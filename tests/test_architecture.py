"""The package's shape, enforced: imports point one way (no cycles, no upward imports), functions stay short.

``LAYERS`` is the single source of the layer order; docs/architecture.md explains it.
Every ``import`` in ``src/laperm`` counts, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "laperm"

# Lowest first. A module may import modules of its own layer or of lower layers, never of a
# higher one; a module's layer is that of the longest entry its dotted name starts with.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("laperm.reconnect",)),
    (
        "foundations",
        (
            "laperm.initial_values",
            "laperm.flat_sync",
            "laperm.optim_format",
            "laperm.optim_state",
            "laperm.optim_steps",
            "laperm.sharding",
            "laperm.checkpoint",
            "laperm.distributed",
            "laperm.init",
            "laperm.data",
            "laperm.export.codec",
            "laperm.layouts",
        ),
    ),
    ("components", ("laperm.models", "laperm.optim", "laperm.overview")),
    ("configuration", ("laperm.config", "laperm.launch")),
    ("construction", ("laperm.build", "laperm.rundir", "laperm.provenance")),
    ("files", ("laperm.export", "laperm.verify", "laperm.pack")),
    ("analysis", ("laperm.analysis",)),
    ("fast", ("laperm.fast",)),
    ("engine", ("laperm.engine", "laperm.train")),
    ("integrations", ("laperm.integrations",)),
    ("experiments", ("laperm.experiments",)),
    ("interface", ("laperm.cli", "laperm.__main__", "laperm")),
]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return best


def _known(module: str, modules: set[str]) -> str | None:
    """``module`` if it is one of the package's modules, else its parent (``from .x import name``)."""
    while module:
        if module in modules:
            return module
        module = module.rpartition(".")[0]
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported laperm module: line}}`` from every import statement, at any depth."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from . import x` imports the module x; `from .m import name` imports m
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
            for target in targets:
                found = _known(target, set(files)) if target.startswith("laperm") else None
                if found is not None and found != module:
                    edges.setdefault(found, node.lineno)
        graph[module] = edges
    return graph


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for module, edges in graph.items():
        for target, line in edges.items():
            # A package's __init__ re-exporting its own submodules is not an upward import.
            if target.startswith(module + "."):
                continue
            if layer_of(target) > layer_of(module):
                bad.append(
                    f"{module} (layer {LAYERS[layer_of(module)][0]}) imports {target} "
                    f"(layer {LAYERS[layer_of(target)][0]}) at line {line}"
                )
    return bad


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    # A package __init__ importing its own submodules is how packages work, not a cycle.
    edges = {m: sorted(t for t in ts if not t.startswith(m + ".")) for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in edges.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t) :] + [m, t] if t in path else [m, t]
            if t not in state and (found := visit(t, path + [m])) is not None:
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [])) is not None:
            return found
    return None


def test_no_upward_imports():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_an_upward_import_and_a_cycle():
    # The old knot: train -> rundir -> export -> train, with rundir <-> export.
    old = {
        "laperm.train": {"laperm.rundir": 1},
        "laperm.rundir": {"laperm.export": 2},
        "laperm.export": {"laperm.train": 3, "laperm.rundir": 4},
    }
    cycle = find_cycle(old)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert any("laperm.export (layer files) imports laperm.train" in b for b in upward_imports(old))
    assert find_cycle({"laperm.a": {"laperm.b": 1}, "laperm.b": {}}) is None
    assert layer_of("laperm.export.codec") < layer_of("laperm.export.fileformat") < layer_of("laperm.engine.trainer")


def test_no_function_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
