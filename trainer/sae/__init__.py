"""The SAE zoo (``docs/variants.md``): one module per variant (class + its own config), found by discovery.

``build(cfg)`` → a fresh SAE, ``load(url)`` → a saved one, ``variants()`` name → class,
``validate_sae(dict)`` → the variant's config. Every SAE has ``forward(x) -> (x_hat, codes, losses)``
(``losses["loss"]`` the objective), ``encode(x) -> Codes``, ``decode(codes, x=None)``,
``post_step()`` (call after each optimiser step), ``save(url)`` / ``save_weights(url)``, its family's
traits (``title``, ``has_l0_knob``, ``is_reference``) and its conversions ``to_saelens()`` /
``to_sparsify()`` (:mod:`trainer.sae.interop`). See
:mod:`trainer.sae.base` for the shared decisions and :mod:`trainer.sae.registry` for how a new
variant file is found.
"""

from trainer.sae.base import SAE, Codes
from trainer.sae.config import SAEConfig
from trainer.sae.registry import build, load, validate_sae, variant_class, variants
from trainer.sae.sparse_ops import sparse_decode

__all__ = ["SAE", "Codes", "SAEConfig", "build", "load", "sparse_decode", "validate_sae", "variant_class",
           "variants"]
