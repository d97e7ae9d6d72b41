"""Learning sanity: on data with a known sparse dictionary the main variants reach FVU < 0.1."""

from __future__ import annotations

import pytest
import torch

import trainer.sae as sae_zoo

STEPS, BATCH, LR = 1000, 256, 3e-3


@pytest.mark.parametrize("variant", ["sparsemax", "topk", "relu"])
def test_learns_ground_truth_dictionary(variant: str, dictionary_data, fvu) -> None:
    data = dictionary_data(d=64, m_true=128, active=4, noise=0.01, seed=1)
    sae = sae_zoo.build({"variant": variant, "d": 64, "m": 256, "seed": 0, **({"k": 8} if variant == "topk" else {})})
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.99))
    for _ in range(STEPS):
        _, _, losses = sae(data.batch(BATCH))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        sae.post_step()
    sae.eval()
    x = data.batch(2048)
    with torch.no_grad():
        x_hat, codes, _ = sae(x)
    assert fvu(x, x_hat) < 0.1
    assert float(codes.support_sizes().float().mean()) < 64  # sparse, not an identity map
