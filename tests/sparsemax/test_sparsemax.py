"""trainer.sparsemax: exactness against a float64 sort reference, the fallback path, the backward."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.errors import UserError
from trainer import sparsemax_cpu
from trainer.sparsemax import (
    AdaptiveK,
    adaptive_state,
    sparsemax,
    sparsemax_mask,
    sparsemax_sort,
    sparsemax_support,
    sparsemax_threshold,
)


class SupportView(NamedTuple):
    """Everything about sparsemax on its padded support, composed from the public ops (fields (..., K))."""

    idx: torch.Tensor
    probs: torch.Tensor
    scores: torch.Tensor
    tau: torch.Tensor
    support_size: torch.Tensor
    mask: torch.Tensor


def sparsemax_topk(z: torch.Tensor, k_max: int | None = None) -> SupportView:
    """idx/probs from sparsemax_support, the mask from sparsemax_mask (same width and order), scores = z on
    the support (plain gather gradient), τ and |S| from sparsemax_threshold."""
    idx, probs = sparsemax_support(z, k_max)
    idx_m, mask = sparsemax_mask(z.detach(), k_max)
    assert torch.equal(idx, idx_m)
    scores = torch.where(mask, z.gather(-1, idx), torch.zeros((), dtype=z.dtype))
    tau, size = sparsemax_threshold(z.detach())
    return SupportView(idx, probs, scores, tau, size, mask)

INF = math.inf


def reference(z: torch.Tensor) -> torch.Tensor:
    """Sort formula in float64 on the last dim, written out independently of the module.

    k = max{r : 1 + r z_(r) > Σ_{i≤r} z_(i)}, τ = (Σ_{i≤k} z_(i) − 1)/k, p = max(z − τ, 0);
    all −inf rows give 0.
    """
    z = z.detach().to(torch.float64).contiguous()
    out = torch.zeros_like(z)
    for row, zr in zip(out.reshape(-1, z.shape[-1]), z.reshape(-1, z.shape[-1])):
        if not torch.isfinite(zr).any():
            continue
        zmax = zr.max()
        srt = sorted((zr - zmax).tolist(), reverse=True)
        csum, best_k, best_c = 0.0, 0, 0.0
        for r, v in enumerate(srt, start=1):
            csum += v
            if 1 + r * v > csum:
                best_k, best_c = r, csum
        tau = (best_c - 1) / best_k
        row.copy_(((zr - zmax) - tau).clamp(min=0))
    return out


def support_sizes(p: torch.Tensor) -> torch.Tensor:
    return (p > 0).sum(dim=-1)


# ----------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("fn", [sparsemax, sparsemax_sort])
def test_hand_computed_values(fn):
    z = torch.tensor(
        [
            [1.0, 0.5, 0.0],  # k = 2, τ = (1.5 − 1)/2 = 0.25
            [3.0, 1.0, 0.0],  # gap > 1: one-hot
            [1.0, 1.0, 0.0],  # tie on the support: τ = 0.5
            [2.0, 2.0, 2.0],  # all equal: uniform
        ],
        dtype=torch.float64,
    )
    expected = torch.tensor(
        [[0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64
    )
    torch.testing.assert_close(fn(z), expected, rtol=0, atol=1e-15)


def test_threshold_hand_computed():
    z = torch.tensor([[1.0, 0.5, 0.0], [3.0, 1.0, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    tau, size = sparsemax_threshold(z)
    torch.testing.assert_close(tau, torch.tensor([0.25, 2.0, 2.0 - 1 / 3], dtype=torch.float64))
    assert size.tolist() == [2, 1, 3]


def test_minus_inf_entries_and_all_minus_inf_row():
    z = torch.tensor([[0.0, -INF, 0.5, -INF], [-INF, -INF, -INF, -INF], [-INF, 7.0, -INF, -INF]])
    p = sparsemax(z)
    # row 0: sorted 0.5, 0, k = 2 (1 + 2·0 > 0.5), τ = (0.5 − 1)/2 = −0.25 → (0.25, 0.75)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0, 0.75, 0], [0, 0, 0, 0], [0, 1.0, 0, 0]]))
    tau, size = sparsemax_threshold(z)
    assert size.tolist() == [2, 0, 1]
    assert tau[1].item() == INF and tau[0].item() == -0.25 and tau[2].item() == 6.0
    torch.testing.assert_close(sparsemax_sort(z), p)
    out = sparsemax_topk(z, 3)
    assert out.mask.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert torch.all(out.probs[1] == 0) and torch.all(out.scores[1] == 0)
    zg = z.clone().requires_grad_(True)
    sparsemax(zg).backward(torch.randn(3, 4))
    assert torch.all(zg.grad[1] == 0) and torch.all(zg.grad[:, 1][0] == 0)
    assert torch.isfinite(zg.grad).all()


def test_m_equals_one():
    z = torch.tensor([[5.0], [-3.0], [-INF]])
    assert sparsemax(z).tolist() == [[1.0], [1.0], [0.0]]
    idx, val = sparsemax_support(z)
    assert idx.tolist() == [[0], [0], [0]] and val.tolist() == [[1.0], [1.0], [0.0]]


# ----------------------------------------------------------------------------- property tests

values = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0]),  # many ties
    st.floats(-10, 10, allow_nan=False, allow_infinity=False),
)


@st.composite
def score_rows(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 4))
    scale = 10.0 ** draw(st.integers(-6, 6))
    offset = draw(st.sampled_from([0.0, 0.0, 3.0, -1e3, 1e6]))
    z = torch.tensor(draw(st.lists(st.lists(values, min_size=m, max_size=m), min_size=n, max_size=n)))
    z = z.to(torch.float64) * scale + offset
    if draw(st.booleans()):
        masked = torch.tensor(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
        masked[draw(st.integers(0, m - 1))] = False  # keep one finite entry
        z[:, masked] = -INF
    k = draw(st.one_of(st.none(), st.integers(1, m + 2)))
    return z, k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(score_rows())
def test_matches_reference_float64(case):
    z, k = case
    ref = reference(z)
    p = sparsemax(z, k=k)
    assert p.dtype == torch.float64 and torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(z.shape[0], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(sparsemax_sort(z), ref, rtol=0, atol=1e-9)
    tau, size = sparsemax_threshold(z, k=k)
    assert torch.equal(size, support_sizes(ref))
    out = sparsemax_topk(z, k)
    dense = torch.zeros_like(z).scatter(1, out.idx, out.probs)
    torch.testing.assert_close(dense, ref, rtol=0, atol=1e-9)
    assert torch.equal(out.support_size, size) and torch.equal(out.mask.sum(-1), size)
    idx, mask = sparsemax_mask(z, k)
    assert torch.equal(idx, out.idx) and torch.equal(mask, out.mask)
    torch.testing.assert_close(out.scores, torch.where(out.mask, z.gather(1, out.idx), 0.0))
    # τ reproduces p on the support (large offsets make τ itself lose absolute precision)
    torch.testing.assert_close(
        (z - tau[:, None]).clamp(min=0), ref, rtol=0, atol=1e-9 * max(1.0, z[torch.isfinite(z)].abs().max())
    )


@settings(max_examples=100, deadline=None)
@given(score_rows())
def test_matches_reference_float32(case):
    z64, k = case
    z = z64.to(torch.float32)
    ref = reference(z)  # exact answer for the float32 input
    p = sparsemax(z, k=k)
    assert p.dtype == torch.float32 and torch.all(p >= 0)
    torch.testing.assert_close(p.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(p.double().sum(-1), torch.ones(z.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    _, size = sparsemax_threshold(z, k=k)
    # support sizes agree except for entries within rounding of τ (p < 1e-5 in the reference)
    near = ((ref > 0) & (ref < 1e-5)).sum(-1)
    assert torch.all((size - support_sizes(ref)).abs() <= near)


def test_bfloat16_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(8, 500, generator=g) * 0.3).to(torch.bfloat16)
    p = sparsemax(z)
    assert p.dtype == torch.bfloat16
    ref = reference(z.float())
    torch.testing.assert_close(p.double(), ref.to(torch.bfloat16).double(), rtol=0, atol=0)
    tau, size = sparsemax_threshold(z)
    assert tau.dtype == torch.float32 and torch.equal(size, support_sizes(ref))
    out = sparsemax_topk(z)
    assert out.probs.dtype == torch.bfloat16 and out.scores.dtype == torch.bfloat16
    zg = z.clone().requires_grad_(True)
    sparsemax(zg).float().pow(2).sum().backward()
    assert zg.grad.dtype == torch.bfloat16 and torch.isfinite(zg.grad.float()).all()


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_scales(scale):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 300, generator=g, dtype=torch.float64) * scale
    torch.testing.assert_close(sparsemax(z), reference(z), rtol=0, atol=1e-9)
    zf = z.float()
    torch.testing.assert_close(sparsemax(zf).double(), reference(zf), rtol=0, atol=1e-5)


def test_large_offset_is_exact_in_float32():
    # 1e6 + small differences: shifting by the row max keeps the support exact in float32.
    z = torch.tensor([[1e6 + 0.5, 1e6, 1e6 - 0.25, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(sparsemax(z).double(), reference(z), rtol=0, atol=1e-6)


def test_m_65536_all_in_support_and_sparse():
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 65536, generator=g, dtype=torch.float64) * 1e-6  # support = all M > any first k
    p = sparsemax(wide, k=64)
    assert support_sizes(p).tolist() == [65536, 65536]
    torch.testing.assert_close(p, reference(wide), rtol=0, atol=1e-9)
    narrow = torch.randn(3, 65536, generator=g) * 0.5
    ref = reference(narrow)
    torch.testing.assert_close(sparsemax(narrow).double(), ref, rtol=0, atol=1e-5)
    _, size = sparsemax_threshold(narrow)
    assert torch.equal(size, support_sizes(ref))


def test_all_equal_rows_any_k():
    for m in (1, 2, 7, 1000):
        z = torch.full((3, m), 4.25, dtype=torch.float64)
        for k in (1, 3, None):
            p = sparsemax(z, k=k)
            torch.testing.assert_close(p, torch.full_like(z, 1 / m), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- fallback and widths


def test_fallback_forced_is_exact_and_only_widens_failing_rows():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 2000, generator=g, dtype=torch.float64)
    z[0] *= 0.01  # wide support (hundreds)
    z[1] *= 10.0  # narrow support
    ref = reference(z)
    sizes = support_sizes(ref)
    assert sizes[0] > 100 and sizes[1] <= 2
    for k in (1, 2, 5):
        torch.testing.assert_close(sparsemax(z, k=k), ref, rtol=0, atol=1e-9)
        out = sparsemax_topk(z, k)
        assert out.idx.shape[1] == int(sizes.max())  # widened to the largest support, not beyond
        torch.testing.assert_close(torch.zeros_like(z).scatter(1, out.idx, out.probs), ref, rtol=0, atol=1e-9)
        # padding indices are valid and off the support
        pad_idx = out.idx[~out.mask]
        assert torch.all(ref.gather(1, out.idx)[~out.mask] == 0) and int(pad_idx.max()) < 2000


def test_topk_width_is_k_max_when_supports_fit():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 1000, generator=g) * 3
    out = sparsemax_topk(z, 32)
    assert out.idx.shape == (5, 32) and int(out.support_size.max()) < 32
    assert torch.all(out.probs[~out.mask] == 0) and torch.all(out.scores[~out.mask] == 0)
    # idx follow descending z, and padding indices are distinct when no fallback happened
    assert torch.all(z.gather(1, out.idx).diff(dim=1) <= 0)
    assert all(len(set(row)) == 32 for row in out.idx.tolist())
    idx, val = sparsemax_support(z, 32)
    assert torch.equal(idx, out.idx) and torch.equal(val, out.probs)
    torch.testing.assert_close(out.tau, sparsemax_threshold(z)[0])


def test_adaptive_state_follows_support_sizes(monkeypatch):
    monkeypatch.setattr(sparsemax_cpu, "available", lambda z: False)  # the torch.topk candidate path
    state = AdaptiveK()
    assert state.propose(10_000) == 64 and state.propose(10) == 10
    state.observe(100)
    assert state.propose(10_000) == 136  # ceil8(1.25·100 + 8)
    state.observe(10)
    assert state.estimate == pytest.approx(95.0)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 4321, generator=g, dtype=torch.float64) * 0.02  # supports of ~1000+
    p = sparsemax(z)  # first call with default k = 64 falls back, then the estimate adapts
    torch.testing.assert_close(p, reference(z), rtol=0, atol=1e-9)
    assert adaptive_state(4321, z.device).estimate == int(support_sizes(p).max())


def test_dim_argument():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    for dim in (0, 1, -1):
        expected = reference(z.movedim(dim, -1)).movedim(-1, dim)
        torch.testing.assert_close(sparsemax(z, dim=dim), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(sparsemax_sort(z, dim=dim), expected, rtol=0, atol=1e-12)
        tau, size = sparsemax_threshold(z, dim=dim)
        assert tau.shape == size.shape == tuple(s for i, s in enumerate(z.shape) if i != dim % 3)
    out = sparsemax_topk(z, 4)
    assert out.idx.shape == (3, 7, 4) and out.tau.shape == (3, 7)


def test_bad_input_raises_user_error():
    with pytest.raises(UserError, match="floating-point"):
        sparsemax(torch.tensor([[1, 2]]))
    with pytest.raises(UserError, match="k_max"):
        sparsemax_topk(torch.randn(2, 3), 0)
    with pytest.raises(UserError, match="empty"):
        sparsemax(torch.randn(2, 0))


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_dense():
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(3, 12, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, k=2), (z,))
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim=0), (z,))


def test_gradcheck_support_values_and_scores():
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(3, 12, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsemax_support(t, 6)[1], (z,))
    assert torch.autograd.gradcheck(lambda t: sparsemax_topk(t, 3).probs, (z,))  # widened by fallback
    assert torch.autograd.gradcheck(lambda t: sparsemax_topk(t, 6).scores, (z,))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1), st.sampled_from([0.05, 0.5, 5.0]))
def test_backward_equals_autograd_through_sort_formula(m, seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, m, generator=g, dtype=torch.float64) * scale
    grad_out = torch.randn(3, m, generator=g, dtype=torch.float64)
    za, zb, zc = (z.clone().requires_grad_(True) for _ in range(3))
    sparsemax(za, k=1).backward(grad_out)
    sparsemax_sort(zb).backward(grad_out)
    out = sparsemax_topk(zc)
    out.probs.backward(grad_out.gather(1, out.idx))
    torch.testing.assert_close(za.grad, zb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(zc.grad, zb.grad, rtol=0, atol=1e-12)
    # the formula itself: dz = s (g − mean_S g)
    s = reference(z) > 0
    mean = (grad_out * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    torch.testing.assert_close(za.grad, torch.where(s, grad_out - mean, 0.0), rtol=0, atol=1e-12)


def test_scores_gradient_is_the_masked_identity():
    z = torch.tensor([[1.0, 0.5, 0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    out = sparsemax_topk(z, 3)
    assert out.mask.tolist() == [[True, True, False]]
    out.scores.sum().backward()
    assert z.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
