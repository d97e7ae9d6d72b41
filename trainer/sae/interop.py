"""What a variant's file hands to ``dynsae export``: the SAE in another library's terms, or why it cannot be.

Each variant converts itself (:meth:`trainer.sae.base.SAE.to_saelens`, :meth:`~trainer.sae.base.SAE.to_sparsify`):
plain tensors under the library's own names (computed in float64; the exporter stores float32) and
the library's config keys, never an import of the library. A format that cannot express the variant
is a :class:`NotRepresentable` whose message is one sentence saying why; the exporter reports it.
The formats themselves (folders, file names, metadata) are written by :mod:`dynsae.export`.

The folds (the export formats are described in :mod:`dynsae.export`): SAELens and sparsify feed the encoder the raw activation x,
while our SAE encodes u = x/s (s = ``input_scale``) or x/‖x‖ (``SAE.unit_input``). With c the factor
between what SAELens feeds and u (:meth:`~trainer.sae.base.SAE.saelens_scale`), positively homogeneous
codes fold by scaling the *features* by c (biases and thresholds ×c, W_enc and W_dec unchanged, so a
unit-norm decoder stays unit-norm); other codes fold the encoder side (W_enc/c, W_dec·c, b_dec·c).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: |‖W_dec,i‖ − 1| below this counts as a unit-norm decoder.
UNIT_NORM_TOL = 1e-4


class NotRepresentable(Exception):
    """The format cannot express this SAE; ``str(err)`` is one sentence saying why."""


@dataclass
class SaeLensForm:
    """An SAE as SAELens (≥ 6) reads it: ``architecture``, its weights (W_enc (d, M), W_dec (M, d), b_dec,
    and the architecture's own: b_enc, threshold, b_gate, …), the architecture's extra ``cfg.json`` keys and
    the ``normalize_activations`` setting that makes SAELens's forward ours."""

    architecture: str
    tensors: dict[str, Tensor]
    cfg: dict[str, Any] = field(default_factory=dict)
    normalize_activations: str = "none"


@dataclass
class SparsifyForm:
    """An SAE as eai-sparsify (1.3) reads it: ``cfg.json`` keys and ``sae.safetensors`` weights."""

    cfg: dict[str, Any]
    tensors: dict[str, Tensor]


def f64(t: Tensor) -> Tensor:
    """A detached float64 CPU copy (the folds are computed in float64)."""
    return t.detach().to(torch.float64).cpu()


def is_unit_norm(rows: Tensor) -> bool:
    """Whether every row has norm 1 (within :data:`UNIT_NORM_TOL`)."""
    return bool((rows.norm(dim=-1) - 1).abs().max() < UNIT_NORM_TOL)


__all__ = ["NotRepresentable", "SaeLensForm", "SparsifyForm", "UNIT_NORM_TOL", "f64", "is_unit_norm"]
