"""Helpers shared by the harvester tests (independent reference computations)."""

from __future__ import annotations

import torch


def manual_vit_tokens(visual: torch.nn.Module, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Independent ViT forward: patch embedding, CLS, positions, ln_pre, then the first n_blocks blocks."""
    x = visual.conv1(images)  # (B, width, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in visual.transformer.resblocks[:n_blocks]:
        x = block(x)
    return x if batch_first else x.permute(1, 0, 2)
