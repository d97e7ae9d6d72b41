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

from trainer.sae.interop import NotRepresentable, SaeLensForm, SparsifyForm
from trainer.sae.sparse_ops import pad_rows
from trainer.sae.topk import AuxKConfig, TopKSAE

#: the candidate floor of a training selection is this fraction of the last batch's threshold T
FLOOR_MARGIN = 0.8


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
        #: the last training batch's K·B-th largest π (a guess at the next one's; speed only, never the result)
        self._last_t = 0.0

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Batch top-K·B (training) or π > θ (eval), as padded (idx, valid), each row's entries in
        descending order of π."""
        if self.training:
            idx, valid, kept, t = batch_topk(pre, self.config.k, FLOOR_MARGIN * self._last_t)
            self._last_t = t
            self.update_threshold(kept)
            return idx, valid
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

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``jumprelu`` with the global inference threshold θ on every latent (SAELens's own
        inference form of BatchTopK): eval mode computes f = π·1[π > θ]; θ folds by c like the features."""
        form, c = self.homogeneous_saelens("jumprelu")
        theta = float(self.threshold) if bool(self.threshold_set) else 0.0
        form.tensors["threshold"] = torch.full((self.config.m,), c * theta, dtype=torch.float64)
        return form

    def to_sparsify(self) -> SparsifyForm:
        """Refused: sparsify's coder keeps the top k per token, ours keeps what exceeds θ."""
        raise NotRepresentable(f"at inference a {self.variant} SAE keeps every latent above one global threshold, "
                               "and sparsify's coder keeps a fixed k per token instead")


def batch_topk(pre: Tensor, k: int, floor: float | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """The K·B largest entries of ReLU(π) over the batch π (B, M), positive ones kept: (idx (B, W),
    valid (B, W), their values (Σ valid,), T = the K·B-th largest value (the smallest positive one when
    fewer are positive)), each row's kept entries first in descending order of π, W = the largest
    per-row count (≥ 1).

    Without sorting B·M values or forming a per-row top-W: any c with #{π ≥ c} ≥ K·B is ≤ T, so the
    entries ≥ c (one comparison pass, row-major) hold every entry the selection can take, and T is
    their K·B-th largest. c is tried in turn: ``floor`` (the caller's guess, e.g. 0.8 × the last
    batch's T), the smallest of the per-row K-th largest values (always ≤ T: it is the K·B-th largest
    of B·K entries), and finally 0 (every positive entry). Ties at T are interchangeable (any choice is
    a batch top-K·B): entries > T, then entries = T up to K·B in row-major order. The kept entries are
    placed in a (B, W) matrix and sorted per row.
    """
    b, m = pre.shape
    n = min(k * b, b * m)
    flat = pre.new_empty(0, dtype=torch.int64)
    for c in ([floor] if floor is not None and floor > 0 else []) + [None]:
        if c is None:  # the smallest per-row K-th largest value
            c = float(torch.topk(pre, min(k, m), dim=-1, sorted=False).values.min())
            if c <= 0:
                break
        flat = (pre >= c).reshape(-1).nonzero().squeeze(1)  # row-major positions
        if flat.numel() >= n:
            break
    if flat.numel() < n:  # c ≤ 0 or no bound held: every positive entry is a candidate
        flat = (pre > 0).reshape(-1).nonzero().squeeze(1)
    vals = pre.reshape(-1)[flat]
    if vals.numel() > n:
        t = torch.topk(vals, n, sorted=False).values.min()
        tied = vals == t
        keep = (vals > t) | (tied & (tied.cumsum(0) <= n - int((vals > t).sum())))
    else:
        t = vals.min() if vals.numel() else pre.new_zeros(())
        keep = torch.ones_like(vals, dtype=torch.bool)
    keep &= vals > 0
    flat, vals = flat[keep], vals[keep]
    rows, cols = flat // m, flat % m
    counts = torch.bincount(rows, minlength=b)
    width = max(int(counts.max()), 1)
    column, valid, pos = pad_rows(rows, cols, counts, width)
    padded = pre.new_full((b, width), float("-inf")).index_put_((rows, pos), vals)
    order = torch.sort(padded, dim=-1, descending=True).indices
    return column.gather(1, order), valid, vals, float(t)
