"""Ablation ``mlp_sparsemax`` (the paper's "MLP + Sparsemax"): the Sparsemax SAE with its
cross-attention onto one shared concept set replaced by an independent linear encoder and decoder.

Everything else is the Sparsemax SAE's: the input is x_n = x/‖x‖ and the output is rescaled by ‖x‖
(``always_unit_norm``), the activation scale, the sparsemax codes with their ``activation``
(scores/probs) and firing-rate mask (:class:`trainer.sae.sparsemax.SparsemaxCoder`), the
``norm_mse`` loss. Only the architecture differs:

    π = (x_n − b_dec) W_encᵀ + b_enc,   a = sparsemax codes of π,   x̂ = ‖x‖ · (Σ_{i∈S} a_i W_dec,i + b_dec)

against the Sparsemax SAE's z = (x_n W_Kᵀ) Cᵀ, x̂ = ‖x‖ · (a C) W_V. W_enc and W_dec start equal (seeded
unit rows, so π starts as the cosine similarities the Sparsemax SAE's z starts as), biases at 0,
decoder unconstrained (as the Sparsemax SAE's C W_V). Fed the raw scaled input instead, its scores are
~√d too large and sparsemax keeps a single concept: the ablation would then measure a collapse.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.interop import SaeLensForm, f64
from trainer.sae.linear import LinearSAE
from trainer.sae.sparsemax import SAELENS_ARCHITECTURE, SparsemaxCoder, SparsemaxCodesConfig


class MLPSparsemaxConfig(SparsemaxCodesConfig):
    """Settings of the MLP + Sparsemax ablation (the Sparsemax SAE's, see SparsemaxCodesConfig)."""

    variant: Literal["mlp_sparsemax"] = "mlp_sparsemax"


class MLPSparsemaxSAE(LinearSAE):
    """Linear encoder, sparsemax codes, dictionary decoder, on the unit sphere."""

    variant = "mlp_sparsemax"
    config_class = MLPSparsemaxConfig
    has_l0_knob = False  # sparsemax codes: the support is chosen per token
    always_unit_norm = True
    unit_decoder = False
    enc_init_scale = 1.0

    def __init__(self, config: MLPSparsemaxConfig) -> None:
        super().__init__(config)
        self.coder = SparsemaxCoder(config)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Sparse codes on the sparsemax support of π."""
        xc, h = self.hidden(xi)
        pre = h + self.b_enc.detach()
        return self.coder(pre, lambda idx, pattern: self.selected_pre(xc, h, idx, pattern))

    def to_saelens(self) -> SaeLensForm:
        """``dynsae_sparsemax``: sparsemax codes are not homogeneous, so the encoder side folds — W_enc/c
        on the c·u SAELens feeds, W_dec·c, b_dec·c, b_enc as it is."""
        c, normalize = self.saelens_scale()
        tensors = {"W_enc": f64(self.W_enc).T / c, "W_dec": c * f64(self.decoder.weight), "b_dec": c * f64(self.b_dec),
                   "b_enc": f64(self.b_enc)}
        return SaeLensForm(SAELENS_ARCHITECTURE, tensors,
                           {"activation": self.config.activation, "scale_by_input_norm": False}, normalize)
