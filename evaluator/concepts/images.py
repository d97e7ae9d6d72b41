"""Images of a vision dataset: find an image by its seq_id through the manifest's source, make thumbnails.

Decisions: image ``seq_id`` s is ``manifest.source.files[s]`` when the manifest lists the image
files in harvest order (a relative path is taken relative to the source folder,
``source.name``); otherwise, for an ``image_folder`` source, the harvester's own seeded order
is reproduced (:func:`harvester.sources.image_items` with the harvest seed, which the manifest
records as ``split.seed``). Thumbnails are the square the model saw
(shorter side resized, centre crop — open_clip's evaluation preprocessing), so the patch grid
lies exactly over them; ``THUMB`` pixels, JPEG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

THUMB = 192


def image_files(manifest: Any) -> list[str]:
    """The image files of a vision dataset in seq_id order (empty when they cannot be found)."""
    source = manifest.source
    if source.files:
        return [f if os.path.isabs(f) else os.path.join(source.name, f) for f in source.files]
    if source.kind == "image_folder" and os.path.isdir(source.name):
        from harvester.config import SourceConfig
        from harvester.sources import image_items

        items = image_items(SourceConfig(kind="image_folder", path=source.name), manifest.split.seed, None)
        return [str(item) for item in items.items]
    return []


def center_square(img: Any) -> Any:
    """The centred square crop of a PIL image (what resize-shorter-side + center-crop keeps)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def write_thumbnail(src: str, dest: Path, size: int = THUMB) -> bool:
    """Write the square thumbnail of ``src`` to ``dest`` (JPEG); False if the image cannot be read."""
    from PIL import Image

    try:
        with Image.open(src) as img:
            thumb = center_square(img.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
    except OSError:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    thumb.save(dest, format="JPEG", quality=85)
    return True


def thumbnails(manifest: Any, seqs: set[int], out: Path) -> dict[int, str]:
    """Thumbnails of the given images under ``out/images/``; seq -> relative path (missing images left out)."""
    files = image_files(manifest) if seqs else []
    found: dict[int, str] = {}
    for seq in sorted(seqs):
        rel = f"images/{seq}.jpg"
        if 0 <= seq < len(files) and os.path.isfile(files[seq]) and write_thumbnail(files[seq], out / rel):
            found[seq] = rel
    return found
