"""``dynsae train CONFIG [--set k=v]``: one training run composed with the evaluator's metrics.

Same config and behaviour as ``python -m trainer run`` (resume, extend), plus the evaluator's metric
definitions handed to the run (:class:`evaluator.training.TrainingEvaluation`): training rows of
``metrics.jsonl`` carry fvu / l0 / support quantiles, and ``eval_every`` rows are scored on the
eval split by the same pass that writes ``eval.json``.
"""

from __future__ import annotations

import argparse
import sys

from store.config import add_config_arguments, load_config
from store.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynsae train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    from evaluator.training import TrainingEvaluation
    from trainer.config import TrainConfig
    from trainer.run import train

    cfg = load_config(TrainConfig, args.config, args.overrides, storage_options=args.storage_options)
    print(train(cfg, progress=not args.no_progress, evaluation=TrainingEvaluation()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
