"""``python -m trainer run CONFIG.yaml [--set k=v ...]`` and ``python -m trainer sweep SWEEP.yaml [--set ...]``.

``run`` trains one SAE (resuming from its last checkpoint if the run directory exists) and prints the
run URL; ``sweep`` runs a grid on Ray and prints the sweep's summary location. Also reachable as
``dynsae train`` / ``dynsae sweep``.
"""

from __future__ import annotations

import argparse
import sys

from store.config import add_config_arguments, load_config
from store.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "train one SAE from a run config"),
                            ("sweep", "run a grid of SAEs on Ray from a sweep config")):
        add_config_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from trainer.config import TrainConfig
        from trainer.run import train

        cfg = load_config(TrainConfig, args.config, args.overrides)
        print(train(cfg, progress=not args.no_progress))
        return 0
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    sweep = load_config(SweepConfig, args.config, args.overrides)
    summary = run_sweep(sweep, source=str(args.config), progress=not args.no_progress)
    print(summary["summary_url"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
