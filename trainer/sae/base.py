"""Pieces shared by every SAE of the zoo: :class:`Codes`, the :class:`SAE` base, losses, decoders.

Shared decisions (written once here, used by every variant):

* **Norm handling.** ``input_norm: "unit"`` (and the cross-attention family, which always works on
  x_n = x/‖x‖) encodes x/‖x‖ and multiplies the reconstruction by ‖x‖. The norms travel in
  ``Codes.norms``, so ``decode(codes)`` works without ``x``; ``decode(codes, x)`` takes ‖x‖ from x.
* **Losses.** ``mse`` = mean_{t,i}(x̂−x)²; ``norm_mse`` = mean_{t,i}(x̂−x)²/‖x_t‖ (the authors' code).
  Both are computed in the SAE's units x/s, s = ``input_scale`` (1 unless the trainer sets it to
  E‖x‖/√d, SAELens-style, so that λ and lr transfer between models); x̂ is returned in activation
  units. ``losses["loss"]`` = reconstruction term + Σ coefficient × penalty; the raw penalties are
  reported under their own names.
* **Sparse codes.** Padded (idx, val) of shape (B, K): padding has val = 0 (idx is any valid index).
  The products with them live in :mod:`trainer.sae.sparse_ops`: :func:`sparse_decode` touches only
  the K rows per sample, forward and backward; :func:`select_linear` returns (x Wᵀ)[b, idx[b, k]]
  from an already computed dense product with a *sparse backward*: the encoders of the sparse
  variants compute their dense pre-activations once without autograd and backpropagate only through
  the selected entries, which is exactly their gradient (the selection mask is held fixed, as for
  TopK/sparsemax).
* **Unit-norm decoder** (topk, batchtopk, gated, jumprelu): rows of W_dec are renormalised in
  :meth:`SAE.post_step` (call after every optimiser step) and the gradient component parallel to
  each row is removed in backward (as SAELens / sparsify do), by an identity autograd function.
* **Buffers** (firing rates, dead counters, thresholds) change only in training mode and are part
  of the state dict, so they are saved with the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from store import io
from store.errors import UserError
from trainer.run_format import weights_url, write_sae_config
from trainer.sae.config import SAEConfig
from trainer.sae.interop import NotRepresentable, SaeLensForm, SparsifyForm
from trainer.sae.sparse_ops import SupportPattern, sparse_decode

NORM_EPS = 1e-8


# ----------------------------------------------------------------------------- codes


@dataclass
class Codes:
    """Concept activations of a batch: padded sparse (``idx``, ``val``) or ``dense`` (B, M).

    ``norms`` (B,) holds ‖x‖ when the SAE scales its output by it (input_norm "unit" or the
    cross-attention family); ``decode`` uses it when ``x`` is not given. ``pattern`` is the
    :class:`~trainer.sae.sparse_ops.SupportPattern` of ``idx``, shared by every sparse product with it
    (built on first use by :meth:`support_pattern`).
    """

    m: int
    idx: Tensor | None = None
    val: Tensor | None = None
    dense: Tensor | None = None
    norms: Tensor | None = None
    pattern: SupportPattern | None = None

    def support_pattern(self) -> SupportPattern:
        """The shared index structure of sparse codes (created once)."""
        if self.pattern is None:
            self.pattern = SupportPattern(self.idx, self.m)
        return self.pattern

    @property
    def is_sparse(self) -> bool:
        """True for padded (idx, val) codes."""
        return self.dense is None

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return (self.val if self.dense is None else self.dense).shape[0]

    def to_dense(self) -> Tensor:
        """(B, M) activations (differentiable; padding adds 0)."""
        if self.dense is not None:
            return self.dense
        out = self.val.new_zeros(self.val.shape[0], self.m)
        return out.scatter_add(1, self.idx, self.val)

    def support_sizes(self) -> Tensor:
        """(B,) number of concepts with a non-zero activation per sample."""
        values = self.val if self.dense is None else self.dense
        return (values != 0).sum(dim=-1)

    def fire_counts(self) -> Tensor:
        """(M,) number of samples in which each concept is non-zero (int64), padding excluded (with a
        masked :attr:`pattern`, only entries on its mask count), consistent with :meth:`support_sizes`."""
        if self.dense is not None:
            return (self.dense != 0).sum(dim=0)
        active = self.val != 0
        if self.pattern is not None and self.pattern.mask is not None:
            active &= self.pattern.mask
        return torch.bincount(self.idx[active], minlength=self.m)

    def detach(self) -> Codes:
        """The same codes without autograd history."""
        return Codes(
            m=self.m,
            idx=self.idx,
            val=None if self.val is None else self.val.detach(),
            dense=None if self.dense is None else self.dense.detach(),
            norms=None if self.norms is None else self.norms.detach(),
            pattern=self.pattern,
        )


#: Padded codes fall back to dense when a row has more than this fraction of M active (padding is then
#: no cheaper than the dense product).
DENSE_FRACTION = 0.125


def padded_from_dense(acts: Tensor, m: int, dense_fraction: float = DENSE_FRACTION) -> Codes:
    """Codes of non-negative activations (B, M): padded by a per-row top-K (K = largest row support)
    when that is at most ``dense_fraction`` · M, dense otherwise. Gradients flow through the values."""
    width = int((acts != 0).sum(dim=-1).max()) if acts.numel() else 0
    if width > dense_fraction * m:
        return Codes(m=m, dense=acts)
    val, idx = torch.topk(acts, max(width, 1), dim=-1)
    return Codes(m=m, idx=idx, val=val)


# ----------------------------------------------------------------------------- unit-norm rows


class _ProjectParallel(torch.autograd.Function):
    """Identity on W (M, d); backward removes from each row's gradient its component along the row."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        # g − (g·ŵ) ŵ = g − ((g·w)/‖w‖²) w: the two row-wise dot products as batched (1×d)(d×1) products
        # (no M×d temporaries), then one fused g − c·w
        dot = torch.bmm(g.unsqueeze(1), weight.unsqueeze(2)).view(-1)
        sq = torch.bmm(weight.unsqueeze(1), weight.unsqueeze(2)).view(-1).clamp_min(NORM_EPS**2)
        return torch.addcmul(g, (dot / sq).unsqueeze(1), weight, value=-1.0)


class Decoder(nn.Module):
    """Dictionary W (M, d) (one row per concept) with optional unit-norm rows, dense or sparse decode."""

    def __init__(self, m: int, d: int, init: Tensor, unit_norm: bool) -> None:
        super().__init__()
        self.unit_norm = unit_norm
        self.weight = nn.Parameter(init.clone())
        if unit_norm:
            self.normalize()

    def rows(self) -> Tensor:
        """W as used in the forward pass (gradient projected when the rows are unit-norm)."""
        return _ProjectParallel.apply(self.weight) if self.unit_norm else self.weight

    def forward(self, codes: Codes) -> Tensor:
        """Σ_i a_i W_i for each sample (B, d): sparse codes touch only their rows."""
        w = self.rows()
        if codes.is_sparse:
            return sparse_decode(codes.idx, codes.val, w, codes.support_pattern())
        return codes.dense.to(w.dtype) @ w

    @torch.no_grad()
    def normalize(self) -> None:
        """W_i ← W_i / ‖W_i‖ (no-op for unconstrained decoders)."""
        if self.unit_norm:
            self.weight.div_(self.weight.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))

    def row_norms(self) -> Tensor:
        """‖W_i‖ (M,)."""
        return self.weight.norm(dim=-1)


# ----------------------------------------------------------------------------- losses


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """mean_{t,i} (x̂ − x)²."""
    return (x_hat - x).pow(2).mean()


def reconstruction(x_hat: Tensor, x: Tensor, loss: str, norms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(the ``loss`` term, plain mse without gradient) from one pass of squared errors; ``norms`` (B,)
    = ‖x‖ when already known. x̂ (B, …, d) may stack several reconstructions of x (B, 1, d)."""
    sq = (x_hat - x).square()
    plain = sq.detach().mean()
    if loss == "mse":
        return sq.mean(), plain
    if norms is None:
        norms = x.norm(dim=-1).clamp_min(NORM_EPS)
    # mean_{t,i} (x̂ − x)² / ‖x_t‖ (x̂ may carry extra dimensions after the batch one: one ‖x_t‖ per t)
    return (sq / norms.reshape(-1, *[1] * (sq.dim() - 1))).mean(), plain


@dataclass
class Reconstructions:
    """Further reconstructions ``ys`` (B, G, d), in the space the SAE encodes, returned as a penalty value
    by ``forward_normalized``: :meth:`SAE.forward` replaces them by Σ_g of their reconstruction losses,
    computed exactly as the main one (the same ``loss`` setting, ×‖x‖ where the SAE rescales) in one
    batched pass. Used by the Matryoshka SAE for its nested prefixes."""

    ys: Tensor

    def loss(self, x: Tensor, loss: str, norms: Tensor | None) -> Tensor:
        """Σ_g recon(ys[:, g] (×‖x‖), x) = G · the mean over (B, G, d)."""
        groups = self.ys.shape[1]
        if groups == 0:
            return x.new_zeros(())
        y = self.ys if norms is None else self.ys * norms[:, None, None]
        return groups * reconstruction(y, x[:, None, :], loss, norms)[0]


# ----------------------------------------------------------------------------- base

#: variant name -> SAE class, filled as variant modules are imported (see trainer.sae.registry).
REGISTERED: dict[str, type[SAE]] = {}



class SAE(nn.Module):
    """Base of every SAE: norm handling, forward/loss assembly, save/load, ``post_step``.

    Subclasses implement ``encode_normalized`` and ``decode_normalized`` (on x or x/‖x‖) and, when the
    objective needs intermediate values, ``forward_normalized`` returning penalties as
    ``{name: (coefficient, value)}``.
    """

    #: The variant name this class implements ("" for shared bases, which are not registered).
    variant: ClassVar[str] = ""
    #: The variant's own config model (fields it uses, with their defaults).
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    #: True for architectures that always work on x/‖x‖ and rescale by ‖x‖ (the paper's).
    always_unit_norm: ClassVar[bool] = False

    # -- the family's traits, read by the sweep and the report (trainer.sae.registry.family)
    #: How sentences name the variant ("the Sparsemax SAE"); "" = the variant string.
    title: ClassVar[str] = ""
    #: False when the variant chooses its support per token and so has no L0 knob (no ``target_l0``):
    #: the sweep trains it before the steered baselines and the report shows its support sizes. Follows
    #: the config (``target_l0`` among its fields) when not set; when set, it must agree (checked when the
    #: class is defined).
    has_l0_knob: ClassVar[bool] = True
    #: True for the one variant every other family is compared against at its L0 (the report's
    #: matched-sparsity reference). Not inherited: a subclass is a baseline unless it says so.
    is_reference: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every class that names its own ``variant`` (registration by the variant string)."""
        super().__init_subclass__(**kwargs)
        if "is_reference" not in cls.__dict__:
            cls.is_reference = False
        if cls.__dict__.get("variant"):
            knob = "target_l0" in cls.config_class.model_fields
            if "has_l0_knob" not in cls.__dict__:
                cls.has_l0_knob = knob
            elif cls.has_l0_knob != knob:
                raise TypeError(f"SAE variant {cls.variant!r}: has_l0_knob = {cls.has_l0_knob} but its config "
                                f"{'has' if knob else 'has no'} target_l0; make them agree.")
            if cls.variant in REGISTERED and REGISTERED[cls.variant].__qualname__ != cls.__qualname__:
                raise TypeError(f"SAE variant {cls.variant!r} is defined twice ({REGISTERED[cls.variant].__module__} "
                                f"and {cls.__module__}); rename one.")
            REGISTERED[cls.variant] = cls

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        self.config = config
        self._generator = torch.Generator().manual_seed(config.seed)

    # -- init helpers
    def randn(self, *shape: int) -> Tensor:
        """Seeded standard normal tensor in the config dtype."""
        return torch.randn(*shape, generator=self._generator).to(self.config.torch_dtype)

    def unit_rows(self, m: int, d: int) -> Tensor:
        """Seeded random (m, d) matrix with unit-norm rows."""
        w = torch.randn(m, d, generator=self._generator)
        return (w / w.norm(dim=-1, keepdim=True)).to(self.config.torch_dtype)

    # -- norm side information
    @property
    def unit_input(self) -> bool:
        """Whether inputs are encoded as x/‖x‖ and outputs rescaled by ‖x‖."""
        return self.always_unit_norm or self.config.input_norm == "unit"

    def split_norm(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x/‖x‖, ‖x‖) when :attr:`unit_input`, else (x, None); ``x`` already divided by input_scale."""
        if not self.unit_input:
            return x, None
        norms = x.norm(dim=-1).clamp_min(NORM_EPS)
        return x / norms[:, None], norms

    def _check_input(self, x: Tensor) -> Tensor:
        """Validated input in the SAE's own units: x / s (s = ``input_scale``)."""
        if x.dim() != 2 or x.shape[-1] != self.config.d:
            raise UserError(f"SAE input has shape {tuple(x.shape)}; a {self.variant} SAE expects (batch, "
                            f"{self.config.d}) activations.")
        x = x.to(self.config.torch_dtype)
        return x if self.config.input_scale == 1.0 else x / self.config.input_scale

    def _unscale(self, y: Tensor) -> Tensor:
        """Back to activation units: s · y."""
        return y if self.config.input_scale == 1.0 else y * self.config.input_scale

    # -- public API
    def encode(self, x: Tensor) -> Codes:
        """Codes of a batch x (B, d)."""
        xi, norms = self.split_norm(self._check_input(x))
        codes = self.encode_normalized(xi)
        codes.norms = norms
        return codes

    def decode(self, codes: Codes, x: Tensor | None = None) -> Tensor:
        """x̂ (B, d) from codes; ``x`` (or ``codes.norms``) supplies ‖x‖ where the SAE needs it."""
        y = self.decode_normalized(codes)
        if not self.unit_input:
            return self._unscale(y)
        if x is not None:
            norms = self._check_input(x).norm(dim=-1).clamp_min(NORM_EPS)
        elif codes.norms is not None:
            norms = codes.norms
        else:
            raise UserError(f"this {self.variant} SAE rescales by ‖x‖; pass x to decode(codes, x) or decode "
                            "codes returned by encode() (they carry the norms).")
        return self._unscale(y * norms[:, None])

    def forward(self, x: Tensor) -> tuple[Tensor, Codes, dict[str, Tensor]]:
        """(x̂, codes, losses) with ``losses["loss"]`` the training objective.

        Losses are in the SAE's units (x/s, ``input_scale``); x̂ is returned in activation units.
        """
        x = self._check_input(x)
        xi, norms = self.split_norm(x)
        codes, y, penalties = self.forward_normalized(xi)
        codes.norms = norms
        x_hat = y * norms[:, None] if norms is not None else y
        recon, plain_mse = reconstruction(x_hat, x, self.config.loss, norms)
        losses: dict[str, Tensor] = {"recon": recon, "mse": plain_mse}
        total = recon
        for name, (coef, value) in penalties.items():
            if isinstance(value, Reconstructions):  # Σ_g of the reconstruction loss of each further y_g
                value = value.loss(x, self.config.loss, norms)
            losses[name] = value
            if torch.is_tensor(coef):  # a steered coefficient: logged beside its penalty
                losses[f"{name}_coef"] = coef.detach()
            total = total + coef * value
        losses["loss"] = total
        return self._unscale(x_hat), codes, losses

    def forward_normalized(self, xi: Tensor) -> tuple[Codes, Tensor, dict[str, tuple[float, Tensor]]]:
        """Default: encode, decode, no penalty. Penalties are ``{name: (coefficient, value)}``; a value may
        be :class:`Reconstructions` (their summed reconstruction loss is the penalty)."""
        codes = self.encode_normalized(xi)
        return codes, self.decode_normalized(codes), {}

    def encode_normalized(self, xi: Tensor) -> Codes:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_normalized(self, codes: Codes) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- conversion to the formats of other libraries (written by dynsae.export; trainer.sae.interop)
    def saelens_scale(self) -> tuple[float, str]:
        """(c, normalize_activations): SAELens feeds the encoder c·u where ours sees u — with a per-token
        norm SAELens's ``constant_norm_rescale`` (x·√d/‖x‖ in, ×‖x‖/√d out, c = √d), else c = s
        (``input_scale``) and ``"none"``."""
        if self.unit_input:
            return math.sqrt(self.config.d), "constant_norm_rescale"
        return float(self.config.input_scale), "none"

    def to_saelens(self) -> SaeLensForm:
        """This SAE in SAELens terms (eval-mode forward); :class:`NotRepresentable` when it has none."""
        raise NotRepresentable(f"SAELens has no architecture for a {self.variant} SAE (its file "
                               f"trainer/sae/{self.variant}.py defines no to_saelens)")

    def to_sparsify(self) -> SparsifyForm:
        """This SAE in eai-sparsify's terms; :class:`NotRepresentable` when it has none."""
        raise NotRepresentable("sparsify holds TopK SAEs only")

    # -- what each latent means in activation space
    def decoder_matrix(self) -> Tensor:  # pragma: no cover - abstract
        """(M, d) matrix whose row j is what latent j adds to the reconstruction per unit of code (before
        any ×‖x‖ or input_scale, positive factors that do not change its direction)."""
        raise NotImplementedError

    @torch.no_grad()
    def decoder_directions(self) -> Tensor:
        """Unit decoder directions u_j (M, d), float32, in the original activation space: the direction
        latent j adds to x̂, u_j = D_j/‖D_j‖ with D = :meth:`decoder_matrix` (a zero row stays 0). What the
        ground-truth metrics compare with the true features (``docs/metrics.md``)."""
        rows = self.decoder_matrix().detach().float()
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)

    def post_step(self) -> None:
        """Call after every optimiser step: renormalises unit-norm decoders."""
        for module in self.modules():
            if isinstance(module, Decoder):
                module.normalize()

    # -- persistence
    def save_weights(self, url: str, storage_options: io.StorageOptions = None) -> None:
        """Write the weights file of ``url`` (parameters and buffers)."""
        io.save_safetensors(weights_url(url), self.state_dict(), storage_options,
                            metadata={"variant": self.variant})

    def save(self, url: str, storage_options: io.StorageOptions = None) -> None:
        """Write this SAE's config and its weights to the directory ``url`` (the run format's files)."""
        write_sae_config(url, self.config.model_dump(mode="json"), storage_options)
        self.save_weights(url, storage_options)

    def load_weights(self, url: str, storage_options: io.StorageOptions = None) -> None:
        """Load the weights file of ``url`` into this SAE (shapes and names must match)."""
        path = weights_url(url)
        state = io.load_safetensors(path, storage_options)
        if state is None:
            raise UserError(f"{path} does not exist; point at a directory written by sae.save() or a trainer run.")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise UserError(f"{path} does not hold a {self.variant} SAE (missing {missing[:3]}, unexpected "
                            f"{extra[:3]}); load it with the config it was saved with.")
        for name, tensor in state.items():
            if tensor.shape != own[name].shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)} but the config gives "
                                f"{tuple(own[name].shape)}; the config and weights do not match.")
        self.load_state_dict(state)
