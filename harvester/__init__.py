"""Harvester: residual-stream activations of transformers into the dynsae store.

``python -m harvester run CONFIG.yaml`` (see :mod:`harvester.config` for the keys,
:mod:`harvester.job` for the job, :mod:`harvester.models` for model adapters and hook sites,
:mod:`harvester.sources` for text and image sources).
"""

__version__ = "0.1.0"
