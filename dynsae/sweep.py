"""``dynsae sweep SWEEP.yaml [--set k=v ...]`` (also ``python -m dynsae sweep``): the trainer's sweep
(:func:`trainer.sweep.run_sweep`) with the evaluator handed in, so every finished run is scored into
its ``eval.json`` and the summary gains the ``eval_*`` columns, and with the evaluator's training metrics
handed to every run (fvu / l0 in ``metrics.jsonl``; ``match_l0`` sweeps need the evaluations). ``dynsae`` is where the packages meet:
the trainer never imports the evaluator.
"""

from __future__ import annotations

import argparse
import sys

from store.cli import CommandHelp, command_parser
from store.config import add_config_arguments
from store.errors import run_cli
from trainer.run_format import SUMMARY_CSV, SUMMARY_FILE

HELP = CommandHelp(
    does="Train a grid of sparse autoencoders (variants x dictionary sizes x seeds ...) on one shared stream "
         "of batches, read once from the dataset, and evaluate each as it finishes. With match_l0 the "
         "baselines are trained to the Sparsemax SAE's measured sparsity. Runs on a local Ray or a cluster; "
         "re-running resumes every run.",
    reads="the sweep config and the dataset it names",
    writes="<runs_root>/<sweep>/: one run folder per grid point with its evaluation, and a summary "
           f"({SUMMARY_FILE}, {SUMMARY_CSV}); prints the summary's URL",
    example="deploy/configs/sweep-gpt2-dict-sizes.yaml --set base.tokens=10000000")


def parser() -> argparse.ArgumentParser:
    p = command_parser("python -m dynsae.sweep", HELP)
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from evaluator.task import evaluate_run_task
    from evaluator.training import TrainingEvaluation
    from trainer.__main__ import sweep_command

    return sweep_command(parser().parse_args(argv), evaluator=evaluate_run_task, evaluation=TrainingEvaluation())


if __name__ == "__main__":
    sys.exit(run_cli(main))
