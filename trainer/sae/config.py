"""The SAE zoo config (:class:`SAEConfig`), one model for every variant.

Defaults that depend on the variant are resolved when the config is validated, so the
``config.json`` written next to the weights holds the values that were really used:

* ``l1`` (L1 coefficient λ): 1e-3 for ``relu``, ``attn_relu`` and ``gated`` (the paper's baselines);
  it must stay unset for the other variants.
* ``loss``: ``"norm_mse"`` (the authors' mean_{t,i}(x̂−x)²/‖x_t‖) for the paper's family
  (``sparsemax``, ``attn_relu``, ``mlp_sparsemax``), ``"mse"`` (mean_{t,i}(x̂−x)²) for the others.
* ``max_fire_rate``: 0.1 for the sparsemax-activated variants (``sparsemax``, ``mlp_sparsemax``) as in
  the authors' code, ``None`` for the others (setting it there is an error: they have no such mask).
* ``aux_k`` (AuxK, Gao et al. 2024): ``min(m, 2**round(log2(d/2)))`` (a power of two close to d/2).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from store.config import StrictModel

VARIANTS: tuple[str, ...] = (
    "sparsemax", "relu", "gated", "jumprelu", "topk", "batchtopk", "attn_relu", "mlp_sparsemax",
)
#: Variants whose codes come from sparsemax (they have the firing-rate mask).
SPARSEMAX_FAMILY = ("sparsemax", "mlp_sparsemax")
#: Variants trained with the authors' norm-weighted loss by default.
PAPER_FAMILY = ("sparsemax", "attn_relu", "mlp_sparsemax")
#: Variants with an L1 penalty.
L1_VARIANTS = ("relu", "attn_relu", "gated")


class SAEConfig(StrictModel):
    """Hyper-parameters of one SAE (see the module docstring for variant-dependent defaults)."""

    variant: Literal[
        "sparsemax", "relu", "gated", "jumprelu", "topk", "batchtopk", "attn_relu", "mlp_sparsemax"
    ] = Field(description="SAE family.")
    d: int = Field(gt=0, description="input width (activation dimension).")
    m: int = Field(gt=0, description="number of concepts / latents (dictionary size).")
    k: int = Field(default=32, gt=0, description="active latents per sample (topk; batchtopk on average).")
    l1: float | None = Field(default=None, ge=0, description="L1 coefficient λ (relu, attn_relu, gated).")
    activation: Literal["scores", "probs"] = Field(
        default="scores", description="sparsemax codes: z on the support (authors) or max(z−τ, 0).")
    input_norm: Literal["none", "unit"] = Field(default="none", description="x/‖x‖ in, ×‖x‖ out.")
    input_scale: float = Field(default=1.0, gt=0, description=(
        "fixed activation scale s: the SAE works on x/s and returns s·x̂ (the trainer sets s = E‖x‖/√d "
        "from the dataset statistics, so λ and lr mean the same on every model)."))
    max_fire_rate: float | None = Field(default=None, gt=0, le=1,
                                        description="mask concepts whose running firing rate exceeds this.")
    fire_rate_decay: float = Field(default=0.99, gt=0, lt=1, description="EMA decay of the firing rate.")
    loss: Literal["norm_mse", "mse"] | None = Field(default=None, description="reconstruction loss.")
    # JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead").
    l0: float = Field(default=1e-3, ge=0, description="JumpReLU L0 coefficient λ.")
    bandwidth: float = Field(default=1e-3, gt=0, description="JumpReLU STE rectangle-kernel bandwidth ε.")
    threshold_init: float = Field(default=1e-3, gt=0, description="JumpReLU initial threshold θ.")
    # AuxK (Gao et al. 2024), used by topk and batchtopk.
    aux_k: int | None = Field(default=None, gt=0, description="latents in the AuxK reconstruction.")
    aux_coef: float = Field(default=1 / 32, ge=0, description="AuxK loss coefficient α.")
    dead_tokens: int = Field(default=10_000_000, gt=0,
                             description="a latent is dead for AuxK after this many tokens without firing.")
    # BatchTopK (Bussmann et al. 2024).
    threshold_decay: float = Field(default=0.99, gt=0, lt=1,
                                   description="EMA decay of the BatchTopK inference threshold.")
    # Sparse path.
    k_max: int | None = Field(default=None, gt=0, description="cap on the padded sparsemax support width.")
    dense_fraction: float = Field(default=0.125, gt=0, le=1,
                                  description="JumpReLU/BatchTopK-eval codes fall back to dense when a row "
                                              "has more than this fraction of m active.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="parameter dtype.")
    seed: int = Field(default=0, description="initialisation seed.")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        """Fill variant-dependent defaults and reject fields a variant does not use."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        variant = data.get("variant")
        if variant not in VARIANTS:
            if "variant" in data:
                raise ValueError(f"unknown SAE variant {variant!r}; choose one of {', '.join(VARIANTS)}")
            return data
        if data.get("l1") is None:
            data["l1"] = 1e-3 if variant in L1_VARIANTS else None
        elif variant not in L1_VARIANTS:
            raise ValueError(f"l1 is only used by {', '.join(L1_VARIANTS)}, not by variant {variant!r}; remove it")
        if data.get("loss") is None:
            data["loss"] = "norm_mse" if variant in PAPER_FAMILY else "mse"
        if "max_fire_rate" not in data:
            data["max_fire_rate"] = 0.1 if variant in SPARSEMAX_FAMILY else None
        elif data["max_fire_rate"] is not None and variant not in SPARSEMAX_FAMILY:
            raise ValueError(
                f"max_fire_rate is only used by {', '.join(SPARSEMAX_FAMILY)}, not by variant {variant!r}; "
                "remove it or set it to null")
        if data.get("aux_k") is None and isinstance(data.get("d"), int) and isinstance(data.get("m"), int):
            if data["d"] > 0 and data["m"] > 0:
                data["aux_k"] = min(data["m"], 2 ** max(0, round(math.log2(max(data["d"] / 2, 1)))))
        return data

    @property
    def torch_dtype(self):  # noqa: ANN201 - torch imported lazily for config-only users
        """The parameter dtype as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype)
