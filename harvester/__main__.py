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
from store.config import add_config_arguments, load_config
from store.errors import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harvester", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="harvest activations described by a YAML config")
    add_config_arguments(run, config_required=False)  # every key has a default
    synth = sub.add_parser("synth", help="generate synthetic activations with a known dictionary "
                           "(ground_truth.safetensors) from a YAML generator config")
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
