"""``topk``: TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = ReLU(TopK_K(π)), π = (x − b_dec) W_encᵀ + b_enc, x̂ = f W_dec + b_dec, K = ``k`` (32), unit-norm
decoder rows. π is computed densely without autograd; the K selected entries are re-read through
:meth:`LinearSAE.selected` (sparse backward) and decoded sparsely.

AuxK: a buffer counts tokens since each latent last fired (training mode); latents silent for
``dead_tokens`` tokens are dead. With e = sg(x − x̂) (in the space the SAE encodes), the top
``aux_k`` dead pre-activations give ê = Σ_{i∈aux} ReLU(π_i) W_dec,i and the loss gains
α · mean_{t,i}(ê − e)², α = ``aux_coef`` = 1/32. The term is 0 while no latent is dead.

Sparsity target: ``target_l0`` sets K (rounded); giving both ``k`` and a different ``target_l0`` is
an error. ``aux_k`` defaults to min(M, 2^round(log2(d/2))), a power of two close to d/2.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from trainer.sae.base import Codes, mse
from trainer.sae.config import SAEConfig
from trainer.sae.interop import NotRepresentable, SaeLensForm, SparsifyForm, is_unit_norm
from trainer.sae.linear import LinearSAE
from trainer.sae.sparse_ops import SupportPattern

DEFAULT_K = 32


class AuxKConfig(SAEConfig):
    """Settings shared by TopK and BatchTopK: K (or a target L0 that sets it) and the AuxK loss."""

    k: int = Field(default=DEFAULT_K, gt=0, description="active latents per sample (batchtopk: on average).")
    target_l0: float | None = Field(default=None, gt=0, description="sets k = round(target_l0).")
    aux_k: int | None = Field(default=None, gt=0, description="latents in the AuxK reconstruction.")
    aux_coef: float = Field(default=1 / 32, ge=0, description="AuxK loss coefficient α.")
    dead_tokens: int = Field(default=10_000_000, gt=0,
                             description="a latent is dead for AuxK after this many tokens without firing.")

    @model_validator(mode="before")
    @classmethod
    def _k_and_aux_k(cls, data: Any) -> Any:
        """k from target_l0 (a different explicit k is an error); aux_k ≈ d/2 as a power of two."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        target = data.get("target_l0")
        if isinstance(target, (int, float)) and not isinstance(target, bool) and target > 0:
            k = max(1, round(target))
            if data.get("k") is not None and data["k"] != k:
                raise ValueError(f"k = {data['k']} and target_l0 = {target} disagree; a {data.get('variant')} SAE "
                                 f"has exactly k active latents, so give one of them (target_l0 sets k = {k})")
            data["k"] = k
        d, m = data.get("d"), data.get("m")
        if data.get("aux_k") is None and isinstance(d, int) and isinstance(m, int) and d > 0 and m > 0:
            data["aux_k"] = min(m, 2 ** max(0, round(math.log2(max(d / 2, 1)))))
        return data


class TopKConfig(AuxKConfig):
    """Settings of the TopK SAE."""

    variant: Literal["topk"] = "topk"


class TopKSAE(LinearSAE):
    """TopK SAE with the AuxK loss; :class:`trainer.sae.batchtopk.BatchTopKSAE` changes the selection."""

    variant = "topk"
    config_class = TopKConfig

    def __init__(self, config: AuxKConfig) -> None:
        super().__init__(config)
        self.register_buffer("tokens_since_fired", torch.zeros(config.m, dtype=torch.int64))

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """(idx (B, K), valid mask or None when every position is selected): the per-row top K."""
        return torch.topk(pre, min(self.config.k, self.config.m), dim=-1).indices, None

    def _encode(self, xi: Tensor) -> tuple[Codes, Tensor, Tensor]:
        """(codes, x − b_dec, π) — π without autograd."""
        xc, h = self.hidden(xi)
        pre = h.add_(self.b_enc.detach())  # π = h + b_enc, in place: h is not read again
        idx, valid = self.select(pre)
        # shared by the encoder's and decoder's backward; with a valid mask, products run over the
        # valid entries only (padding decodes to nothing and gets no gradient)
        pattern = SupportPattern(idx, self.config.m, valid)
        val = torch.relu(self.selected(xc, pre, idx, pattern))
        if valid is not None:  # padding: b_enc[idx] was added there
            val = torch.where(valid, val, 0.0)
        return Codes(m=self.config.m, idx=idx, val=val, pattern=pattern), xc, pre

    def encode_normalized(self, xi: Tensor) -> Codes:
        """Sparse codes."""
        return self._encode(xi)[0]

    def forward_normalized(self, xi: Tensor):
        """Codes, reconstruction and the AuxK loss."""
        codes, xc, pre = self._encode(xi)
        y = self.decode_normalized(codes)
        self.track_dead(codes)
        return codes, y, {"auxk": (self.config.aux_coef, self.auxk(xi, y, xc, pre))}

    @torch.no_grad()
    def track_dead(self, codes: Codes) -> None:
        """tokens_since_fired += B, reset where fired (training mode only)."""
        if self.training:
            self.tokens_since_fired.add_(codes.batch_size)
            self.tokens_since_fired.masked_fill_(codes.fire_counts() > 0, 0)

    def auxk(self, xi: Tensor, y: Tensor, xc: Tensor, pre: Tensor) -> Tensor:
        """mean (ê − e)² over the top-aux_k dead latents (0 when none is dead or not training)."""
        dead = self.tokens_since_fired >= self.config.dead_tokens
        n_dead = int(dead.sum()) if self.training else 0
        if n_dead == 0:
            return xi.new_zeros(())
        k_aux = min(self.config.aux_k or n_dead, n_dead)
        idx = torch.topk(pre.masked_fill(~dead, float("-inf")), k_aux, dim=-1).indices
        pattern = SupportPattern(idx, self.config.m)
        aux = Codes(m=self.config.m, idx=idx, val=torch.relu(self.selected(xc, pre, idx, pattern)), pattern=pattern)
        e = (xi - y).detach()
        return mse(self.decoder(aux), e)

    def to_saelens(self) -> SaeLensForm:
        """SAELens ``topk`` with ``k``; ``rescale_acts_by_decoder_norm`` (a no-op on unit rows) marks the
        decoder unit-norm only where it is, which lets SAE-Dashboard fold decoder norms."""
        form = self.homogeneous_saelens("topk")[0]
        form.cfg = {"k": int(min(self.config.k, self.config.m)),
                    "rescale_acts_by_decoder_norm": is_unit_norm(form.tensors["W_dec"])}
        return form

    def to_sparsify(self) -> SparsifyForm:
        """sparsify's SparseCoder (``encoder`` = W_enc, b_enc; ``W_dec``, ``b_dec``): the SAELens fold."""
        if self.unit_input:
            raise NotRepresentable("it was trained with input_norm 'unit' (x/‖x‖ in, ×‖x‖ out), which sparsify "
                                   "cannot express")
        form = TopKSAE.to_saelens(self)
        t = form.tensors
        tensors = {"encoder.weight": t["W_enc"].T, "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        cfg = {"activation": "topk", "expansion_factor": max(1, self.config.m // self.config.d),
               "normalize_decoder": bool(form.cfg["rescale_acts_by_decoder_norm"]), "num_latents": self.config.m,
               "k": int(form.cfg["k"]), "multi_topk": False, "skip_connection": False, "transcode": False,
               "d_in": self.config.d}
        return SparsifyForm(cfg, tensors)
