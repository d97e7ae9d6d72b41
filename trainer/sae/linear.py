"""The linear-encoder architecture shared by relu, gated, jumprelu, topk, batchtopk and mlp_sparsemax.

Parameters: W_enc (M, d), b_enc (M,), b_dec (d,), decoder W_dec (M, d) (one row per latent).
Pre-activations π = (x − b_dec) W_encᵀ + b_enc; reconstruction x̂ = Σ_i f_i W_dec,i + b_dec.

Init: W_dec rows are seeded random unit vectors, W_enc = ``enc_init_scale`` · W_dec (tied init as in
Gao et al. 2024 / Anthropic's updates), b_enc = b_dec = 0. Variants with unit-norm decoders keep
‖W_dec,i‖ = 1 through :meth:`SAE.post_step`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from trainer.sae.base import SAE, Codes, Decoder
from trainer.sae.config import SAEConfig
from trainer.sae.sparse_ops import SupportPattern, select_linear


class LinearSAE(SAE):
    """Linear encoder + dictionary decoder with a decoder bias (see module docstring)."""

    #: Whether decoder rows are kept at unit norm.
    unit_decoder: ClassVar[bool] = True
    #: W_enc = scale · W_dec at init.
    enc_init_scale: ClassVar[float] = 1.0

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        m, d = config.m, config.d
        w = self.unit_rows(m, d)
        self.decoder = Decoder(m, d, w, unit_norm=self.unit_decoder)
        self.W_enc = nn.Parameter(w.clone() * self.enc_init_scale)
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=config.torch_dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=config.torch_dtype))

    def centered(self, xi: Tensor) -> Tensor:
        """x − b_dec."""
        return xi - self.b_dec

    def pre_acts(self, xi: Tensor) -> Tensor:
        """π = (x − b_dec) W_encᵀ + b_enc, dense with plain autograd (B, M)."""
        return self.centered(xi) @ self.W_enc.T + self.b_enc

    def hidden(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """(x − b_dec, (x − b_dec) W_encᵀ) with the product computed without autograd, for sparse codes."""
        xc = self.centered(xi)
        with torch.no_grad():
            h = xc @ self.W_enc.T
        return xc, h

    def selected_pre(self, xc: Tensor, h: Tensor, idx: Tensor, pattern: SupportPattern | None = None) -> Tensor:
        """π[b, idx[b,k]] with a sparse backward to W_enc, b_enc and b_dec (B, K)."""
        return select_linear(xc, self.W_enc, idx, h, pattern) + self.b_enc[idx]

    def decode_normalized(self, codes: Codes) -> Tensor:
        """x̂ = Σ_i f_i W_dec,i + b_dec."""
        return self.decoder(codes) + self.b_dec
