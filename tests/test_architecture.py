"""The house rules of ARCHITECTURE.md, checked on every module of the five packages.

* Imports point one way: store ← harvester; store ← trainer ← evaluator ← dynsae (evaluator may also
  use harvester). Every import counts: top level, inside functions (lazy), under TYPE_CHECKING, and
  strings that name one of our modules (importlib.import_module("evaluator.actor") is an import).
* One module touches fsspec: store/io.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "harvester", "trainer", "evaluator", "dynsae")
ALLOWED = {
    "store": set(),
    "harvester": {"store"},
    "trainer": {"store"},
    "evaluator": {"store", "trainer", "harvester"},
    "dynsae": {"store", "harvester", "trainer", "evaluator"},
}
NAMED_MODULE = re.compile(r"^(store|harvester|trainer|evaluator|dynsae)(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def modules() -> list[tuple[str, Path]]:
    return [(pkg, path) for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))]


def references(path: Path) -> set[str]:
    """Top-level packages this file imports or names (import statements anywhere, module-name strings)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and NAMED_MODULE.match(node.value):
            found.add(node.value.split(".")[0])
    return found


def test_imports_point_one_way():
    wrong = []
    for pkg, path in modules():
        for target in references(path) & set(PACKAGES):
            if target != pkg and target not in ALLOWED[pkg]:
                wrong.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not wrong, "imports that run back up: " + ", ".join(wrong)


def test_package_graph_has_no_cycle():
    graph = {pkg: set() for pkg in PACKAGES}
    for pkg, path in modules():
        graph[pkg] |= (references(path) & set(PACKAGES)) - {pkg}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert not [p for p in PACKAGES if reaches(p, p, set())]


def test_one_module_touches_fsspec():
    users = sorted(str(path.relative_to(ROOT)) for _, path in modules() if "fsspec" in references(path))
    assert users == ["store/io.py"]


def test_the_checker_sees_lazy_type_checking_and_string_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evaluator import metrics\n"
                      "def f():\n    import dynsae.cli\n    return __import__('importlib').import_module('harvester.job')\n")
    assert references(sample) >= {"evaluator", "dynsae", "harvester"}
