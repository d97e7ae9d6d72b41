"""``jumprelu``: JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead").

f = JumpReLU_θ(π) = π ⊙ H(π − θ), π = (x − b_dec) W_encᵀ + b_enc, θ = exp(log_threshold) per latent.
Loss = MSE + λ ‖f‖₀ (mean over the batch, λ = ``l0``). H has no gradient; θ gets the straight-through
pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε:

    ∂f/∂θ  := −(θ/ε) K((π − θ)/ε)        ∂H(π − θ)/∂θ := −(1/ε) K((π − θ)/ε)

θ starts at ``threshold_init``; unit-norm decoder rows (Gemma Scope practice). Codes are computed
densely (the θ gradient needs every π near θ) and handed out padded when every row has at most
``dense_fraction``·M active latents, dense otherwise (:func:`padded_from_dense`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.sae.base import Codes, padded_from_dense
from trainer.sae.config import SAEConfig
from trainer.sae.linear import LinearSAE


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = π H(π − θ); df/dπ = H(π − θ); df/dθ = −(θ/ε) K((π − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        dpre = g * (pre > theta).to(g.dtype)
        dtheta = (-(theta / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g).sum(dim=0)
        return dpre, dtheta, None


class _Step(torch.autograd.Function):
    """H(π − θ); dH/dπ = 0; dH/dθ = −(1/ε) K((π − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        dtheta = (-(1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g).sum(dim=0)
        return None, dtheta, None


class JumpReluSAE(LinearSAE):
    """JumpReLU SAE with learnable thresholds and an L0 penalty."""

    variant = "jumprelu"
    enc_init_scale = 0.1

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        self.log_threshold = nn.Parameter(
            torch.full((config.m,), math.log(config.threshold_init), dtype=config.torch_dtype))

    def _acts(self, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.pre_acts(xi)
        theta = torch.exp(self.log_threshold)
        return pre, theta, _JumpReLU.apply(pre, theta, self.config.bandwidth)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """JumpReLU codes."""
        return padded_from_dense(self._acts(xi)[2], self.config.m, self.config.dense_fraction)

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and λ ‖f‖₀ with the STE threshold gradient."""
        pre, theta, f = self._acts(xi)
        codes = padded_from_dense(f, self.config.m, self.config.dense_fraction)
        l0 = _Step.apply(pre, theta, self.config.bandwidth).sum(dim=-1).mean()
        return codes, self.decode_normalized(codes), {"l0": (self.config.l0, l0)}
