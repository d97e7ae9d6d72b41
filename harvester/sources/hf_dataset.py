"""``hf_dataset``: a Hugging Face ``datasets`` text dataset, streamed in its stored order.

Default ``Skylion007/openwebtext``; WikiText-103 is ``path: wikitext, name: wikitext-103-raw-v1``.
``label_field: NAME`` labels each record by its ``NAME`` column (labelled text, for sparse probing;
docs/metrics.md): a ``ClassLabel`` column's names are the classes, otherwise the sorted distinct
values (as strings). The dataset is read once more, before the harvest, to count the classes.
:func:`load_hf_dataset` is shared with ``hf_image_dataset``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from harvester.sources import SourceConfig, check_classes, register_source
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
    label_field: str | None = None  # class = this column of each record
    label_keys = ("label_field",)

    def display_name(self) -> str:
        base = self.path or DEFAULT_TEXT_DATASET
        return f"{base}:{self.name}" if self.name else base

    def split_name(self) -> str | None:
        return self.split

    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        for record in self._records():
            yield str(record[self.text_field])

    def _records(self) -> Iterator[dict[str, Any]]:
        """The dataset's records, each checked to hold the text field (and the label field when set)."""
        path = self.path or DEFAULT_TEXT_DATASET
        for record in load_hf_dataset(path, self.name, self.split, self.revision, self.streaming):
            for key, option in ((self.text_field, "text_field"), (self.label_field, "label_field")):
                if key is not None and record.get(key) is None:
                    raise UserError(f"dataset {path!r} has a record without field {key!r}; set source.{option} "
                                    f"to one of {', '.join(record)}.")
            yield record

    def _class_names(self) -> tuple[list[str], bool]:
        """(class names, whether they come from a ClassLabel column) of the label field."""
        path = self.path or DEFAULT_TEXT_DATASET
        dataset = load_hf_dataset(path, self.name, self.split, self.revision, self.streaming)
        feature = (getattr(dataset, "features", None) or {}).get(self.label_field)
        names = getattr(feature, "names", None)
        counts = Counter(str(record[self.label_field]) for record in self._records())
        where = f"{self.display_name()} (label_field {self.label_field!r})"
        if names:
            by_name = Counter({names[int(k)]: v for k, v in counts.items()})
            return check_classes(where, list(names), by_name), True
        return check_classes(where, sorted(counts), counts), False

    def document_classes(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        return None if self.label_field is None else self._class_names()[0]

    def labelled_documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
        if self.label_field is None:
            yield from super().labelled_documents(storage_options)
            return
        names, class_label = self._class_names()
        index = {name: i for i, name in enumerate(names)}
        for record in self._records():
            value = record[self.label_field]
            yield str(record[self.text_field]), int(value) if class_label else index[str(value)]


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
