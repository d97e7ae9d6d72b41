"""``python_docs``: Python's own documentation, offline (no download).

The help topics bundled with Python (``pydoc_data.topics``, sorted by topic) followed by the
docstrings of the standard library (module, then public classes and functions, modules sorted by
name), read with ``ast`` from the ``.py`` files of the standard library directory without
importing anything.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from harvester.sources import SourceConfig, register_source


@register_source
class PythonDocsSource(SourceConfig):
    """Python's documentation (no fields: the text is the running Python's)."""

    kind: Literal["python_docs"] = "python_docs"
    legacy_hash = True

    def display_name(self) -> str:
        return f"python_docs-{sys.version_info.major}.{sys.version_info.minor}"

    def resolved_revision(self) -> str | None:
        return sys.version.split()[0]

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        return python_doc_texts()


def python_doc_texts() -> Iterator[str]:
    """Python's own documentation, in a fixed order (see the module docstring)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        yield from module_docstrings(module)


def module_docstrings(module: str) -> Iterator[str]:
    """Docstrings of a top-level stdlib module (module, then public defs/classes), without importing it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / f"{module}.py", stdlib / module / "__init__.py"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:  # a C extension module: no Python source
        return
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield f"{module}\n\n{doc}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield f"{module}.{node.name}\n\n{doc}"
