"""The evaluator as a Ray actor: the sweep hands it each finished run.

``EvaluatorActor`` is a Ray actor class (``EvaluatorActor.remote(...)``, ``.options(num_gpus=...)``);
its ``evaluate(run_url)`` writes ``<run_url>/eval.json`` and returns the report as a JSON-able dict.
It keeps the language / CLIP models it loaded for CE and zero-shot between calls, so a sweep
over many runs of one dataset loads its model once.
"""

from __future__ import annotations

from typing import Any

import ray

from evaluator.evaluate import DEFAULT_CE_CONTEXTS, evaluate_run


class Evaluator:
    """Plain-Python evaluator holding a model cache (the body of :data:`EvaluatorActor`)."""

    def __init__(self, *, max_tokens: int | None = None, ce_contexts: int = DEFAULT_CE_CONTEXTS,
                 device: str | None = None, batch_size: int = 4096, zeroshot: dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_tokens, self.ce_contexts, self.batch_size = max_tokens, ce_contexts, batch_size
        self.storage_options = storage_options
        self.zeroshot = None
        if zeroshot is not None:
            from evaluator.zeroshot import ZeroShotConfig

            self.zeroshot = ZeroShotConfig.model_validate(zeroshot)
        self.models: dict[str, Any] = {}

    def evaluate(self, run_url: str) -> dict[str, Any]:
        """Evaluate one run, write its ``eval.json``, return the report as a dict."""
        report = evaluate_run(run_url, max_tokens=self.max_tokens, ce_contexts=self.ce_contexts,
                              device=self.device, batch_size=self.batch_size, zeroshot=self.zeroshot,
                              storage_options=self.storage_options, model_cache=self.models, progress=False)
        return report.model_dump(mode="json")

    def cached_models(self) -> list[str]:
        """Keys of the models held in the cache (for inspection and tests)."""
        return sorted(self.models)


EvaluatorActor = ray.remote(Evaluator)
