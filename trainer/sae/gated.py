"""``gated``: Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

With x_c = x − b_dec and h = x_c W_gateᵀ (W_gate = ``W_enc``):

    π_gate = h + b_gate                       (b_gate = ``b_enc``)
    π_mag  = exp(r_mag) ⊙ h + b_mag           # W_mag = exp(r_mag) ⊙ W_gate (weight sharing)
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag),     x̂ = f W_dec + b_dec

Loss = MSE(x̂, x) + λ ‖ReLU(π_gate)‖₁ + MSE(x̂_frozen, x) with x̂_frozen = ReLU(π_gate) sg(W_dec) + sg(b_dec)
(the auxiliary reconstruction through a frozen decoder, which trains the gate path). Unit-norm decoder
rows as in the paper. Codes are padded when sparse enough (:func:`padded_from_dense`). λ = ``l1`` =
1e-3 or steered to ``target_l0`` (:mod:`trainer.sae.steering`) on the L0 of the codes f.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from trainer.sae.base import Codes, mse, padded_from_dense
from trainer.sae.linear import LinearSAE
from trainer.sae.steering import SparsityController, SteeredConfig


class GatedConfig(SteeredConfig):
    """Settings of the Gated SAE."""

    variant: Literal["gated"] = "gated"
    l1: float = Field(default=1e-3, ge=0, description="L1 coefficient λ on the gate (start value when steered).")


class GatedSAE(LinearSAE):
    """Gated SAE with r_mag rescaling and the frozen-decoder auxiliary loss."""

    variant = "gated"
    config_class = GatedConfig
    enc_init_scale = 0.1

    def __init__(self, config: GatedConfig) -> None:
        super().__init__(config)
        self.controller = SparsityController(config.l1, config)
        self.r_mag = nn.Parameter(torch.zeros(config.m, dtype=config.torch_dtype))
        self.b_mag = nn.Parameter(torch.zeros(config.m, dtype=config.torch_dtype))

    def _paths(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag)."""
        h = self.centered(xi) @ self.W_enc.T
        return h + self.b_enc, torch.exp(self.r_mag) * h + self.b_mag

    def _codes(self, pi_gate: Tensor, pi_mag: Tensor) -> Codes:
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)  # f = 1[π_gate > 0] ⊙ ReLU(π_mag)
        return padded_from_dense(f, self.config.m)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Gated codes."""
        return self._codes(*self._paths(xi))

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction, L1 on the gate and the frozen-decoder auxiliary loss."""
        pi_gate, pi_mag = self._paths(xi)
        codes = self._codes(pi_gate, pi_mag)
        self.controller.update(codes.support_sizes())
        gate = torch.relu(pi_gate)
        l1 = gate.sum(dim=-1).mean()  # ‖ReLU(π_gate)‖₁
        frozen = gate @ self.decoder.weight.detach() + self.b_dec.detach()
        aux = mse(frozen, xi)
        return codes, self.decode_normalized(codes), {"l1": (self.controller.coefficient, l1), "aux": (1.0, aux)}
