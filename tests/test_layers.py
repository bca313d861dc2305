"""The package's layers: every import in ``moalign/`` (module level, inside functions and under ``TYPE_CHECKING``
alike) goes to the same layer or one below, and no chain of imports comes back to where it started.

The layers, bottom up (docs/architecture.md draws the same picture)::

    errors, registry, bounded_yaml
    config, data, objectives, weighting, rl        the vocabulary: typed configs, examples, rewards, scalarizations
    diagnostics                                    what runs show: covariance law, interference, μ-PL
    models, theory                                 loading policies; exact softmax-policy problems
    engine                                         the native training loop, rollouts, checkpoints, run directories
    study, integrations                            grids of runs and reports; TRL
    cli, __main__                                  the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moalign"
LAYERS = [
    {"errors", "registry", "bounded_yaml", "__init__"},
    {"config", "data", "objectives", "weighting", "rl"},
    {"diagnostics"},
    {"models", "theory"},
    {"engine"},
    {"study", "integrations"},
    {"cli", "__main__"},
]
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The moalign modules ``path`` imports (``from moalign.x import y`` counts as ``moalign.x.y`` when that is a
    module, else ``moalign.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("moalign"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moalign") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF[parts[1]] if len(parts) > 1 else 0


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} → {d}" for m, deps in graph.items() for d in deps if d in graph and layer(d) > layer(m))


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_every_module_has_a_layer():
    assert sorted({m.split(".")[1] for m in import_graph() if "." in m} - set(LAYER_OF)) == []


def test_imports_go_to_the_same_layer_or_below():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert import_circles(import_graph()) == []


def test_the_checks_catch_a_planted_circle_and_upward_import(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("import torch\n\ndef f():\n    from moalign.cli import main\n    from moalign.engine import x\n")
    assert imported_modules(source, {"moalign.engine.x"}) == {"moalign.cli", "moalign.engine.x"}
    graph = {"moalign.engine.a": {"moalign.cli"}, "moalign.cli": {"moalign.engine.a"},
             "moalign.rl.b": {"moalign.weighting.c"}, "moalign.weighting.c": {"moalign.rl.b"}}
    assert upward_imports(graph) == ["moalign.engine.a → moalign.cli"]
    assert sorted(map(tuple, import_circles(graph))) == [("moalign.cli", "moalign.engine.a", "moalign.cli"),
                                                         ("moalign.rl.b", "moalign.weighting.c", "moalign.rl.b")]
