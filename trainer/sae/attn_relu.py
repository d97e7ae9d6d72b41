"""Ablation ``attn_relu``: the cross-attention architecture with ReLU + L1 instead of sparsemax.

a = ReLU(z), z = (x_n W_Kᵀ) Cᵀ (dense codes), x̂ = ‖x‖ · (a C) W_V. Penalty: λ Σ_i a_i ‖C_i‖ ‖W_V‖_F/√d
(mean over the batch). The weight stands in for the decoder-row norm ‖(C W_V)_i‖ without forming
C W_V (an M×d×d product); it equals ‖C_i‖ at W_V = I and stops the L1 term being evaded by shrinking
W_K while growing C or W_V.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.cross_attention import CrossAttentionSAE


class AttnReluSAE(CrossAttentionSAE):
    """Cross-attention SAE with a ReLU activation and a weighted L1 penalty."""

    variant = "attn_relu"

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Dense codes a = ReLU(z)."""
        return Codes(m=self.config.m, dense=torch.relu(self.query(xi) @ self.C.T))

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and the weighted L1 penalty."""
        codes = self.encode_normalized(xi)
        weight = self.C.norm(dim=-1) * (self.W_V.norm() / math.sqrt(self.config.d))
        l1 = (codes.dense * weight).sum(dim=-1).mean()  # Σ_i a_i w_i
        return codes, self.decode_normalized(codes), {"l1": (self.config.l1, l1)}
