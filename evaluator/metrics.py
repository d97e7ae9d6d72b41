"""Metric definitions (``docs/metrics.md``): one module, float64 accumulation, streaming == one-shot.

Every metric exists in two forms that agree to float64 rounding:

* a *streaming accumulator* fed batch by batch (``update``), mergeable (``merge``), whose
  ``result()`` is the metric over everything it has seen; and
* a *functional form* on whole tensors (``fvu(x, x_hat)``, ...), which is the accumulator
  fed once.

Definitions (x ∈ R^d a row, x̂ its reconstruction in the original activation space,
N rows, a ∈ R^M the codes of a row):

* ``fvu`` = Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − μ‖², μ the eval-set mean vector. The
  denominator is computed as Q − ‖S‖²/N (Q = Σ‖x‖², S = Σx) about a shift c (the first
  batch's mean), i.e. Σ‖x − c‖² − ‖Σ(x − c)‖²/N, which is the same quantity with less
  cancellation when the mean is large.
* ``nmse_uncentered`` = Σ‖x − x̂‖² / Σ‖x‖²; ``explained_variance`` = 1 − fvu.
* ``l0`` = mean_t #{i : a_i ≠ 0} (sparsemax *scores* can be negative, so count ≠ 0, not > 0);
  the per-row support size histogram ("dynamic K"); Pearson correlations of the support
  size with ‖x‖ and with the token position.
* ``dead_frac`` = fraction of concepts that never fired on the evaluated rows;
  ``dense_frac`` = fraction that fired on more than 10% of them. (Training logs its own, different
  count under another name: ``train_dead_frac`` = fraction of concepts that have not fired for the
  last ``dead_tokens`` training tokens, kept by the trainer's counters, :mod:`trainer.run`.)
* Sparse probing (SAEBench's definition; docs/metrics.md): per document D, the mean-pooled codes
  ā_D = (1/|D|) Σ_{t∈D} a_t over its kept rows (:class:`DocumentMeans`); the documents are split
  (seeded, per class, :data:`PROBE_TEST_FRACTION` of each class's documents to probe-test) into
  probe-train and probe-test, disjoint by document (:func:`probe_split`); for each class c (one vs
  rest) the n latents with the largest |mean_{D∈c} ā_D − mean_{D∉c} ā_D| on probe-train
  (:func:`rank_latents`) feed an L2 logistic regression on standardised inputs; a probe-test
  document's class is the argmax over the classes' probabilities, and ``probe_top{n}`` the
  fraction of probe-test documents classified right, n ∈ :data:`PROBE_SIZES` (:func:`sparse_probe`).
  The same probe on the raw activations' n best dimensions gives ``probe_raw_top{n}``, on all d
  dimensions ``probe_raw_all`` (:func:`probe_metrics`).

Ground truth (synthetic datasets, ``docs/metrics.md``): true features F (n, d) unit rows, the SAE's
unit decoder directions u_j (M, d), Cos_ij = ⟨F_i, u_j⟩, and per eval row t its true support S_t:

* ``gt_mcc`` = (1/n) Σ_i Cos_{i,π(i)}, π the one-to-one assignment of true features to latents that
  maximises Σ_i Cos_{i,π(i)} (Hungarian); with M < n only M features are matched and the others count 0.
* ``gt_recovered`` = (1/n) #{i : max_j Cos_ij ≥ 0.9}.
* ``gt_f1`` = mean over true features i of F1(latent π(i) fires, i ∈ S_t) over the eval rows:
  F1 = 2TP / (2TP + FP + FN) ("fires" = code ≠ 0); an unmatched feature scores 0; a feature that is
  never present and whose latent never fires (F1 = 0/0) is left out of the mean.
* ``gt_l0_spearman`` = Spearman ρ(L0_t, |S_t|) over the eval rows (Pearson of average ranks);
  None when either is constant (e.g. a TopK SAE's L0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

METRICS_VERSION = "3"  # 2: ground-truth metrics (gt_*); 3: sparse probing (probe_top{n}, probe_raw_*)
DENSE_THRESHOLD = 0.1  # a concept firing on more than this fraction of rows is "dense"


def _f64(t: Tensor) -> Tensor:
    """Detached float64 CPU copy of ``t``."""
    return t.detach().to(device="cpu", dtype=torch.float64)


class ReconstructionAccumulator:
    """Streaming Σ‖x − x̂‖², Σ‖x‖² and the centred total sum of squares, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0            # Σ‖x − x̂‖²
        self.q = 0.0              # Σ‖x‖²
        self.shift: Tensor | None = None  # c
        self.s_shift: Tensor | None = None  # Σ(x − c)
        self.q_shift = 0.0        # Σ‖x − c‖²

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Add a batch of rows ``x`` (B, d) and their reconstructions ``x_hat`` (B, d)."""
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"x and x_hat must both be (B, d); got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        if x.shape[0] == 0:
            return
        x64, xh64 = _f64(x), _f64(x_hat)
        if self.shift is None:
            self.shift = x64.mean(0)
            self.s_shift = torch.zeros_like(self.shift)
        centred = x64 - self.shift
        self.n += x64.shape[0]
        self.sse += float(((x64 - xh64) ** 2).sum())
        self.q += float((x64 ** 2).sum())
        self.s_shift = self.s_shift + centred.sum(0)
        self.q_shift += float((centred ** 2).sum())

    def merge(self, other: ReconstructionAccumulator) -> ReconstructionAccumulator:
        """Fold ``other`` into this accumulator (as if its rows had been fed here); returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.__dict__.update({k: (v.clone() if isinstance(v, Tensor) else v) for k, v in other.__dict__.items()})
            return self
        assert self.shift is not None and other.shift is not None and other.s_shift is not None
        # Re-express other's sums about our shift c1: x − c1 = (x − c2) + δ, δ = c2 − c1.
        delta = other.shift - self.shift
        s_other = other.s_shift + other.n * delta
        q_other = other.q_shift + 2.0 * float(delta @ other.s_shift) + other.n * float(delta @ delta)
        self.n += other.n
        self.sse += other.sse
        self.q += other.q
        self.s_shift = self.s_shift + s_other
        self.q_shift += q_other
        return self

    @property
    def sst(self) -> float:
        """Σ‖x − μ‖² = Σ‖x − c‖² − ‖Σ(x − c)‖²/N (= Q − ‖S‖²/N)."""
        if self.n == 0 or self.s_shift is None:
            return 0.0
        return max(self.q_shift - float(self.s_shift @ self.s_shift) / self.n, 0.0)

    def result(self) -> dict[str, float]:
        """fvu, nmse_uncentered, explained_variance, mse (per row) and the row count."""
        sst = self.sst
        fvu_value = self.sse / sst if sst > 0 else math.nan
        nmse = self.sse / self.q if self.q > 0 else math.nan
        return {
            "fvu": fvu_value,
            "nmse_uncentered": nmse,
            "explained_variance": 1.0 - fvu_value,
            "mse_per_row": self.sse / self.n if self.n else math.nan,
            "rows": self.n,
        }


class CorrelationAccumulator:
    """Streaming Pearson correlation of two series (Chan et al.'s mergeable co-moments, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_a = 0.0
        self.mean_b = 0.0
        self.m2_a = 0.0   # Σ(a − ā)²
        self.m2_b = 0.0   # Σ(b − b̄)²
        self.c_ab = 0.0   # Σ(a − ā)(b − b̄)

    def _combine(self, n: int, mean_a: float, mean_b: float, m2_a: float, m2_b: float, c_ab: float) -> None:
        if n == 0:
            return
        total = self.n + n
        da, db = mean_a - self.mean_a, mean_b - self.mean_b
        w = self.n * n / total
        self.m2_a += m2_a + da * da * w
        self.m2_b += m2_b + db * db * w
        self.c_ab += c_ab + da * db * w
        self.mean_a += da * n / total
        self.mean_b += db * n / total
        self.n = total

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add paired samples ``a`` (B,) and ``b`` (B,)."""
        a64, b64 = _f64(a).reshape(-1), _f64(b).reshape(-1)
        if a64.shape != b64.shape:
            raise ValueError(f"paired series differ in length: {a64.numel()} vs {b64.numel()}")
        if a64.numel() == 0:
            return
        ma, mb = float(a64.mean()), float(b64.mean())
        ca, cb = a64 - ma, b64 - mb
        self._combine(a64.numel(), ma, mb, float(ca @ ca), float(cb @ cb), float(ca @ cb))

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Fold ``other`` into this accumulator; returns self."""
        self._combine(other.n, other.mean_a, other.mean_b, other.m2_a, other.m2_b, other.c_ab)
        return self

    def result(self) -> float:
        """r = Σ(a − ā)(b − b̄) / √(Σ(a − ā)² Σ(b − b̄)²); NaN when either series is constant."""
        denom = math.sqrt(self.m2_a * self.m2_b)
        return self.c_ab / denom if denom > 0 else math.nan


class SparsityAccumulator:
    """Streaming l0, support-size histogram, dead/dense fractions and support-size correlations."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.n = 0
        self.support_sum = 0           # Σ_t |S_t|
        self.histogram = torch.zeros(1, dtype=torch.int64)  # histogram[k] = #rows with |S_t| = k
        self.fire_counts = torch.zeros(m, dtype=torch.int64)  # rows on which concept i fired
        self.corr_norm = CorrelationAccumulator()
        self.corr_position = CorrelationAccumulator()

    def update(self, support_sizes: Tensor, fire_counts: Tensor, norms: Tensor | None = None,
               positions: Tensor | None = None) -> None:
        """Add a batch: per-row support sizes (B,), per-concept fire counts on these rows (M,),
        and optionally the rows' norms ‖x‖ (B,) and positions (B,) for the correlations."""
        sizes = support_sizes.detach().to("cpu", torch.int64).reshape(-1)
        if fire_counts.numel() != self.m:
            raise ValueError(f"fire_counts has {fire_counts.numel()} entries, expected M = {self.m}")
        if sizes.numel() == 0:
            return
        self.n += sizes.numel()
        self.support_sum += int(sizes.sum())
        counts = torch.bincount(sizes)
        if counts.numel() > self.histogram.numel():
            grown = torch.zeros(counts.numel(), dtype=torch.int64)
            grown[: self.histogram.numel()] = self.histogram
            self.histogram = grown
        self.histogram[: counts.numel()] += counts
        self.fire_counts += fire_counts.detach().to("cpu", torch.int64).reshape(-1)
        if norms is not None:
            self.corr_norm.update(sizes, norms)
        if positions is not None:
            self.corr_position.update(sizes, positions)

    def update_codes(self, codes: Tensor, norms: Tensor | None = None, positions: Tensor | None = None) -> None:
        """Add a batch of dense codes (B, M): a concept fires on a row where its code is ≠ 0."""
        active = codes != 0
        self.update(active.sum(-1), active.sum(0), norms, positions)

    def merge(self, other: SparsityAccumulator) -> SparsityAccumulator:
        """Fold ``other`` (same M) into this accumulator; returns self."""
        if other.m != self.m:
            raise ValueError(f"cannot merge sparsity accumulators of M = {self.m} and M = {other.m}")
        size = max(self.histogram.numel(), other.histogram.numel())
        hist = torch.zeros(size, dtype=torch.int64)
        hist[: self.histogram.numel()] += self.histogram
        hist[: other.histogram.numel()] += other.histogram
        self.histogram = hist
        self.n += other.n
        self.support_sum += other.support_sum
        self.fire_counts += other.fire_counts
        self.corr_norm.merge(other.corr_norm)
        self.corr_position.merge(other.corr_position)
        return self

    def support_quantile(self, q: float) -> float:
        """The q-quantile of the per-row support size (lower value at ties: the smallest k with CDF ≥ q)."""
        if self.n == 0:
            return math.nan
        cdf = torch.cumsum(self.histogram, 0)
        target = q * self.n
        return float(torch.nonzero(cdf >= target)[0, 0]) if target > 0 else float(torch.nonzero(cdf)[0, 0])

    def result(self) -> dict[str, Any]:
        """l0, histogram (list, index = support size), quantiles, dead/dense fractions, correlations."""
        rate = self.fire_counts.to(torch.float64) / max(self.n, 1)
        dead = int((self.fire_counts == 0).sum())
        dense = int((rate > DENSE_THRESHOLD).sum())
        return {
            "l0": self.support_sum / self.n if self.n else math.nan,
            "support_histogram": [int(v) for v in self.histogram.tolist()],
            "support_median": self.support_quantile(0.5),
            "support_p10": self.support_quantile(0.1),
            "support_p90": self.support_quantile(0.9),
            "support_max": int(torch.nonzero(self.histogram)[-1, 0]) if self.n else 0,
            "support_norm_corr": self.corr_norm.result(),
            "support_position_corr": self.corr_position.result(),
            "dead": dead,
            "dense": dense,
            "dead_frac": dead / self.m,
            "dense_frac": dense / self.m,
            "rows": self.n,
        }


# ---- functional forms: the accumulators fed once -------------------------------------------------


def reconstruction_metrics(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    """All reconstruction metrics of ``x_hat`` against ``x`` (rows), one shot."""
    acc = ReconstructionAccumulator()
    acc.update(x, x_hat)
    return acc.result()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − μ‖², μ = mean of the rows of ``x``."""
    return reconstruction_metrics(x, x_hat)["fvu"]


def nmse_uncentered(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x‖²."""
    return reconstruction_metrics(x, x_hat)["nmse_uncentered"]


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − fvu."""
    return reconstruction_metrics(x, x_hat)["explained_variance"]


def support_sizes(codes: Any) -> Tensor:
    """Per-row count of non-zero codes: a ``Codes`` object's ``support_sizes()`` or (codes ≠ 0).sum(-1)."""
    if hasattr(codes, "support_sizes"):
        return codes.support_sizes()
    return (codes != 0).sum(-1)


def l0(codes: Any) -> float:
    """mean_t #{i : a_ti ≠ 0} for dense codes (B, M) or a ``Codes`` object."""
    sizes = support_sizes(codes)
    return float(sizes.to(torch.float64).mean()) if sizes.numel() else math.nan


def suggest_topk(sparsity: dict[str, Any]) -> dict[str, Any]:
    """The K a TopK SAE should use to match a sparsemax SAE's sparsity.

    K = round(l0), the mean support size, so the TopK SAE spends the same number of active
    concepts per token on average (BatchTopK matches this exactly: its K is a batch mean);
    the median and the 10–90% range of the support size are given beside it.
    """
    mean = sparsity["l0"]
    return {
        "k": max(1, int(round(mean))) if not math.isnan(mean) else None,
        "rule": "K = round(mean support size) over the eval tokens",
        "mean": mean,
        "median": sparsity.get("support_median"),
        "p10": sparsity.get("support_p10"),
        "p90": sparsity.get("support_p90"),
    }


# ---- sparse probing (SAEBench) ---------------------------------------------------------------------

#: The probe sizes n of ``probe_top{n}`` (the paper's on-1/5/10/50 columns).
PROBE_SIZES: tuple[int, ...] = (1, 5, 10, 50)
#: Fraction of each class's documents that go to probe-test.
PROBE_TEST_FRACTION = 0.3
#: Seed of the probe-train / probe-test split (the same split for every run on a dataset).
PROBE_SEED = 0
#: Inverse L2 strength of the logistic regressions (scikit-learn's C, liblinear solver, standardised inputs).
PROBE_C = 1.0


class DocumentMeans:
    """Streaming per-document mean of row vectors, ā_D = (1/|D|) Σ_{t∈D} v_t, in float64.

    ``documents`` lists every document id that may occur (sorted unique); rows of other ids are an
    error. ``result()`` gives the ids with at least one row and their means."""

    def __init__(self, documents: np.ndarray, width: int) -> None:
        self.documents = torch.as_tensor(np.asarray(documents, dtype=np.int64))
        if self.documents.numel() > 1 and not bool((self.documents[1:] > self.documents[:-1]).all()):
            raise ValueError("documents must be sorted and unique")
        self.sums = torch.zeros(self.documents.numel(), width, dtype=torch.float64)
        self.counts = torch.zeros(self.documents.numel(), dtype=torch.int64)

    def update(self, values: Tensor, docs: Tensor) -> None:
        """Add rows ``values`` (B, width) of documents ``docs`` (B,)."""
        docs = docs.detach().to("cpu", torch.int64).reshape(-1)
        if docs.numel() == 0:
            return
        pos = torch.searchsorted(self.documents, docs).clamp_max(max(self.documents.numel() - 1, 0))
        if self.documents.numel() == 0 or not bool((self.documents[pos] == docs).all()):
            raise ValueError("a row belongs to a document that is not in the documents list")
        self.sums.index_add_(0, pos, _f64(values))
        self.counts.index_add_(0, pos, torch.ones_like(pos))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(document ids with rows, (n, width) float64 means)."""
        seen = self.counts > 0
        means = self.sums[seen] / self.counts[seen, None].to(torch.float64)
        return self.documents[seen].numpy(), means.numpy()


def probe_split(labels: np.ndarray, test_fraction: float = PROBE_TEST_FRACTION,
                seed: int = PROBE_SEED) -> np.ndarray:
    """Bool mask of the probe-test documents: a seeded permutation of all documents, of which each
    class sends its first round(test_fraction · n_c) to probe-test (at least one document stays in
    probe-train). The documents a class sends depend on the seed and the class's members only."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        k = min(int(round(test_fraction * len(members))), len(members) - 1)
        test[members[:k]] = True
    return test


def rank_latents(features: np.ndarray, is_class: np.ndarray) -> np.ndarray:
    """Feature indices by decreasing |mean over the class − mean over the rest| (ties: lower index first)."""
    diff = np.abs(features[is_class].mean(0) - features[~is_class].mean(0))
    return np.argsort(-diff, kind="stable")


def sparse_probe(features: np.ndarray, labels: np.ndarray, test: np.ndarray, n: int | None) -> float:
    """Multi-class accuracy on the ``test`` documents of one-vs-rest L2 logistic regressions, each on
    its class's top-``n`` features (:func:`rank_latents` on the probe-train documents; None = all
    features), inputs standardised with probe-train statistics; class = argmax of the probabilities.
    Classes absent from probe-train are never predicted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = features[~test], labels[~test], features[test], labels[test]
    classes = np.unique(y_train)
    if len(classes) < 2 or len(y_test) == 0:
        raise ValueError("a probe needs two classes in probe-train and a probe-test document")
    scores = np.empty((len(y_test), len(classes)))
    for j, c in enumerate(classes):
        is_class = y_train == c
        keep = rank_latents(x_train, is_class)[:n]
        scaler = StandardScaler().fit(x_train[:, keep])
        model = LogisticRegression(C=PROBE_C, solver="liblinear", max_iter=1000).fit(scaler.transform(x_train[:, keep]), is_class)
        scores[:, j] = model.predict_proba(scaler.transform(x_test[:, keep]))[:, 1]
    return float(np.mean(classes[np.argmax(scores, axis=1)] == y_test))


def probe_metrics(codes: np.ndarray, raw: np.ndarray, labels: np.ndarray,
                  sizes: Sequence[int] = PROBE_SIZES, seed: int = PROBE_SEED) -> dict[str, Any]:
    """``probe_top{n}`` (codes), ``probe_raw_top{n}`` and ``probe_raw_all`` (raw activations) for
    documents' pooled ``codes`` (D, M) and ``raw`` activations (D, d) with class ``labels`` (D,), and
    the split's details; ``{"probe_skipped": reason}`` when there are too few labelled documents."""
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    if int((counts >= 2).sum()) < 2:
        return {"probe_skipped": f"{len(labels)} labelled documents in the eval split, fewer than two classes "
                                 "with two documents each"}
    test = probe_split(labels, seed=seed)
    out: dict[str, Any] = {}
    for n in sizes:
        out[f"probe_top{n}"] = sparse_probe(codes, labels, test, n)
        out[f"probe_raw_top{n}"] = sparse_probe(raw, labels, test, n)
    out["probe_raw_all"] = sparse_probe(raw, labels, test, None)
    majority = np.bincount(labels[~test]).argmax()
    out["probe"] = {"documents": len(labels), "train_documents": int((~test).sum()),
                    "test_documents": int(test.sum()), "classes": int((counts > 0).sum()),
                    "class_counts": [int(v) for v in counts], "test_fraction": PROBE_TEST_FRACTION,
                    "seed": seed, "C": PROBE_C, "sizes": list(sizes),
                    "majority_baseline": float(np.mean(labels[test] == majority))}
    return out

# ---- ground truth (synthetic datasets) ----------------------------------------------------------

#: A true feature counts as recovered when some decoder direction has cosine ≥ this with it.
RECOVERED_COSINE = 0.9


def feature_matching(features: Tensor, directions: Tensor) -> dict[str, Any]:
    """Hungarian matching of true features (n, d) to unit decoder directions (M, d), maximising Σ cosine.

    Returns ``gt_mcc``, ``gt_recovered``, ``assignment`` (n,) int64 (the latent matched to feature i,
    −1 when M < n leaves it unmatched), ``matched_cosine`` (n,) float64 (0 where unmatched) and
    ``best_cosine`` (n,) = max_j Cos_ij. Both inputs are normalised here (rows of norm 0 stay 0).
    """
    from scipy.optimize import linear_sum_assignment

    f, u = _f64(features), _f64(directions)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (f @ u.T).numpy()  # Cos_ij = ⟨F_i, u_j⟩
    rows, cols = linear_sum_assignment(cos, maximize=True)
    n = cos.shape[0]
    assignment = torch.full((n,), -1, dtype=torch.int64)
    assignment[torch.from_numpy(rows)] = torch.from_numpy(cols).to(torch.int64)
    matched = torch.zeros(n, dtype=torch.float64)
    matched[torch.from_numpy(rows)] = torch.from_numpy(cos[rows, cols])
    best = torch.from_numpy(cos.max(axis=1)) if cos.shape[1] else torch.zeros(n, dtype=torch.float64)
    return {"gt_mcc": float(matched.sum()) / n, "gt_recovered": float((best >= RECOVERED_COSINE).double().mean()),
            "assignment": assignment, "matched_cosine": matched, "best_cosine": best}


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..N of ``values`` (float64), ties given their average rank."""
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(_f64(values).numpy(), method="average"))


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman ρ of paired series: Pearson r of their average ranks; None when either is constant."""
    if a.numel() != b.numel():
        raise ValueError(f"paired series differ in length: {a.numel()} vs {b.numel()}")
    if a.numel() < 2 or bool((a == a.reshape(-1)[0]).all()) or bool((b == b.reshape(-1)[0]).all()):
        return None
    acc = CorrelationAccumulator()
    acc.update(average_ranks(a.reshape(-1)), average_ranks(b.reshape(-1)))
    return acc.result()


class GroundTruthAccumulator:
    """Streaming counts for ``gt_f1`` and the (L0_t, |S_t|) pairs for ``gt_l0_spearman``.

    ``assignment`` (n,) is :func:`feature_matching`'s; ``m`` the number of latents. ``update`` takes
    a batch's codes (a ``Codes`` object or dense (B, M)) and ``present`` (B, n) bool (i ∈ S_t).
    """

    def __init__(self, assignment: Tensor, m: int) -> None:
        self.assignment = assignment.to(torch.int64).cpu()
        n = self.assignment.numel()
        self.feature_of = torch.full((m,), -1, dtype=torch.int64)  # latent j -> the feature it is matched to
        ok = self.assignment >= 0
        self.feature_of[self.assignment[ok]] = torch.arange(n)[ok]
        self.tp = torch.zeros(n, dtype=torch.int64)
        self.fp = torch.zeros(n, dtype=torch.int64)
        self.fn = torch.zeros(n, dtype=torch.int64)
        self.l0: list[Tensor] = []
        self.true_l0: list[Tensor] = []

    def fires(self, codes: Any) -> Tensor:
        """(B, n) bool: the latent matched to feature i is non-zero in row b."""
        n = self.assignment.numel()
        dense = codes if isinstance(codes, Tensor) else codes.dense
        if dense is not None:
            out = torch.zeros(dense.shape[0], n, dtype=torch.bool)
            ok = self.assignment >= 0
            out[:, ok] = (dense.detach().cpu()[:, self.assignment[ok]] != 0)
            return out
        idx, val = codes.idx.detach().cpu(), codes.val.detach().cpu()
        feat = self.feature_of[idx]
        hit = (val != 0) & (feat >= 0)
        out = torch.zeros(idx.shape[0], n, dtype=torch.bool)
        rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
        out[rows[hit], feat[hit]] = True
        return out

    def update(self, codes: Any, present: Tensor) -> None:
        """Add a batch: its codes and which true features each row holds."""
        fires, present = self.fires(codes), present.cpu().bool()
        self.tp += (fires & present).sum(0)
        self.fp += (fires & ~present).sum(0)
        self.fn += (~fires & present).sum(0)
        self.l0.append(support_sizes(codes).detach().cpu().to(torch.int64))
        self.true_l0.append(present.sum(-1).to(torch.int64))

    def result(self) -> dict[str, Any]:
        """``gt_f1`` (mean F1 over true features), ``gt_l0_spearman`` and their parts."""
        denom = 2 * self.tp + self.fp + self.fn
        defined = denom > 0
        f1 = torch.where(defined, 2 * self.tp.double() / denom.clamp_min(1).double(), torch.nan)
        l0 = torch.cat(self.l0) if self.l0 else torch.zeros(0, dtype=torch.int64)
        true_l0 = torch.cat(self.true_l0) if self.true_l0 else torch.zeros(0, dtype=torch.int64)
        return {"gt_f1": float(f1[defined].mean()) if bool(defined.any()) else math.nan,
                "gt_l0_spearman": spearman(l0, true_l0), "f1_defined": int(defined.sum()), "rows": int(l0.numel()),
                "true_l0_mean": float(true_l0.double().mean()) if true_l0.numel() else math.nan}
