"""``open_clip``: the vision tower of an open_clip CLIP ViT, with its evaluation preprocessing.

``model.name`` is an open_clip model name (``ViT-B-16``) or a path to a model-config JSON file;
``pretrained`` is a tag (``openai``) or a checkpoint file. Images go through
:mod:`harvester.images` and the model's preprocess; only ``model.visual`` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harvester.models.base import ModelAdapter, ModelInfo, ModelKind, hub_offline, register_model
from store.errors import UserError


class ClipAdapter(ModelAdapter):
    """Images (B, 3, H, W) in; the hooked hidden state comes back (B, T, d) whatever the ViT runs."""

    def forward(self, inputs: torch.Tensor) -> None:
        self.model.visual(inputs)

    def batch_first(self, hidden: torch.Tensor) -> torch.Tensor:
        if not getattr(self.model.visual.transformer, "batch_first", True):
            return hidden.transpose(0, 1)  # (T, B, d) -> (B, T, d)
        return hidden


def open_clip_name(cfg: Any) -> str:
    """The open_clip model name; a path to a model-config JSON file is registered first."""
    import open_clip

    path = Path(cfg.name).expanduser()
    if cfg.name.endswith(".json"):
        if not path.is_file():
            raise UserError(f"open_clip model config {cfg.name} does not exist; check model.name.")
        open_clip.add_model_config(str(path))
        return path.stem
    return cfg.name


@register_model
class OpenClip(ModelKind):
    kind = "open_clip"
    modality = "image"
    fields = ("pretrained",)

    @classmethod
    def load(cls, cfg: Any, device: torch.device) -> ModelAdapter:
        return load_open_clip(cfg, device)


def load_open_clip(cfg: Any, device: torch.device) -> ModelAdapter:
    """An open_clip model with its evaluation preprocessing; only the vision tower is run."""
    import open_clip

    name = open_clip_name(cfg)
    if name not in open_clip.list_models():
        raise UserError(f"open_clip has no model {cfg.name!r}; choose one of open_clip.list_models() "
                        f"(e.g. ViT-B-16) or give a model-config .json path.")
    pretrained = cfg.pretrained
    if pretrained and not Path(pretrained).expanduser().exists() and "://" not in pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(f"open_clip model {name} has no pretrained weights {pretrained!r}; choose one of "
                            f"{', '.join(tags) or '(none)'} or give a checkpoint file.")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, precision="fp32" if device.type == "cpu"
            else {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[cfg.dtype])
    except (OSError, RuntimeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        extra = " (HF_HUB_OFFLINE=1 forbids downloading the weights)" if hub_offline() else ""
        raise UserError(f"cannot load open_clip {name} pretrained={pretrained!r}{extra}: {reason}.") from None
    visual = model.visual
    grid = getattr(visual, "grid_size", None)
    if grid is None or not hasattr(visual, "transformer"):
        raise UserError(f"open_clip model {name} has no ViT vision tower; choose a ViT model.")
    cls = 1 if getattr(visual, "class_embedding", None) is not None else 0
    tokens = int(grid[0] * grid[1]) + cls
    d = int(visual.transformer.width)
    info = ModelInfo(cfg.name, cfg.kind, len(visual.transformer.resblocks), d, tokens_per_image=tokens)
    return ClipAdapter(model, info, device, preprocess=preprocess)
