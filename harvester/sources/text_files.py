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
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from harvester.sources import SourceConfig, register_source
from store.errors import UserError
from store.io import expand_paths, open_url

STRUCTURED = (".jsonl", ".parquet")
SNIFF_BYTES = 1024


@register_source
class TextFilesSource(SourceConfig):
    """Files, directories or globs (any fsspec URL) of text, JSON-lines or Parquet."""

    kind: Literal["text_files"] = "text_files"
    legacy_hash = True
    paths: list[str] = Field(default_factory=list)
    text_field: str = "text"  # the key (.jsonl) or column (.parquet) holding the text

    def files(self, storage_options: dict[str, Any] | None = None) -> list[str]:
        if not self.paths:
            raise UserError("source.kind text_files needs source.paths (files, directories or globs).")
        return expand_paths(self.paths, storage_options, keep=not_hidden)

    def listed_files(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        return self.files(storage_options)

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        return text_file_documents(self.files(storage_options), self.text_field, storage_options)


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


def jsonl_documents(path: str, text_field: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """The ``text_field`` of each JSON object line (blank lines skipped)."""
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
            yield str(record[text_field])


def parquet_documents(path: str, text_field: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """The non-null values of the ``text_field`` column."""
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
    for value in table.column(text_field).to_pylist():
        if value is not None:
            yield str(value)


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
