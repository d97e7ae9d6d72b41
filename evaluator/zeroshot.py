"""Zero-shot concept classification with a CLIP ViT (``docs/metrics.md``).

For each labelled image dataset:

1. Split the images per class, seeded, into a *selection* and a disjoint *test* part.
2. Selection: run the ViT up to the hook, encode every spliced token with the SAE, and
   count per class c how often each concept i fires: count[c, i] = #{tokens of images of
   class c with a_i ≠ 0}.
3. Test: for each n in ``top_n`` keep, for an image of class c, only class c's n most
   frequent concepts (ties by concept index): a ← a ⊙ 1[i ∈ top_n(c)]; decode, splice x̂
   into the ViT at the hook, finish the forward pass and classify against the CLIP text
   embeddings of the class names (each class: the mean over prompt templates of the
   normalised text embeddings, renormalised; prediction = argmax cosine similarity).
4. Report test accuracy for each n beside the unmodified model (``accuracy_clean``) and
   the SAE with all concepts on (``accuracy_sae``).

Positions in ``skip_positions`` (e.g. the run's ``exclude_positions``: rows the SAE was
not trained on) pass through unmodified; every other token of the image is spliced.
Datasets are ImageFolder directories (one sub-directory per class; class name = the
directory name with ``_`` read as a space) or HF datasets (``hf``: an id or a
``save_to_disk`` directory; needs the ``datasets`` package) with class names from the
label feature or the config. A config lists several; each can be disabled, and one whose
files are missing is skipped with the reason recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from evaluator.splice import rows_edit, splice, unwrap_model
from harvester.images import image_loader, is_image_file, pixel_batch, to_rgb
from store.config import StrictModel
from store.errors import UserError

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)


class ImageDatasetConfig(StrictModel):
    """One labelled image dataset: an ImageFolder ``path`` or an HF dataset ``hf``."""

    name: str = Field(description="name used in the report.")
    enabled: bool = Field(default=True, description="set false to leave this dataset out.")
    path: str | None = Field(default=None, description="ImageFolder root (one sub-directory per class).")
    hf: str | None = Field(default=None, description="HF dataset id or a save_to_disk directory.")
    hf_split: str = Field(default="test", description="split of the HF dataset to use.")
    image_key: str = Field(default="image", description="HF column holding the image.")
    label_key: str = Field(default="label", description="HF column holding the class index.")
    class_names: list[str] | None = Field(default=None, description="override the class names.")
    selection_fraction: float = Field(default=0.5, gt=0, lt=1,
                                      description="fraction of each class used to pick concepts.")
    max_per_class: int | None = Field(default=None, gt=1, description="cap on images per class.")
    seed: int = Field(default=0, description="seed of the selection/test split.")


class ZeroShotConfig(StrictModel):
    """Which datasets to classify and how."""

    datasets: list[ImageDatasetConfig] = Field(default_factory=list)
    top_n: list[int] = Field(default_factory=lambda: [1, 5, 10, 50])
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    batch_size: int = Field(default=32, gt=0, description="images per forward pass.")


class LabeledImages:
    """Images (lazy: a loader per item), integer labels and class names. Images load through
    :mod:`harvester.images` (open, RGB, the model's preprocess), the harvester's own path."""

    def __init__(self, name: str, loaders: list[Callable[[], Any]], labels: list[int],
                 class_names: list[str]) -> None:
        if len(loaders) != len(labels):
            raise ValueError("one label per image is required")
        self.name, self.loaders, self.class_names = name, loaders, class_names
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.loaders)

    def split(self, fraction: float, seed: int, max_per_class: int | None = None) -> tuple[Tensor, Tensor]:
        """Seeded per-class split into disjoint (selection, test) index tensors."""
        g = torch.Generator().manual_seed(seed)
        selection, test = [], []
        for c in range(len(self.class_names)):
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            if max_per_class is not None:
                idx = idx[:max_per_class]
            if idx.numel() < 2:
                continue
            k = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
            selection.append(idx[:k])
            test.append(idx[k:])
        if not selection:
            raise UserError(f"image dataset {self.name!r} has no class with at least 2 images; "
                            "add images so each class can be split into selection and test parts.")
        return torch.cat(selection).sort().values, torch.cat(test).sort().values


def image_folder(name: str, root: str, class_names: list[str] | None = None) -> LabeledImages:
    """An ImageFolder directory: ``root/<class>/<image>``; classes in sorted directory order."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not dirs:
        raise UserError(f"image folder {root} has no class sub-directories; lay it out as {root}/<class>/<image>.")
    if class_names is not None and len(class_names) != len(dirs):
        raise UserError(f"image folder {root} has {len(dirs)} classes but class_names lists {len(class_names)}; "
                        "give one name per sub-directory (sorted order).")
    names = class_names or [d.name.replace("_", " ") for d in dirs]
    loaders, labels = [], []
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and is_image_file(f.name):
                loaders.append(image_loader(str(f)))
                labels.append(label)
    return LabeledImages(name, loaders, labels, names)


def hf_images(cfg: ImageDatasetConfig) -> LabeledImages:
    """An HF dataset (hub id or save_to_disk directory) with an image and a class-label column."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise FileNotFoundError("the `datasets` package is not installed (pip install datasets)") from None
    if Path(cfg.hf).is_dir():
        ds = datasets.load_from_disk(cfg.hf)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf_split]
    else:
        ds = datasets.load_dataset(cfg.hf, split=cfg.hf_split)
    for key in (cfg.image_key, cfg.label_key):
        if key not in ds.column_names:
            raise UserError(f"HF dataset {cfg.hf} has no column {key!r} (columns: {', '.join(ds.column_names)}); "
                            "set image_key / label_key.")
    names = cfg.class_names or getattr(ds.features[cfg.label_key], "names", None)
    if not names:
        raise UserError(f"HF dataset {cfg.hf} does not name its classes; list them under class_names.")
    labels = [int(v) for v in ds[cfg.label_key]]

    def loader(i: int) -> Callable[[], Any]:
        return lambda: to_rgb(ds[i][cfg.image_key])

    return LabeledImages(cfg.name, [loader(i) for i in range(len(ds))], labels, list(names))


def load_images(cfg: ImageDatasetConfig) -> LabeledImages:
    """The dataset a config entry names (exactly one of ``path`` / ``hf``)."""
    if (cfg.path is None) == (cfg.hf is None):
        raise UserError(f"zero-shot dataset {cfg.name!r} must set exactly one of path (ImageFolder) or hf.")
    if cfg.path is not None:
        return image_folder(cfg.name, cfg.path, cfg.class_names)
    return hf_images(cfg)


# ---- CLIP pieces -----------------------------------------------------------------------------


def text_embeddings(model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                    templates: Sequence[str]) -> Tensor:
    """(C, e): per class the renormalised mean over templates of normalised text embeddings."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for name in class_names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            emb = model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            out.append(mean / mean.norm())
    return torch.stack(out)


def vit_seq_first(model: nn.Module) -> bool:
    """True when the open_clip vision transformer runs (T, B, d) instead of (B, T, d)."""
    visual = getattr(model, "visual", model)
    return not getattr(getattr(visual, "transformer", None), "batch_first", True)


def image_logits(model: nn.Module, images: Tensor, text: Tensor) -> Tensor:
    """Cosine similarities (B, C) of the images' CLIP embeddings with the class text embeddings."""
    feats = model.encode_image(images).float()
    return (feats / feats.norm(dim=-1, keepdim=True)) @ text.T


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the hooked rows are recorded."""


def hooked_rows(model: nn.Module, images: Tensor, layer: int, site: str) -> Tensor:
    """The residual stream (B, T, d) at (layer, site) for ``images``; the forward stops there."""
    box: list[Tensor] = []

    def capture(h: Tensor) -> Tensor:
        box.append(h.detach())
        raise _Captured

    try:
        with splice(model, layer, site, capture, seq_first=vit_seq_first(model)):
            model.encode_image(images)
    except _Captured:
        pass
    return box[0]


def _kept_positions(t: int, skip_positions: Sequence[int]) -> Tensor:
    keep = torch.ones(t, dtype=torch.bool)
    keep[[p for p in skip_positions if -t <= p < t]] = False
    return keep


def mask_codes(codes: Any, keep: Tensor) -> Any:
    """Codes with a_i zeroed where ``keep`` (rows, M) is False (sparse or dense codes)."""
    if codes.dense is not None:
        return type(codes)(m=codes.m, dense=codes.dense * keep.to(codes.dense.dtype), norms=codes.norms)
    val = codes.val * keep.gather(1, codes.idx).to(codes.val.dtype)
    return type(codes)(m=codes.m, idx=codes.idx, val=val, norms=codes.norms)


def _sae_rows(sae: nn.Module, keep_per_image: Tensor | None) -> Callable[[Tensor], Tensor]:
    """reconstruct(rows) for ``rows_edit``: the SAE, optionally keeping only each image's concepts."""

    def reconstruct(rows: Tensor) -> Tensor:
        codes = sae.encode(rows)
        if keep_per_image is not None:
            per_image = rows.shape[0] // keep_per_image.shape[0]
            codes = mask_codes(codes, keep_per_image.repeat_interleave(per_image, dim=0))
        return sae.decode(codes, rows).float()

    return reconstruct


def _batches(images: LabeledImages, index: Tensor, preprocess: Callable, batch_size: int, desc: str):
    for start in tqdm(range(0, index.numel(), batch_size), desc=desc, unit="batch"):
        chunk = index[start:start + batch_size]
        pixels = pixel_batch(preprocess, [images.loaders[int(i)]() for i in chunk])
        yield pixels, images.labels[chunk]


def concept_counts(model: nn.Module, sae: nn.Module, images: LabeledImages, index: Tensor, preprocess: Callable,
                   layer: int, site: str, skip_positions: Sequence[int], batch_size: int) -> Tensor:
    """count[c, i] = tokens of images of class c (in ``index``) on which concept i fires (a_i ≠ 0)."""
    counts = torch.zeros(len(images.class_names), sae.config.m, dtype=torch.int64)
    device = next(model.parameters()).device
    with torch.no_grad():
        for pixels, labels in _batches(images, index, preprocess, batch_size, f"{images.name} select"):
            h = hooked_rows(model, pixels.to(device), layer, site)
            keep = _kept_positions(h.shape[1], skip_positions).to(h.device)
            rows = h[:, keep]  # (B, T', d)
            for c in labels.unique():
                sel = rows[(labels == c).to(h.device)].reshape(-1, rows.shape[-1]).float()
                counts[c] += sae.encode(sel).fire_counts().to("cpu", torch.int64)
    return counts


def top_concepts(counts: Tensor, n: int) -> Tensor:
    """(C, M) bool: each class's n most frequent concepts (ties broken by the lower concept index)."""
    m = counts.shape[1]
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices[:, : min(n, m)]
    keep = torch.zeros_like(counts, dtype=torch.bool)
    return keep.scatter_(1, order, True)


def predict(model: nn.Module, images: LabeledImages, index: Tensor, preprocess: Callable, text: Tensor,
            layer: int, site: str, skip_positions: Sequence[int], batch_size: int,
            sae: nn.Module | None = None, keep: Tensor | None = None, desc: str = "test") -> Tensor:
    """Predicted class per image of ``index``: clean (``sae`` None), SAE spliced, or SAE with
    only ``keep[label]`` concepts on for each image (``keep`` (C, M) bool)."""
    device = next(model.parameters()).device
    seq_first = vit_seq_first(model)
    preds = []
    with torch.no_grad():
        for pixels, labels in _batches(images, index, preprocess, batch_size, f"{images.name} {desc}"):
            pixels = pixels.to(device)
            if sae is None:
                logits = image_logits(model, pixels, text)
            else:
                per_image = None if keep is None else keep[labels].to(device)
                edit = rows_edit(_sae_rows(sae, per_image), skip_positions)
                with splice(model, layer, site, edit, seq_first=seq_first):
                    logits = image_logits(model, pixels, text)
            preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def zeroshot_dataset(model: Any, preprocess: Callable, tokenizer: Callable, sae: nn.Module, images: LabeledImages,
                     layer: int, site: str, *, top_n: Sequence[int] = (1, 5, 10, 50),
                     templates: Sequence[str] = DEFAULT_TEMPLATES, skip_positions: Sequence[int] = (),
                     selection_fraction: float = 0.5, seed: int = 0, max_per_class: int | None = None,
                     batch_size: int = 32) -> dict[str, Any]:
    """Zero-shot accuracies on one dataset (see the module docstring); includes per-image predictions."""
    net = unwrap_model(model).eval()
    sae.eval()
    selection, test = images.split(selection_fraction, seed, max_per_class)
    text = text_embeddings(net, tokenizer, images.class_names, templates)
    args = (net, images, test, preprocess, text, layer, site, skip_positions, batch_size)
    truth = images.labels[test]
    counts = concept_counts(net, sae, images, selection, preprocess, layer, site, skip_positions, batch_size)
    predictions = {"clean": predict(*args, desc="clean"), "sae": predict(*args, sae=sae, desc="sae")}
    for n in top_n:
        predictions[f"top_{n}"] = predict(*args, sae=sae, keep=top_concepts(counts, n), desc=f"top-{n}")

    def accuracy(pred: Tensor) -> float:
        return float((pred == truth).double().mean()) if truth.numel() else math.nan

    return {
        "classes": len(images.class_names),
        "images_selection": int(selection.numel()),
        "images_test": int(test.numel()),
        "templates": len(templates),
        "accuracy_clean": accuracy(predictions["clean"]),
        "accuracy_sae": accuracy(predictions["sae"]),
        "accuracy_top_n": {str(n): accuracy(predictions[f"top_{n}"]) for n in top_n},
        "chance": 1.0 / len(images.class_names),
        "test_index": test.tolist(),
        "predictions": {k: v.tolist() for k, v in predictions.items()},
    }


def zeroshot_eval(model: Any, preprocess: Callable, tokenizer: Callable, sae: nn.Module, layer: int, site: str,
                  config: ZeroShotConfig, skip_positions: Sequence[int] = ()) -> dict[str, Any]:
    """Run every enabled dataset of ``config``; a dataset whose files are missing is skipped with a reason."""
    results: dict[str, Any] = {}
    for ds in config.datasets:
        if not ds.enabled:
            results[ds.name] = {"skipped": "disabled in the config"}
            continue
        try:
            images = load_images(ds)
        except (FileNotFoundError, OSError, ConnectionError) as err:
            results[ds.name] = {"skipped": f"dataset not available: {err}"}
            continue
        res = zeroshot_dataset(model, preprocess, tokenizer, sae, images, layer, site, top_n=config.top_n,
                               templates=config.templates, skip_positions=skip_positions,
                               selection_fraction=ds.selection_fraction, seed=ds.seed,
                               max_per_class=ds.max_per_class, batch_size=config.batch_size)
        res.pop("predictions")
        res.pop("test_index")
        results[ds.name] = res
    return results
