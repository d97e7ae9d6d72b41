"""dynsae evaluator: metric definitions, CE splicing, zero-shot concept classification, reports.

* :mod:`evaluator.metrics` — streaming float64 fvu / nmse_uncentered / explained_variance / l0,
  support-size histogram, dead/dense fractions, support-size correlations (``docs/metrics.md``).
* :mod:`evaluator.splice` — replace the residual stream at (layer, resid_pre|resid_post).
* :mod:`evaluator.ce` — ``splice_ce``: ce_clean / ce_sae / ce_zero / ce_degradation / ce_recovered / kl.
* :mod:`evaluator.zeroshot` — per-class top-n concepts spliced into a CLIP ViT.
* :mod:`evaluator.evaluate` — ``evaluate_run(run_url) -> EvalReport`` writing ``eval.json`` (the one
  eval-split pass).
* :mod:`evaluator.training` — ``TrainingEvaluation``: the metrics handed to training runs (the trainer
  holds no metric definition of its own).
* :mod:`evaluator.task` — ``evaluate_run_task``: one run's evaluation as a Ray task (the worker process
  keeps the models it loaded), handed to the sweep by ``dynsae sweep``.
* :mod:`evaluator.matched` — matched-sparsity comparison (matching, interpolation, verdicts).
* :mod:`evaluator.report` — ``write_report(sweep_url)``: report.md + PNG plots.
* :mod:`evaluator.foreign` — SAELens and sparsify folders evaluated like runs.
* :mod:`evaluator.concepts` — the concept browser.

CLI: ``python -m evaluator run RUN_URL... [--json] | report SWEEP_URL | concepts ...``.
"""
