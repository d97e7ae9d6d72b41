"""``image_folder``: ``root/<class>/<image>`` files (classes sorted, as torchvision's ImageFolder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from harvester.images import IMAGE_EXTENSIONS, is_image_file, open_image
from harvester.sources import ImageItems, SourceConfig, register_source
from store.errors import UserError


@register_source
class ImageFolderSource(SourceConfig):
    """An ImageFolder root; items are file paths, labels the index of the class folder."""

    kind: Literal["image_folder"] = "image_folder"
    modality = "image"
    legacy_hash = True
    path: str | None = None  # the ImageFolder root

    def display_name(self) -> str:
        return str(self.path)

    def list_images(self) -> ImageItems:
        if not self.path:
            raise UserError("source.kind image_folder needs source.path (the ImageFolder root).")
        return image_folder(self.path)

    def open_images(self, items: list[Any]) -> list[Any]:
        return [open_image(path) for path in items]


def image_folder(root: str) -> ImageItems:
    """``root/<class>/<image>`` files (searched recursively inside each class), classes and files sorted."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"image folder {root} does not exist; set source.path to an ImageFolder root.")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    items: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted((base / name).rglob("*")):
            if path.is_file() and is_image_file(path.name):
                items.append(str(path))
                labels.append(index)
    if not items:
        raise UserError(f"image folder {root} holds no images in class sub-folders (root/<class>/<image>"
                        f" with {', '.join(IMAGE_EXTENSIONS)}); check source.path.")
    return ImageItems(items, np.asarray(labels, dtype=np.int32), classes)
