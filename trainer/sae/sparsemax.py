"""The Sparsemax SAE ("Improving Sparse Autoencoder with Dynamic Attention"), ``docs/variants.md``.

On the cross-attention architecture (:mod:`trainer.sae.cross_attention`): z = (x_n W_Kᵀ) Cᵀ, sparsemax
threshold τ(z) and support S = {m : z_m > τ} from :func:`trainer.sparsemax.sparsemax_mask`, codes

* ``activation="scores"`` (authors' code): a = z ⊙ 1_S — the gradient flows through z on the
  support, the mask held fixed;
* ``activation="probs"``: a = max(z − τ, 0) — the sparsemax output, gradient dz = s (g − mean_S g),

and x̂ = ‖x‖ · (a C) W_V decoded from the support only. Loss: reconstruction only (``norm_mse`` by
default). z is computed once densely without autograd; the selected entries z_S are re-read with a
backward that touches only the support rows of C and gives dq = Σ_{j∈S} dz_j C_j (no dense (B, M)
gradient, no B×M×d backward matmul): :func:`trainer.sae.sparse_ops.select_linear` in ``encode``,
and in training (``forward``) :func:`trainer.sae.sparse_ops.select_decode`, which also decodes and
writes C's two gradient contributions (as keys and as values) into one tensor.

Firing-rate mask (the authors' ``max_fire_rate``, default 0.1, ``None`` disables), exactly:
a buffer ``fire_rate`` (M,) starts at 0; every forward in *training mode* first sets z_j = −inf for
each concept with fire_rate_j > max_fire_rate (unless that would mask every concept), computes the
codes, then updates fire_rate ← δ·fire_rate + (1−δ)·(samples of the batch in which j is active)/B
with δ = ``fire_rate_decay`` (0.99). In eval mode nothing is masked and the buffer is unchanged.
The same mask serves ``mlp_sparsemax`` (:class:`SparsemaxCoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from trainer.sae.base import Codes
from trainer.sae.config import SAEConfig
from trainer.sae.cross_attention import CrossAttentionSAE
from trainer.sae.interop import SaeLensForm
from trainer.sae.sparse_ops import SupportPattern, select_decode, select_linear
from trainer.sparsemax import sparsemax_mask

#: The SAELens architecture the sparsemax-coded variants export to (dynsae.saelens registers it).
SAELENS_ARCHITECTURE = "dynsae_sparsemax"
NO_TARGET = ("a {variant} SAE chooses its support size per token (sparsemax), so it has no L0 target; "
             "train it first and steer the baselines to its measured L0 instead (their sae.target_l0 = the l0 "
             "in its evaluation, or the sweep's match_l0), then compare in the report's Matched sparsity section")


class SparsemaxCodesConfig(SAEConfig):
    """Settings of the sparsemax codes, shared by ``sparsemax`` and ``mlp_sparsemax`` (module docstring)."""

    #: Fields refused with a sentence of their own (see :func:`trainer.sae.registry.validate_sae`).
    field_refusals: ClassVar[dict[str, str]] = {"target_l0": NO_TARGET, "k": NO_TARGET}

    activation: Literal["scores", "probs"] = Field(
        default="scores", description="codes: z on the support (authors' code) or max(z − τ, 0).")
    loss: Literal["norm_mse", "mse"] = Field(default="norm_mse", description="the authors' loss by default.")
    max_fire_rate: float | None = Field(default=0.1, gt=0, le=1, description=(
        "mask concepts whose running firing rate exceeds this (the authors' 0.1; null disables)."))
    fire_rate_decay: float = Field(default=0.99, gt=0, lt=1, description="EMA decay of the firing rate.")
    k_max: int | None = Field(default=None, gt=0, description="cap on the padded support width (None: exact).")


class SparsemaxConfig(SparsemaxCodesConfig):
    """Settings of the Sparsemax SAE."""

    variant: Literal["sparsemax"] = "sparsemax"


class SparsemaxCoder(nn.Module):
    """Sparsemax codes from dense scores, with the running firing-rate mask (module docstring)."""

    def __init__(self, config: SparsemaxCodesConfig) -> None:
        super().__init__()
        self.m = config.m
        self.activation = config.activation
        self.k_max = config.k_max
        self.max_fire_rate = config.max_fire_rate
        self.decay = config.fire_rate_decay
        self.register_buffer("fire_rate", torch.zeros(config.m, dtype=torch.float32))

    def masked(self, z: Tensor) -> Tensor:
        """z with over-firing concepts set to −inf **in place** (training mode only)."""
        if not self.training or self.max_fire_rate is None:
            return z
        over = self.fire_rate > self.max_fire_rate
        if not bool(over.any()) or bool(over.all()):
            return z
        return z.masked_fill_(over, float("-inf"))

    def support(self, z: Tensor) -> SupportPattern:
        """The sparsemax support of dense scores z (B, M, no autograd; consumed: over-firing concepts
        are overwritten with −inf) as a masked :class:`SupportPattern`."""
        with torch.no_grad():
            idx, mask = sparsemax_mask(self.masked(z), self.k_max)
        return SupportPattern(idx, self.m, mask)

    def values(self, zs: Tensor, mask: Tensor) -> Tensor:
        """Codes on the support from the selected scores zs (B, K), differentiably."""
        if self.activation == "scores":
            return torch.where(mask, zs, 0.0)  # a = z ⊙ 1_S
        n = mask.sum(dim=-1, keepdim=True).clamp_min(1)
        tau = (torch.where(mask, zs, 0.0).sum(dim=-1, keepdim=True) - 1) / n  # τ = (Σ_S z − 1)/|S|
        return torch.where(mask, (zs - tau).clamp_min(0), 0.0)  # a = max(z − τ, 0)

    def forward(self, z: Tensor, selected: Callable[[Tensor, SupportPattern], Tensor]) -> Codes:
        """Codes from dense scores z (B, M, no autograd; consumed, see :meth:`support`) and
        ``selected(idx, pattern)`` = z[idx] with autograd (read on the support only)."""
        pattern = self.support(z)  # shared by the selection and the decoder
        val = self.values(selected(pattern.idx, pattern), pattern.mask)
        codes = Codes(m=self.m, idx=pattern.idx, val=val, pattern=pattern)
        self.update(codes)
        return codes

    @torch.no_grad()
    def update(self, codes: Codes) -> None:
        """fire_rate ← δ fire_rate + (1 − δ) · fire_counts / B (training mode only)."""
        if self.training and self.max_fire_rate is not None:
            rate = codes.fire_counts().to(self.fire_rate.dtype) / max(codes.batch_size, 1)
            self.fire_rate.mul_(self.decay).add_(rate, alpha=1 - self.decay)


class SparsemaxSAE(CrossAttentionSAE):
    """The paper's SAE: cross-attention over shared concepts with sparsemax attention."""

    variant = "sparsemax"
    config_class = SparsemaxConfig
    title = "Sparsemax SAE"
    has_l0_knob = False  # the support is chosen per token
    is_reference = True  # the baselines are matched to its L0 and compared against it

    def __init__(self, config: SparsemaxConfig) -> None:
        super().__init__(config)
        self.coder = SparsemaxCoder(config)

    def scores(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """(q, z): q = x_n W_Kᵀ with autograd, z = q Cᵀ (B, M) without."""
        q = self.query(xi)
        with torch.no_grad():
            z = q @ self.C.T  # z = (x_n W_Kᵀ) Cᵀ
        return q, z

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Sparse codes of x_n on the sparsemax support."""
        q, z = self.scores(xi)
        return self.coder(z, lambda idx, pattern: select_linear(q, self.C, idx, z, pattern))

    def forward_normalized(self, xi: Tensor):
        """Codes and (a C) W_V with selection and decode fused (:func:`select_decode`: one dC)."""
        q, z = self.scores(xi)
        pattern = self.coder.support(z)
        h, val = select_decode(q, self.C, z, pattern, lambda zs: self.coder.values(zs, pattern.mask))
        codes = Codes(m=self.config.m, idx=pattern.idx, val=val, pattern=pattern)
        self.coder.update(codes)
        return codes, h @ self.W_V, {}

    def to_saelens(self) -> SaeLensForm:
        """``dynsae_sparsemax`` (registered with SAELens by ``import dynsae.saelens``) on the folded
        dictionary, encoding x/‖x‖ and returning features ‖x‖·a (``scale_by_input_norm``)."""
        return SaeLensForm(SAELENS_ARCHITECTURE, self.dictionary(),
                           {"activation": self.config.activation, "scale_by_input_norm": True})
