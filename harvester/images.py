"""The one image loading path of dynsae: open an image file (or take an HF dataset's PIL image),
convert it to RGB, and turn a list of images into the model's pixel batch with its preprocess.

The harvester (``image_folder`` / ``hf_image_dataset`` sources) and the zero-shot evaluator
(:mod:`evaluator.zeroshot`) both load images through these functions, so the pixels a concept was
harvested from and the pixels it is evaluated on go through the same steps. Files are opened with
:func:`store.io.open_url` (local paths and fsspec URLs alike).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from store.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def is_image_file(path: str) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Any) -> Any:
    """An RGB PIL image (palette, grey, RGBA and CMYK images are converted; RGB is copied)."""
    return image.convert("RGB")


def open_image(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The image file at ``path`` as an RGB PIL image; an unreadable file is a one-sentence UserError."""
    from PIL import Image

    from store.io import open_url

    try:
        with open_url(str(path), "rb", storage_options) as fh, Image.open(fh) as img:
            return to_rgb(img)
    except OSError as err:  # PIL.UnidentifiedImageError is an OSError, as are missing files
        raise UserError(f"image {path} cannot be read ({err}); remove or replace it.") from None


def image_loader(path: str, storage_options: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A lazy :func:`open_image` of ``path`` (datasets hold a loader per image, not the pixels)."""
    return lambda: open_image(path, storage_options)


def pixel_batch(preprocess: Callable[[Any], Any], images: Sequence[Any]) -> Any:
    """(B, 3, H, W) tensor: the model's preprocess of each RGB image, stacked."""
    import torch

    return torch.stack([preprocess(img) for img in images])
