"""The evaluator's metrics handed to training runs (:class:`trainer.run.RunEvaluation`).

The trainer holds no metric definition of its own (imports point one way: the trainer never imports
the evaluator). Whoever composes a run — ``dynsae train``, ``dynsae sweep``, the demo — hands it a
:class:`TrainingEvaluation`, whose numbers come from the one definition of each metric in
:mod:`evaluator.metrics` and, for ``eval_every`` rows, from the one eval-split pass
(:func:`evaluator.evaluate.score_eval_split`) that ``eval.json`` uses too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from evaluator.metrics import ReconstructionAccumulator, SparsityAccumulator

#: Support-size quantiles logged with each training batch.
SUPPORT_QUANTILES = (0.1, 0.5, 0.9, 0.99)


class TrainingEvaluation:
    """fvu / l0 / support quantiles of training batches, and scalar eval-split metrics."""

    def batch_metrics(self, x: Tensor, x_hat: Tensor, codes: Any) -> dict[str, float]:
        """fvu (about the batch mean), l0 and support-size quantiles of one training batch."""
        recon = ReconstructionAccumulator()
        recon.update(x, x_hat)
        sparsity = SparsityAccumulator(codes.m)
        sparsity.update(codes.support_sizes(), codes.fire_counts())
        out = {"fvu": recon.result()["fvu"], "l0": sparsity.result()["l0"]}
        out.update({f"support_q{q:g}": sparsity.support_quantile(q) for q in SUPPORT_QUANTILES})
        return out

    def eval_split(self, sae: torch.nn.Module, plan: Any, device: torch.device,
                   max_tokens: int | None) -> dict[str, Any]:
        """fvu, l0, dead fraction and row count on the run's eval split (its own row filter)."""
        from evaluator.evaluate import score_eval_split

        was_training = sae.training
        sae.eval()
        try:
            acc = score_eval_split(sae, plan.cfg.dataset, plan.row_filter, plan.median_norm, max_tokens=max_tokens,
                                   batch_size=plan.cfg.batch_size, device=str(device),
                                   storage_options=plan.cfg.storage_options, progress=False)
        finally:
            sae.train(was_training)
        kept, sparsity = acc.kept.result(), acc.sparsity.result()
        return {"fvu": kept["fvu"], "l0": sparsity["l0"], "dead_frac": sparsity["dead_frac"], "tokens": kept["rows"]}
