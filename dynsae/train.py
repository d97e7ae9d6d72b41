"""``dynsae train CONFIG [--set k=v]``: one training run composed with the evaluator's metrics.

Same config and behaviour as ``python -m trainer run`` (resume, extend), plus the evaluator's metric
definitions handed to the run (:class:`evaluator.training.TrainingEvaluation`): training rows of
``metrics.jsonl`` carry fvu / l0 / support quantiles, and ``eval_every`` rows are scored on the
eval split by the same pass that writes ``eval.json``.
"""

from __future__ import annotations

import sys

from store.cli import CommandHelp, command_parser
from store.config import add_config_arguments, load_config
from store.errors import run_cli

HELP = CommandHelp(
    does="Train one sparse autoencoder on a dataset, as a YAML config describes it (dataset, SAE variant and "
         "size, token budget). Re-running the same command resumes from the last checkpoint; a larger token "
         "budget extends a finished run.",
    reads="the config and the dataset it names",
    writes="a run folder <runs_root>/<name>/ (config, weights, checkpoint, training metrics); prints its URL",
    example="run.yaml --set sae.variant=topk --set sae.m=4096")


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m dynsae.train", HELP)
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
