"""The house rules of ARCHITECTURE.md, checked on every module of the five packages.

* Imports point one way: store ← harvester; store ← trainer ← evaluator ← dynsae (evaluator may also
  use harvester). Every import counts: top level, inside functions (lazy), under TYPE_CHECKING, and
  strings that name one of our modules (importlib.import_module("evaluator.task") is an import).
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_references(path: Path, ours: set[str]) -> set[str]:
    """Our modules this file imports or names: ``import a.b``, ``from a import b`` (the module a.b when it
    is one, else a), relative imports resolved, module-name strings; anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in ours else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and NAMED_MODULE.match(node.value):
            found.add(node.value)
    return {m for m in found if m in ours and m != here}


def module_graph() -> dict[str, set[str]]:
    paths = [path for _, path in modules()]
    ours = {module_name(p) for p in paths}
    return {module_name(p): module_references(p, ours) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_circle_between_modules():
    """Two modules never import each other, directly or round a loop (lazy imports included). A plugin
    registry finds its package's modules by discovery (importlib on computed names), which is no edge."""
    assert not cycles(module_graph()), "module circles: " + "; ".join(" <-> ".join(c) for c in cycles(module_graph()))


def test_the_circle_checker_finds_a_loop(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
