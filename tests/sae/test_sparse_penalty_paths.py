"""The penalty variants' sparse path (relu, jumprelu, gated) against their dense path.

Once every row's support is ≤ M/8 these SAEs pad their codes on the support and run the encoder's and
decoder's backward over it only (:meth:`trainer.sae.linear.LinearSAE.active_pattern`). That is exact:
the losses, codes and every parameter gradient equal the dense path's up to float summation order,
and so do the weights after a run of steered training steps. The dense path is forced by an SAE whose
``active_pattern`` always answers None (what it answers for a dense batch).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import trainer.sae as sae_zoo
from trainer.sae.base import SAE

D, M, B, L0 = 32, 1024, 96, 8.0


def batch(seed: int = 0) -> Tensor:
    """Activations with a shared mean direction and rows of varying norm."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=gen)
    return (0.5 + torch.rand(B, 1, generator=gen)) * (torch.randn(B, D, generator=gen) + 0.5 * mean)


def sparse_sae(variant: str, bandwidth: float = 0.05) -> SAE:
    """A steered SAE whose codes on :func:`batch` have an L0 near 8 (max row support well under M/8);
    jumprelu with a wide ``bandwidth`` by default (many entries near θ)."""
    extra = {"bandwidth": bandwidth} if variant == "jumprelu" else {}
    sae = sae_zoo.build({"variant": variant, "d": D, "m": M, "seed": 0, "target_l0": L0, **extra})
    if variant in ("relu", "gated"):  # b_enc = −(1 − L/M) quantile of each latent's x W_encᵀ over 10 batches
        with torch.no_grad():
            h = torch.cat([batch(100 + i) for i in range(10)]) @ sae.W_enc.T
            sae.b_enc.copy_(-torch.quantile(h, 1 - L0 / M, dim=0))
    sae.train()
    return sae


def dense_twin(sae: SAE) -> SAE:
    """A copy that always takes the dense path."""
    twin = copy.deepcopy(sae)
    twin.active_pattern = lambda mask: None
    return twin


def step_grads(sae: SAE, x: Tensor) -> tuple[dict[str, float], Tensor, dict[str, Tensor]]:
    """(losses, dense codes, parameter gradients) of one forward/backward."""
    sae.zero_grad(set_to_none=True)
    _, codes, losses = sae(x)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, codes.to_dense().detach(), grads


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "gated", "jumprelu-tiny-bandwidth"])
def test_sparse_path_equals_dense_path(variant: str) -> None:
    """jumprelu-tiny-bandwidth: ε = 1e-12 is below θ's float resolution, so θ − ε rounds to θ; the
    first-batch init puts θ_j exactly on one π_bj, whose K(0) = 1 must still reach θ_j."""
    variant, _, tiny = variant.partition("-")
    sae = sparse_sae(variant, bandwidth=1e-12) if tiny else sparse_sae(variant)
    twin = dense_twin(sae)
    x = batch(1)
    if variant == "jumprelu":  # the data-aware init runs on the first training batch: give both the same
        sae._init_from_batch(x)
        twin._init_from_batch(x)
    codes = sae.encode(x)
    assert codes.is_sparse and codes.pattern is not None and codes.pattern.mask is not None  # the sparse path ran
    assert 0 < float(codes.support_sizes().float().mean()) < M / 8
    assert twin.encode(x).to_dense().count_nonzero() == codes.to_dense().count_nonzero()

    losses, acts, grads = step_grads(sae, x)
    dense_losses, dense_acts, dense_grads = step_grads(twin, x)
    assert torch.equal(acts, dense_acts)  # same values, read from the same π
    for name, value in dense_losses.items():
        assert losses[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert grads.keys() == dense_grads.keys()
    for name, g in dense_grads.items():
        assert g.abs().max() > 0, f"{name}: no gradient in the dense path, nothing compared"
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)


def test_jumprelu_sparse_path_carries_the_threshold_gradient_of_entries_below_theta() -> None:
    """The STE derivative reaches θ_j from entries just below θ_j (f = 0 there): dropping them changes
    log_threshold's gradient, so the comparison above tests them."""
    sae = sparse_sae("jumprelu")
    x = batch(1)
    sae._init_from_batch(x)
    with torch.no_grad():
        pre, theta = sae.pre_acts(x), sae.thresholds()
        window = (pre - theta).abs() < sae.config.bandwidth / 2  # K((π − θ)/ε) ≠ 0
        below, above = (window & (pre <= theta)).sum(dim=0), (window & (pre > theta)).sum(dim=0)
    _, _, grads = step_grads(sae, x)
    only_below = (below > 0) & (above == 0)  # latents whose θ gradient comes from below θ only
    assert int(only_below.sum()) >= 10
    assert bool((grads["log_threshold"][only_below] != 0).all())


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "gated"])
def test_steered_training_on_the_sparse_path_ends_at_the_dense_paths_weights(variant: str) -> None:
    sae = sparse_sae(variant)
    twin = dense_twin(sae)
    for model in (sae, twin):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(12):
            _, _, losses = model(batch(2 + step))
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            model.post_step()
    assert sae.encode(batch(2)).is_sparse  # still on the sparse path at the end
    for (name, p), q in zip(sae.state_dict().items(), twin.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(p, q), name


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "gated"])
def test_dense_codes_take_the_dense_path(variant: str) -> None:
    """A dense batch (a row with more than M/8 active latents) is computed densely."""
    sae = sparse_sae(variant)
    with torch.no_grad():
        if variant == "jumprelu":
            sae._init_from_batch(batch(1))
            sae.log_threshold.fill_(-20.0)
        else:
            sae.b_enc.fill_(10.0)
    codes = sae(batch(1))[1]
    assert not codes.is_sparse or codes.pattern is None or codes.pattern.mask is None
    assert float(codes.support_sizes().float().max()) > M / 8
