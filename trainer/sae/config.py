"""The SAE config every variant's own config extends (:class:`SAEConfig`), and its validation.

Each variant file (``trainer/sae/<name>.py``) declares a pydantic config deriving from
:class:`SAEConfig` with only the fields that variant uses, its defaults and their reasons, and a
``variant: Literal["<name>"]`` field. The SAE config a user writes is the union of those configs,
discriminated by ``variant`` (:func:`trainer.sae.registry.validate_sae`): a field that the variant
does not use is an error naming it.

Shared here: the input width ``d``, the dictionary size ``m``, the norm side information
(``input_norm``), the activation scale (``input_scale``), the reconstruction loss, the parameter
dtype and the initialisation seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from store.config import StrictModel


class SAEConfig(StrictModel):
    """Settings every SAE variant has (a variant's config adds its own)."""

    variant: str = Field(description="SAE family (the name of its file in trainer/sae/).")
    d: int = Field(gt=0, description="input width (activation dimension).")
    m: int = Field(gt=0, description="number of concepts / latents (dictionary size).")
    input_norm: Literal["none", "unit"] = Field(default="none", description="x/‖x‖ in, ×‖x‖ out.")
    input_scale: float = Field(default=1.0, gt=0, description=(
        "fixed activation scale s: the SAE works on x/s and returns s·x̂ (the trainer sets s = median‖x‖/√d "
        "from the dataset statistics, so λ and lr mean the same on every model)."))
    loss: Literal["norm_mse", "mse"] = Field(default="mse", description=(
        "reconstruction loss: mse = mean_{t,i}(x̂−x)²; norm_mse = mean_{t,i}(x̂−x)²/‖x_t‖ (the authors' code)."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="parameter dtype.")
    seed: int = Field(default=0, description="initialisation seed.")

    @property
    def torch_dtype(self):  # noqa: ANN201 - torch imported lazily for config-only users
        """The parameter dtype as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype)
