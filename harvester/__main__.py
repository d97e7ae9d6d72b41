"""``python -m harvester run CONFIG.yaml [--set dotted.key=value ...]`` and
``python -m harvester synth CONFIG.yaml [--set ...]`` (synthetic activations with a known dictionary,
:mod:`harvester.synth`).

Harvests residual-stream activations into a sealed dataset and prints a summary; the last line
printed is the dataset URL (so ``URL=$(python -m harvester run cfg.yaml | tail -1)`` works).
Ctrl-C (SIGINT) or SIGTERM stops it within seconds with exit status 130 or 143: its Ray tasks are stopped,
committed shards are kept, the shards in flight are dropped, and the same command resumes.
"""

from __future__ import annotations

import argparse
import sys

from harvester.config import HarvestConfig
from store.cli import CommandHelp, subcommand_parser
from store.config import add_config_arguments, load_config
from store.errors import run_cli

RUN_HELP = CommandHelp(
    does="Record a model's activations at one layer on a text corpus or an image set, into a dataset that "
         "training and evaluation read (anywhere fsspec reaches: a folder, S3, GCS). Runs on a local Ray or a "
         "cluster; Ctrl-C keeps what is done and the same command resumes. Every config key has a default.",
    reads="the harvest config (model, layer, source), the model and the corpus",
    writes="a sealed dataset <output>/<name>-<config hash>/; the last line printed is its URL",
    example="deploy/configs/smollm2-python-docs.yaml --set hook.layer=12")
SYNTH_HELP = CommandHelp(
    does="Make a synthetic dataset whose rows are sparse sums of known features, with a varying number of "
         "features per row, so an SAE's recovery of the true dictionary can be scored.",
    reads="a generator config (dimension, number of features, rows, sparsity; every key has a default)",
    writes="a sealed dataset with its true features and per-row feature counts; the last line printed is its URL",
    example="--set d=64 --set features=256 --set rows=65536")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harvester", description="Harvest or synthesize activation datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    run = subcommand_parser(sub, "run", "python -m harvester run", RUN_HELP)
    add_config_arguments(run, config_required=False)  # every key has a default
    synth = subcommand_parser(sub, "synth", "python -m harvester synth", SYNTH_HELP)
    add_config_arguments(synth, config_required=False)
    return p


def synth_main(args: argparse.Namespace) -> int:
    """``synth``: generate, print a summary, then the dataset URL as the last line."""
    from harvester.synth import SynthConfig, synthesize

    cfg = load_config(SynthConfig, args.config, args.overrides, storage_options=args.storage_options)
    result = synthesize(cfg, progress=not args.no_progress)
    if result.skipped:
        print(f"already generated: {result.rows:,} rows, sealed")
    else:
        print(f"generated {result.rows:,} rows ({cfg.features:,} true features, d = {cfg.d}) in "
              f"{result.seconds:,.1f} s: {result.throughput:,.0f} rows/s")
    print(result.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see module docstring); returns the exit status."""
    args = parser().parse_args(argv)
    if args.command == "synth":
        return synth_main(args)
    cfg = load_config(HarvestConfig, args.config, args.overrides, storage_options=args.storage_options)
    from harvester.job import HarvestInterrupted, harvest

    try:
        result = harvest(cfg, progress=not args.no_progress)
    except HarvestInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 128 + err.signum
    if result.skipped:
        print(f"already harvested: {result.rows:,} rows ({result.sequences:,} sequences), sealed")
    else:
        per_s = result.throughput
        images = f", {result.sequences / result.seconds:,.1f} images/s" if result.unit == "img" else ""
        resumed = f", {result.resumed_shards} committed shards reused" if result.resumed_shards else ""
        print(f"harvested {result.rows:,} rows ({result.sequences:,} sequences) in {result.seconds:,.1f} s: "
              f"{per_s:,.0f} rows/s{images}{resumed}")
    print(result.url)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
