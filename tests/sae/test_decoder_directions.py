"""``SAE.decoder_directions()``: the unit direction each latent adds to x̂, in activation space."""

from __future__ import annotations

import pytest
import torch

import trainer.sae as sae_zoo
from trainer.sae.base import Codes

D, M = 8, 12
EXTRA = {"topk": {"k": 3}, "batchtopk": {"k": 3}}


def perturbed(variant: str, **kw) -> sae_zoo.SAE:
    """A variant with every parameter moved off its init (W_V ≠ I, biases ≠ 0, decoder rows not unit)."""
    sae = sae_zoo.build({"variant": variant, "d": D, "m": M, "seed": 1, **EXTRA.get(variant, {}), **kw})
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return sae.eval()


@pytest.mark.parametrize("variant", sorted(sae_zoo.variants()))
def test_one_hot_decode_moves_along_the_direction(variant: str) -> None:
    """decode(e_j) − decode(0) is a positive multiple of u_j for every latent j; ‖u_j‖ = 1."""
    sae = perturbed(variant, input_scale=2.5)
    u = sae.decoder_directions()
    assert u.shape == (M, D) and u.dtype == torch.float32
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(M))
    norms = torch.full((M,), 3.0)  # ‖x‖ for the variants that rescale by it
    with torch.no_grad():
        delta = (sae.decode(Codes(m=M, dense=torch.eye(M), norms=norms))
                 - sae.decode(Codes(m=M, dense=torch.zeros(M, M), norms=norms)))
    cos = torch.nn.functional.cosine_similarity(delta, u, dim=-1)
    torch.testing.assert_close(cos, torch.ones(M), atol=1e-5, rtol=0)


def test_cross_attention_directions_are_the_value_vectors() -> None:
    """Sparsemax SAE: u_j = (C W_V)_j / ‖(C W_V)_j‖, computed by hand for a 2-d case."""
    sae = sae_zoo.build({"variant": "sparsemax", "d": 2, "m": 3, "seed": 0})
    with torch.no_grad():
        sae.C.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.W_V.copy_(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    # C W_V = [[0, 2], [1, 0], [1, 2]]
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1 / 5**0.5, 2 / 5**0.5]])
    torch.testing.assert_close(sae.decoder_directions(), expected)


def test_linear_directions_are_normalised_decoder_rows_and_zero_rows_stay_zero() -> None:
    sae = sae_zoo.build({"variant": "relu", "d": 2, "m": 2, "seed": 0})
    with torch.no_grad():
        sae.decoder.weight.copy_(torch.tensor([[3.0, -4.0], [0.0, 0.0]]))
    torch.testing.assert_close(sae.decoder_directions(), torch.tensor([[0.6, -0.8], [0.0, 0.0]]))
