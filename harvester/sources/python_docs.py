"""``python_docs``: Python's own documentation, offline (no download).

The help topics bundled with Python (``pydoc_data.topics``, sorted by topic) followed by the
docstrings of the standard library (module, then public classes and functions, modules sorted by
name), read with ``ast`` from the ``.py`` files of the standard library directory without
importing anything.

``label_by: family`` labels each document for sparse probing (docs/metrics.md): a help topic is
class ``language`` (the language reference), a docstring the family of its top-level module in the
fixed map :data:`MODULE_FAMILIES` (text, data formats, numbers and containers, network, OS and
files, concurrency, development tools, GUI); docstrings of modules outside the map are left out.
The labelled documents come in a fixed seeded permutation (seed 0), so that ``max_tokens`` samples
every class rather than the first few in alphabetical order.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from harvester.sources import SourceConfig, register_source

LANGUAGE = "language"  # the class of the pydoc help topics
#: Module family of each top-level standard-library module (the classes of ``label_by: family``).
MODULE_FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("re", "string", "difflib", "textwrap", "unicodedata", "stringprep", "codecs", "encodings", "locale",
             "gettext", "shlex", "html"),
    "data formats": ("json", "csv", "pickle", "pickletools", "copyreg", "shelve", "marshal", "dbm", "sqlite3",
                     "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "configparser", "tomllib", "plistlib",
                     "base64", "binascii", "struct", "netrc", "mailbox", "mimetypes", "quopri", "uu", "xdrlib",
                     "wave", "aifc", "sunau", "chunk", "xml"),
    "numbers and containers": ("math", "cmath", "decimal", "fractions", "numbers", "random", "statistics",
                               "datetime", "calendar", "zoneinfo", "collections", "heapq", "bisect", "array",
                               "copy", "pprint", "reprlib", "enum", "graphlib", "functools", "itertools",
                               "operator", "weakref", "types", "dataclasses"),
    "network": ("socket", "ssl", "select", "selectors", "http", "urllib", "email", "smtplib", "poplib", "imaplib",
                "ftplib", "nntplib", "telnetlib", "socketserver", "xmlrpc", "ipaddress", "webbrowser", "wsgiref",
                "cgi", "cgitb", "uuid"),
    "os and files": ("os", "io", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "stat", "filecmp",
                     "fileinput", "platform", "ctypes", "sysconfig", "site", "posixpath", "ntpath", "getpass",
                     "signal", "mmap", "pty", "tty", "curses", "mailcap"),
    "concurrency": ("threading", "multiprocessing", "concurrent", "asyncio", "subprocess", "sched", "queue",
                    "contextvars"),
    "development tools": ("unittest", "doctest", "pdb", "bdb", "profile", "cProfile", "pstats", "trace", "timeit",
                          "inspect", "ast", "dis", "tokenize", "typing", "warnings", "logging", "traceback",
                          "importlib", "pkgutil", "zipimport", "argparse", "optparse", "getopt", "code", "codeop",
                          "compileall", "py_compile", "symtable", "pydoc", "venv", "tracemalloc", "abc",
                          "contextlib", "linecache", "modulefinder", "runpy"),
    "gui": ("tkinter", "turtle", "turtledemo", "idlelib"),
}


@register_source
class PythonDocsSource(SourceConfig):
    """Python's documentation (the text is the running Python's); ``label_by: family`` labels it."""

    kind: Literal["python_docs"] = "python_docs"
    legacy_hash = True
    label_by: Literal["family"] | None = None  # class = the module family (see the module docstring)
    label_keys = ("label_by",)

    def display_name(self) -> str:
        return f"python_docs-{sys.version_info.major}.{sys.version_info.minor}"

    def resolved_revision(self) -> str | None:
        return sys.version.split()[0]

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        return python_doc_texts()

    def document_classes(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        if self.label_by is None:
            return None
        return family_classes()

    def labelled_documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
        if self.label_by is None:
            yield from super().labelled_documents(storage_options)
            return
        docs = family_documents()
        for i in np.random.default_rng(0).permutation(len(docs)):
            yield docs[i]


def python_doc_texts() -> Iterator[str]:
    """Python's own documentation, in a fixed order (see the module docstring)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        yield from module_docstrings(module)


def family_classes() -> list[str]:
    """The class names of ``label_by: family``: ``language`` then the module families."""
    return [LANGUAGE, *MODULE_FAMILIES]


@functools.cache
def family_documents() -> tuple[tuple[str, int], ...]:
    """``(text, class index)`` of every help topic (sorted), then of every docstring of the modules of
    each family in the family map (modules sorted within a family).

    Parsing the ~250 modules takes ~3.5 s of CPU, paid by every process that needs the labelled
    documents (a harvest's driver, each test); so the result is kept once per machine, as JSON in
    the dynsae cache folder (:func:`harvester.gguf_cache.cache_root`) at
    ``python_docs/family-<key>.json``, the key hashing the standard library's folder, the Python
    version and this module's source (a new Python or a changed family map makes a new file). It is
    written under a temporary name and renamed into place; a file that does not read back is parsed
    again and replaced."""
    path = family_cache_path()
    with contextlib.suppress(OSError, ValueError, TypeError):
        return tuple((str(text), int(label)) for text, label in json.loads(path.read_text(encoding="utf-8")))
    docs = parse_family_documents()
    with contextlib.suppress(OSError):  # a read-only cache folder: parse again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                         encoding="utf-8") as fh:
            json.dump(docs, fh)
        os.replace(fh.name, path)
    return docs


def family_cache_path() -> Path:
    """Where :func:`family_documents` keeps its result (see there)."""
    from harvester.gguf_cache import cache_root

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    key = hashlib.sha256(f"{stdlib}|{sys.version}".encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    return cache_root() / "python_docs" / f"family-{key}.json"


def parse_family_documents() -> tuple[tuple[str, int], ...]:
    """:func:`family_documents`, parsed from the standard library's sources."""
    from pydoc_data.topics import topics

    index = {name: i for i, name in enumerate(family_classes())}
    docs = [(topics[key], index[LANGUAGE]) for key in sorted(topics)]
    for family, modules in MODULE_FAMILIES.items():
        for module in sorted(modules):
            docs += [(text, index[family]) for text in module_docstrings(module)]
    return tuple(docs)


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
