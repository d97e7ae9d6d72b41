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


# ---- ground truth ----------------------------------------------------------------------------------


def test_feature_matching_is_the_optimal_assignment_not_the_greedy_one():
    """cos = [[0.3, 0.31], [0, 0.95]]: feature 0's own best latent (1) is feature 1's only good one;
    the Hungarian matching gives (0→0, 1→1), mean 1.25/2; one feature has a latent at cos ≥ 0.9."""
    f = torch.eye(3)[:2]
    u = torch.tensor([[0.3, 0.0, math.sqrt(1 - 0.09)], [0.31, 0.95, math.sqrt(1 - 0.31**2 - 0.95**2)]])
    res = metrics.feature_matching(f, u)
    assert res["assignment"].tolist() == [0, 1]
    assert res["gt_mcc"] == pytest.approx(1.25 / 2)
    assert res["gt_recovered"] == 0.5
    assert res["best_cosine"].tolist() == pytest.approx([0.31, 0.95])


def test_fewer_latents_than_features_count_the_unmatched_as_zero():
    res = metrics.feature_matching(torch.eye(3), 2 * torch.eye(3)[:1])
    assert res["assignment"].tolist() == [0, -1, -1]
    assert res["gt_mcc"] == pytest.approx(1 / 3) and res["gt_recovered"] == pytest.approx(1 / 3)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 1000))
def test_oracle_directions_score_one_in_any_order_and_scale(n, extra, seed):
    """Directions = the true features, permuted, positively scaled, plus random extra latents: every
    feature is found (mcc = recovered = 1) and matched to its own latent."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 8, generator=g)
    perm = torch.randperm(n + extra, generator=g)
    u = torch.cat([f * (torch.rand(n, 1, generator=g) + 0.5), torch.randn(extra, 8, generator=g)])[perm]
    res = metrics.feature_matching(f, u)
    assert res["gt_mcc"] == pytest.approx(1.0) and res["gt_recovered"] == 1.0
    assert res["assignment"].tolist() == torch.argsort(perm)[:n].tolist()
    assert res["gt_mcc"] <= float(res["best_cosine"].mean()) + 1e-12


def test_f1_and_spearman_by_hand_dense_and_sparse_agree():
    """feature 0 ↔ latent 1, feature 1 ↔ latent 0. Rows: codes [[0,2,0],[1,0,5],[0,0,1]], present
    [[1,0],[1,1],[0,0]]. Feature 0: fires [1,0,0] vs present [1,1,0] → F1 = 2/3; feature 1: fires
    [0,1,0] vs [0,1,0] → 1; gt_f1 = 5/6. L0 = [1,2,1], |S| = [1,2,0]: ranks [1.5,3,1.5] and [2,3,1],
    ρ = 1.5/√(1.5·2) = √3/2."""
    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    present = torch.tensor([[True, False], [True, True], [False, False]])
    from trainer.sae import Codes

    sparse = Codes(m=3, idx=torch.tensor([[1, 0], [0, 2], [2, 0]]), val=torch.tensor([[2.0, 0.0], [1.0, 5.0],
                                                                                      [1.0, 0.0]]))
    results = []
    for codes in (dense, Codes(m=3, dense=dense), sparse):
        acc = metrics.GroundTruthAccumulator(torch.tensor([1, 0]), m=3)
        acc.update(codes[:2] if isinstance(codes, torch.Tensor) else codes, present if not isinstance(
            codes, torch.Tensor) else present[:2])
        if isinstance(codes, torch.Tensor):
            acc.update(codes[2:], present[2:])
        results.append(acc.result())
    for res in results:
        assert res["gt_f1"] == pytest.approx(5 / 6)
        assert res["gt_l0_spearman"] == pytest.approx(math.sqrt(3) / 2)
        assert res["f1_defined"] == 2 and res["rows"] == 3


def test_f1_leaves_out_features_never_present_nor_fired_and_unmatched_score_zero():
    acc = metrics.GroundTruthAccumulator(torch.tensor([0, -1, 1]), m=2)
    # feature 0 (latent 0) always right; feature 1 unmatched but present once → F1 0; feature 2 (latent 1)
    # never present, never fires → 0/0, left out
    acc.update(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[True, True, False], [False, False, False]]))
    res = acc.result()
    assert res["gt_f1"] == pytest.approx(0.5) and res["f1_defined"] == 2


def test_spearman_is_none_for_a_constant_series():
    assert metrics.spearman(torch.tensor([3, 3, 3]), torch.tensor([1, 2, 3])) is None
    assert metrics.spearman(torch.tensor([1, 2, 3]), torch.tensor([10, 20, 35])) == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(a=st.lists(st.integers(0, 5), min_size=3, max_size=30), seed=st.integers(0, 100))
def test_spearman_matches_scipy(a, seed):
    from scipy.stats import spearmanr

    b = torch.randint(0, 4, (len(a),), generator=torch.Generator().manual_seed(seed))
    ours = metrics.spearman(torch.tensor(a), b)
    if len(set(a)) == 1 or len(set(b.tolist())) == 1:
        assert ours is None
    else:
        assert ours == pytest.approx(spearmanr(a, b.numpy()).statistic, abs=1e-12)
