"""Security basics, checked over the whole source tree with the AST (so new code is held to them too)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [
        *(REPO / "src" / "busbench").rglob("*.py"),
        REPO / "train.py",
        REPO / "test.py",
        *(REPO / "bench").glob("*.py"),
    ]
)


def calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_sources_found():
    assert len(SOURCES) > 10


def test_no_eval_or_exec():
    offenders = [
        f"{p}:{c.lineno}"
        for p in SOURCES
        for c in calls(p)
        if isinstance(c.func, ast.Name) and c.func.id in {"eval", "exec"}
    ]
    assert offenders == []


def test_yaml_is_read_with_safe_load_only():
    unsafe = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"}
    offenders = [f"{p}:{c.lineno}" for p in SOURCES for c in calls(p) if dotted(c.func) in unsafe]
    assert offenders == []


def test_torch_load_always_weights_only():
    offenders = []
    for path in SOURCES:
        for call in calls(path):
            if dotted(call.func) != "torch.load":
                continue
            flag = next((k for k in call.keywords if k.arg == "weights_only"), None)
            if flag is None or not (isinstance(flag.value, ast.Constant) and flag.value.value is True):
                offenders.append(f"{path}:{call.lineno}")
    assert offenders == []


def test_no_pickle_loading():
    offenders = [
        f"{p}:{c.lineno}"
        for p in SOURCES
        for c in calls(p)
        if dotted(c.func) in {"pickle.load", "pickle.loads"}
    ]
    assert offenders == []
