"""``hf_image_dataset``: a Hugging Face ``datasets`` dataset with an image and a class-label column."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from harvester.images import to_rgb
from harvester.sources import ImageItems, SourceConfig, register_source
from harvester.sources.hf_dataset import load_hf_dataset
from store.errors import UserError


@register_source
class HFImageDatasetSource(SourceConfig):
    """Images and labels of a HF dataset; items are row indices."""

    kind: Literal["hf_image_dataset"] = "hf_image_dataset"
    modality = "image"
    legacy_hash = True
    path: str | None = None  # the dataset id
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_field: str = "image"
    label_field: str = "label"

    def display_name(self) -> str:
        return str(self.path)

    def split_name(self) -> str | None:
        return self.split

    def dataset(self) -> Any:
        if not self.path:
            raise UserError("source.kind hf_image_dataset needs source.path (the dataset id).")
        return load_hf_dataset(self.path, self.name, self.split, self.revision, streaming=False)

    def list_images(self) -> ImageItems:
        dataset = self.dataset()
        for key in (self.image_field, self.label_field):
            if key not in dataset.column_names:
                raise UserError(f"dataset {self.path!r} has no column {key!r}; set source.image_field/label_field "
                                f"to one of {', '.join(dataset.column_names)}.")
        labels = np.asarray(dataset[self.label_field], dtype=np.int32)
        if len(labels) == 0:
            raise UserError(f"dataset {self.path!r} split {self.split!r} holds no images; check source.split.")
        feature = dataset.features[self.label_field]
        names = list(getattr(feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)])
        return ImageItems(list(range(len(labels))), labels, names)

    def open_images(self, items: list[Any]) -> list[Any]:
        return [to_rgb(img) for img in self.dataset().select(items)[self.image_field]]
