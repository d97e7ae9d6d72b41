"""``python -m evaluator report SWEEP_URL``: ``<sweep>/report.md`` beside PNG plots.

Inputs: every run of the sweep directory as the run format reads it back
(:func:`trainer.run_format.read_sweep`: the runs the sweep summary lists, else every sub-directory
holding a run config), each with its config and eval record. Sections:

1. Matched sparsity (the headline): per M, each baseline family against the reference family (the
   variant declaring ``is_reference``: the Sparsemax SAE) at its L0, with a verdict per metric and
   the per-M frontier plot (``frontier.png``); the
   computation and its rules are :mod:`evaluator.matched`.
2. The paper-style table: one row per variant (with its ``input_norm`` setting), one column
   per dictionary size M, each cell ``fvu / ce_degradation`` (mean ± sample std over the runs in
   that cell, e.g. seeds, when more than one, with their count).
3. Every run: seed (the SAE's init seed), target_l0 (absent on runs older than the field), l0,
   fvu (kept rows and all rows), CE numbers, dead/dense fractions, filter.
4. fvu vs M per variant (``fvu_vs_m.png``).
5. The L0–fvu frontier over all sizes (``l0_fvu.png``).
6. The support-size histogram of each run of a variant without an L0 knob (``has_l0_knob`` false: the
   sparsemax family, which chooses its support per token; ``support_<run>.png``) and the K a
   TopK SAE should use to match it: K = round(mean support size) (the mean is what a
   TopK/BatchTopK SAE spends per token), with the median and 10–90% range beside it.

Runs without an eval record are listed as not evaluated, never silently dropped.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections import defaultdict
from io import BytesIO
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from evaluator import matched  # noqa: E402
from evaluator.metrics import suggest_topk  # noqa: E402
from store import io  # noqa: E402
from store.errors import UserError  # noqa: E402
from store.io import join_url  # noqa: E402
from trainer.run_format import EVAL_FILE, RunRecord, read_sweep, report_url  # noqa: E402
from trainer.sae.registry import family, variants  # noqa: E402


def discover_runs(sweep_url: str, storage_options: io.StorageOptions = None) -> list[RunRecord]:
    """The sweep's runs, in summary order when there is one, else sorted by name."""
    runs = read_sweep(sweep_url, storage_options)
    if not runs and not io.exists(sweep_url, storage_options):
        raise UserError(f"sweep directory {sweep_url} does not exist; pass <runs_root>/<sweep name>.")
    if not runs:
        raise UserError(f"{sweep_url} holds no run directories (sub-directories with a run config); "
                        "pass the sweep directory <runs_root>/<sweep name>.")
    return runs


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _f(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _pm(stat: matched.Stat, spec: str = ".4f") -> str:
    """``mean ± std`` (just the mean for one value, – for none)."""
    if stat.mean is None:
        return "–"
    return _f(stat.mean, spec) + ("" if stat.std is None else f" ± {format(stat.std, spec)}")


def paper_table(runs: list[RunRecord]) -> str:
    """Markdown table: rows variants, columns dictionary sizes, cells ``fvu / ce_degradation``
    (mean ± sample std and the count when a cell holds more than one run)."""
    evaluated = [r for r in runs if r.eval is not None]
    sizes = sorted({r.m for r in evaluated})
    labels = list(dict.fromkeys(matched.family_of(r) for r in evaluated))
    cells: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for r in evaluated:
        cells[(matched.family_of(r), r.m)].append(r)
    lines = ["| variant | " + " | ".join(f"M = {m}" for m in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for label in labels:
        row = []
        for m in sizes:
            group = cells.get((label, m), [])
            if not group:
                row.append("")
                continue
            fvu = matched.summarize(r.metric("fvu") for r in group)
            ce = matched.summarize(r.metric("ce_degradation") for r in group)
            count = f" (n={len(group)})" if len(group) > 1 else ""
            row.append(f"{_pm(fvu)} / {_pm(ce)}{count}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(runs: list[RunRecord]) -> str:
    """Markdown table with one row per run."""
    head = ("| run | variant | M | input_norm | seed | target_l0 | l0 | fvu | fvu (all rows) | ce_degradation | "
            "ce_recovered | kl | dead | dense | tokens | filter |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        seed = "–" if r.seed is None else r.seed
        target = "–" if r.target_l0 is None else f"{r.target_l0:g}"
        if r.eval is None:
            lines.append(f"| {r.name} | {r.variant} | {r.m} | {r.input_norm} | {seed} | {target} | not evaluated |"
                         + " |" * 9)
            continue
        ev = r.eval
        tokens = ev.tokens.kept if ev.tokens is not None else None
        filt = ev.filter.description if ev.filter is not None else ""
        lines.append(
            f"| {r.name} | {r.variant} | {r.m} | {ev.input_norm or r.input_norm} | {seed} | {target} | "
            f"{_f(r.metric('l0'), '.1f')} | "
            f"{_f(r.metric('fvu'))} | {_f(r.metric('fvu_unfiltered'))} | {_f(r.metric('ce_degradation'))} | "
            f"{_f(r.metric('ce_recovered'), '.3f')} | {_f(r.metric('kl'))} | {_f(r.metric('dead_frac'), '.3f')} | "
            f"{_f(r.metric('dense_frac'), '.3f')} | {tokens} | {filt} |")
    return "\n".join(lines)


def _save(fig: Any, url: str, storage_options: io.StorageOptions = None) -> None:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    io.write_bytes(url, buf.getvalue(), storage_options)


def plot_fvu_vs_m(runs: list[RunRecord], url: str, storage_options: io.StorageOptions = None) -> None:
    """fvu against dictionary size M (log scale), one line per variant."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, dict[int, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.metric("fvu") is not None:
            by_label[matched.family_of(r)][r.m].append(r.metric("fvu"))
    for label, points in by_label.items():
        ms = sorted(points)
        ax.plot(ms, [_mean(points[m]) for m in ms], marker="o", label=label)
    ax.set_xscale("log", base=2)
    _finish(fig, ax, "dictionary size M", "fvu (eval split)", "fvu vs dictionary size", url, storage_options)


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, url: str,
            storage_options: io.StorageOptions = None) -> None:
    """Labels, grid, legend; write the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, url, storage_options)


def plot_l0_fvu(runs: list[RunRecord], url: str, storage_options: io.StorageOptions = None) -> None:
    """The sparsity–fidelity frontier: fvu against l0, one series per variant."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in runs:
        if r.metric("fvu") is not None and r.metric("l0") is not None:
            by_label[matched.family_of(r)].append((r.metric("l0"), r.metric("fvu"), r.m))
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for l0v, fvu, m in pts:
            ax.annotate(f"M={m}", (l0v, fvu), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    _finish(fig, ax, "l0 (mean active concepts per token)", "fvu", "L0–fvu frontier", url, storage_options)


def plot_support(run: RunRecord, url: str, storage_options: io.StorageOptions = None) -> dict[str, Any]:
    """Support-size histogram of one run (mean and median marked); returns the suggested TopK K."""
    sparsity = run.eval.value("sparsity")
    hist = sparsity["support_histogram"]
    sug = suggest_topk(sparsity)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(hist)), hist, width=1.0, color="tab:blue", alpha=0.8)
    if sug["mean"] is not None:
        ax.axvline(sug["mean"], color="tab:red", label=f"mean {sug['mean']:.1f} → K = {sug['k']}")
    if sug["median"] is not None:
        ax.axvline(sug["median"], color="tab:green", linestyle="--", label=f"median {sug['median']:g}")
    ax.set_xlabel("support size |S| (active concepts per token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{run.name}: dynamic K (M = {run.m})")
    ax.legend(fontsize=8)
    _save(fig, url, storage_options)
    return sug


FRONTIER_PNG = "frontier.png"
_METRIC_NAMES = {"dead_frac": "dead"}


def metric_name(key: str) -> str:
    """How the report names an eval.json metric (``dead_frac`` → ``dead``; others as they are)."""
    return _METRIC_NAMES.get(key, key)


def metric_spec(key: str) -> str:
    """Format of a metric in the tables: 4 decimals for fvu and ce_degradation, else 3."""
    return ".4f" if key in ("fvu", "ce_degradation") else ".3f"


def plot_frontier(points: list[RunRecord], url: str, storage_options: io.StorageOptions = None) -> None:
    """fvu against L0 (log x), one panel per M, one line per family through its frontier points (seeds
    averaged per config, error bars = sample std), the reference's points as stars with a ±WINDOW band."""
    reference = matched.reference_family()
    title = family(reference).title
    by_m: dict[int, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        if p.metric("fvu") is not None:
            by_m[p.m][matched.family_of(p)].append(p)
    sizes = sorted(by_m)
    families = list(dict.fromkeys(matched.family_of(p) for p in points))
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(5 * max(1, len(sizes)), 4), squeeze=False)
    for ax, m in zip(axes[0], sizes, strict=False):
        for fam, runs in by_m[m].items():
            front = matched.frontier(runs)
            xs = [g.l0.mean for g in front]
            ys = [g.metrics["fvu"].mean for g in front]
            yerr = [g.metrics["fvu"].std or 0.0 for g in front]
            xerr = [g.l0.std or 0.0 for g in front]
            ref = fam == reference
            ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, color=colors[fam], marker="*" if ref else "o",
                        markersize=14 if ref else 5, linestyle="none" if ref else "-", capsize=3,
                        label=f"{fam} ({title})" if ref and title != fam else fam, zorder=3 if ref else 2)
            if ref:
                for x in xs:
                    ax.axvspan(x * (1 - matched.WINDOW), x * (1 + matched.WINDOW), color=colors[fam], alpha=0.12)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter())  # plain numbers, minor ticks labelled on short ranges
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_xlabel("L0 (mean active concepts per token, log)")
        ax.set_ylabel("fvu")
        ax.set_title(f"M = {m}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"fvu–L0 frontier; band: ±{matched.WINDOW:.0%} around each {reference} L0")
    _save(fig, url, storage_options)


def _seeds(runs: tuple[RunRecord, ...]) -> str:
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    listed = f", seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else ""
    return f"{len(runs)} run{'s' if len(runs) != 1 else ''}{listed}"


def _point(g: matched.Group) -> str:
    target = "" if g.target_l0 is None else f", target {g.target_l0:g}"
    return f"L0 {_pm(g.l0, '.1f')} ({g.seeds} seed{'s' if g.seeds != 1 else ''}{target})"


def _how(match: matched.Match) -> str:
    """How a baseline's values were obtained, for the table."""
    if match.method == "matched":
        return f"matched ({_seeds(match.runs)})"
    if match.method == "interpolated":
        assert match.bracket is not None and match.t is not None
        a, b = match.bracket
        return f"interpolated in log L0 between {_point(a)} and {_point(b)}, t = {match.t:.2f}"
    assert match.nearest is not None
    return f"no match: nearest {_point(match.nearest)} — not at the same sparsity"


def _sentence(family: str, v: matched.Verdict, reference_title: str) -> str:
    """One verdict sentence; Δ and the threshold printed at the metric's table precision."""
    name = metric_name(v.metric)
    if v.outcome == "not conclusive" or v.delta is None or v.pooled_std is None:
        return f"- {family}, {name}: **not conclusive** — {v.reason}."
    spec = metric_spec(v.metric)
    within = v.outcome == "within seed spread"
    rule = (f"Δ = {format(v.delta, '+' + spec)}, |Δ| {'≤' if within else '>'} {matched.Z:g} × pooled std = "
            f"{format(matched.Z * v.pooled_std, spec)}")
    if within:
        spread = "seed and sampling spread" if v.metric in matched.PROBE_METRICS else "seed spread"
        return f"- {family}, {name}: the difference is **within {spread}** ({rule})."
    better = "better" if v.outcome == "reference better" else "worse"
    return f"- {family}, {name}: the {reference_title} is **{better}** than {family} ({rule})."


def matched_section(comparisons: list[matched.SizeComparison],
                    metrics: tuple[str, ...] = matched.LOWER_IS_BETTER) -> list[str]:
    """Markdown lines of the "Matched sparsity" section for ``metrics`` (those the runs have:
    :func:`evaluator.matched.present_metrics`); the plot is written by :func:`plot_frontier`."""
    w, z = f"{matched.WINDOW:.0%}", f"{matched.Z:g}"
    reference = matched.reference_family()
    title = family(reference).title
    concept = [k for k in metrics if k in matched.HIGHER_IS_BETTER]
    direction = ("lower is better for fvu, ce_degradation and dead" + (
        f"; higher is better for {', '.join(concept)} (concept quality: sparse probing accuracy on labelled "
        "documents, recovery of a synthetic dataset's true features; docs/metrics.md)" if concept else ""))
    lines = [
        "## Matched sparsity", "",
        "Comparisons between variants are only meaningful at equal sparsity (the same L0) and with more than "
        "one seed; this section says where that holds.", "",
        f"How: per dictionary size M, L = the {title}'s mean L0 over its runs (variant `{reference}`, default "
        f"input_norm). A baseline family's fvu / ce_degradation / dead (and every metric below) at L is the mean ± "
        f"sample std over its runs "
        f"with |L0 − L| ≤ {w}·L (**matched**). When it has no run there but frontier points (seeds averaged per "
        "config) on both sides of L, the two bracketing points a, b are **interpolated** linearly in log L0: "
        "t = (ln L − ln L0_a)/(ln L0_b − ln L0_a), y = (1 − t)·y_a + t·y_b, with the spread interpolated alike from "
        "their seed std, s = (1 − t)·s_a + t·s_b. Otherwise the nearest point is shown, **not at the same "
        f"sparsity**. Δ = baseline − {reference}; {direction}. The other metrics are compared the same way. "
        f"Runs without an {EVAL_FILE} or a positive L0 take no part.", "",
        f"Rule: with the pooled std s_p = √((s_a² + s_b²)/2), |Δ| > {z}·s_p means one side is better; otherwise the "
        "difference is within seed spread. With one seed on either side (for an interpolation: at either "
        "bracketing point), or without a matched L0, the comparison is **not conclusive**."
        + (" For a sparse-probing accuracy p̄ each side's s is at least its sampling error √(p̄(1 − p̄)/n_test) on the "
           "n_test probe-test documents (every seed is tested on the same few documents, so agreeing seeds do not "
           "make a one-document difference a verdict)." if any(k in matched.PROBE_METRICS for k in metrics) else ""),
        "",
    ]
    for size in comparisons:
        lines += [f"### M = {size.m}", ""]
        ref = size.reference
        if ref is None:
            lines += [f"No {reference} run at M = {size.m}: nothing to compare {', '.join(size.others)} against.", ""]
            continue
        values = ", ".join(f"{metric_name(k)} = {_pm(ref.metrics[k], metric_spec(k))}" for k in metrics)
        lines += [f"{title} ({_seeds(ref.runs)}): L0 = {_pm(ref.l0, '.2f')}, {values}.", ""]
        if not size.families:
            lines += [f"No baseline at M = {size.m}.", ""]
            continue
        head = "".join(f" {metric_name(k)} | Δ {metric_name(k)} |" for k in metrics)
        lines += ["| family | values obtained by | L0 |" + head, "|---|---|---|" + "---|---|" * len(metrics)]
        for fc in size.families:
            mt = fc.match
            l0 = f"≈ {_f(mt.l0.mean, '.1f')}" if mt.method == "interpolated" else _pm(mt.l0, ".1f")
            cells = []
            for k in metrics:
                spec = metric_spec(k)
                delta = fc.verdicts[k].delta
                cells += [_pm(mt.metrics[k], spec), "–" if delta is None else format(delta, "+" + spec)]
            lines.append(f"| {mt.family} | {_how(mt)} | {l0} | " + " | ".join(cells) + " |")
        lines += ["", "Verdicts:", ""]
        for fc in size.families:
            lines += [_sentence(fc.match.family, fc.verdicts[k], title) for k in metrics]
        lines.append("")
    lines += [f"![fvu–L0 frontier per M]({FRONTIER_PNG})", "",
              "fvu against L0 (log x), one panel per M and one line per family (seeds averaged per config, error "
              f"bars = std); the {title}'s points are stars, each with a ±{w} band.", ""]
    return lines


PROBE_SIZES = (1, 5, 10, 50)  # the paper's "on 1 / 5 / 10 / 50" columns
GT_METRICS = ("gt_mcc", "gt_recovered", "gt_f1", "gt_l0_spearman")


def zeroshot_accuracy(run: RunRecord, dataset: str, n: int) -> float | None:
    """Zero-shot accuracy of ``run`` on ``dataset`` keeping each class's top-n concepts (None when absent)."""
    res = ((run.eval.value("zeroshot") if run.eval is not None else None) or {}).get(dataset) or {}
    value = (res.get("accuracy_top_n") or {}).get(str(n))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def concept_columns(runs: list[RunRecord]) -> list[tuple[str, Any]]:
    """(header, run -> value) of every concept column some run has: sparse probing on 1/5/10/50 latents
    (text), zero-shot on 1/5/10/50 concepts per vision dataset, ground-truth recovery."""
    evaluated = [r for r in runs if r.eval is not None]
    columns: list[tuple[str, Any]] = []
    if any(r.metric("probe_top1") is not None for r in evaluated):
        columns += [(f"probe on {n}", lambda r, n=n: r.metric(f"probe_top{n}")) for n in PROBE_SIZES]
    datasets = dict.fromkeys(name for r in evaluated for name, res in ((r.eval.value("zeroshot") or {}).items())
                             if isinstance(res, dict) and "accuracy_top_n" in res)
    for ds in datasets:
        columns += [(f"zero-shot {ds} on {n}", lambda r, ds=ds, n=n: zeroshot_accuracy(r, ds, n)) for n in PROBE_SIZES]
    columns += [(k, lambda r, k=k: r.metric(k)) for k in GT_METRICS if any(r.metric(k) is not None for r in evaluated)]
    return columns


def concept_section(runs: list[RunRecord]) -> list[str]:
    """Markdown lines of the "Concept quality" section: the paper's on-1/5/10/50 table (sparse probing
    for text, zero-shot for vision) and the ground-truth metrics, per family and M (mean ± std over the
    runs of the cell), with the raw-activation probe baselines."""
    evaluated = [r for r in runs if r.eval is not None]
    lines = ["## Concept quality", ""]
    columns = concept_columns(runs)
    if not columns:
        reasons = sorted({str(r.eval.value("probe_skipped")) for r in evaluated if r.eval.value("probe_skipped")})
        lines += ["No run has concept metrics" + (f" (sparse probing: {'; '.join(reasons)})" if reasons else "")
                  + ". They need a labelled dataset (sparse probing), zero-shot image datasets (vision) or a "
                  "synthetic dataset with its true features (`dynsae synth`).", ""]
        return lines
    lines += ["Per family and M, mean ± sample std over the cell's runs (n); higher is better. **probe on n**: "
              "SAEBench sparse probing, the accuracy of one-vs-rest logistic regressions on the n latents "
              "whose mean-pooled per-document activation differs most between a class and the rest, on "
              "held-out documents; **zero-shot on n**: CLIP classification keeping each class's n most "
              "frequent concepts; **gt_ metrics**: recovery of a synthetic dataset's true dictionary "
              "(docs/metrics.md). Cells pool every run whatever its L0: the matched comparison and its "
              "verdicts are in the section above.", ""]
    cells: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for r in evaluated:
        cells[(matched.family_of(r), r.m)].append(r)
    lines += ["| family | M | n | L0 | " + " | ".join(h for h, _ in columns) + " |",
              "|---|---|---|---|" + "---|" * len(columns)]
    for (label, m), group in cells.items():
        values = [_pm(matched.summarize(get(r) for r in group), ".3f") for _, get in columns]
        l0 = _pm(matched.summarize(r.metric("l0") for r in group), ".1f")
        lines.append(f"| {label} | {m} | {len(group)} | {l0} | " + " | ".join(values) + " |")
    raw = [r for r in evaluated if r.metric("probe_raw_all") is not None]
    if raw:
        def mean(key: str) -> str:
            return _pm(matched.summarize(r.metric(key) for r in raw), ".3f")

        lines += ["", "Baselines on the same documents and split, from the raw activations (the same for every run of "
                  "a dataset): the n best of the d dimensions — " + ", ".join(
                      f"on {n}: {mean(f'probe_raw_top{n}')}" for n in PROBE_SIZES)
                  + f"; all d dimensions: {mean('probe_raw_all')}."]
        probe = raw[0].eval.value("probe") or {}
        if probe:
            lines += ["", f"Sparse probing data: {probe.get('documents')} labelled documents of the eval split in "
                          f"{probe.get('classes')} classes, {probe.get('train_documents')} to train the probes and "
                          f"{probe.get('test_documents')} to test them (split seed {probe.get('seed')}); always "
                          f"predicting the most frequent class scores {_f(probe.get('majority_baseline'), '.3f')}."]
    lines.append("")
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_report(sweep_url: str, storage_options: io.StorageOptions = None) -> str:
    """Write ``<sweep_url>/report.md`` and its plots; returns the report's URL."""
    runs = discover_runs(sweep_url, storage_options)
    evaluated = [r for r in runs if r.eval is not None]
    if not evaluated:
        raise UserError(f"no run under {sweep_url} has an {EVAL_FILE}; evaluate them first "
                        f"(python -m evaluator run RUN_URL...).")
    plot_fvu_vs_m(evaluated, join_url(sweep_url, "fvu_vs_m.png"), storage_options)
    plot_l0_fvu(evaluated, join_url(sweep_url, "l0_fvu.png"), storage_options)
    points = [r for r in evaluated if matched.comparable(r)]
    plot_frontier(points, join_url(sweep_url, FRONTIER_PNG), storage_options)
    first = evaluated[0].eval
    assert first is not None
    lines = [
        f"# Sweep report: {sweep_url.rstrip('/').rsplit('/', 1)[-1]}",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} from {len(runs)} runs "
        f"({len(evaluated)} evaluated) under `{sweep_url}`. Dataset `{first.dataset_url}` "
        f"(manifest {str(first.dataset_manifest_hash)[:12]}), hook layer {first.hook_layer} "
        f"{first.hook_site}, metric definitions v{first.metrics_version}. Row filter: "
        f"{first.filter.description if first.filter is not None else None}.",
        "",
        *matched_section(matched.compare(points), matched.present_metrics(points)),
        *concept_section(runs),
        "## fvu / ce_degradation by variant and dictionary size",
        "",
        "Cells: fvu (Σ‖x−x̂‖²/Σ‖x−μ‖² on the eval split's kept rows) / ce_degradation (ce_sae − ce_clean, "
        "nats; – when CE was not computed); mean ± sample std over the cell's runs when n > 1. Cells pool "
        "every run of a variant at M, whatever its L0: compare variants in the section above.",
        "",
        paper_table(runs),
        "",
        "## Runs",
        "",
        runs_table(runs),
        "",
    ]
    skipped = sorted({r.eval.value("ce_skipped") for r in evaluated if r.eval.value("ce_skipped")})
    if skipped:
        lines += [f"CE not computed: {'; '.join(skipped)}.", ""]
    lines += ["## fvu vs dictionary size", "", "![fvu vs M](fvu_vs_m.png)", "",
              "## L0–fvu frontier", "", "![L0 vs fvu](l0_fvu.png)", ""]
    sparse_runs = [r for r in evaluated if not family(r.variant).has_l0_knob and r.eval.value("sparsity")]
    dynamic = ", ".join(name for name, cls in variants().items() if not cls.has_l0_knob)
    lines += ["## Support size of the dynamic-K runs and the suggested TopK K", ""]
    if not sparse_runs:
        lines += [f"No run of a variant that chooses its support per token ({dynamic}) in this sweep.", ""]
    else:
        lines += [f"Variants without an L0 knob ({dynamic}) choose their support per token. "
                  "K = round(mean support size over the eval tokens): a TopK (or BatchTopK) SAE with this K "
                  "spends as many active concepts per token on average as the run chose; the "
                  "median and the 10–90% range show how much the per-token support varies.", "",
                  "| run | M | suggested K | mean | median | p10–p90 | corr(support size, ‖x‖) | corr(support size, position) |",
                  "|---|---|---|---|---|---|---|---|"]
        images = []
        for r in sparse_runs:
            png = f"support_{_slug(r.name)}.png"
            sug = plot_support(r, join_url(sweep_url, png), storage_options)
            sp = r.eval.value("sparsity")
            lines.append(f"| {r.name} | {r.m} | {sug['k']} | {_f(sug['mean'], '.2f')} | {_f(sug['median'], 'g')} | "
                         f"{_f(sug['p10'], 'g')}–{_f(sug['p90'], 'g')} | {_f(sp.get('support_norm_corr'), '.3f')} | "
                         f"{_f(sp.get('support_position_corr'), '.3f')} |")
            images.append(f"![support size of {r.name}]({png})")
        lines += [""] + images + [""]
    url = report_url(sweep_url)
    io.write_text(url, "\n".join(lines), storage_options)
    return url
