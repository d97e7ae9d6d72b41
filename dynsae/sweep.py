"""``dynsae sweep SWEEP.yaml [--set k=v ...]`` (also ``python -m dynsae sweep``): the trainer's sweep
(:func:`trainer.sweep.run_sweep`) with the evaluator handed in, so every finished run is scored into
its ``eval.json`` and the summary gains the ``eval_*`` columns, and with the evaluator's training metrics
handed to every run (fvu / l0 in ``metrics.jsonl``; ``match_l0`` sweeps need the evaluations). ``dynsae`` is where the packages meet:
the trainer never imports the evaluator.
"""

from __future__ import annotations

import argparse
import sys

from store.config import add_config_arguments
from store.errors import run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynsae sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from evaluator.actor import EvaluatorActor
    from evaluator.training import TrainingEvaluation
    from trainer.__main__ import sweep_command

    return sweep_command(parser().parse_args(argv), evaluator=EvaluatorActor, evaluation=TrainingEvaluation())


if __name__ == "__main__":
    sys.exit(run_cli(main))
