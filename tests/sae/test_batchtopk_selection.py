"""BatchTopK's training selection (:func:`trainer.sae.batchtopk.batch_topk`) against the simple reference
it replaced: a top-K·B over the flattened ReLU(π), a dense keep mask, a per-row top-W to pad."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import trainer.sae as sae_zoo
from trainer.sae.batchtopk import batch_topk


def reference_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, valid, top-K·B values of ReLU(π)) as BatchTopKSAE.select computed them before."""
    b, m = pre.shape
    flat = torch.relu(pre).reshape(-1)
    top = torch.topk(flat, min(k * b, flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top.indices, True)
    keep = keep.reshape(b, m) & (pre > 0)
    counts = keep.sum(dim=-1)
    width = max(int(counts.max()), 1)
    idx = torch.topk(pre.masked_fill(~keep, float("-inf")), width, dim=-1).indices
    valid = torch.arange(width)[None, :] < counts[:, None]
    return idx, valid, top.values


def scores(b: int, m: int, seed: int, shift: float = 0.0, step: float | None = None) -> Tensor:
    """π with rows of varying scale (so per-row counts vary); ``step`` rounds to a grid (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(b, m, generator=gen) * (0.3 + 2 * torch.rand(b, 1, generator=gen)) + shift
    return pre if step is None else torch.round(pre / step) * step


def entries(idx: Tensor, valid: Tensor) -> set[tuple[int, int]]:
    """The selected (row, column) pairs."""
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    return set(zip(rows[valid].tolist(), idx[valid].tolist()))


FLOORS = [None, 0.0, -1.0, 0.05, 0.5, 1.0, 3.0, 100.0]  # absent, ≤ 0, too low, about right, too high


@pytest.mark.parametrize("floor", FLOORS)
@pytest.mark.parametrize(("b", "m", "k"), [(64, 300, 8), (33, 50, 4), (16, 40, 40), (8, 7, 3)])
def test_same_selection_as_the_reference(b: int, m: int, k: int, floor: float | None) -> None:
    for seed, shift in [(0, 0.0), (1, -1.5), (2, -4.0)]:  # the last leaves fewer than K·B positive entries
        pre = scores(b, m, seed, shift)
        ref_idx, ref_valid, ref_top = reference_select(pre, k)
        idx, valid, kept, t = batch_topk(pre, k, floor)
        assert torch.equal(valid, ref_valid)
        assert torch.equal(idx[valid], ref_idx[ref_valid])  # same entries, same per-row order
        positive = ref_top[ref_top > 0]
        assert torch.equal(kept.sort().values, positive.sort().values)
        assert t == float(positive.min() if int((pre > 0).sum()) <= k * b else ref_top.min())


@pytest.mark.parametrize("floor", FLOORS)
def test_ties_at_the_threshold_take_an_equally_good_set(floor: float | None) -> None:
    """With ties at T the reference's choice among them is arbitrary: the new selection must have the
    same entries above T, as many at T, and each row in descending order."""
    b, m, k = 48, 200, 6
    straddled = 0
    for seed in range(6):
        pre = scores(b, m, seed, step=0.25)
        ref_idx, ref_valid, ref_top = reference_select(pre, k)
        idx, valid, kept, t = batch_topk(pre, k, floor)
        assert t == float(ref_top.min()) > 0
        chosen, ref_chosen = entries(idx, valid), entries(ref_idx, ref_valid)
        above = {(r, c) for r, c in chosen if pre[r, c] > t}
        assert above == {(r, c) for r, c in ref_chosen if pre[r, c] > t}
        assert len(chosen) == len(ref_chosen) == k * b
        assert all(pre[r, c] == t for r, c in chosen - above)
        straddled += chosen != ref_chosen or int((pre == t).sum()) > len(chosen - above)
        rows = torch.arange(b)[:, None].expand_as(idx)
        values = torch.where(valid, pre[rows, idx], float("-inf"))
        assert torch.equal(values, values.sort(dim=-1, descending=True).values)
        assert torch.equal(kept.sort().values, ref_top.sort().values)
    assert straddled  # the inputs do exercise ties at T


def test_sae_select_matches_the_reference_over_steps() -> None:
    """The SAE's training selection (with its floor carried over from the last batch) and its threshold."""
    sae = sae_zoo.build({"variant": "batchtopk", "d": 8, "m": 256, "k": 5})
    lows = []
    for seed in range(4):
        pre = scores(40, 256, seed, shift=0.3 * seed - 0.5)
        idx, valid = sae.select(pre)
        ref_idx, ref_valid, ref_top = reference_select(pre, 5)
        assert torch.equal(valid, ref_valid) and torch.equal(idx[valid], ref_idx[ref_valid])
        lows.append(float(ref_top[ref_top > 0].min()))
    expected = lows[0]
    for low in lows[1:]:
        expected = 0.99 * expected + 0.01 * low
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-6)


def test_padding_carries_no_code_when_b_enc_is_positive() -> None:
    """Padded positions hold 0 (not ReLU(b_enc[idx])) and the codes keep exactly K·B entries."""
    sae = sae_zoo.build({"variant": "batchtopk", "d": 8, "m": 64, "k": 3})
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 3, 20)[:, None]
    codes = sae.encode(x)
    assert codes.idx.shape[1] > 3 and int((codes.to_dense() != 0).sum()) == 3 * 20
    assert int(codes.fire_counts().sum()) == 3 * 20
