"""Metric definitions: hand-computed cases and hypothesis properties (streaming == one-shot, invariances)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator import metrics
from evaluator.metrics import (
    CorrelationAccumulator,
    ReconstructionAccumulator,
    SparsityAccumulator,
)


def test_hand_computed_fvu_and_nmse():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # SSE = 1 + 1 = 2; μ = (2, 1); SST = (1 + 1) + (1 + 1) = 4; Σ‖x‖² = 1 + 13 = 14.
    assert metrics.fvu(x, x_hat) == pytest.approx(0.5, abs=1e-15)
    assert metrics.nmse_uncentered(x, x_hat) == pytest.approx(2 / 14, abs=1e-15)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(0.5, abs=1e-15)


def test_mean_predictor_has_fvu_one_and_identity_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 16, generator=g) * 3 + 50.0  # large mean: the shifted SST must stay exact
    mean = x.to(torch.float64).mean(0, keepdim=True).expand_as(x)
    acc = ReconstructionAccumulator()
    for part_x, part_m in zip(x.split(50), mean.split(50)):
        acc.update(part_x, part_m)
    assert acc.result()["fvu"] == pytest.approx(1.0, abs=1e-12)
    assert metrics.fvu(x, x.clone()) == 0.0
    assert metrics.explained_variance(x, x.clone()) == 1.0


def test_l0_counts_nonzero_including_negative_scores():
    codes = torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, -3.0, 0.1]])
    assert metrics.l0(codes) == pytest.approx((2 + 0 + 4) / 3)
    acc = SparsityAccumulator(m=4)
    acc.update_codes(codes)
    res = acc.result()
    assert res["support_histogram"] == [1, 0, 1, 0, 1]
    assert res["dead"] == 0  # concept 3 fired once (0.1), concept 1 fired twice (one negative)
    # fire rates: c0 2/3, c1 2/3, c2 1/3, c3 1/3 -> all > 10% -> dense
    assert res["dense_frac"] == 1.0
    assert res["support_median"] == 2.0


def test_dead_and_dense_fractions():
    codes = torch.zeros(100, 5)
    codes[:50, 0] = 1.0      # 50% -> dense
    codes[:10, 1] = 2.0      # exactly 10% -> not dense
    codes[:11, 2] = -1.0     # 11% -> dense
    acc = SparsityAccumulator(m=5)
    acc.update_codes(codes)
    res = acc.result()
    assert res["dead"] == 2 and res["dead_frac"] == pytest.approx(0.4)
    assert res["dense"] == 2 and res["dense_frac"] == pytest.approx(0.4)


def test_support_correlations_match_numpy():
    g = torch.Generator().manual_seed(1)
    norms = torch.rand(300, generator=g) * 10
    positions = torch.randint(0, 64, (300,), generator=g)
    sizes = (norms * 2 + torch.randn(300, generator=g)).round().clamp(min=0).to(torch.int64)
    acc = SparsityAccumulator(m=3)
    for s, n, p in zip(sizes.split(77), norms.split(77), positions.split(77)):
        acc.update(s, torch.zeros(3, dtype=torch.int64), n, p)
    res = acc.result()
    assert res["support_norm_corr"] == pytest.approx(np.corrcoef(sizes.numpy(), norms.numpy())[0, 1], rel=1e-9)
    assert res["support_position_corr"] == pytest.approx(
        np.corrcoef(sizes.numpy(), positions.numpy())[0, 1], rel=1e-9)
    assert res["l0"] == pytest.approx(float(sizes.double().mean()))


def test_suggest_topk_uses_mean_support():
    acc = SparsityAccumulator(m=8)
    acc.update(torch.tensor([2, 3, 3, 8]), torch.zeros(8, dtype=torch.int64))
    sug = metrics.suggest_topk(acc.result())
    assert sug["k"] == 4 and sug["mean"] == 4.0 and sug["median"] == 3.0


# ---- hypothesis properties --------------------------------------------------------------------

@st.composite
def batches_and_split(draw):
    n = draw(st.integers(min_value=2, max_value=40))
    d = draw(st.integers(min_value=1, max_value=6))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=n), max_size=6)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 5.0, -100.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + offset
    x_hat = x + torch.randn(n, d, generator=g, dtype=torch.float64) * scale * 0.3
    return x, x_hat, [0, *cuts, n]


def _feed(x, x_hat, bounds):
    acc = ReconstructionAccumulator()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.update(x[lo:hi], x_hat[lo:hi])
    return acc


@settings(max_examples=60, deadline=None)
@given(batches_and_split())
def test_streaming_equals_one_shot(data):
    x, x_hat, bounds = data
    one = metrics.reconstruction_metrics(x, x_hat)
    streamed = _feed(x, x_hat, bounds).result()
    # direct formula, no accumulator
    mu = x.mean(0)
    direct = float(((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum())
    for key in ("fvu", "nmse_uncentered", "explained_variance"):
        assert streamed[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12)
    assert one["fvu"] == pytest.approx(direct, rel=1e-9)
    assert streamed["rows"] == x.shape[0]


@settings(max_examples=40, deadline=None)
@given(batches_and_split(), st.integers(min_value=1, max_value=5))
def test_merge_equals_sequential(data, n_parts):
    x, x_hat, _ = data
    parts = np.array_split(np.arange(x.shape[0]), n_parts)
    merged = ReconstructionAccumulator()
    for idx in parts:
        part = ReconstructionAccumulator()
        part.update(x[idx], x_hat[idx])
        merged.merge(part)
    assert merged.result()["fvu"] == pytest.approx(metrics.fvu(x, x_hat), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(batches_and_split(), st.floats(min_value=-50, max_value=50), st.floats(min_value=0.01, max_value=100))
def test_fvu_invariances(data, shift, scale):
    x, x_hat, _ = data
    base = metrics.fvu(x, x_hat)
    if math.isnan(base):
        return
    # translating both x and x̂ by the same vector leaves fvu unchanged
    t = torch.full((x.shape[1],), shift, dtype=torch.float64)
    assert metrics.fvu(x + t, x_hat + t) == pytest.approx(base, rel=1e-6)
    # scaling both by c > 0 leaves fvu unchanged
    assert metrics.fvu(x * scale, x_hat * scale) == pytest.approx(base, rel=1e-9)
    # permuting rows leaves fvu unchanged
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    assert metrics.fvu(x[perm], x_hat[perm]) == pytest.approx(base, rel=1e-9)
    # an orthogonal rotation of feature space leaves fvu unchanged
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1)))
    assert metrics.fvu(x @ q, x_hat @ q) == pytest.approx(base, rel=1e-9)
    # fvu of the mean predictor is 1
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 2**31 - 1),
       st.lists(st.integers(0, 30), max_size=5))
def test_sparsity_streaming_equals_one_shot(n, m, seed, cuts):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.4)
    norms = torch.rand(n, generator=g)
    positions = torch.randint(0, 10, (n,), generator=g)
    one = SparsityAccumulator(m)
    one.update_codes(codes, norms, positions)
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    streamed = SparsityAccumulator(m)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        streamed.update_codes(codes[lo:hi], norms[lo:hi], positions[lo:hi])
    a, b = one.result(), streamed.result()
    assert a["support_histogram"] == b["support_histogram"]
    assert a["dead"] == b["dead"] and a["dense"] == b["dense"] and a["l0"] == pytest.approx(b["l0"])
    assert a["l0"] == pytest.approx(metrics.l0(codes))
    for key in ("support_norm_corr", "support_position_corr"):
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], abs=1e-9)


def test_correlation_merge():
    a, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    b = a + 0.5 * b
    left, right = CorrelationAccumulator(), CorrelationAccumulator()
    left.update(a[:30], b[:30])
    right.update(a[30:], b[30:])
    assert left.merge(right).result() == pytest.approx(float(np.corrcoef(a, b)[0, 1]), rel=1e-12)
