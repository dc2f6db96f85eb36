"""The package layout keeps its promises: pure domain types, and stages that import one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("app", "workers")


def _room(module: str) -> str:
    """The room a module lives in: app.ml.<stage>, app.<package>, or the top-level module itself."""
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    if len(parts) >= 3 and parts[1] == "ml":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _modules() -> dict[str, Path]:
    found = {}
    for package in SOURCE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in SOURCE_PACKAGES}


def _room_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        source = _room(module)
        for name in _imports(path):
            while name and name not in modules:  # `from app.x import function` names a module's attribute
                name = name.rpartition(".")[0]
            if name and _room(name) != source:
                graph.setdefault(source, set()).add(_room(name))
    return graph


def test_importing_the_domain_pulls_in_no_torch_and_no_sqlalchemy():
    code = ("import sys, importlib, pkgutil, app.domain\n"
            "for m in pkgutil.walk_packages(app.domain.__path__, 'app.domain.'): importlib.import_module(m.name)\n"
            "heavy = sorted(n for n in sys.modules if n.split('.')[0] in {'torch', 'transformers', 'sqlalchemy', 'fastapi'})\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_no_import_cycle_between_rooms():
    graph = _room_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(room: str, trail: list[str]) -> None:
        state[room] = 1
        for nxt in sorted(graph.get(room, ())):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [room, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[room] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])
    assert cycles == []


# Who may import whom. A room absent from a rule's value may not be imported by it.
_ALLOWED = {
    "app.domain": set(),
    "app.data": {"app.domain"},
    "app.core": set(),
    "app.ml.models": {"app.domain", "app.data"},
    "app.ml.text": {"app.domain"},
    # train -> infer: a linear head is fitted on the features serving computes (LabelScorer.features)
    "app.ml.train": {"app.domain", "app.data", "app.core", "app.ml.models", "app.ml.text", "app.ml.eval",
                     "app.ml.infer"},
    "app.ml.infer": {"app.domain", "app.core", "app.ml.models", "app.ml.text"},
    "app.ml.eval": {"app.domain", "app.data", "app.ml.models", "app.ml.infer"},
}


def test_each_room_imports_only_the_rooms_below_it():
    graph = _room_graph()
    wrong = {room: sorted(graph.get(room, set()) - allowed) for room, allowed in _ALLOWED.items()}
    assert {room: bad for room, bad in wrong.items() if bad} == {}


def test_no_module_imports_a_route_or_the_worker_loop():
    graph = _room_graph()
    importers_of_api = sorted(room for room, targets in graph.items() if "app.api" in targets)
    importers_of_workers = sorted(room for room, targets in graph.items() if "workers" in targets)
    assert importers_of_api == ["app.main"]
    assert importers_of_workers == []
