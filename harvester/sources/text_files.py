"""``text_files``: plain-text files, JSON-lines and Parquet, local or at any fsspec URL.

``paths`` lists files, directories (searched recursively; hidden files, whose name starts with
``.``, are skipped) and globs; each entry's files are taken in sorted order, entries in the
order given. Decisions:

* ``.jsonl`` is one document per line (the ``text_field`` key of each JSON object), ``.parquet``
  one document per row of the ``text_field`` column;
* any other file is plain text whatever its extension (``.txt``, ``.md``, ``.rst``, ``.py``, none):
  the whole file is one document, read as UTF-8;
* a file that is not text is refused, with one sentence naming it: a NUL byte or invalid UTF-8 in
  its first KiB (a multi-byte character cut at the KiB boundary is not invalid), or invalid UTF-8
  further on.

Document labels (labelled text, for sparse probing; docs/metrics.md):

* ``label_from: folder`` (the ImageFolder convention): every entry of ``paths`` is a root
  directory whose sub-directories are the classes (sorted by name, merged across roots); every
  document of a file under ``<root>/<class>/`` has that class. The documents are taken in a fixed
  seeded permutation of the files (seed 0), so that ``max_tokens`` samples every class.
* ``label_field: NAME``: the ``NAME`` key (.jsonl) or column (.parquet) of each record is its
  class (classes = the sorted distinct values, as strings); records without it are refused.
  The files are read once more, before the harvest, to list the classes.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field

from harvester.sources import SourceConfig, check_classes, register_source
from store.errors import UserError
from store.io import expand_paths, filesystem, join_url, open_url

STRUCTURED = (".jsonl", ".parquet")
SNIFF_BYTES = 1024


@register_source
class TextFilesSource(SourceConfig):
    """Files, directories or globs (any fsspec URL) of text, JSON-lines or Parquet."""

    kind: Literal["text_files"] = "text_files"
    legacy_hash = True
    paths: list[str] = Field(default_factory=list)
    text_field: str = "text"  # the key (.jsonl) or column (.parquet) holding the text
    label_from: Literal["folder"] | None = None  # class = the sub-directory of each root in paths
    label_field: str | None = None  # class = this key (.jsonl) / column (.parquet) of each record
    label_keys = ("label_from", "label_field")

    def files(self, storage_options: dict[str, Any] | None = None) -> list[str]:
        if not self.paths:
            raise UserError("source.kind text_files needs source.paths (files, directories or globs).")
        return expand_paths(self.paths, storage_options, keep=not_hidden)

    def listed_files(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        return self.files(storage_options)

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        return text_file_documents(self.files(storage_options), self.text_field, storage_options)

    def _label_option(self) -> str | None:
        if self.label_from is not None and self.label_field is not None:
            raise UserError("source.kind text_files takes one of label_from and label_field, not both; "
                            "drop one of them.")
        return self.label_from or self.label_field

    def _labelled_files(self, storage_options: dict[str, Any] | None) -> tuple[list[str], list[tuple[str, int]]]:
        """(class names, [(file, class index)]) of a ``label_from: folder`` source, files permuted."""
        if not self.paths:
            raise UserError("source.kind text_files needs source.paths (files, directories or globs).")
        per_class: dict[str, list[str]] = {}
        for root in self.paths:
            fs, path = filesystem(root, storage_options)
            if not fs.isdir(path):
                raise UserError(f"source path {root} is not a directory; with label_from: folder each entry of "
                                f"source.paths is a root holding one sub-directory per class.")
            for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if entry["type"] == "directory" and not name.startswith("."):
                    per_class.setdefault(name, []).extend(
                        expand_paths([join_url(root, name)], storage_options, keep=not_hidden))
        names = sorted(per_class)
        check_classes(f"text_files {', '.join(self.paths)}", names, {n: len(per_class[n]) for n in names})
        pairs = [(f, i) for i, n in enumerate(names) for f in per_class[n]]
        order = np.random.default_rng(0).permutation(len(pairs))
        return names, [pairs[i] for i in order]

    def document_classes(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        option = self._label_option()
        if option is None:
            return None
        if self.label_from is not None:
            return self._labelled_files(storage_options)[0]
        counts = Counter(label for _, label in text_file_records(self.files(storage_options), self.text_field,
                                                                  self.label_field, storage_options))
        names = sorted(counts)
        return check_classes(f"text_files {', '.join(self.paths)} (label_field {self.label_field!r})", names, counts)

    def labelled_documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
        names = self.document_classes(storage_options)
        if names is None:
            yield from super().labelled_documents(storage_options)
            return
        if self.label_from is not None:
            for path, label in self._labelled_files(storage_options)[1]:
                for text in text_file_documents([path], self.text_field, storage_options):
                    yield text, label
            return
        index = {name: i for i, name in enumerate(names)}
        for text, label in text_file_records(self.files(storage_options), self.text_field, self.label_field,
                                             storage_options):
            yield text, index[label]


def not_hidden(path: str) -> bool:
    """False for a file whose name starts with a dot (``.DS_Store``, editor swap files)."""
    return not path.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def binary_reason(head: bytes) -> str | None:
    """Why ``head`` (a file's first bytes) is not UTF-8 text, or None when it is."""
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}"
    return None


def plain_text(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The whole file as one UTF-8 document; a binary file is a UserError naming it."""
    with open_url(path, "rb", storage_options) as fh:
        data = fh.read()
    reason = binary_reason(data[:SNIFF_BYTES])
    if reason is None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"invalid UTF-8 at byte {err.start}"
    raise UserError(f"source file {path} is not plain text ({reason}); remove it from source.paths or "
                    f"narrow the path with a glob.")


def jsonl_documents(path: str, text_field: str, storage_options: dict[str, Any] | None,
                    label_field: str | None = None) -> Iterator[Any]:
    """The ``text_field`` of each JSON object line (blank lines skipped); with ``label_field``,
    ``(text, str(label))`` pairs."""
    with open_url(path, "rb", storage_options) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path} line {lineno} is not UTF-8 text (invalid byte at column {err.start + 1}); "
                                "fix the file's encoding or remove that line.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {lineno} is not valid JSON; fix or remove it.") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path} line {lineno} has no {text_field!r} key; "
                                f"set source.text_field to the key holding the text.")
            if label_field is None:
                yield str(record[text_field])
                continue
            if record.get(label_field) is None:
                raise UserError(f"{path} line {lineno} has no {label_field!r} label; give every record a label "
                                f"or set source.label_field to the key holding it.")
            yield str(record[text_field]), str(record[label_field])


def parquet_documents(path: str, text_field: str, storage_options: dict[str, Any] | None,
                      label_field: str | None = None) -> Iterator[Any]:
    """The non-null values of the ``text_field`` column; with ``label_field``, ``(text, str(label))``
    pairs (a null label is refused)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; install it with `pip install pyarrow`.") from None
    import pyarrow as pa

    with open_url(path, "rb", storage_options) as fh:
        try:
            table = pq.read_table(fh)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable Parquet file ({type(err).__name__}); it is truncated or "
                            "corrupt — re-create it or remove it from source.paths.") from None
    if text_field not in table.column_names:
        raise UserError(f"{path} has no column {text_field!r}; set source.text_field to one of "
                        f"{', '.join(table.column_names)}.")
    if label_field is not None and label_field not in table.column_names:
        raise UserError(f"{path} has no column {label_field!r}; set source.label_field to one of "
                        f"{', '.join(table.column_names)}.")
    labels = table.column(label_field).to_pylist() if label_field is not None else None
    for row, value in enumerate(table.column(text_field).to_pylist()):
        if value is None:
            continue
        if labels is None:
            yield str(value)
        elif labels[row] is None:
            raise UserError(f"{path} row {row} has no {label_field!r} label; give every row a label.")
        else:
            yield str(value), str(labels[row])


def text_file_documents(paths: list[str], text_field: str,
                        storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Documents of the files, in the given order (see the module docstring)."""
    for path in paths:
        if path.endswith(".jsonl"):
            yield from jsonl_documents(path, text_field, storage_options)
        elif path.endswith(".parquet"):
            yield from parquet_documents(path, text_field, storage_options)
        else:
            yield plain_text(path, storage_options)


def text_file_records(paths: list[str], text_field: str, label_field: str,
                      storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """``(text, label)`` of every record of the .jsonl / .parquet files (``label_field`` needs records)."""
    for path in paths:
        if path.endswith(".jsonl"):
            yield from jsonl_documents(path, text_field, storage_options, label_field)
        elif path.endswith(".parquet"):
            yield from parquet_documents(path, text_field, storage_options, label_field)
        else:
            raise UserError(f"source file {path} is plain text, which has no {label_field!r} field; label_field "
                            f"needs .jsonl or .parquet files (use label_from: folder for plain-text files).")
