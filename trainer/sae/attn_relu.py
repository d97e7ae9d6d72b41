"""Ablation ``attn_relu``: the cross-attention architecture with ReLU + L1 instead of sparsemax.

a = ReLU(z), z = (x_n W_Kᵀ) Cᵀ (dense codes), x̂ = ‖x‖ · (a C) W_V. Penalty: λ Σ_i a_i ‖C_i‖ ‖W_V‖_F/√d
(mean over the batch). The weight stands in for the decoder-row norm ‖(C W_V)_i‖ without forming
C W_V (an M×d×d product); it equals ‖C_i‖ at W_V = I and stops the L1 term being evaded by shrinking
W_K while growing C or W_V. Everything else is the Sparsemax SAE's (unit-sphere input, ×‖x‖ output,
``norm_mse`` loss), so the pair isolates the activation. λ = ``l1`` = 1e-3 or steered to
``target_l0`` (:mod:`trainer.sae.steering`), which is how it is compared at the Sparsemax SAE's L0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.cross_attention import CrossAttentionSAE
from trainer.sae.interop import SaeLensForm
from trainer.sae.steering import SparsityController, SteeredConfig


class AttnReluConfig(SteeredConfig):
    """Settings of the attention + ReLU ablation."""

    variant: Literal["attn_relu"] = "attn_relu"
    l1: float = Field(default=1e-3, ge=0, description="L1 coefficient λ (start value when target_l0 is set).")
    loss: Literal["norm_mse", "mse"] = Field(default="norm_mse", description="the Sparsemax SAE's loss.")


class AttnReluSAE(CrossAttentionSAE):
    """Cross-attention SAE with a ReLU activation and a weighted L1 penalty."""

    variant = "attn_relu"
    config_class = AttnReluConfig

    def __init__(self, config: AttnReluConfig) -> None:
        super().__init__(config)
        self.controller = SparsityController(config.l1, config)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Dense codes a = ReLU(z)."""
        return Codes(m=self.config.m, dense=torch.relu(self.query(xi) @ self.C.T))

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and the weighted L1 penalty."""
        codes = self.encode_normalized(xi)
        self.controller.update(codes.support_sizes())
        weight = self.C.norm(dim=-1) * (self.W_V.norm() / math.sqrt(self.config.d))
        l1 = (codes.dense * weight).sum(dim=-1).mean()  # Σ_i a_i w_i
        return codes, self.decode_normalized(codes), {"l1": (self.controller.coefficient, l1)}

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``standard``: ReLU is homogeneous, so ‖x‖·ReLU((x/‖x‖) W_enc) = ReLU(x W_enc) on the
        folded dictionary (:meth:`CrossAttentionSAE.dictionary`) — nothing of ours needed to load it."""
        return SaeLensForm("standard", self.dictionary())
