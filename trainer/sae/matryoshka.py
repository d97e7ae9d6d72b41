"""``matryoshka``: Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders").

The dictionary is split into G consecutive groups of sizes m_1, …, m_G (Σ m_g = M); prefix g holds the
first M_g = m_1 + … + m_g latents. Every prefix must reconstruct the input on its own, so the early
latents learn general features and later ones refine them instead of absorbing them:

    f = BatchTopK(π)  (the selection, threshold and AuxK of :mod:`trainer.sae.batchtopk`, unchanged)
    x̂_g = Σ_{i < M_g} f_i W_dec,i + b_dec          (g = 1 … G; x̂_G is the usual reconstruction)
    loss = Σ_g recon(x̂_g, x) + α · AuxK

``recon`` is the variant's reconstruction loss (``mse``; ``norm_mse`` and ×‖x‖ as for every variant);
the logs carry ``recon`` (the full dictionary, comparable with every other variant) and
``prefix_mse`` (Σ over the inner prefixes g < G). The sum over prefixes is SAELens's form; the mean
(Bussmann et al.'s code) differs by the factor 1/G, which Adam's update does not see except through
the AuxK weight.

Groups: ``group_sizes`` (explicit, summing to M) or ``group_fractions`` (summing to 1; the prefix ends
are round(M · cumulative fraction), the last M; a group that rounds to nothing at a small M is
dropped). The default doubles the prefix at each level: M/16, M/8, M/4, M/2, M.

Training cost: the prefix reconstructions come from **one** sparse decode. Each selected entry belongs
to one group; the padded codes are laid out as B·G rows (row (b, g) holds sample b's entries of group
g, masked), decoded with :func:`trainer.sae.sparse_ops.sparse_decode` into the per-group partial sums
y_{b,g}, and x̂_g = b_dec + Σ_{h ≤ g} y_{b,h} is a cumulative sum over g. Forward and backward touch
each entry once (O(E·d), E = selected entries), as a plain BatchTopK decode does; the G prefixes add
O(B·G·d) elementwise work.

Inference is BatchTopK's (f = π ⊙ 1[π > θ], one global θ), so the export is too: SAELens ``jumprelu``
with θ on every latent; sparsify cannot hold it (its coder keeps a fixed k per token).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from trainer.sae.base import Codes, Reconstructions
from trainer.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from trainer.sae.sparse_ops import SupportPattern, sparse_decode

#: Prefix widths M/16, M/8, M/4, M/2, M.
DEFAULT_FRACTIONS = [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]


class MatryoshkaConfig(BatchTopKConfig):
    """Settings of the Matryoshka BatchTopK SAE (BatchTopK's, plus the nested groups)."""

    variant: Literal["matryoshka"] = "matryoshka"  # type: ignore[assignment]
    group_fractions: list[float] = Field(default_factory=lambda: list(DEFAULT_FRACTIONS), min_length=1, description=(
        "fraction of the dictionary in each nested group, summing to 1 (default: prefixes M/16, M/8, …, M)."))
    group_sizes: list[int] | None = Field(default=None, min_length=1, description=(
        "explicit group sizes summing to m (replaces group_fractions)."))

    @model_validator(mode="after")
    def _groups_fit(self) -> MatryoshkaConfig:
        """Every group non-empty and the groups exactly fill the dictionary."""
        self.prefix_ends()
        return self

    def prefix_ends(self) -> list[int]:
        """M_1 < M_2 < … < M_G = M, the widths of the nested prefixes (ValueError when explicit sizes do not
        fill M or the fractions do not sum to 1)."""
        if self.group_sizes is not None:
            if any(s <= 0 for s in self.group_sizes) or sum(self.group_sizes) != self.m:
                raise ValueError(f"group_sizes {self.group_sizes} must be positive and sum to m = {self.m}")
            ends, total = [], 0
            for size in self.group_sizes:
                total += size
                ends.append(total)
            return ends
        fractions = self.group_fractions
        if any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"group_fractions {fractions} must be positive and sum to 1")
        ends, acc = set(), 0.0
        for f in fractions[:-1]:
            acc += f
            ends.add(round(acc * self.m))
        return sorted((ends | {self.m}) - {0})  # a group that rounds to nothing at this M is dropped


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE whose nested dictionary prefixes each reconstruct the input (module docstring)."""

    variant = "matryoshka"
    config_class = MatryoshkaConfig
    title = "Matryoshka BatchTopK SAE"

    def __init__(self, config: MatryoshkaConfig) -> None:
        super().__init__(config)
        self.register_buffer("prefix_ends", torch.tensor(config.prefix_ends(), dtype=torch.int64), persistent=False)

    def group_of(self, idx: Tensor) -> Tensor:
        """The group g of each latent index (0-based): the first prefix that contains it."""
        return torch.bucketize(idx, self.prefix_ends, right=True)

    def prefix_reconstructions(self, codes: Codes) -> Tensor:
        """(B, G, d) x̂_g = Σ_{i < M_g} f_i W_dec,i + b_dec: one sparse decode over B·G rows (row (b, g) =
        sample b's entries of group g) and a cumulative sum over g."""
        b, width = codes.idx.shape
        groups = self.prefix_ends.numel()
        valid = codes.val.new_ones(codes.idx.shape, dtype=torch.bool) if codes.pattern is None or \
            codes.pattern.mask is None else codes.pattern.mask
        in_group = self.group_of(codes.idx)[:, None, :] == torch.arange(groups, device=codes.idx.device)[None, :, None]
        mask = (valid[:, None, :] & in_group).reshape(b * groups, width)
        idx = codes.idx[:, None, :].expand(b, groups, width).reshape(b * groups, width)
        val = codes.val[:, None, :].expand(b, groups, width).reshape(b * groups, width)
        parts = sparse_decode(idx, val, self.decoder.rows(), SupportPattern(idx, self.config.m, mask))
        return parts.view(b, groups, -1).cumsum(dim=1) + self.b_dec

    def forward_normalized(self, xi: Tensor):
        """Codes (BatchTopK), the full reconstruction x̂_G, the inner prefixes' losses and AuxK."""
        codes, xc, pre = self._encode(xi)
        prefixes = self.prefix_reconstructions(codes)
        y = prefixes[:, -1]
        self.track_dead(codes)
        inner = Reconstructions(prefixes[:, :-1])
        return codes, y, {"prefix_mse": (1.0, inner), "auxk": (self.config.aux_coef, self.auxk(xi, y, xc, pre))}
