"""``gated``: Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

With x_c = x − b_dec and h = x_c W_gateᵀ (W_gate = ``W_enc``):

    π_gate = h + b_gate                       (b_gate = ``b_enc``)
    π_mag  = exp(r_mag) ⊙ h + b_mag           # W_mag = exp(r_mag) ⊙ W_gate (weight sharing)
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag),     x̂ = f W_dec + b_dec

Loss = MSE(x̂, x) + λ ‖ReLU(π_gate)‖₁ + MSE(x̂_frozen, x) with x̂_frozen = ReLU(π_gate) sg(W_dec) + sg(b_dec)
(the auxiliary reconstruction through a frozen decoder, which trains the gate path). Unit-norm decoder
rows as in the paper. When every row's gate support is ≤ M/8 the codes, the L1 term and the frozen
reconstruction are computed on it with a sparse backward (exact); otherwise densely. λ = ``l1`` =
1e-3 or steered to ``target_l0`` (:mod:`trainer.sae.steering`) on the L0 of the codes f.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from trainer.sae.base import Codes, mse, padded_from_dense
from trainer.sae.interop import SaeLensForm, f64
from trainer.sae.linear import LinearSAE
from trainer.sae.sparse_ops import SupportPattern, select_linear, sparse_decode
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

    def _hidden(self, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_c, h = x_c W_gateᵀ, π_gate), with autograd."""
        xc = self.centered(xi)
        h = xc @ self.W_enc.T
        return xc, h, h + self.b_enc

    def _dense_codes(self, h: Tensor, pi_gate: Tensor) -> Codes:
        pi_mag = torch.exp(self.r_mag) * h + self.b_mag
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)  # f = 1[π_gate > 0] ⊙ ReLU(π_mag)
        return padded_from_dense(f, self.config.m)

    def _support(self, xc: Tensor, h: Tensor, pattern: SupportPattern) -> tuple[Codes, Tensor]:
        """(codes f, ReLU(π_gate)) on the gate's support, padded, with a sparse backward: h is read there
        once and feeds both paths (π_mag = exp(r_mag) ⊙ h + b_mag elementwise, as densely)."""
        idx, mask = pattern.idx, pattern.mask
        h_sel = select_linear(xc, self.W_enc, idx, h.detach(), pattern)
        s_gate = h_sel + self.b_enc[idx]
        s_mag = torch.exp(self.r_mag)[idx] * h_sel + self.b_mag[idx]
        f = torch.where(mask, (s_gate > 0).to(s_mag.dtype) * torch.relu(s_mag), 0.0)
        return Codes(m=self.config.m, idx=idx, val=f, pattern=pattern), torch.where(mask, torch.relu(s_gate), 0.0)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Gated codes: padded on the gate's support when sparse enough, dense otherwise."""
        xc, h, pi_gate = self._hidden(xi)
        pattern = self.active_pattern(pi_gate.detach() > 0)
        return self._dense_codes(h, pi_gate) if pattern is None else self._support(xc, h, pattern)[0]

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction, L1 on the gate and the frozen-decoder auxiliary loss.

        Sparse path (every row's gate support ≤ M/8, :meth:`LinearSAE.active_pattern`): f, ReLU(π_gate)
        and their derivatives with respect to h vanish off the gate's support, so the codes, the L1 term
        and the frozen reconstruction are computed there (padded) and the encoder's backward runs over
        it only; the results are the dense path's."""
        xc, h, pi_gate = self._hidden(xi)
        pattern = self.active_pattern(pi_gate.detach() > 0)
        frozen_w = self.decoder.weight.detach()
        if pattern is None:
            codes = self._dense_codes(h, pi_gate)
            gate = torch.relu(pi_gate)
            frozen = gate @ frozen_w
        else:
            codes, gate = self._support(xc, h, pattern)
            frozen = sparse_decode(pattern.idx, gate, frozen_w, pattern)
        self.controller.update(codes.support_sizes())
        l1 = gate.sum(dim=-1).mean()  # ‖ReLU(π_gate)‖₁
        aux = mse(frozen + self.b_dec.detach(), xi)
        return codes, self.decode_normalized(codes), {"l1": (self.controller.coefficient, l1), "aux": (1.0, aux)}

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``gated``: π_gate = h + b_gate, π_mag = exp(r_mag) ⊙ h + b_mag (features fold by c)."""
        form, c = self.homogeneous_saelens("gated", bias_name="b_gate")
        form.tensors.update(b_mag=c * f64(self.b_mag), r_mag=f64(self.r_mag))
        return form
