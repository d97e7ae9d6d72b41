"""SAELens architectures of dynsae's own, registered on import (``import dynsae.saelens``).

``dynsae export RUN OUT --format saelens`` writes the sparsemax-coded variants (``sparsemax``,
``mlp_sparsemax``) as architecture ``"dynsae_sparsemax"``; this module teaches SAELens that name
through :func:`sae_lens.register_sae_class`, after which ``sae_lens.SAE.load_from_disk(OUT)`` returns
a :class:`DynsaeSparsemaxSAE`. Every other variant exports to a stock SAELens architecture and
loads without this module (see :mod:`dynsae.export`).

The module imports only torch and sae_lens (nothing else of dynsae), so a team that only wants to
*load* our SAEs needs neither the activation store nor the trainer.

The exported forward (one linear encoder, sparsemax over the scores, one linear decoder)::

    u   = x/‖x‖ if scale_by_input_norm else x            (x after SAELens's own normalisation)
    π   = (u − b_dec·apply_b_dec_to_input) W_enc + b_enc  (B, d_sae)
    τ   = sparsemax threshold of π;  S = {i : π_i > τ}    (per-token support: the dynamic K)
    a_i = π_i 1[i∈S]  (activation "scores")   or   max(π_i − τ, 0)  (activation "probs")
    f   = ‖x‖·a if scale_by_input_norm else a             (the features ``encode`` returns)
    x̂   = f W_dec + b_dec

For the Sparsemax SAE the export folds W_enc = (C W_K)ᵀ and W_dec = C W_V with zero biases and
``scale_by_input_norm``, so the decode is linear in the features (``docs/interop.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from torch import Tensor, nn

ARCHITECTURE = "dynsae_sparsemax"
ACTIVATIONS = ("scores", "probs")
NORM_EPS = 1e-8
FIRST_WIDTH = 128  # candidates per row of the first top-k; rows whose support may not fit are sorted fully


def _prefix(vals: Tensor) -> tuple[Tensor, Tensor]:
    """Sort formula on descending values shifted by the row max: (k*, τ − z_max) per row.

    k* = max{r : 1 + r·v_r > c_r}, τ = (c_{k*} − 1)/k*, c_r = Σ_{i≤r} v_i.
    """
    csum = vals.cumsum(dim=1)
    r = torch.arange(1, vals.shape[1] + 1, device=vals.device)
    kstar = ((1 + r * vals > csum) * r).amax(dim=1)
    c_k = csum.gather(1, (kstar - 1).clamp_min(0)[:, None])[:, 0]
    return kstar, (c_k - 1) / kstar.clamp_min(1).to(vals.dtype)


def sparsemax_codes(z: Tensor, activation: str = "scores", first_width: int = FIRST_WIDTH) -> Tensor:
    """Dense sparsemax codes of the rows of z (B, M), in z's dtype (computed in float32 or float64).

    The support is the first k* entries of the descending order (exactly as dynsae's trainer takes
    it); "scores" keeps z there, "probs" gives max(z − τ, 0). Top-k candidates come first: a row
    with k* < width is certified (the condition failed inside the candidates, so the support fits);
    the other rows are redone with a full sort.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    rows = z.reshape(-1, z.shape[-1])
    zc = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    m = zc.shape[1]
    zmax = zc.max(dim=1, keepdim=True).values
    width = min(m, first_width)
    vals, idx = torch.topk(zc, width, dim=1, sorted=True)
    kstar, tau = _prefix(vals - zmax)
    failed = (kstar >= width).nonzero()[:, 0] if width < m else kstar.new_zeros(0)
    out = torch.zeros_like(zc)
    done = torch.ones(zc.shape[0], dtype=torch.bool, device=z.device)
    done[failed] = False
    _scatter(out, done, vals, idx, kstar, tau, zmax, activation)
    if failed.numel():
        sub_vals, sub_idx = torch.sort(zc[failed], dim=1, descending=True)
        sub_kstar, sub_tau = _prefix(sub_vals - zmax[failed])
        sub_out = torch.zeros_like(zc[failed])
        _scatter(sub_out, torch.ones_like(failed, dtype=torch.bool), sub_vals, sub_idx, sub_kstar, sub_tau,
                 zmax[failed], activation)
        out[failed] = sub_out
    return out.to(z.dtype).reshape(z.shape)


def _scatter(out: Tensor, rows: Tensor, vals: Tensor, idx: Tensor, kstar: Tensor, tau: Tensor, zmax: Tensor,
             activation: str) -> None:
    """Write the codes of the selected rows into ``out`` (in place) from their sorted candidates."""
    on = torch.arange(vals.shape[1], device=vals.device)[None, :] < kstar[:, None]  # the first k* entries
    if activation == "scores":
        code = vals  # a = z on the support
    else:
        code = ((vals - zmax) - tau[:, None]).clamp_min(0)  # a = max(z − τ, 0)
    code = torch.where(on & rows[:, None], code, 0.0)
    out.scatter_(1, idx, code)


@dataclass
class DynsaeSparsemaxSAEConfig(SAEConfig):
    """Config of :class:`DynsaeSparsemaxSAE` (SAELens fields plus the two below).

    activation: ``"scores"`` (a = π on the support, the Sparsemax paper's code) or ``"probs"``
        (a = max(π − τ, 0), the sparsemax output).
    scale_by_input_norm: encode x/‖x‖ and multiply the features by ‖x‖ (the export sets it only
        when b_dec = 0, so that the decode stays linear in the features).
    """

    activation: str = "scores"
    scale_by_input_norm: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.scale_by_input_norm and self.normalize_activations != "none":
            raise ValueError("scale_by_input_norm already normalises the input; set normalize_activations "
                             f"to 'none', not {self.normalize_activations!r}")


class DynsaeSparsemaxSAE(SAE[DynsaeSparsemaxSAEConfig]):
    """Inference SAE with sparsemax codes (module docstring): linear encoder, linear decoder."""

    b_enc: nn.Parameter

    def initialize_weights(self) -> None:
        """W_enc, W_dec, b_dec from SAELens; b_enc zero."""
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def encode(self, x: Tensor) -> Tensor:
        """Dense features f (…, d_sae): ‖x‖·a or a (module docstring)."""
        sae_in = self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype)))
        norms = None
        if self.cfg.scale_by_input_norm:
            norms = sae_in.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            sae_in = sae_in / norms  # x/‖x‖
        sae_in = self.run_time_activation_norm_fn_in(sae_in) - self.b_dec * self.cfg.apply_b_dec_to_input
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = sparsemax_codes(hidden_pre, self.cfg.activation)
        if norms is not None:
            acts = acts * norms  # f = ‖x‖·a
        return self.hook_sae_acts_post(acts)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """x̂ = f W_dec + b_dec (then SAELens's output normalisation and reshaping)."""
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)


def register() -> None:
    """Register ``"dynsae_sparsemax"`` with SAELens (idempotent)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, DynsaeSparsemaxSAE, DynsaeSparsemaxSAEConfig)


register()
