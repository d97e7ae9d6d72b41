"""The SAE zoo (DESIGN §5): one module per family, one registry.

``build(cfg)`` → a fresh SAE, ``load(url)`` → a saved one, ``VARIANTS`` name → class. Every SAE has
``forward(x) -> (x_hat, codes, losses)`` (``losses["loss"]`` the objective), ``encode(x) -> Codes``,
``decode(codes, x=None)``, ``post_step()`` (call after each optimiser step), ``save(url)`` /
``save_weights(url)``. See :mod:`trainer.sae.base` for the shared decisions.
"""

from trainer.sae.base import SAE, Codes
from trainer.sae.config import SAEConfig
from trainer.sae.registry import VARIANTS, build, load
from trainer.sae.sparse_ops import sparse_decode

__all__ = ["SAE", "VARIANTS", "Codes", "SAEConfig", "build", "load", "sparse_decode"]
