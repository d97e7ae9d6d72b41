"""Data sources: one module per source kind, found by discovery.

Each module of this package that defines a source kind holds its own pydantic config — a
subclass of :class:`SourceConfig` with ``kind: Literal["<kind>"]`` and only the fields that kind
uses — and its reader, and registers it with :func:`register_source`. :func:`source_kinds` imports
every module of the package (``pkgutil``) the first time it is asked, and again when asked for a
kind it does not know, so a new file here is a new ``source.kind`` with nothing else edited.

A text source implements :meth:`SourceConfig.documents` (strings, in one deterministic order);
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
from collections.abc import Iterator
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
           "pack_contexts", "token_spec", "token_stream", "DEFAULT_KIND"]

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

    Class attributes a kind sets: ``modality`` (``"text"`` or ``"image"``) and ``legacy_hash``
    (True for the five kinds that existed when the config was one flat class: their dataset-name
    hash is computed over that flat form, so existing datasets keep their names).
    """

    kind: str
    modality: ClassVar[Literal["text", "image"]] = "text"
    legacy_hash: ClassVar[bool] = False

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
        """The fields the dataset-name hash covers (see ``legacy_hash``)."""
        dumped = self.model_dump(mode="json")
        return {**LEGACY_FIELDS, **dumped} if self.legacy_hash else dumped

    # -- reading
    def documents(self, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
        """Documents of a text source, in its deterministic order."""
        raise UserError(f"source.kind {self.kind!r} is an image source; use a text source for a language model.")

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
