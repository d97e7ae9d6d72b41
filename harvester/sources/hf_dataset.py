"""``hf_dataset``: a Hugging Face ``datasets`` text dataset, streamed in its stored order.

Default ``Skylion007/openwebtext``; WikiText-103 is ``path: wikitext, name: wikitext-103-raw-v1``.
:func:`load_hf_dataset` is shared with ``hf_image_dataset``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from harvester.sources import SourceConfig, register_source
from store.errors import UserError

DEFAULT_TEXT_DATASET = "Skylion007/openwebtext"


@register_source
class HFDatasetSource(SourceConfig):
    """A text dataset on the Hugging Face hub (or in its cache)."""

    kind: Literal["hf_dataset"] = "hf_dataset"
    legacy_hash = True
    path: str | None = None  # HF dataset id (default Skylion007/openwebtext)
    name: str | None = None  # HF dataset config name, e.g. "wikitext-103-raw-v1"
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"
    streaming: bool = True

    def display_name(self) -> str:
        base = self.path or DEFAULT_TEXT_DATASET
        return f"{base}:{self.name}" if self.name else base

    def split_name(self) -> str | None:
        return self.split

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        path = self.path or DEFAULT_TEXT_DATASET
        dataset = load_hf_dataset(path, self.name, self.split, self.revision, self.streaming)
        for record in dataset:
            if self.text_field not in record:
                raise UserError(f"dataset {path!r} has no field {self.text_field!r}; set source.text_field to "
                                f"one of {', '.join(record)}.")
            yield str(record[self.text_field])


def import_datasets() -> Any:
    """The ``datasets`` package, or a UserError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face dataset sources need the `datasets` package; install it with "
                        "`pip install datasets` or use source.kind text_files / python_docs.") from None
    return datasets


def load_hf_dataset(path: str, name: str | None, split: str, revision: str | None, streaming: bool) -> Any:
    """``datasets.load_dataset`` with one-sentence errors."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(path, name, split=split, revision=revision, streaming=streaming)
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        raise UserError(f"cannot open Hugging Face dataset {path!r} split {split!r} "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); check source.path/name/"
                        f"split, and that it is cached when HF_DATASETS_OFFLINE=1.") from None
