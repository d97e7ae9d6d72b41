"""The evaluator as a Ray task: the sweep hands it each finished run.

:func:`evaluate_run_task` evaluates one run (writes ``<run_url>/eval.json``) and returns the report as a
JSON-able dict. ``dynsae sweep`` hands it to :func:`trainer.sweep.run_sweep`, which runs it as one Ray
task per finished run, placed like a training task (``docs/sweep.md``).

The language / CLIP models loaded for CE and zero-shot stay in :data:`MODEL_CACHE`, a dict of the worker
process (one entry per model and device, kept as long as the process lives). Tasks, not one evaluator
actor per sweep: on CPUs Ray hands a finished task's worker process to the next task (evaluation or
training, of this sweep or a later one in the same Ray job), so a warm worker has torch and
transformers imported already, and one that evaluated a run of a dataset before evaluates the next
with the model it loaded then. On GPUs each evaluation gets a fresh process (``max_calls=1``, as for
training: Ray sets ``CUDA_VISIBLE_DEVICES`` per task, which a process cannot change once CUDA is up)
and loads its model again. A CPU worker keeps its models while it trains later runs: on a CPU cluster
every worker that evaluated holds a copy of the models it loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from evaluator.evaluate import DEFAULT_CE_CONTEXTS, evaluate_run

#: The models this process loaded for CE / zero-shot, keyed as :func:`evaluator.evaluate.evaluate_run`'s
#: ``model_cache`` (the model's settings and the device); shared by every evaluation the process runs.
MODEL_CACHE: dict[str, Any] = {}


def evaluate_run_task(run_url: str, *, max_tokens: int | None = None, ce_contexts: int = DEFAULT_CE_CONTEXTS,
                      device: str | None = None, batch_size: int = 4096, zeroshot: dict[str, Any] | None = None,
                      storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one run with this process's :data:`MODEL_CACHE`, write its ``eval.json``, return the
    report as a dict. ``device`` None: cuda if this process sees a GPU, else cpu; ``zeroshot``: the
    fields of a :class:`evaluator.zeroshot.ZeroShotConfig`."""
    zeroshot_config = None
    if zeroshot is not None:
        from evaluator.zeroshot import ZeroShotConfig

        zeroshot_config = ZeroShotConfig.model_validate(zeroshot)
    report = evaluate_run(run_url, max_tokens=max_tokens, ce_contexts=ce_contexts,
                          device=device or ("cuda" if torch.cuda.is_available() else "cpu"), batch_size=batch_size,
                          zeroshot=zeroshot_config, storage_options=storage_options, model_cache=MODEL_CACHE,
                          progress=False)
    return report.model_dump(mode="json")
