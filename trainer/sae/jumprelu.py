"""``jumprelu``: JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead").

f = JumpReLU_θ(π) = π ⊙ H(π − θ), π = (x − b_dec) W_encᵀ + b_enc, θ_i = g · exp(log_threshold_i).
Loss = MSE + λ ‖f‖₀ (mean over the batch, λ = ``l0``). H has no gradient; θ gets the
straight-through pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε:

    ∂f/∂θ  := −(θ/ε) K((π − θ)/ε)        ∂H(π − θ)/∂θ := −(1/ε) K((π − θ)/ε)

Sparsity (decisions of ours, measured on SmolLM2 block 20, M = 1,152, 800 steps): Adam moves log θ
by about lr per step, far slower than the encoder moves π, so neither a fixed start such as
θ = 1e-3 (fully dense after 1,200 steps) nor a steered λ (λ grew ×10⁶ while the L0 stayed above 600)
holds the L0 within a run. So, on the first training batch (unless ``threshold_init`` is given):

* b_dec ← the batch mean (the usual data-aware decoder-bias init): without it a few latents learn
  the mean direction, fire on every token and the rest die (96% dead in that run);
* θ_i ← the (1 − L/M) quantile of π_i over the batch, so the initial L0 is about L; the buffer
  ``threshold_ready`` records that this happened;

and during training a global threshold scale g (a buffer, starting at 1) is steered by the
controller of :mod:`trainer.sae.steering` toward L = ``target_l0`` — too many active latents raise
every threshold — while the STE keeps learning each latent's own threshold. Without ``target_l0``
the same controller holds L = 64 (``DEFAULT_L0``), so a JumpReLU SAE with the defaults is never
dense. λ stays the fixed coefficient ``l0``. On that run: L0 31.8 for a target of 32, 0.7% dead.

Unit-norm decoder rows (Gemma Scope practice). π is computed densely; when every row's support is
≤ M/8 the codes are padded on it and the backward runs over the support and the entries just below
θ that the STE needs (:meth:`JumpReluSAE.forward_normalized`; exact), otherwise densely.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from trainer.sae.base import Codes, padded_from_dense
from trainer.sae.interop import SaeLensForm, f64
from trainer.sae.linear import LinearSAE
from trainer.sae.sparse_ops import SupportPattern, sparse_decode
from trainer.sae.steering import SparsityController, SteeredConfig

#: The L0 held (and initialised) when no target is given.
DEFAULT_L0 = 64.0
#: Smallest initial threshold (θ must be positive: it lives in log space).
MIN_THRESHOLD = 1e-6


class JumpReluConfig(SteeredConfig):
    """Settings of the JumpReLU SAE."""

    variant: Literal["jumprelu"] = "jumprelu"
    l0: float = Field(default=1e-3, ge=0, description="L0 coefficient λ.")
    bandwidth: float = Field(default=1e-3, gt=0, description="STE rectangle-kernel bandwidth ε.")
    threshold_init: float | None = Field(default=None, gt=0, description=(
        "initial θ for every latent; None: from the first training batch so the initial L0 is target_l0 "
        "(or 64)."))
    target_l0: float | None = Field(default=None, gt=0, description=(
        "L0 the global threshold scale is steered to (None: hold 64)."))


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = π H(π − θ); df/dπ = H(π − θ); df/dθ = −(θ/ε) K((π − θ)/ε). θ: (M,) against π (B, M), summed
    over the batch in backward, or one θ per entry of π."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        dpre = g * (pre > theta).to(g.dtype)
        dtheta = (-(theta / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g).sum_to_size(theta.shape)
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
        dtheta = (-(1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g).sum_to_size(theta.shape)
        return None, dtheta, None


class JumpReluSAE(LinearSAE):
    """JumpReLU SAE with learnable thresholds and an L0 penalty."""

    variant = "jumprelu"
    config_class = JumpReluConfig
    enc_init_scale = 0.1

    def __init__(self, config: JumpReluConfig) -> None:
        super().__init__(config)
        start = config.threshold_init if config.threshold_init is not None else 1e-3
        self.log_threshold = nn.Parameter(torch.full((config.m,), math.log(start), dtype=config.torch_dtype))
        self.register_buffer("threshold_ready", torch.tensor(config.threshold_init is not None))
        # g, the global threshold scale, steered toward target_l0 (or DEFAULT_L0)
        self.controller = SparsityController(1.0, config, target=config.target_l0 or DEFAULT_L0)

    @torch.no_grad()
    def _init_from_batch(self, xi: Tensor) -> None:
        """b_dec = mean of the first training batch, θ_i = quantile_{1 − L/M}(π_i) over it (docstring)."""
        if bool(self.threshold_ready) or not self.training:
            return
        self.b_dec.copy_(xi.mean(dim=0).to(self.b_dec.dtype))
        pre = self.pre_acts(xi)
        target = self.config.target_l0 or DEFAULT_L0
        rows = pre.shape[0]
        k = min(rows, max(1, round((1.0 - min(target / self.config.m, 1.0)) * rows)))  # the (1 − L/M) quantile
        theta = torch.kthvalue(pre.detach().float(), k, dim=0).values.clamp_min(MIN_THRESHOLD)
        self.log_threshold.copy_(theta.log().to(self.log_threshold.dtype))
        self.threshold_ready.fill_(True)

    def thresholds(self) -> Tensor:
        """θ_i = g · exp(log_threshold_i) (M,), differentiable in log_threshold."""
        return self.controller.coefficient.to(self.log_threshold.dtype) * torch.exp(self.log_threshold)

    def _pre(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """(π (B, M) with autograd, θ (M,))."""
        self._init_from_batch(xi)
        return self.pre_acts(xi), self.thresholds()

    def _support_codes(self, xi: Tensor, pre: Tensor, theta: Tensor, pattern: SupportPattern) -> Codes:
        """JumpReLU codes on the support π > θ, read from the detached π with a sparse backward."""
        idx = pattern.idx
        s = self.selected(self.centered(xi), pre.detach(), idx, pattern)
        f = _JumpReLU.apply(s, theta[idx], self.config.bandwidth)
        return Codes(m=self.config.m, idx=idx, val=torch.where(pattern.mask, f, 0.0), pattern=pattern)

    def encode_normalized(self, xi: Tensor) -> Codes:
        """JumpReLU codes: padded on their support when sparse enough, dense otherwise."""
        pre, theta = self._pre(xi)
        pattern = self.active_pattern(pre.detach() > theta.detach())
        if pattern is None:
            return padded_from_dense(_JumpReLU.apply(pre, theta, self.config.bandwidth), self.config.m)
        return self._support_codes(xi, pre, theta, pattern)

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and λ ‖f‖₀ with the STE threshold gradient.

        Sparse path (codes sparse enough, :meth:`LinearSAE.active_pattern`): besides the support S
        (π > θ), the θ pseudo-derivatives need the entries just below the threshold, N = {θ − ε ≤ π ≤ θ}
        (a superset of where K((π − θ)/ε) ≠ 0 off the support, twice as wide; "≤" keeps π = θ when ε
        is below θ's float resolution and θ − ε rounds to θ): there f = 0 and ∂f/∂π = 0, but
        ∂L/∂θ_j gains −(θ_j/ε) K · ⟨∂L/∂x̂_b, W_dec,j⟩ from the reconstruction and −(1/ε) K · λ/B from the
        L0 term. So N is decoded too, with f = 0 (x̂ unchanged) through sg(W_dec) (its sampled dot gives
        ⟨∂L/∂x̂_b, W_dec,j⟩), and enters the L0 sum with H = 0. Everywhere else both derivatives are 0,
        so the gradients are the dense path's."""
        pre, theta = self._pre(xi)
        eps = self.config.bandwidth
        pre_d, theta_d = pre.detach(), theta.detach()
        support = self.active_pattern(pre_d > theta_d)
        near = None if support is None else self.active_pattern((pre_d <= theta_d) & (pre_d >= theta_d - eps))
        if support is None or near is None:  # dense codes: ∂L/∂f reaches every entry near θ
            codes = Codes(m=self.config.m, dense=_JumpReLU.apply(pre, theta, eps))
            self.controller.update(codes.support_sizes())
            l0 = _Step.apply(pre, theta, eps).sum(dim=-1).mean()
            return codes, self.decode_normalized(codes), {"l0": (self.config.l0, l0)}
        codes = self._support_codes(xi, pre, theta, support)
        self.controller.update(codes.support_sizes())
        s_near, theta_near = pre_d.gather(1, near.idx), theta[near.idx]
        f_near = torch.where(near.mask, _JumpReLU.apply(s_near, theta_near, eps), 0.0)  # 0: below θ
        x_hat = self.decode_normalized(codes) + sparse_decode(near.idx, f_near, self.decoder.weight.detach(), near)
        # on the support f = π H(π − θ) = π, so the codes' values are the π the step function reads
        steps = (torch.where(support.mask, _Step.apply(codes.val.detach(), theta[support.idx], eps), 0.0).sum()
                 + torch.where(near.mask, _Step.apply(s_near, theta_near, eps), 0.0).sum())
        return codes, x_hat, {"l0": (self.config.l0, steps / xi.shape[0])}

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``jumprelu``: the features fold by c, and so does θ (stored as θ, not log θ)."""
        form, c = self.homogeneous_saelens("jumprelu")
        form.tensors["threshold"] = c * f64(self.thresholds())
        return form
