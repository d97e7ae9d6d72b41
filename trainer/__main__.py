"""``python -m trainer run CONFIG.yaml [--set k=v ...]`` and ``python -m trainer sweep SWEEP.yaml [--set ...]``.

``run`` trains one SAE (resuming from its last checkpoint if the run directory exists) and prints the
run URL; ``sweep`` trains a grid on Ray *without evaluating it* (the trainer knows no evaluator:
``dynsae sweep`` / ``python -m dynsae sweep`` trains and evaluates) and prints the sweep's summary
location. Also reachable as ``dynsae train``. SIGINT/SIGTERM stop a sweep cleanly (exit 128 + the
signal number: 130 for Ctrl-C); the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from store.config import add_config_arguments, load_config
from store.errors import run_cli

SWEEP_HELP = "train a grid of SAEs on Ray from a sweep config (no evaluation: `dynsae sweep` evaluates)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train one SAE from a run config"), ("sweep", SWEEP_HELP)):
        add_config_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def sweep_command(args: argparse.Namespace, evaluator: Any = None, evaluation: Any = None) -> int:
    """Run the sweep of ``args`` (config, overrides, no_progress, storage_options) with ``evaluator`` and the
    runs' ``evaluation`` handed in; print the summary URL. An interrupt is one sentence on stderr and exit
    code 128 + signal number."""
    from store.cluster import Interrupted
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    sweep = load_config(SweepConfig, args.config, args.overrides, storage_options=args.storage_options)
    if evaluator is None and sweep.evaluate:
        print(f"sweep {sweep.name}: training only, no evaluation (python -m trainer sweep has no evaluator; "
              "`dynsae sweep` evaluates, `dynsae eval RUN_URL` scores a run later).", flush=True)
    try:
        summary = run_sweep(sweep, source=str(args.config), progress=not args.no_progress, evaluator=evaluator,
                            evaluation=evaluation)
    except Interrupted as err:
        print(f"interrupted ({err}): sweep {sweep.name} stopped and its actors are gone; every run keeps its "
              "last checkpoint, so running the same command again resumes it.", file=sys.stderr, flush=True)
        return 128 + err.signum
    print(summary["summary_url"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from trainer.config import TrainConfig
        from trainer.run import train

        cfg = load_config(TrainConfig, args.config, args.overrides, storage_options=args.storage_options)
        print(train(cfg, progress=not args.no_progress))
        return 0
    return sweep_command(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
