"""``python -m evaluator report SWEEP_URL``: ``<sweep>/report.md`` beside PNG plots.

Inputs: every run directory under the sweep root (listed in ``summary.json`` when the trainer
wrote one, else every sub-directory holding a ``config.json``), each with its ``config.json``
and ``eval.json``. Sections:

1. The paper-style table: one row per variant (with its ``input_norm`` setting), one column
   per dictionary size M, each cell ``fvu / ce_degradation`` (mean over the runs in that cell,
   e.g. seeds; the count is shown when more than one).
2. Every run: l0, fvu (kept rows and all rows), CE numbers, dead/dense fractions, filter.
3. fvu vs M per variant (``fvu_vs_m.png``).
4. The L0–fvu frontier (``l0_fvu.png``).
5. The support-size histogram of each sparsemax-family run (``support_<run>.png``) and the K a
   TopK SAE should use to match it: K = round(mean support size) (the mean is what a
   TopK/BatchTopK SAE spends per token), with the median and 10–90% range beside it.

Runs without an ``eval.json`` are listed as not evaluated, never silently dropped.
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

from evaluator.evaluate import CONFIG_FILE, EVAL_FILE  # noqa: E402
from evaluator.metrics import suggest_topk  # noqa: E402
from store import io  # noqa: E402
from store.errors import UserError  # noqa: E402
from store.io import join_url  # noqa: E402

REPORT_FILE = "report.md"
SPARSEMAX_FAMILY = ("sparsemax", "mlp_sparsemax")


class RunRecord:
    """One run of the sweep: its name, URL, config and eval report (None when not evaluated)."""

    def __init__(self, name: str, url: str, config: dict[str, Any], ev: dict[str, Any] | None) -> None:
        self.name, self.url, self.config, self.eval = name, url, config, ev
        sae = config.get("sae", {})
        self.variant: str = sae.get("variant", "?")
        self.m: int = int(sae.get("m", 0))
        self.input_norm: str = sae.get("input_norm", "none")

    @property
    def label(self) -> str:
        """Row label of the paper table: the variant, tagged when given unit-norm side information."""
        return f"{self.variant} (input_norm=unit)" if self.input_norm == "unit" else self.variant

    def metric(self, key: str) -> float | None:
        """A scalar from eval.json (None when missing or not evaluated)."""
        if self.eval is None:
            return None
        value = self.eval.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def discover_runs(sweep_url: str, storage_options: io.StorageOptions = None) -> list[RunRecord]:
    """The sweep's runs, in summary.json order when there is one, else sorted by name."""
    summary = io.read_json_object(join_url(sweep_url, "summary.json"), storage_options, what="a sweep summary")
    entries: list[tuple[str, str]] = []
    if summary is not None and isinstance(summary.get("runs"), list):
        for row in summary["runs"]:
            name = row.get("name")
            if name:
                entries.append((name, row.get("run_url") or join_url(sweep_url, name)))
    else:
        if not io.exists(sweep_url, storage_options):
            raise UserError(f"sweep directory {sweep_url} does not exist; pass <runs_root>/<sweep name>.")
        for name in io.list_dir(sweep_url, storage_options):
            if io.exists(join_url(sweep_url, name, CONFIG_FILE), storage_options):
                entries.append((name, join_url(sweep_url, name)))
    runs = []
    for name, url in entries:
        config = io.read_json_object(join_url(url, CONFIG_FILE), storage_options, what="a run config")
        if config is None:
            continue
        runs.append(RunRecord(name, url, config, io.read_json_object(join_url(url, EVAL_FILE), storage_options, what="an eval report")))
    if not runs:
        raise UserError(f"{sweep_url} holds no run directories (sub-directories with {CONFIG_FILE}); "
                        "pass the sweep directory <runs_root>/<sweep name>.")
    return runs


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _f(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def paper_table(runs: list[RunRecord]) -> str:
    """Markdown table: rows variants, columns dictionary sizes, cells ``fvu / ce_degradation``."""
    evaluated = [r for r in runs if r.eval is not None]
    sizes = sorted({r.m for r in evaluated})
    labels = list(dict.fromkeys(r.label for r in evaluated))
    cells: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for r in evaluated:
        cells[(r.label, r.m)].append(r)
    lines = ["| variant | " + " | ".join(f"M = {m}" for m in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for label in labels:
        row = []
        for m in sizes:
            group = cells.get((label, m), [])
            if not group:
                row.append("")
                continue
            fvu = _mean([r.metric("fvu") for r in group])
            ce = _mean([r.metric("ce_degradation") for r in group])
            count = f" (n={len(group)})" if len(group) > 1 else ""
            row.append(f"{_f(fvu)} / {_f(ce)}{count}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(runs: list[RunRecord]) -> str:
    """Markdown table with one row per run."""
    head = ("| run | variant | M | input_norm | l0 | fvu | fvu (all rows) | ce_degradation | ce_recovered | kl | "
            "dead | dense | tokens | filter |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        if r.eval is None:
            lines.append(f"| {r.name} | {r.variant} | {r.m} | {r.input_norm} | not evaluated |" + " |" * 9)
            continue
        ev = r.eval
        tokens = (ev.get("tokens") or {}).get("kept")
        filt = (ev.get("filter") or {}).get("description", "")
        lines.append(
            f"| {r.name} | {r.variant} | {r.m} | {ev.get('input_norm', r.input_norm)} | {_f(r.metric('l0'), '.1f')} | "
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
            by_label[r.label][r.m].append(r.metric("fvu"))
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
            by_label[r.label].append((r.metric("l0"), r.metric("fvu"), r.m))
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for l0v, fvu, m in pts:
            ax.annotate(f"M={m}", (l0v, fvu), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    _finish(fig, ax, "l0 (mean active concepts per token)", "fvu", "L0–fvu frontier", url, storage_options)


def plot_support(run: RunRecord, url: str, storage_options: io.StorageOptions = None) -> dict[str, Any]:
    """Support-size histogram of one run (mean and median marked); returns the suggested TopK K."""
    sparsity = run.eval["sparsity"]
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
    first = evaluated[0].eval
    lines = [
        f"# Sweep report: {sweep_url.rstrip('/').rsplit('/', 1)[-1]}",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} from {len(runs)} runs "
        f"({len(evaluated)} evaluated) under `{sweep_url}`. Dataset `{first.get('dataset_url')}` "
        f"(manifest {str(first.get('dataset_manifest_hash'))[:12]}), hook layer {first.get('hook_layer')} "
        f"{first.get('hook_site')}, metric definitions v{first.get('metrics_version')}. Row filter: "
        f"{(first.get('filter') or {}).get('description')}.",
        "",
        "## fvu / ce_degradation by variant and dictionary size",
        "",
        "Cells: fvu (Σ‖x−x̂‖²/Σ‖x−μ‖² on the eval split's kept rows) / ce_degradation (ce_sae − ce_clean, "
        "nats; – when CE was not computed).",
        "",
        paper_table(runs),
        "",
        "## Runs",
        "",
        runs_table(runs),
        "",
    ]
    skipped = sorted({r.eval.get("ce_skipped") for r in evaluated if r.eval.get("ce_skipped")})
    if skipped:
        lines += [f"CE not computed: {'; '.join(skipped)}.", ""]
    lines += ["## fvu vs dictionary size", "", "![fvu vs M](fvu_vs_m.png)", "",
              "## L0–fvu frontier", "", "![L0 vs fvu](l0_fvu.png)", ""]
    sparse_runs = [r for r in evaluated if r.variant in SPARSEMAX_FAMILY and r.eval.get("sparsity")]
    lines += ["## Support size of the sparsemax runs (dynamic K) and the suggested TopK K", ""]
    if not sparse_runs:
        lines += ["No sparsemax-family run in this sweep.", ""]
    else:
        lines += ["K = round(mean support size over the eval tokens): a TopK (or BatchTopK) SAE with this K "
                  "spends as many active concepts per token on average as the sparsemax SAE chose; the "
                  "median and the 10–90% range show how much the per-token support varies.", "",
                  "| run | M | suggested K | mean | median | p10–p90 | corr(support size, ‖x‖) | corr(support size, position) |",
                  "|---|---|---|---|---|---|---|---|"]
        images = []
        for r in sparse_runs:
            png = f"support_{_slug(r.name)}.png"
            sug = plot_support(r, join_url(sweep_url, png), storage_options)
            sp = r.eval["sparsity"]
            lines.append(f"| {r.name} | {r.m} | {sug['k']} | {_f(sug['mean'], '.2f')} | {_f(sug['median'], 'g')} | "
                         f"{_f(sug['p10'], 'g')}–{_f(sug['p90'], 'g')} | {_f(sp.get('support_norm_corr'), '.3f')} | "
                         f"{_f(sp.get('support_position_corr'), '.3f')} |")
            images.append(f"![support size of {r.name}]({png})")
        lines += [""] + images + [""]
    url = join_url(sweep_url, REPORT_FILE)
    io.write_text(url, "\n".join(lines), storage_options)
    return url
