"""Ablation ``mlp_sparsemax``: the relu architecture (:mod:`trainer.sae.linear`) with sparsemax codes.

π = (x − b_dec) W_encᵀ + b_enc; codes from sparsemax over π exactly as in the Sparsemax SAE
(:class:`trainer.sae.sparsemax.SparsemaxCoder`: ``activation`` scores/probs, firing-rate mask);
x̂ = Σ_{i∈S} a_i W_dec,i + b_dec decoded from the support. Decoder unconstrained (as relu; with
``probs`` the codes sum to 1 and the decoder rows carry the scale); loss ``norm_mse`` by default.
"""

from __future__ import annotations

from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.config import SAEConfig
from trainer.sae.linear import LinearSAE
from trainer.sae.sparsemax import SparsemaxCoder


class MLPSparsemaxSAE(LinearSAE):
    """Linear encoder, sparsemax activation, dictionary decoder."""

    variant = "mlp_sparsemax"
    unit_decoder = False

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        self.coder = SparsemaxCoder(config)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Sparse codes on the sparsemax support of π."""
        xc, h = self.hidden(xi)
        pre = h + self.b_enc.detach()
        return self.coder(pre, lambda idx, pattern: self.selected_pre(xc, h, idx, pattern))
