"""``relu``: the standard SAE baseline (Anthropic, April 2024 update).

f = ReLU((x − b_dec) W_encᵀ + b_enc), x̂ = f W_dec + b_dec, loss = MSE + λ Σ_i f_i ‖W_dec,i‖
(mean over the batch, λ = ``l1`` = 1e-3 by default). The decoder is unconstrained (the penalty is
weighted by the row norms instead); W_enc starts at 0.1 · W_dec.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.linear import LinearSAE


class ReluSAE(LinearSAE):
    """ReLU SAE with a decoder-norm weighted L1 penalty."""

    variant = "relu"
    unit_decoder = False
    enc_init_scale = 0.1

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Dense codes f = ReLU(π)."""
        return Codes(m=self.config.m, dense=torch.relu(self.pre_acts(xi)))

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and λ Σ_i f_i ‖W_dec,i‖."""
        codes = self.encode_normalized(xi)
        l1 = (codes.dense * self.decoder.row_norms()).sum(dim=-1).mean()
        return codes, self.decode_normalized(codes), {"l1": (self.config.l1, l1)}
