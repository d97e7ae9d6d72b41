"""The cross-attention architecture of the paper, shared by ``sparsemax`` and ``attn_relu``.

Parameters: concepts C ∈ R^{M×d}, W_K, W_V ∈ R^{d×d}. On x_n = x/‖x‖ (this family always works on the
unit sphere and rescales by ‖x‖, see :class:`trainer.sae.base.SAE`):

    q = x_n W_Kᵀ,   z = q Cᵀ          # = x_n (C W_K)ᵀ without forming C W_K (M×d×d)
    x̂ = ‖x‖ · (a C) W_V              # = ‖x‖ · a (C W_V) without forming C W_V

``a C`` is a sparse decode over the rows of C when the codes are sparse.

Init: C rows are seeded random unit vectors (so z starts as cosine similarities), W_K = W_V = I.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.sae.base import SAE, Codes
from trainer.sae.config import SAEConfig
from trainer.sae.interop import f64
from trainer.sae.sparse_ops import sparse_decode


class CrossAttentionSAE(SAE):
    """Shared concepts C used as keys (through W_K) and values (through W_V)."""

    always_unit_norm = True

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        d = config.d
        self.C = nn.Parameter(self.unit_rows(config.m, d))
        self.W_K = nn.Parameter(torch.eye(d, dtype=config.torch_dtype))
        self.W_V = nn.Parameter(torch.eye(d, dtype=config.torch_dtype))

    def query(self, xn: Tensor) -> Tensor:
        """q = x_n W_Kᵀ (B, d)."""
        return xn @ self.W_K.T

    def decoder_matrix(self) -> Tensor:
        """C W_V (M, d), computed as (C) @ W_V: the value vectors as they reach the output (x̂ = ‖x‖ a (C W_V)).
        Formed only here (M·d² flops once), never in the training step."""
        return self.C @ self.W_V

    def decode_normalized(self, codes: Codes) -> Tensor:
        """(a C) W_V on the unit sphere (the base class multiplies by ‖x‖)."""
        if codes.is_sparse:
            h = sparse_decode(codes.idx, codes.val, self.C, codes.support_pattern())
        else:
            h = codes.dense.to(self.C.dtype) @ self.C
        return h @ self.W_V

    def dictionary(self) -> dict[str, Tensor]:
        """The plain dictionary this SAE folds to: W_enc = (C W_K)ᵀ (d, M) on x/‖x‖, W_dec = C W_V (M, d),
        zero biases (the scale s cancels on x/‖x‖), features ‖x‖·a — a linear, stateless decode."""
        c = f64(self.C)
        d, m = self.config.d, self.config.m
        return {"W_enc": (c @ f64(self.W_K)).T, "W_dec": c @ f64(self.W_V),
                "b_enc": torch.zeros(m, dtype=torch.float64), "b_dec": torch.zeros(d, dtype=torch.float64)}
