"""``make demo`` / ``dynsae demo``: harvest -> sweep -> evaluate -> report, end to end.

This module only composes the four packages through their public entry points — the same
functions ``python -m harvester run``, ``python -m dynsae sweep`` and ``python -m evaluator
report`` call — so the demo exercises exactly the code path of the real jobs:

1. :func:`harvester.job.harvest` with the ``harvest`` section (a :class:`HarvestConfig`);
2. :func:`trainer.sweep.run_sweep` with the ``sweep`` section, its ``base.dataset`` set to the URL
   the harvest produced (one feeder, one training task per grid point, one evaluation task scoring
   each finished run);
3. :func:`evaluator.report.write_report` on the sweep root, then a short "About this run" section
   (date, machine, budgets, wall times) is put at the top of ``report.md``;
4. with a ``synth`` section: :func:`harvester.synth.synthesize` (``dynsae synth``) makes activations with
   a known dictionary, the ``synth_sweep`` section (matched sparsity, seeds) trains on them the same way,
   and its own ``report.md`` carries the ground-truth metrics (``gt_*``, ``docs/metrics.md``).

The phases share one Ray (:func:`one_ray`): started (or joined) once, so a local instance starts once
instead of once per phase and the sweep's tasks find the harvest's warm worker processes.

The default config is ``dynsae/configs/demo.yaml``; ``dynsae demo OTHER.yaml`` takes another and ``--set``
overrides any key (``--set sweep.base.tokens=2048``). Every step resumes: a re-run reuses the
sealed dataset and finished runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from store import io
from store.cli import CommandHelp, command_parser
from store.config import StrictModel, add_config_arguments, load_config, validate
from store.errors import UserError, run_cli
from store.io import join_url
from trainer.run_format import summary_url

HELP = CommandHelp(
    does="Run the whole pipeline on a small example that needs no download: harvest activations, train a "
         "sweep of SAEs, evaluate them and write the report. Re-running reuses what is done.",
    reads="a demo config (default: the one shipped with dynsae)",
    writes="the dataset, the sweep's run folders and its report under the config's output folder",
    example="--set sweep.base.tokens=2048")

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "demo.yaml"


class DemoConfig(StrictModel):
    """The demo: a harvest config and a sweep config (its ``base.dataset`` is filled in)."""

    storage_option_keys: ClassVar[tuple[str, ...]] = ("harvest.storage_options", "sweep.base.storage_options")

    harvest: dict[str, Any]
    sweep: dict[str, Any]
    synth: dict[str, Any] | None = Field(default=None, description=(
        "a `dynsae synth` generator config: the synthetic ground-truth comparison (needs synth_sweep)."))
    synth_sweep: dict[str, Any] | None = Field(default=None, description=(
        "the sweep run on the synthetic dataset (its base.dataset is filled in)."))
    concepts_tokens: int = Field(default=0, ge=0, description="if > 0, build the concept browser of one run.")


def machine_line() -> str:
    """A one-line description of where the demo ran."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - describing the machine must never fail the demo
        gpu = "unknown accelerator"
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}"


def about_section(cfg: DemoConfig, dataset_url: str, rows: int, timings: dict[str, float]) -> str:
    """The preface of report.md: when, where, how small."""
    from trainer.config import SweepConfig, grid_points

    base = cfg.sweep.get("base", {})
    n_runs = len(grid_points(SweepConfig.model_validate(cfg.sweep)))
    tokens = int(base.get("tokens", 0))
    lines = [
        "## About this run",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine_line()}.",
        f"- Dataset: `{dataset_url}` — {rows:,} activation rows harvested "
        f"(model `{cfg.harvest.get('model', {}).get('name')}`, block {cfg.harvest.get('hook', {}).get('layer')} "
        f"{cfg.harvest.get('hook', {}).get('site')}).",
        f"- Training: {n_runs} runs, each **{tokens:,} tokens** (batch {base.get('batch_size')}). "
        "This is a demonstration budget, about 10,000x smaller than the paper's 1e9-token runs: "
        "the numbers show the pipeline works, not how the variants compare at convergence.",
        f"- Wall time: harvest {timings['harvest']:.0f} s, sweep + evaluation {timings['sweep']:.0f} s, "
        f"report {timings['report']:.0f} s, total {sum(timings.values()):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def prepend_to_report(report_url: str, text: str, storage_options: io.StorageOptions = None) -> None:
    """Insert ``text`` after the report's first heading line."""
    body = io.read_text(report_url, storage_options) or ""
    head, sep, rest = body.partition("\n")
    if not head.startswith("#"):
        head, sep, rest = "", "", body
    new = f"{head}{sep}\n{text}\n{rest}" if head else f"{text}\n{rest}"
    io.write_text(report_url, new, storage_options)


@contextlib.contextmanager
def one_ray(cfg: DemoConfig) -> Iterator[None]:
    """One Ray for every phase: :func:`store.cluster.start_or_join` (``RAY_ADDRESS``, else a Ray this process
    already initialised, else a local instance) once, which the harvest and the sweeps then use as a Ray this
    process has initialised; closed (a local instance stopped) however the demo ends. A config that gives a
    phase its own Ray address (``harvest.ray_address``, ``ray.address`` of a sweep) keeps one session per phase."""
    sweeps = [s for s in (cfg.sweep, cfg.synth_sweep) if s is not None]
    addresses = [cfg.harvest.get("ray_address"), *((s.get("ray") or {}).get("address") for s in sweeps)]
    if any(addresses):
        yield
        return
    from store.cluster import start_or_join

    session = start_or_join()
    try:
        yield
    finally:
        session.close()


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the pipeline on one Ray (:func:`one_ray`); returns the dataset URL, sweep URL, report URL and
    timings."""
    with one_ray(cfg):
        return _run_demo(cfg, progress)


def _run_demo(cfg: DemoConfig, progress: bool) -> dict[str, Any]:
    from evaluator.report import write_report
    from evaluator.task import evaluate_run_task
    from evaluator.training import TrainingEvaluation
    from harvester.config import HarvestConfig
    from harvester.job import harvest
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    harvest_cfg = validate(HarvestConfig, cfg.harvest, source="demo config: harvest")
    print(f"[1/3] harvesting {harvest_cfg.model.name} block {harvest_cfg.hook.layer} "
          f"{harvest_cfg.hook.site} over {harvest_cfg.source.kind} ...", flush=True)
    result = harvest(harvest_cfg, progress=progress)
    timings["harvest"] = time.perf_counter() - t0
    print(f"      dataset: {result.url} ({result.rows:,} rows)", flush=True)

    sweep_data = dict(cfg.sweep)
    sweep_data["base"] = {**sweep_data.get("base", {}), "dataset": result.url}
    sweep_cfg = validate(SweepConfig, sweep_data, source="demo config: sweep")
    t1 = time.perf_counter()
    print(f"[2/3] training and evaluating the sweep {sweep_cfg.name!r} on in-process Ray ...", flush=True)
    summary = run_sweep(sweep_cfg, source="demo config: sweep", progress=progress, evaluator=evaluate_run_task,
                        evaluation=TrainingEvaluation())
    timings["sweep"] = time.perf_counter() - t1
    sweep_url = join_url(sweep_cfg.base["runs_root"], sweep_cfg.name)

    t2 = time.perf_counter()
    print("[3/3] writing the report ...", flush=True)
    storage_options = sweep_cfg.base.get("storage_options")
    report_url = write_report(sweep_url, storage_options)
    timings["report"] = time.perf_counter() - t2
    prepend_to_report(report_url, about_section(cfg, result.url, result.rows, timings), storage_options)

    concepts_url = None
    if cfg.concepts_tokens > 0:
        concepts_url = build_concepts(summary, cfg.concepts_tokens)
    synthetic = run_synthetic(cfg, progress) if cfg.synth is not None else None
    return {"dataset": result.url, "sweep": sweep_url, "report": report_url, "summary": summary,
            "timings": timings, "concepts": concepts_url, "synthetic": synthetic}


def run_synthetic(cfg: DemoConfig, progress: bool) -> dict[str, Any]:
    """Phase 4: synthetic dataset -> matched-sparsity sweep -> report with the ground-truth metrics."""
    from evaluator.report import write_report
    from evaluator.task import evaluate_run_task
    from evaluator.training import TrainingEvaluation
    from harvester.synth import SynthConfig, synthesize
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    if cfg.synth_sweep is None:
        raise UserError("demo config: synth is set but synth_sweep is not; add the sweep to run on the synthetic "
                        "dataset or remove synth.")
    t0 = time.perf_counter()
    synth_cfg = validate(SynthConfig, cfg.synth, source="demo config: synth")
    print(f"[+] synthetic ground truth: {synth_cfg.rows:,} rows, d = {synth_cfg.d}, {synth_cfg.features} true "
          "features ...", flush=True)
    data = synthesize(synth_cfg, progress=progress)
    sweep_data = dict(cfg.synth_sweep)
    sweep_data["base"] = {**sweep_data.get("base", {}), "dataset": data.url}
    sweep_cfg = validate(SweepConfig, sweep_data, source="demo config: synth_sweep")
    summary = run_sweep(sweep_cfg, source="demo config: synth_sweep", progress=progress, evaluator=evaluate_run_task,
                        evaluation=TrainingEvaluation())
    sweep_url = join_url(sweep_cfg.base["runs_root"], sweep_cfg.name)
    storage_options = sweep_cfg.base.get("storage_options")
    report_url = write_report(sweep_url, storage_options)
    seconds = time.perf_counter() - t0
    prepend_to_report(report_url, synthetic_about(synth_cfg, data.url, sweep_cfg, seconds), storage_options)
    return {"dataset": data.url, "sweep": sweep_url, "report": report_url, "summary": summary, "seconds": seconds}


def synthetic_about(synth: Any, dataset_url: str, sweep: Any, seconds: float) -> str:
    """The preface of the synthetic sweep's report.md: what the truth is and how small the budget."""
    from trainer.config import grid_points

    base = sweep.base
    return "\n".join([
        "## About this run",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine_line()}.",
        f"- Dataset: `{dataset_url}` — {synth.rows:,} synthetic rows x = Σ c_i F_i + ε from {synth.features} known "
        f"unit features in d = {synth.d} (`dynsae synth`); per row {synth.simple_l0[0]}–{synth.simple_l0[1]} "
        f"features ({synth.simple_fraction:.0%} of rows) or {synth.complex_l0[0]}–{synth.complex_l0[1]}; "
        "power-law firing frequencies.",
        f"- Training: {len(grid_points(sweep))} runs, each **{int(base.get('tokens', 0)):,} tokens**, matched to the "
        f"{sweep.match_l0} SAE's held-out L0. gt_mcc / gt_recovered / gt_f1 / gt_l0_spearman score the learned "
        "dictionary against the true one (docs/metrics.md); comparisons hold only at equal L0 and across seeds, "
        "and at this demonstration budget they show the pipeline, not converged results.",
        f"- Wall time: {seconds:.0f} s (generation, sweep, evaluation, report).",
        "",
    ])


def build_concepts(summary: dict[str, Any], tokens: int) -> str | None:
    """Concept browser of the first sparsemax run (when the concept package is present)."""
    try:
        from evaluator.concepts.__main__ import main as concepts_main
    except ImportError:
        return None
    runs = [r for r in summary.get("runs", []) if r.get("status") == "finished"]
    pick = next((r for r in runs if r.get("sae.variant") == "sparsemax"), runs[0] if runs else None)
    if pick is None:
        return None
    concepts_main([pick["run_url"], "--tokens", str(tokens)])
    return join_url(pick["run_url"], "concepts", "index.html")


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m dynsae.demo", HELP)
    add_config_arguments(p, config_required=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_config(DemoConfig, args.config or DEFAULT_CONFIG, args.overrides, storage_options=args.storage_options)
    t0 = time.perf_counter()
    out = run_demo(cfg, progress=not args.no_progress)
    runs = out["summary"].get("runs", [])
    failed = [r for r in runs if r.get("status") != "finished"]
    if failed:
        raise UserError(f"{len(failed)} demo runs failed; see {summary_url(out['sweep'])}.")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s: {len(runs)} runs trained and evaluated.")
    if out["concepts"]:
        print(f"concept browser: {out['concepts']}")
    print(f"report: {out['report']}")
    if out["synthetic"]:
        syn = out["synthetic"]
        bad = [r for r in syn["summary"].get("runs", []) if r.get("status") != "finished"]
        if bad:
            raise UserError(f"{len(bad)} synthetic demo runs failed; see {summary_url(syn['sweep'])}.")
        print(f"synthetic ground-truth report: {syn['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
