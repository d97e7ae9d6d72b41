"""Comparisons at matched sparsity (``docs/metrics.md``, report.md "Matched sparsity"): pure functions on run records.

The question the report answers: at the same dictionary size M and the same L0, is the reference
family (the Sparsemax SAE) better than each baseline family, beyond seed noise? Everything here is
computed from the runs as read back from their directories (:class:`trainer.run_format.RunRecord`, :func:`comparable`); nothing
is hard-coded per variant.

Decisions:

* **Family** = the variant, tagged ``(input_norm=unit)`` when the run got x/‖x‖ in and ×‖x‖ out
  (:func:`family_label`). The **reference** is the family of the variant whose file declares
  ``is_reference`` (``sparsemax``), with the default input_norm (:func:`reference_family`); every
  other family present at the same M is a baseline.
* **Config** = the run's ``sae`` section without its ``seed``: runs that differ only in the seed are
  one frontier point, their mean ± std being the seed spread (:func:`frontier`).
* **Spread** = the sample standard deviation (n − 1 in the denominator); undefined (None) for one run.
* **Reference L0** L = mean l0 over the reference runs at that M (all its seeds and configs pooled).
* **Matched**: a baseline's runs with |l0 − L| ≤ w·L, w = :data:`WINDOW` = 0.25, pooled: mean ± std of
  each metric over those runs.
* **Interpolated** (no run in the window, frontier points on both sides of L): between the two
  bracketing frontier points a (largest mean l0 ≤ L) and b (smallest mean l0 > L), linear in log L0:

      t = (ln L − ln l0_a) / (ln l0_b − ln l0_a),   y(L) = (1 − t)·ȳ_a + t·ȳ_b,
      s(L) = (1 − t)·s_a + t·s_b   (the bracketing points' seed std, interpolated alike),

  with n = min(n_a, n_b) seeds behind it.
* **Unmatched** (no run in the window and points on one side only): the nearest frontier point in
  |ln l0 − ln L| is shown, noted "not at the same sparsity", and never gets a verdict.
* **Verdict** per metric, with Δ = baseline − reference and the pooled std s_p = √((s_a² + s_b²)/2).
  Lower is better for fvu, ce_degradation and dead_frac; higher is better for the concept metrics
  (:data:`HIGHER_IS_BETTER`: sparse probing ``probe_top{n}`` and ground-truth recovery ``gt_*``):

      |Δ| > Z·s_p (Z = :data:`Z` = 2)  ⇒  reference better (Δ > 0 when lower is better, Δ < 0 when
                                          higher is better) or worse (the other sign),
      otherwise                         ⇒  within seed spread.

  For the sparse-probing accuracies (:data:`PROBE_METRICS`) each side's spread is at least the
  accuracy's sampling error on the probe-test documents, s ≥ √(p̄(1 − p̄)/n_test) (:func:`sampling_floor`):
  every seed is scored on the same few held-out documents, so two seeds that agree (std 0) say nothing
  about the documents that were not drawn, and a difference of one or two documents out of 31 must
  not read as a verdict.

  It is **not conclusive** (and says why) when the L0 is unmatched, when a side has fewer than two
  distinct seeds (no spread to compare against; for an interpolation, when a bracketing point has one
  seed), or when the metric is missing on a side.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from trainer.run_format import RunRecord

#: Half-width of the matching window, relative to the reference L0: |l0 − L| ≤ WINDOW·L.
WINDOW = 0.25
#: A difference counts when |Δ| > Z × pooled std.
Z = 2.0
#: The compared reconstruction metrics (eval.json keys); lower is better for each.
LOWER_IS_BETTER: tuple[str, ...] = ("fvu", "ce_degradation", "dead_frac")
#: The compared concept metrics (eval.json keys; docs/metrics.md); higher is better for each. A run
#: without them (no labels, no ground truth) leaves them None.
CONCEPT_METRICS: tuple[str, ...] = ("probe_top1", "probe_top5", "probe_top10", "probe_top50",
                                    "gt_mcc", "gt_recovered", "gt_f1", "gt_l0_spearman")
HIGHER_IS_BETTER = frozenset(CONCEPT_METRICS)
#: Accuracies on a sample of held-out documents: their verdicts count the sampling error too.
PROBE_METRICS = frozenset(("probe_top1", "probe_top5", "probe_top10", "probe_top50"))
#: Every compared metric.
METRICS: tuple[str, ...] = LOWER_IS_BETTER + CONCEPT_METRICS

Method = Literal["matched", "interpolated", "unmatched"]
Outcome = Literal["reference better", "reference worse", "within seed spread", "not conclusive"]


def family_label(variant: str, input_norm: str) -> str:
    """The family a run belongs to: its variant, tagged when given unit-norm side information."""
    return f"{variant} (input_norm=unit)" if input_norm == "unit" else variant


def reference_family() -> str:
    """The family every other one is compared against: the ``is_reference`` variant with the default
    input_norm ("sparsemax"); "" when no variant declares it (then nothing is compared)."""
    from trainer.sae.registry import reference_variant

    return family_label(reference_variant() or "", "none")


def family_of(run: RunRecord) -> str:
    """The family a run belongs to (:func:`family_label` of its variant and input_norm)."""
    return family_label(run.variant, run.input_norm)


def comparable(run: RunRecord) -> bool:
    """Whether a run takes part: evaluated, with a positive l0 (log L0 is undefined otherwise)."""
    l0 = run.l0
    return l0 is not None and l0 > 0


@dataclass(frozen=True)
class Stat:
    """mean ± std over n values (std is the sample std, None when n < 2; mean None when n = 0)."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: Iterable[float | None]) -> Stat:
    """Mean and sample std (n − 1) of the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return Stat(mean, std, len(vals))


def n_seeds(runs: Iterable[RunRecord]) -> int:
    """Distinct seeds among the runs (a run without a recorded seed counts as its own)."""
    return len({("seed", r.seed) if r.seed is not None else ("run", r.name) for r in runs})


@dataclass(frozen=True)
class Group:
    """Runs pooled together (one config's seeds, the runs in the window, or a family's runs at one M)."""

    runs: tuple[RunRecord, ...]
    l0: Stat
    metrics: Mapping[str, Stat]

    @property
    def seeds(self) -> int:
        return n_seeds(self.runs)

    @property
    def target_l0(self) -> float | None:
        """The common target of the runs (None when absent or not shared)."""
        targets = {r.target_l0 for r in self.runs}
        return targets.pop() if len(targets) == 1 else None


def pool(runs: Iterable[RunRecord]) -> Group:
    """mean ± std of l0 and of every metric over the runs."""
    runs = tuple(runs)
    return Group(runs, summarize(r.l0 for r in runs), {k: summarize(r.metric(k) for r in runs) for k in METRICS})


def frontier(runs: Iterable[RunRecord]) -> list[Group]:
    """One point per config (seeds averaged), sorted by mean l0 (runs of one family at one M expected)."""
    by_config: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_config[r.config_key].append(r)
    return sorted((pool(rs) for rs in by_config.values()), key=lambda g: g.l0.mean or 0.0)


@dataclass(frozen=True)
class Match:
    """A baseline family's metrics at the reference L0, and how they were obtained."""

    family: str
    method: Method
    metrics: Mapping[str, Stat]
    seeds: int                      # seeds behind the values (the smaller side for an interpolation)
    runs: tuple[RunRecord, ...]      # the runs the values come from
    l0: Stat                        # the L0 of those runs (interpolated: L itself, n = seeds)
    bracket: tuple[Group, Group] | None = None  # interpolated: the two frontier points a, b
    t: float | None = None                       # interpolated: the weight of b
    nearest: Group | None = None                 # unmatched: the nearest frontier point


def _lerp(a: float | None, b: float | None, t: float) -> float | None:
    return None if a is None or b is None else (1 - t) * a + t * b


def interpolate(a: Group, b: Group, l0: float) -> tuple[dict[str, Stat], float]:
    """Every metric at ``l0`` between frontier points a (l0_a ≤ l0) and b (l0_b > l0), linear in ln L0:
    t = (ln l0 − ln l0_a)/(ln l0_b − ln l0_a), y = (1 − t)·ȳ_a + t·ȳ_b, s = (1 − t)·s_a + t·s_b,
    n = min(n_a, n_b). Returns (metrics, t)."""
    la, lb = a.l0.mean, b.l0.mean
    assert la is not None and lb is not None and 0 < la <= l0 < lb
    t = (math.log(l0) - math.log(la)) / (math.log(lb) - math.log(la))
    out = {}
    for k in METRICS:
        sa, sb = a.metrics[k], b.metrics[k]
        out[k] = Stat(_lerp(sa.mean, sb.mean, t), _lerp(sa.std, sb.std, t), min(sa.n, sb.n))
    return out, t


def match_family(family: str, runs: Sequence[RunRecord], l0: float) -> Match:
    """The family's metrics at reference L0 ``l0`` (see the module docstring): the runs within
    ±WINDOW·l0 pooled, else an interpolation in ln L0 between bracketing frontier points, else the
    nearest point, marked unmatched."""
    inside = [r for r in runs if abs(r.l0 - l0) <= WINDOW * l0]
    if inside:
        g = pool(inside)
        return Match(family, "matched", g.metrics, g.seeds, g.runs, g.l0)
    points = frontier(runs)
    below = [p for p in points if p.l0.mean is not None and p.l0.mean <= l0]
    above = [p for p in points if p.l0.mean is not None and p.l0.mean > l0]
    if below and above:
        a, b = below[-1], above[0]
        metrics, t = interpolate(a, b, l0)
        seeds = min(a.seeds, b.seeds)
        return Match(family, "interpolated", metrics, seeds, a.runs + b.runs, Stat(l0, None, seeds),
                     bracket=(a, b), t=t)
    near = min(points, key=lambda p: abs(math.log(p.l0.mean or l0) - math.log(l0)))
    return Match(family, "unmatched", near.metrics, near.seeds, near.runs, near.l0, nearest=near)


@dataclass(frozen=True)
class Verdict:
    """The comparison of one metric: Δ = baseline − reference, the pooled std, the outcome and why."""

    metric: str
    delta: float | None
    pooled_std: float | None
    outcome: Outcome
    reason: str


def pooled_std(a: float, b: float) -> float:
    """s_p = √((s_a² + s_b²)/2)."""
    return math.sqrt((a * a + b * b) / 2)


def probe_test_documents(runs: Iterable[RunRecord]) -> int | None:
    """The fewest probe-test documents among the runs' sparse probes (None when none was run)."""
    counts = []
    for r in runs:
        probe = r.eval.value("probe") if r.eval is not None else None
        if isinstance(probe, dict) and isinstance(probe.get("test_documents"), int) and probe["test_documents"] > 0:
            counts.append(probe["test_documents"])
    return min(counts) if counts else None


def sampling_floor(metric: str, stat: Stat, runs: Iterable[RunRecord]) -> float:
    """The least spread a metric's value can be trusted to: for a probe accuracy p̄ on n_test held-out
    documents, its binomial standard error √(p̄(1 − p̄)/n_test); 0 for every other metric."""
    if metric not in PROBE_METRICS or stat.mean is None:
        return 0.0
    n = probe_test_documents(runs)
    if n is None:
        return 0.0
    p = min(max(stat.mean, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


def verdict(metric: str, ref: Stat, ref_seeds: int, match: Match, reference: str | None = None,
            ref_runs: Sequence[RunRecord] = ()) -> Verdict:
    """Decide one metric by the rule of the module docstring: |Δ| > Z·s_p decides (lower is better, or
    higher for :data:`HIGHER_IS_BETTER`), otherwise within seed spread; never a verdict from one seed or
    at an unmatched L0. A probe accuracy's spread on each side is at least its sampling error
    (:func:`sampling_floor`; ``ref_runs``: the reference's runs, whose eval.json say how many documents
    were tested). ``reference``: the reference family's name in the reasons (default
    :func:`reference_family`)."""
    reference = reference_family() if reference is None else reference
    base = match.metrics[metric]
    delta = None if base.mean is None or ref.mean is None else base.mean - ref.mean
    pooled = None if base.std is None or ref.std is None else pooled_std(
        max(base.std, sampling_floor(metric, base, match.runs)), max(ref.std, sampling_floor(metric, ref, ref_runs)))
    why = None
    if match.method == "unmatched":
        why = f"not at the same sparsity: no {match.family} run within ±{WINDOW:.0%} of the {reference} L0 " \
              "and none on both sides of it to interpolate"
    elif delta is None:
        missing = reference if ref.mean is None else match.family
        why = f"{metric} was not computed for {missing}"
    elif ref_seeds < 2 or ref.n < 2:
        why = f"one {reference} seed: no spread to compare against"
    elif match.seeds < 2 or base.n < 2:
        why = (f"one {match.family} seed at a bracketing point: no spread to compare against"
               if match.method == "interpolated" else f"one {match.family} seed: no spread to compare against")
    if why is not None or delta is None or pooled is None:
        return Verdict(metric, delta, pooled, "not conclusive", why or "no spread to compare against")
    if abs(delta) > Z * pooled:
        reference_better = delta < 0 if metric in HIGHER_IS_BETTER else delta > 0
        outcome: Outcome = "reference better" if reference_better else "reference worse"
        return Verdict(metric, delta, pooled, outcome, f"|Δ| = {abs(delta):.4g} > {Z:g} × pooled std {pooled:.4g}")
    return Verdict(metric, delta, pooled, "within seed spread",
                   f"|Δ| = {abs(delta):.4g} ≤ {Z:g} × pooled std {pooled:.4g}")


@dataclass(frozen=True)
class FamilyComparison:
    match: Match
    verdicts: Mapping[str, Verdict]


@dataclass(frozen=True)
class SizeComparison:
    """Everything the report shows for one dictionary size M."""

    m: int
    reference: Group | None  # the reference family's runs at M (None: nothing to compare against)
    families: list[FamilyComparison] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # families present when there is no reference


def compare(points: Iterable[RunRecord], reference: str | None = None) -> list[SizeComparison]:
    """Per M (ascending): the ``reference`` family (default :func:`reference_family`) and every other
    family matched at its L0, in order of first appearance (runs that are not :func:`comparable` take
    no part)."""
    reference = reference_family() if reference is None else reference
    points = [p for p in points if comparable(p)]
    by_m: dict[int, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        by_m[p.m][family_of(p)].append(p)
    out = []
    for m in sorted(by_m):
        families = by_m[m]
        ref_runs = families.get(reference)
        others = [f for f in families if f != reference]
        if not ref_runs:
            out.append(SizeComparison(m, None, others=others))
            continue
        ref = pool(ref_runs)
        assert ref.l0.mean is not None
        rows = []
        for fam in others:
            match = match_family(fam, families[fam], ref.l0.mean)
            rows.append(FamilyComparison(match, {k: verdict(k, ref.metrics[k], ref.seeds, match, reference, ref.runs)
                                                 for k in METRICS}))
        out.append(SizeComparison(m, ref, rows))
    return out


def present_metrics(points: Iterable[RunRecord]) -> tuple[str, ...]:
    """The metrics of :data:`METRICS` that at least one run has (the reconstruction ones always)."""
    points = list(points)
    return tuple(k for k in METRICS if k in LOWER_IS_BETTER or any(p.metric(k) is not None for p in points))
