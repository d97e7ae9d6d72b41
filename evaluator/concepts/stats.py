"""Streaming per-concept statistics in bounded memory, vectorised over concepts.

:class:`ConceptStats` is fed the dense codes ``a`` (B, M) of one batch at a time and keeps,
for every concept m:

* ``fires[m]``  = #{t : a_tm ≠ 0}                 (firing frequency = fires / rows)
* ``sums[m]``   = Σ_{t : a_tm ≠ 0} a_tm            (float64; mean = sums / fires, the mean
  *when firing*, as activation dashboards report it)
* ``maxs[m]``   = max_{t : a_tm ≠ 0} a_tm
* ``hist[m]``   a histogram of the non-zero values on one fixed global grid (see below)

and :class:`TopN` keeps the n best (value, id) pairs per concept as an (M, n) buffer merged
with each batch by ``torch.topk`` over the concatenation — no Python loop over concepts.

Histogram bins. Streaming needs bins fixed before the data is seen, but a concept's range
is only known at the end. So values are counted on one *global* log-spaced grid of
magnitudes, ``BINS_PER_DECADE`` bins per decade from ``HIST_LO`` to ``HIST_HI`` (values
outside are clamped into the end bins), one half of the bins for positive values and one
for negative ones (the sparsemax SAE's ``scores`` codes can be negative). The card shows
the grid cut to the concept's own [min, max] and merged into at most ``DISPLAY_BINS``
bars (:func:`display_histogram`), i.e. log-spaced bins over the concept's own range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

HIST_LO = 1e-6
HIST_HI = 1e6
BINS_PER_DECADE = 16
HALF_BINS = int(round(math.log10(HIST_HI / HIST_LO) * BINS_PER_DECADE))  # magnitude bins per sign
DISPLAY_BINS = 24


def magnitude_bin(values: Tensor) -> Tensor:
    """Global grid bin of |v|: floor(BINS_PER_DECADE · log10(|v| / HIST_LO)), clamped to [0, HALF_BINS)."""
    logs = torch.log10(values.abs().to(torch.float64).clamp_min(HIST_LO) / HIST_LO) * BINS_PER_DECADE
    return logs.floor().to(torch.int64).clamp_(0, HALF_BINS - 1)


def bin_edges() -> Tensor:
    """Magnitude edges of the global grid (HALF_BINS + 1 values, float64)."""
    return HIST_LO * torch.pow(10.0, torch.arange(HALF_BINS + 1, dtype=torch.float64) / BINS_PER_DECADE)


class ConceptStats:
    """Firing counts, conditional mean, max and a histogram per concept, fed batch by batch."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.rows = 0
        self.fires = torch.zeros(m, dtype=torch.int64)
        self.sums = torch.zeros(m, dtype=torch.float64)
        self.maxs = torch.full((m,), -math.inf, dtype=torch.float64)
        self.mins = torch.full((m,), math.inf, dtype=torch.float64)
        # hist[m, 0:HALF_BINS] counts positive values, hist[m, HALF_BINS:] negative ones
        self.hist = torch.zeros(m, 2 * HALF_BINS, dtype=torch.int32)

    def update(self, a: Tensor) -> None:
        """Add the codes ``a`` (B, M) of B kept rows."""
        if a.ndim != 2 or a.shape[1] != self.m:
            raise ValueError(f"codes must be (B, {self.m}); got {tuple(a.shape)}")
        a = a.detach().to("cpu", torch.float32)
        self.rows += a.shape[0]
        nz = a != 0
        self.fires += nz.sum(0)
        self.sums += torch.where(nz, a, 0.0).sum(0, dtype=torch.float64)
        self.maxs = torch.maximum(self.maxs, torch.where(nz, a, -math.inf).amax(0).to(torch.float64))
        self.mins = torch.minimum(self.mins, torch.where(nz, a, math.inf).amin(0).to(torch.float64))
        rows, cols = nz.nonzero(as_tuple=True)
        vals = a[rows, cols]
        flat = cols * (2 * HALF_BINS) + magnitude_bin(vals) + (vals < 0).to(torch.int64) * HALF_BINS
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def freq(self) -> Tensor:
        """Firing frequency fires / rows (float64)."""
        return self.fires.to(torch.float64) / max(self.rows, 1)

    def mean(self) -> Tensor:
        """Mean activation over the rows where the concept fired (0 where it never fired)."""
        return torch.where(self.fires > 0, self.sums / self.fires.clamp_min(1), 0.0)

    def max(self) -> Tensor:
        """Largest activation (0 where the concept never fired)."""
        return torch.where(self.fires > 0, self.maxs, 0.0)


def display_histograms(hist: Tensor, max_bars: int = DISPLAY_BINS) -> list[list[list[float]]]:
    """The cards' bars ``[[lo, hi, count], ...]`` (ascending values) from global-grid rows (M, 2·HALF_BINS).

    Per concept and sign, only the span of occupied bins is kept and it is cut into at most
    ``max_bars`` groups of ``width = ceil(span / max_bars)`` adjacent bins (vectorised over
    concepts with a cumulative sum). Negative bars (if any) come first, with lo < hi < 0.
    """
    edges = bin_edges().numpy()
    h = hist.numpy().astype(np.int64)
    m = h.shape[0]
    steps = np.arange(max_bars + 1)
    per_sign = []
    for part in (h[:, HALF_BINS:], h[:, :HALF_BINS]):              # negative, then positive
        occupied = part > 0
        has = occupied.any(1)
        first = occupied.argmax(1)
        last = HALF_BINS - occupied[:, ::-1].argmax(1)                 # one past the last occupied bin
        width = np.maximum(1, -(-(last - first) // max_bars))
        bounds = np.minimum(first[:, None] + steps[None, :] * width[:, None], last[:, None])  # (M, B+1)
        cum = np.concatenate([np.zeros((m, 1), np.int64), part.cumsum(1)], axis=1)
        counts = np.take_along_axis(cum, bounds[:, 1:], 1) - np.take_along_axis(cum, bounds[:, :-1], 1)
        real = (bounds[:, 1:] > bounds[:, :-1]) & has[:, None]
        per_sign.append((edges[bounds[:, :-1]], edges[bounds[:, 1:]], counts, real))
    out: list[list[list[float]]] = []
    (nlo, nhi, ncount, nreal), (plo, phi, pcount, preal) = per_sign
    for c in range(m):
        neg = [[-float(hi), -float(lo), int(k)] for lo, hi, k in zip(nlo[c][nreal[c]], nhi[c][nreal[c]],
                                                                   ncount[c][nreal[c]])][::-1]
        pos = [[float(lo), float(hi), int(k)] for lo, hi, k in zip(plo[c][preal[c]], phi[c][preal[c]],
                                                                 pcount[c][preal[c]])]
        out.append(neg + pos)
    return out


def display_histogram(hist_row: Tensor, max_bars: int = DISPLAY_BINS) -> list[list[float]]:
    """:func:`display_histograms` of one concept's row."""
    return display_histograms(hist_row[None], max_bars)[0]


class TopN:
    """The n largest scores per concept with their ids, kept as (M, n) buffers.

    ``update(scores, ids)``: scores (U, M) with ``-inf`` where a unit is not eligible (the
    concept did not fire), ids (U,) int64 unit ids (row or image). Each batch is reduced to
    its own top-min(n, U) per concept, concatenated with the buffer and cut back to n with
    ``torch.topk`` — the result equals a brute-force top-n over everything seen (up to ties).
    """

    def __init__(self, m: int, n: int) -> None:
        self.m, self.n = m, n
        self.values = torch.full((m, n), -math.inf, dtype=torch.float32)
        self.ids = torch.full((m, n), -1, dtype=torch.int64)

    def update(self, scores: Tensor, ids: Tensor) -> None:
        """Merge one batch of candidates (see class docstring)."""
        if scores.shape[0] == 0:
            return
        k = min(self.n, scores.shape[0])
        cand_v, cand_i = scores.to(torch.float32).topk(k, dim=0)   # (k, M)
        cand_ids = ids.to(torch.int64)[cand_i]                     # (k, M)
        both_v = torch.cat([self.values, cand_v.T], dim=1)         # (M, n + k)
        both_i = torch.cat([self.ids, cand_ids.T], dim=1)
        best_v, pos = both_v.topk(self.n, dim=1)
        self.values = best_v.contiguous()
        self.ids = torch.where(torch.isfinite(best_v), both_i.gather(1, pos), -1)

    def counts(self) -> Tensor:
        """How many valid (finite) entries each concept holds."""
        return torch.isfinite(self.values).sum(1)
