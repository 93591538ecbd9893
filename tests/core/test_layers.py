"""Imports point down the layers only: cli -> {report, engine} -> methods -> {data, models, losses} -> base.

``report`` reads what the engine wrote, so it sits above it. The base layer (config, metrics, errors and the small
utilities beside them) imports nothing from any package above it. Every ``import`` in every module of
``src/busbench`` counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

#: layer of each top-level part of busbench; a module may import only from its own layer or below
LAYERS: dict[str, int] = {
    "<root>": 0,  # busbench/__init__.py (the version)
    "errors": 0,
    "atomic": 0,
    "locking": 0,
    "config": 0,
    "metrics": 0,
    "plugins": 0,
    "data": 1,
    "models": 1,
    "losses": 1,
    "methods": 2,
    "engine": 3,
    "report": 4,
    "cli": 5,
    "__main__": 5,
}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, src: Path) -> bool:
    base = src.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path, src: Path) -> set[str]:
    """Every ``busbench`` module ``path`` imports (``from busbench import x`` counts as ``busbench.x`` when ``x``
    is a module, else as ``busbench``)."""
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if _is_module(full, src) else target)
    return {m for m in found if m == "busbench" or m.startswith("busbench.")}


def part_of(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "<root>"


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """``module -> imported busbench modules`` for every module under ``src/busbench``."""
    return {
        _module_name(path, src): imported_modules(path, src)
        for path in sorted((src / "busbench").rglob("*.py"))
    }


@functools.cache
def source_graph() -> dict[str, frozenset[str]]:
    """The import graph of the package under test, parsed once for all the tests here."""
    return {module: frozenset(targets) for module, targets in import_graph().items()}


def upward_imports(graph: dict[str, set[str]] | dict[str, frozenset[str]]) -> list[str]:
    """``importer -> imported`` for every import that points to a higher layer (or to a part with no layer)."""
    bad = []
    for module, targets in graph.items():
        own = LAYERS.get(part_of(module))
        for target in sorted(targets):
            theirs = LAYERS.get(part_of(target))
            if own is None or theirs is None or theirs > own:
                bad.append(f"{module} -> {target}")
    return bad


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in source_graph()}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS in {__file__}"


def test_imports_point_down_only():
    assert upward_imports(source_graph()) == []


def test_the_named_rules_hold():
    graph = source_graph()

    def imports(importer: str, *targets: str) -> list[str]:
        return [
            f"{m} -> {t}"
            for m, ts in graph.items()
            if part_of(m) == importer
            for t in ts
            if part_of(t) in targets
        ]

    assert imports("engine", "report", "cli") == []
    assert imports("methods", "engine", "report", "cli") == []
    for lower in ("data", "models", "losses"):
        assert imports(lower, "engine", "report", "methods", "cli") == []
    for base in ("config", "metrics", "errors"):
        assert imports(base, "data", "models", "losses", "methods", "engine", "report", "cli") == []


def test_the_scanner_sees_real_and_lazy_imports():
    graph = source_graph()
    edges = {(part_of(m), part_of(t)) for m, ts in graph.items() for t in ts}
    # downward edges the code is known to have, so an empty graph cannot pass the tests above
    assert {("engine", "data"), ("methods", "models"), ("report", "engine"), ("engine", "methods")} <= edges


def test_an_upward_import_is_caught(tmp_path):
    pkg = tmp_path / "busbench"
    for sub in ("data", "engine", "report"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "train.py").write_text("def fit():\n    return 1\n")
    (pkg / "report" / "tables.py").write_text("from busbench.engine.train import fit\n")
    (pkg / "data" / "loader.py").write_text(
        "def later():\n    from ..engine import train  # lazy and relative\n    return train\n"
    )
    assert upward_imports(import_graph(tmp_path)) == ["busbench.data.loader -> busbench.engine.train"]
