"""Running statistics of activations: float64, mergeable, deterministic.

``StatsAccumulator`` keeps, in float64:

* ``rows`` and the column sums Σ x (→ mean vector μ = Σ x / n);
* Σ ‖x‖₂ (→ mean norm) and the exact min / max norm;
* a histogram of log₂‖x‖ with 128 bins per octave over [2⁻⁴⁰, 2⁴⁰) (plus an underflow bin
  for ‖x‖ < 2⁻⁴⁰, zeros included). Quantiles come from this histogram: the value
  reported is the geometric centre of the bin holding the rank ``q·(n−1)``, clipped to the
  exact [min, max]. The relative error is therefore at most 2^(1/256) − 1 ≈ 0.27 %;
  ``"1.0"`` is the exact maximum. The histogram is bounded (≤ 10,241 bins) and merges
  exactly, so per-shard states stored in commit records merge into the dataset's stats
  with no second pass over the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from store.manifest import QUANTILE_KEYS, DatasetStats, StatsState

BINS_PER_OCTAVE = 128
MIN_EXP = -40
MAX_EXP = 40
UNDERFLOW = MIN_EXP * BINS_PER_OCTAVE - 1  # bin for ‖x‖ < 2^MIN_EXP (and 0)


def as_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of a numpy array or torch tensor (bfloat16 becomes float32)."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return np.asarray(x)
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def norm_bins(norms: np.ndarray) -> np.ndarray:
    """Histogram bin of each norm: ``floor(128 · log₂‖x‖)``, clipped to the bounded range."""
    out = np.full(norms.shape, UNDERFLOW, dtype=np.int64)
    pos = norms >= 2.0 ** MIN_EXP
    with np.errstate(divide="ignore"):
        b = np.floor(np.log2(norms[pos]) * BINS_PER_OCTAVE).astype(np.int64)
    out[pos] = np.minimum(b, MAX_EXP * BINS_PER_OCTAVE - 1)
    return out


def bin_centre(b: int) -> float:
    """Geometric centre of histogram bin ``b``."""
    if b == UNDERFLOW:
        return 0.0
    return 2.0 ** ((b + 0.5) / BINS_PER_OCTAVE)


class StatsAccumulator:
    """Feed activation rows with :meth:`update`; :meth:`merge` others; :meth:`result` gives stats."""

    def __init__(self, d: int | None = None) -> None:
        self.rows = 0
        self.sum: np.ndarray | None = None if d is None else np.zeros(d, dtype=np.float64)
        self.norm_sum = 0.0
        self.norm_min = math.inf
        self.norm_max = -math.inf
        self.hist: dict[int, int] = {}

    def update(self, acts: Any) -> StatsAccumulator:
        """Add rows ``acts`` of shape (n, d) (numpy or torch, any float dtype)."""
        x = as_numpy(acts)
        if x.ndim != 2:
            raise ValueError(f"expected activations of shape (n, d), got {x.shape}")
        if x.shape[0] == 0:
            return self
        if self.sum is None:
            self.sum = np.zeros(x.shape[1], dtype=np.float64)
        if self.sum.shape[0] != x.shape[1]:
            raise ValueError(f"expected d={self.sum.shape[0]}, got rows of width {x.shape[1]}")
        self.sum += x.sum(axis=0, dtype=np.float64)  # float64 accumulator, no float64 copy of x
        xf = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
        # ‖x‖₂ per row: squares summed in the row's float32 (relative error ~1e-7·√d), then float64
        norms = np.sqrt(np.einsum("ij,ij->i", xf, xf).astype(np.float64))
        self.rows += x.shape[0]
        self.norm_sum += float(norms.sum())
        self.norm_min = min(self.norm_min, float(norms.min()))
        self.norm_max = max(self.norm_max, float(norms.max()))
        keys, counts = np.unique(norm_bins(norms), return_counts=True)
        for k, c in zip(keys.tolist(), counts.tolist()):
            self.hist[k] = self.hist.get(k, 0) + c
        return self

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Add another accumulator's rows into this one (exact)."""
        if other.rows == 0:
            return self
        if self.sum is None:
            self.sum = np.zeros_like(other.sum)
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge stats of d={other.sum.shape[0]} into d={self.sum.shape[0]}")
        self.sum += other.sum
        self.rows += other.rows
        self.norm_sum += other.norm_sum
        self.norm_min = min(self.norm_min, other.norm_min)
        self.norm_max = max(self.norm_max, other.norm_max)
        for k, c in other.hist.items():
            self.hist[k] = self.hist.get(k, 0) + c
        return self

    def quantile(self, q: float) -> float:
        """Approximate norm quantile (see module docstring for the error bound)."""
        if self.rows == 0:
            return float("nan")
        if q >= 1.0:
            return self.norm_max
        target = q * (self.rows - 1)  # 0-based rank in sorted order
        seen = 0
        for b in sorted(self.hist):
            seen += self.hist[b]
            if seen > target:
                return float(min(max(bin_centre(b), self.norm_min), self.norm_max))
        return self.norm_max

    def result(self) -> DatasetStats:
        """The dataset statistics: mean vector, mean norm and norm quantiles."""
        if self.rows == 0 or self.sum is None:
            raise ValueError("no rows were added to the statistics")
        return DatasetStats(
            rows=self.rows,
            mean=(self.sum / self.rows).tolist(),
            mean_norm=self.norm_sum / self.rows,
            norm_quantiles={k: self.quantile(float(k)) for k in QUANTILE_KEYS},
        )

    def state(self) -> StatsState:
        """Serializable state (what commit records store)."""
        return StatsState(
            rows=self.rows,
            sum=[] if self.sum is None else self.sum.tolist(),
            norm_sum=self.norm_sum,
            norm_min=None if self.rows == 0 else self.norm_min,
            norm_max=None if self.rows == 0 else self.norm_max,
            hist={str(k): v for k, v in sorted(self.hist.items())},
        )

    @classmethod
    def from_state(cls, state: StatsState) -> StatsAccumulator:
        """Rebuild an accumulator from :meth:`state`."""
        acc = cls()
        acc.rows = state.rows
        acc.sum = np.asarray(state.sum, dtype=np.float64) if state.sum else None
        acc.norm_sum = state.norm_sum
        acc.norm_min = math.inf if state.norm_min is None else state.norm_min
        acc.norm_max = -math.inf if state.norm_max is None else state.norm_max
        acc.hist = {int(k): v for k, v in state.hist.items()}
        return acc
