"""``relu``: the standard SAE baseline (Anthropic, April 2024 update).

f = ReLU((x − b_dec) W_encᵀ + b_enc), x̂ = f W_dec + b_dec, loss = MSE + λ Σ_i f_i ‖W_dec,i‖
(mean over the batch). λ = ``l1`` = 1e-3 (the paper's baselines) or, with ``target_l0``, steered
from there to that L0 (:mod:`trainer.sae.steering`). The decoder is unconstrained (the penalty is
weighted by the row norms instead); W_enc starts at 0.1 · W_dec. Once a batch's codes are sparse
(every row's support ≤ M/8, e.g. when steered to a small L0) they are padded on their support and the
encoder's and decoder's backward run over it only (:meth:`LinearSAE.active_pattern`; exact).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from trainer.sae.base import Codes
from trainer.sae.interop import SaeLensForm
from trainer.sae.linear import LinearSAE
from trainer.sae.steering import SparsityController, SteeredConfig


class ReluConfig(SteeredConfig):
    """Settings of the ReLU SAE."""

    variant: Literal["relu"] = "relu"
    l1: float = Field(default=1e-3, ge=0, description="L1 coefficient λ (start value when target_l0 is set).")


class ReluSAE(LinearSAE):
    """ReLU SAE with a decoder-norm weighted L1 penalty."""

    variant = "relu"
    config_class = ReluConfig
    unit_decoder = False
    enc_init_scale = 0.1

    def __init__(self, config: ReluConfig) -> None:
        super().__init__(config)
        self.controller = SparsityController(config.l1, config)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """f = ReLU(π): padded on its support when sparse enough (:meth:`LinearSAE.active_pattern`,
        sparse backward), dense otherwise."""
        pre = self.pre_acts(xi)  # with autograd: the dense path's; the sparse path reads it detached
        pattern = self.active_pattern(pre.detach() > 0)
        if pattern is None:
            return Codes(m=self.config.m, dense=torch.relu(pre))
        val = torch.relu(self.selected(self.centered(xi), pre.detach(), pattern.idx, pattern))
        return Codes(m=self.config.m, idx=pattern.idx, val=torch.where(pattern.mask, val, 0.0), pattern=pattern)

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and λ Σ_i f_i ‖W_dec,i‖ (λ steered when target_l0 is set)."""
        codes = self.encode_normalized(xi)
        self.controller.update(codes.support_sizes())
        norms = self.decoder.row_norms()
        weighted = codes.dense * norms if codes.dense is not None else codes.val * norms[codes.idx]
        l1 = weighted.sum(dim=-1).mean()
        return codes, self.decode_normalized(codes), {"l1": (self.controller.coefficient, l1)}

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``standard``: f = ReLU(π) is homogeneous, so the features fold by c."""
        return self.homogeneous_saelens("standard")[0]
