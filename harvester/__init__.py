"""Harvester: residual-stream activations of transformers into the dynsae store.

``python -m harvester run CONFIG.yaml`` (see :mod:`harvester.config` for the keys,
:mod:`harvester.job` for the job, :mod:`harvester.models` for model adapters and hook sites (one
module per ``model.kind``), :mod:`harvester.sources` for text and image sources (one module per
``source.kind``, each with its own config), :mod:`harvester.packing` for documents -> contexts and
:mod:`harvester.images` for the image loading path the zero-shot evaluator shares).
"""

__version__ = "0.1.0"
