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

from trainer.sae.base import DENSE_FRACTION, SAE, Codes, Decoder
from trainer.sae.config import SAEConfig
from trainer.sae.interop import SaeLensForm, f64
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

    def selected(self, xc: Tensor, pre: Tensor, idx: Tensor, pattern: SupportPattern) -> Tensor:
        """π[b, idx[b,k]] read from the dense π (computed without autograd) with a sparse backward to W_enc
        and b_dec (through xc) and to b_enc, through b_enc[idx] − sg(b_enc[idx]) (exactly 0, so the value
        is π's own). 0 plus a b_enc gradient at padding: callers mask the activation there."""
        bias = self.b_enc[idx]
        return select_linear(xc, self.W_enc, idx, pre, pattern) + (bias - bias.detach())

    def active_pattern(self, mask: Tensor) -> SupportPattern | None:
        """The support of a (B, M) mask of the latents that can be non-zero, as a masked
        :class:`SupportPattern`, or None when a row holds more than ``DENSE_FRACTION`` · M of them (then
        the dense products are no dearer than the sparse ones: the caller takes its dense path).

        The penalty variants (relu, jumprelu, gated) take the sparse path with it whenever their codes
        are sparse enough. It is exact: outside the mask an activation is 0 and so is its derivative
        with respect to π, so the encoder's gradient lives on the mask; the decoder's products need only
        the non-zero codes. Results equal the dense path's up to float summation order
        (``tests/sae/test_sparse_penalty_paths.py``)."""
        return SupportPattern.from_mask(mask, DENSE_FRACTION * self.config.m)

    def selected_pre(self, xc: Tensor, h: Tensor, idx: Tensor, pattern: SupportPattern | None = None) -> Tensor:
        """π[b, idx[b,k]] with a sparse backward to W_enc, b_enc and b_dec (B, K)."""
        return select_linear(xc, self.W_enc, idx, h, pattern) + self.b_enc[idx]

    def decoder_matrix(self) -> Tensor:
        """W_dec (M, d): latent i adds f_i W_dec,i to x̂ (b_dec is added whatever the codes)."""
        return self.decoder.weight

    def decode_normalized(self, codes: Codes) -> Tensor:
        """x̂ = Σ_i f_i W_dec,i + b_dec."""
        return self.decoder(codes) + self.b_dec

    def homogeneous_saelens(self, architecture: str, bias_name: str = "b_enc") -> tuple[SaeLensForm, float]:
        """(form, c) for codes positively homogeneous in π (relu, topk, jumprelu, gated, batchtopk): SAELens
        computes c·π on c·u, so the fold scales the features by c — W_enc, W_dec as they are, b_dec·c and
        the encoder bias (named ``bias_name`` in SAELens) ·c. The caller adds its architecture's own
        tensors (thresholds ×c) and cfg keys."""
        c, normalize = self.saelens_scale()
        tensors = {"W_enc": f64(self.W_enc).T, "W_dec": f64(self.decoder.weight), "b_dec": c * f64(self.b_dec),
                   bias_name: c * f64(self.b_enc)}
        return SaeLensForm(architecture, tensors, normalize_activations=normalize), c
