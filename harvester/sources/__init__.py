"""Data sources: one module per source kind, found by discovery.

Each module of this package that defines a source kind holds its own pydantic config — a
subclass of :class:`SourceConfig` with ``kind: Literal["<kind>"]`` and only the fields that kind
uses — and its reader, and registers it with :func:`register_source`. :func:`source_kinds` imports
every module of the package (``pkgutil``) the first time it is asked, and again when asked for a
kind it does not know, so a new file here is a new ``source.kind`` with nothing else edited.

A text source implements :meth:`SourceConfig.documents` (strings, in one deterministic order);
a text source that can label its documents (``label_from: folder`` / ``label_field`` / python_docs'
``label_by``) also implements :meth:`SourceConfig.document_classes` (the class names, or None when
unlabelled; bad labels are refused there, before any worker starts) and
:meth:`SourceConfig.labelled_documents` (``(text, class index)`` in one deterministic order; the
harvester numbers them, and that number is the stored document id);
an image source implements :meth:`SourceConfig.list_images` (items, labels, class names) and
:meth:`SourceConfig.open_images` (RGB PIL images of some items, through :mod:`harvester.images`).
Image order is a seeded permutation of all items (:func:`image_items`), so that ``max_images``
takes a sample across classes rather than the first few classes.

The ``source:`` section of a harvest config is validated by :func:`parse_source`: ``kind``
(default ``hf_dataset``) picks the class, whose unknown keys are errors naming the key.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from harvester.packing import TokenSpec, pack_contexts, token_spec, token_stream
from store.config import StrictModel
from store.errors import UserError

__all__ = ["SourceConfig", "ImageItems", "register_source", "source_kinds", "source_class", "parse_source",
           "iter_documents", "image_items", "load_images", "source_name", "source_revision", "TokenSpec",
           "pack_contexts", "token_spec", "token_stream", "DEFAULT_KIND", "check_classes", "iter_labelled_documents"]

DEFAULT_KIND = "hf_dataset"
_REGISTRY: dict[str, type[SourceConfig]] = {}
_SEARCHED: list[bool] = []  # non-empty once every module of the package has been imported


@dataclass
class ImageItems:
    """A deterministic list of images: ``items[i]`` is a file path or a dataset index."""

    items: list[Any]
    labels: np.ndarray  # (n,) int32
    class_names: list[str]
    dataset_files: list[str] = field(default_factory=list)


class SourceConfig(StrictModel):
    """Base of every source kind's config. ``SourceConfig(kind=..., **fields)`` builds the kind's class.

    Class attributes a kind sets: ``modality`` (``"text"`` or ``"image"``), ``legacy_hash``
    (True for the five kinds that existed when the config was one flat class: their dataset-name
    hash is computed over that flat form, so existing datasets keep their names) and
    ``label_keys`` (the fields that ask for document labels; see :meth:`hash_fields`).
    """

    kind: str
    modality: ClassVar[Literal["text", "image"]] = "text"
    legacy_hash: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ()  # the kind's document-label options (None = unset)

    def __new__(cls, *args: Any, **data: Any) -> SourceConfig:
        if cls is SourceConfig:  # the base names no kind: build the one ``kind`` says
            cls = source_class(data.get("kind", DEFAULT_KIND))
        return super().__new__(cls)

    @property
    def is_image(self) -> bool:
        return self.modality == "image"

    # -- what the manifest records
    def display_name(self) -> str:
        """A short human name for the manifest (``source.name``)."""
        return self.kind

    def resolved_revision(self) -> str | None:
        """The source's revision for the manifest (the configured one, or a version the kind knows)."""
        return getattr(self, "revision", None)

    def split_name(self) -> str | None:
        """The split the manifest records (None for sources without splits)."""
        return None

    def listed_files(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        """The files read, in order, when the source is a list of files (else None)."""
        return None

    def hash_fields(self) -> dict[str, Any]:
        """The fields the dataset-name hash covers (see ``legacy_hash``). The label options
        (``label_keys``) that are set go under one ``document_label`` key, so an unlabelled config
        keeps the name it had before labels existed and a labelled one never shares it."""
        dumped = self.model_dump(mode="json", exclude=set(self.label_keys))
        hashed = {**LEGACY_FIELDS, **dumped} if self.legacy_hash else dumped
        options = {k: getattr(self, k) for k in self.label_keys if getattr(self, k) is not None}
        return {**hashed, "document_label": options} if options else hashed

    # -- reading
    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        """Documents of a text source, in its deterministic order."""
        raise UserError(f"source.kind {self.kind!r} is an image source; use a text source for a language model.")

    def document_classes(self, storage_options: dict[str, Any] | None = None) -> list[str] | None:
        """Class names of a labelled text source (checked with :func:`check_classes`), else None."""
        return None

    def labelled_documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
        """``(text, class index into document_classes())`` of a labelled text source, in its order."""
        raise UserError(f"source.kind {self.kind!r} has no document labels as configured; set its label "
                        f"option (label_from / label_field / label_by) to harvest labelled text.")

    def list_images(self) -> ImageItems:
        """All images of an image source (items, labels, class names) in the source's own order."""
        raise UserError(f"source.kind {self.kind!r} is a text source; an open_clip model needs images.")

    def open_images(self, items: list[Any]) -> list[Any]:
        """RGB PIL images for ``items`` (as :meth:`list_images` gave them)."""
        raise UserError(f"source.kind {self.kind!r} is a text source; it has no images.")


# The one flat SourceConfig's fields and defaults before sources became one class per kind.
LEGACY_FIELDS: dict[str, Any] = {"kind": DEFAULT_KIND, "path": None, "name": None, "split": "train", "revision": None,
                                 "paths": [], "text_field": "text", "image_field": "image", "label_field": "label",
                                 "streaming": True}


def register_source(cls: type[SourceConfig]) -> type[SourceConfig]:
    """Class decorator: register a source kind under its ``kind`` literal."""
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str):
        raise TypeError(f"{cls.__name__}.kind needs a default (its Literal kind string)")
    _REGISTRY[kind] = cls
    return cls


def _discover() -> None:
    """Import every module of this package; each registers the kinds it defines."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    _SEARCHED.append(True)


def source_kinds() -> dict[str, type[SourceConfig]]:
    """kind -> config class of every source module in the package."""
    if not _SEARCHED:  # a kind module imported directly registers itself, but the others are not in yet
        _discover()
    return dict(_REGISTRY)


def source_class(kind: Any) -> type[SourceConfig]:
    """The config class of ``kind`` (the package is searched again for a kind not seen yet)."""
    if not isinstance(kind, str) or kind not in source_kinds():
        importlib.invalidate_caches()
        _discover()
    if isinstance(kind, str) and kind in _REGISTRY:
        return _REGISTRY[kind]
    known = ", ".join(sorted(_REGISTRY))
    raise ValidationError.from_exception_data("SourceConfig", [InitErrorDetails(
        type=PydanticCustomError("source_kind", "unknown source kind; use one of {known}", {"known": known}),
        loc=("kind",), input=kind)])


def parse_source(value: Any) -> SourceConfig:
    """A source config from a mapping (``kind`` picks the class, default hf_dataset) or a config object."""
    if isinstance(value, SourceConfig):
        return value
    if not isinstance(value, dict):
        raise ValidationError.from_exception_data("SourceConfig", [InitErrorDetails(
            type="dict_type", loc=(), input=value)])
    return source_class(value.get("kind", DEFAULT_KIND)).model_validate(value)


# ------------------------------------------------------------------ the driver's view

def source_name(cfg: SourceConfig) -> str:
    """A short human name for the manifest."""
    return cfg.display_name()


def source_revision(cfg: SourceConfig) -> str | None:
    """The source's revision for the manifest."""
    return cfg.resolved_revision()


def iter_documents(cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Documents of a text source, in its deterministic order."""
    yield from cfg.documents(storage_options)


def iter_labelled_documents(cfg: SourceConfig,
                            storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
    """``(text, class index)`` of a labelled text source, in its deterministic order."""
    yield from cfg.labelled_documents(storage_options)


def check_classes(source: str, names: list[str], counts: Mapping[str, int]) -> list[str]:
    """``names`` when they make a classification task, else a UserError naming ``source``: at least two
    classes, none without documents, and no more classes than documents."""
    if len(names) < 2:
        raise UserError(f"source {source} has {len(names)} document class{'es' if len(names) != 1 else ''} "
                        f"({', '.join(names) or 'none'}); labelled text needs at least two (one sub-folder or "
                        f"label value per class).")
    total = sum(counts.get(n, 0) for n in names)
    if len(names) > total:
        raise UserError(f"source {source} has more classes ({len(names)}) than documents ({total}); "
                        f"give every class documents.")
    empty = [n for n in names if counts.get(n, 0) == 0]
    if empty:
        raise UserError(f"source {source} has no documents of class {empty[0]!r}; add documents to it or "
                        f"remove that class.")
    return names


def image_items(cfg: SourceConfig, seed: int, max_images: int | None) -> ImageItems:
    """The images to harvest: a seeded permutation of the source, cut to ``max_images``."""
    found = cfg.list_images()
    order = np.random.default_rng(seed).permutation(len(found.items))
    if max_images is not None:
        order = order[:max_images]
    return ImageItems([found.items[i] for i in order], found.labels[order], found.class_names)


def load_images(cfg: SourceConfig, items: list[Any]) -> list[Any]:
    """RGB PIL images for the given items (paths, or indices of the HF dataset)."""
    return cfg.open_images(items)
