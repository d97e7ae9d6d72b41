"""Sparsity steering: the penalty coefficient λ of relu, gated and attn_relu (and JumpReLU's global
threshold scale, see :mod:`trainer.sae.jumprelu`) is driven so that the L0 of the training batches
reaches ``target_l0`` (``docs/variants.md``, "Sparsity targets").

Comparisons between SAE families are only meaningful at equal sparsity. The penalty variants have
no direct L0 knob: their L0 lands wherever λ puts it. With ``target_l0`` set, λ is steered by a
multiplicative integral controller on a smoothed L0 of the training batches:

    ℓ̄_t     = β ℓ̄_{t−1} + (1 − β) ℓ_t          (ℓ̄_1 = ℓ_1; ℓ_t = mean support size of batch t)
    λ_{t+1} = λ_t · exp(η · clip(ln(ℓ̄_t / L*), −1, 1))

with L* = ``target_l0``, η = ``steer_rate`` (0.02: λ can change by e^0.02 ≈ 2% per step, ×10 in
~115 steps) and β = ``steer_smoothing`` (0.9, about ten batches). Too many active latents (ℓ̄ > L*)
raise λ, too few lower it; the clip bounds the step when the L0 is far off (a dense start).
λ starts at the variant's coefficient (``l1`` or ``l0``) and stays in [1e-10, 1e4].

λ, ℓ̄ and the step count are buffers of the SAE, so they are saved with the weights and in every
checkpoint: a resumed run continues the same trajectory exactly. Only training-mode forwards
update them; evaluation never changes λ. Without ``target_l0`` λ is the fixed coefficient.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from trainer.sae.config import SAEConfig

COEF_MIN, COEF_MAX = 1e-10, 1e4


class SteeredConfig(SAEConfig):
    """Settings of a variant whose sparsity penalty can be steered to a target L0."""

    target_l0: float | None = Field(default=None, gt=0, description=(
        "steer the penalty coefficient so the training L0 reaches this (mean active latents per token)."))
    steer_rate: float = Field(default=0.02, gt=0, le=1, description="η: log-coefficient step per unit log error.")
    steer_smoothing: float = Field(default=0.9, ge=0, lt=1, description="β: EMA of the batch L0 the controller sees.")


class SparsityController(nn.Module):
    """λ as a buffer, steered toward ``target_l0`` (module docstring) or fixed when there is none."""

    def __init__(self, coef: float, config: SteeredConfig, target: float | None = None) -> None:
        super().__init__()
        self.target = config.target_l0 if target is None else target
        self.rate = config.steer_rate
        self.smoothing = config.steer_smoothing
        self.register_buffer("coef", torch.tensor(float(coef), dtype=torch.float64))
        self.register_buffer("l0_ema", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    @property
    def coefficient(self) -> Tensor:
        """λ for this step (a 0-dim tensor: no host sync)."""
        return self.coef

    @torch.no_grad()
    def update(self, support_sizes: Tensor) -> None:
        """One controller step from the batch's per-row support sizes (training mode, target set)."""
        if not self.training or self.target is None or support_sizes.numel() == 0:
            return
        l0 = support_sizes.to(torch.float64).mean()
        self.steps.add_(1)
        first = self.steps == 1
        self.l0_ema.copy_(torch.where(first, l0, self.smoothing * self.l0_ema + (1 - self.smoothing) * l0))
        error = torch.log(self.l0_ema.clamp_min(1e-2) / self.target).clamp(-1.0, 1.0)  # ln(ℓ̄ / L*)
        self.coef.mul_(torch.exp(self.rate * error)).clamp_(COEF_MIN, COEF_MAX)
