"""``batchtopk``: BatchTopK SAE (Bussmann et al. 2024).

Training: keep the K·B largest of ReLU(π) over the whole batch (K = ``k``, so K active per sample on
average), codes padded to the largest per-sample count. The inference threshold θ is a running mean
of the smallest selected positive activation: θ ← δ θ + (1 − δ) min_{selected} π (first batch: θ =
that minimum; δ = ``threshold_decay``). Eval mode: f = π ⊙ 1[π > θ] per sample (no batch
dependence). AuxK and the unit-norm decoder as in :mod:`trainer.sae.topk`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from trainer.sae.topk import AuxKConfig, TopKSAE


class BatchTopKConfig(AuxKConfig):
    """Settings of the BatchTopK SAE."""

    variant: Literal["batchtopk"] = "batchtopk"
    threshold_decay: float = Field(default=0.99, gt=0, lt=1, description="EMA decay of the inference threshold.")


class BatchTopKSAE(TopKSAE):
    """TopK over the batch in training, a learned global threshold at inference."""

    variant = "batchtopk"
    config_class = BatchTopKConfig

    def __init__(self, config: BatchTopKConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_set", torch.zeros((), dtype=torch.bool))

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Batch top-K·B (training) or π > θ (eval), as padded (idx, valid)."""
        b, m = pre.shape
        if self.training:
            flat = torch.relu(pre).reshape(-1)
            top = torch.topk(flat, min(self.config.k * b, flat.numel()))
            keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top.indices, True)
            keep = keep.reshape(b, m) & (pre > 0)
            self.update_threshold(top.values)
        else:
            keep = pre > self.threshold.to(pre.dtype)
        counts = keep.sum(dim=-1)
        width = max(int(counts.max()), 1)
        idx = torch.topk(pre.masked_fill(~keep, float("-inf")), width, dim=-1).indices
        valid = torch.arange(width, device=pre.device)[None, :] < counts[:, None]
        return idx, valid

    @torch.no_grad()
    def update_threshold(self, selected: Tensor) -> None:
        """θ ← δ θ + (1 − δ) min(selected positive values)."""
        positive = selected[selected > 0]
        if positive.numel() == 0:
            return
        low = positive.min().to(self.threshold.dtype)
        if bool(self.threshold_set):
            decay = self.config.threshold_decay
            self.threshold.mul_(decay).add_(low, alpha=1 - decay)
        else:
            self.threshold.copy_(low)
            self.threshold_set.fill_(True)


