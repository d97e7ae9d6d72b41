"""Exact, sort-free sparsemax (Martins & Astudillo 2016) with a support-only backward.

Definitions (the sort formula, ``docs/variants.md``). For one row z ∈ R^M sorted descending
z_(1) ≥ … ≥ z_(M), with prefix sums c_r = Σ_{i≤r} z_(i)::

    k* = max{ r : 1 + r·z_(r) > c_r }         # support size
    τ  = (c_{k*} − 1) / k*                      # threshold
    p  = max(z − τ, 0)                          # sparsemax(z), on the simplex

:func:`sparsemax_sort` is that formula verbatim (a full sort; reference for tests and
the bench). Everything else here is *sort-free* in the common case:

Top-k candidates with a certificate
    ``torch.topk`` returns the k largest values v_1 ≥ … ≥ v_k (exactly the first k
    entries of the full sort, ties included). Running the sort formula on them gives
    k̂ = max{r ≤ k : 1 + r·v_r > c_r}. The condition set of the full formula is a
    prefix {1, …, k*} of r (1 + r·z_(r) − c_r is non-increasing in r), so if k̂ < k
    the condition already failed inside the candidates and k* = k̂, τ is exact:
    **k̂ < k certifies that the support fits** (k = M trivially certifies too).
    Rows with k̂ = k "fail": their support may extend beyond the candidates.

Fallback for failing rows (exact, usually one extra step)
    For a failing row the candidate threshold τ̂ = (c_k − 1)/k is a *lower bound* of
    τ (τ = max_r (c_r − 1)/r), so the support lies inside {z > τ̂}. Counting that set
    (one pass over the failing rows only) gives n ≥ k*, and a second top-k with
    k = n + 1 is certified. If rounding ever defeats that bound, k doubles; k = M is a
    full sort and always certified. Only the failing rows are redone.

Linear-time candidates on CPU
    For float32/float64 CPU rows, when the caller does not fix ``k``, the candidates come from
    :mod:`trainer.sparsemax_cpu` instead of ``torch.topk``: a lower bound of τ from the row's group
    maxima, then exactly the entries above it plus the largest one below, sorted. They are the first
    w entries of the full sort, so the same certificate (k̂ < w, or w = M) and the same fallback
    apply. It is 2–3× faster than ``torch.topk`` with k ≈ 100 (``std::nth_element`` per row).

Choosing k adaptively
    Unless the caller passes ``k``, an :class:`AdaptiveK` per (M, device type) in a
    module-level cache proposes k from a decaying maximum of the support sizes seen in
    recent calls (×1.25 headroom + 8, rounded up to a multiple of 8). A too-small k is
    never wrong, only slower (fallback); the estimate follows the data within a call.

Host synchronisation
    ``topk`` needs k as a Python int and the fallback needs to know which rows failed,
    so each call performs exactly **one** device→host read in the common path: a
    2-element tensor [any row failed, max support size] read with ``.tolist()``, which
    also feeds the adaptive k. The fallback (rare once k has adapted) adds a few more.
    On CPU this costs nothing; on GPU it is one small sync per call.

Precision
    Rows are shifted by their maximum before the prefix sums (z − z_max is exact for
    every entry within a factor 2 of z_max, which includes the whole support when
    z_max ≥ 2), so τ and p are accurate to a few ulps of 1 even at scales of 1e6.
    bfloat16/float16 inputs are computed in float32 and the outputs cast back;
    float32 and float64 are computed in their own dtype. ``tau`` is returned in the
    compute dtype (float32 for half types).

Masked entries and special values
    −inf entries (masked concepts) never enter the support and get p = 0 and zero
    gradient. A row that is **all −inf** has no support: p = 0 everywhere, τ = +inf,
    support size 0, zero gradient (the SAE reads that as "no concept fires").
    NaN or +inf entries are outside the contract (outputs are then NaN).

Backward (never a sort)
    The Jacobian of sparsemax is diag(s) − s sᵀ/|S| with s the support indicator, so
    dz_i = s_i (g_i − mean_{j∈S} g_j)  (Martins & Astudillo 2016, eq. 14). The dense
    op scatters its output from the support and saves only (idx, mask) of the support,
    so forward and backward each touch the dense (N, M) tensor once (a zero fill).

API
    * :func:`sparsemax` — dense p, same shape/dtype as z, custom backward.
    * :func:`sparsemax_threshold` — (tau, support_size), ``dim`` removed; no gradient.
    * :func:`sparsemax_support` — (idx, val) padded to width K over the last dim.
    * :func:`sparsemax_mask` — (idx, mask) of the padded support, no values (what the SAE uses).
    * :func:`sparsemax_sort` — the reference sort formula (autograd through sort).

Padding convention for the support ops: width K = ``k_max`` when every row's support
fits in ``k_max`` entries (K = the smallest certified width otherwise — results are
never truncated); with ``k_max=None`` K = the largest support size in the batch.
Entries are in descending order of z; positions r ≥ support_size are padding with
val = probs = scores = 0 and mask False; their idx are valid indices of entries off the
support (the next-largest entries; after a fallback a row may repeat one of them), so
``scatter`` of the padded values and ``index_add`` / ``scatter_add`` are safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from store.errors import UserError
from trainer import sparsemax_cpu

__all__ = [
    "AdaptiveK",
    "sparsemax",
    "sparsemax_mask",
    "sparsemax_sort",
    "sparsemax_support",
    "sparsemax_threshold",
]


# ----------------------------------------------------------------------------- state


@dataclass
class AdaptiveK:
    """Proposes the number of top-k candidates from recently observed support sizes.

    ``estimate`` is a decaying maximum: after each call it becomes
    ``max(observed_max_support, decay * estimate)``. The proposal is
    ``ceil8(headroom * estimate + 8)`` clipped to [1, M]; before any observation it is
    ``initial``.
    """

    initial: int = 64
    headroom: float = 1.25
    decay: float = 0.95
    estimate: float | None = field(default=None)

    def propose(self, m: int) -> int:
        """Candidate count for rows of length ``m``."""
        if self.estimate is None:
            k = self.initial
        else:
            k = 8 * math.ceil((self.headroom * self.estimate + 8) / 8)
        return max(1, min(m, k))

    def observe(self, max_support: int) -> None:
        """Record the largest support size of a call."""
        prev = 0.0 if self.estimate is None else self.decay * self.estimate
        self.estimate = max(float(max_support), prev)


_ADAPTIVE: dict[tuple[int, str], AdaptiveK] = {}


def adaptive_state(m: int, device: torch.device) -> AdaptiveK:
    """The module-level :class:`AdaptiveK` for rows of length ``m`` on ``device``'s type."""
    key = (m, device.type)
    if key not in _ADAPTIVE:
        _ADAPTIVE[key] = AdaptiveK()
    return _ADAPTIVE[key]


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise UserError(f"sparsemax needs a floating-point tensor, got dtype {dtype}; cast z with .float() first.")
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _rows(z: Tensor, dim: int) -> tuple[Tensor, torch.Size]:
    """Move ``dim`` last and flatten the rest: (N, M) view/copy plus the moved shape."""
    if z.dim() == 0:
        raise UserError("sparsemax needs at least a 1-d tensor, got a scalar; pass z with a concept dimension.")
    moved = z.movedim(dim, -1)
    if moved.shape[-1] == 0:
        raise UserError(f"sparsemax over dim {dim} of shape {tuple(z.shape)} is empty; it needs at least one entry.")
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _check_k(k: int | None, name: str) -> None:
    if k is not None and (not isinstance(k, int) or k < 1):
        raise UserError(f"{name} must be a positive integer or None, got {k!r}.")


class _Prefix(NamedTuple):
    """Sort formula run on sorted candidates v (N, K) of rows shifted by their max."""

    kstar: Tensor  # (N,) int64, support size within the candidates (0 for all −inf rows)
    tau_shift: Tensor  # (N,) τ − z_max (+inf for all −inf rows)
    zmax: Tensor  # (N,) finite row max (0 for all −inf rows)


def _prefix_threshold(vals: Tensor) -> _Prefix:
    """k̂ = max{r : 1 + r·v_r > c_r}, τ̂ = (c_k̂ − 1)/k̂ on the shifted candidates."""
    top = vals[:, 0]
    zmax = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = vals - zmax[:, None]  # −inf entries stay −inf
    csum = shifted.cumsum(dim=1)  # c_r
    r = torch.arange(1, vals.shape[1] + 1, device=vals.device, dtype=vals.dtype)
    cond = 1 + r * shifted > csum  # 1 + r z_(r) > c_r
    kstar = (cond * torch.arange(1, vals.shape[1] + 1, device=vals.device)).amax(dim=1)
    c_k = csum.gather(1, (kstar - 1).clamp_min(0)[:, None])[:, 0]
    tau_shift = torch.where(kstar > 0, (c_k - 1) / kstar.clamp_min(1).to(vals.dtype), torch.inf)  # τ = (c_k − 1)/k
    return _Prefix(kstar, tau_shift, zmax)


class _Certified(NamedTuple):
    vals: Tensor  # (N, K) sorted top-K values (float, compute dtype)
    idx: Tensor  # (N, K) int64
    prefix: _Prefix
    max_support: int


def _certified_topk(z: Tensor, k: int | None, min_width: int = 1) -> _Certified:
    """Top-K candidates of each row of z (N, M) with K large enough to hold every support.

    ``k`` is the first try (None: adaptive); the width is at least ``min(min_width, M)``
    and every row is certified (k̂ < K or K = M).
    """
    n, m = z.shape
    if k is None and sparsemax_cpu.available(z):  # linear-time candidates on CPU (certified the same way)
        vals, idx, widths = sparsemax_cpu.candidates(z, min_width)
        prefix = _prefix_threshold(vals)
        failed = (prefix.kstar >= widths) & (widths < m)
        state = None
    else:
        state = adaptive_state(m, z.device) if k is None else None
        k0 = state.propose(m) if state is not None else min(k, m)
        width = max(k0, min(min_width, m))
        vals, idx = torch.topk(z, width, dim=1, sorted=True)
        prefix = _prefix_threshold(vals)
        failed = prefix.kstar >= width if width < m else torch.zeros_like(prefix.kstar, dtype=torch.bool)
    any_failed, max_support = torch.stack([failed.any().long(), prefix.kstar.max()]).tolist()  # the one sync
    if any_failed:
        vals, idx, prefix, max_support = _refine(z, vals, idx, prefix, failed)
    if state is not None:
        state.observe(max_support)
    return _Certified(vals, idx, prefix, int(max_support))


def _refine(z: Tensor, vals: Tensor, idx: Tensor, prefix: _Prefix, failed: Tensor):
    """Redo the failing rows with more candidates until certified; pad the other rows to match.

    Certified rows have k̂ < width, so their last candidate is off the support; padding
    repeats its index (value −inf), which keeps every padding index off the support.
    """
    n, m = z.shape
    rows = failed.nonzero()[:, 0]
    width = vals.shape[1]
    sub = z.index_select(0, rows)
    tau_lb = prefix.zmax[rows] + prefix.tau_shift[rows]  # τ̂ ≤ τ, so S ⊆ {z > τ̂}
    bound = int((sub > tau_lb[:, None]).sum(dim=1).max()) + 1
    k = width
    while True:
        k = min(m, max(bound, 2 * k))
        sub_vals, sub_idx = torch.topk(sub, k, dim=1, sorted=True)
        sub_prefix = _prefix_threshold(sub_vals)
        still = sub_prefix.kstar >= k if k < m else torch.zeros_like(sub_prefix.kstar, dtype=torch.bool)
        if not bool(still.any()):
            break
        bound = k + 1
    pad = k - width
    all_vals = torch.cat([vals, vals.new_full((n, pad), -torch.inf)], dim=1).index_copy_(0, rows, sub_vals)
    all_idx = torch.cat([idx, idx[:, -1:].expand(n, pad)], dim=1).index_copy_(0, rows, sub_idx)
    kstar = prefix.kstar.index_copy(0, rows, sub_prefix.kstar)
    tau_shift = prefix.tau_shift.index_copy(0, rows, sub_prefix.tau_shift)
    zmax = prefix.zmax.index_copy(0, rows, sub_prefix.zmax)
    return all_vals, all_idx, _Prefix(kstar, tau_shift, zmax), int(kstar.max())


def _support_probs(vals: Tensor, prefix: _Prefix, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(probs, mask) on sorted candidates: p_r = (v_r − z_max) − τ̂ for r ≤ k*, else 0."""
    if mask is None:
        mask = torch.arange(vals.shape[1], device=vals.device)[None, :] < prefix.kstar[:, None]
    probs = ((vals - prefix.zmax[:, None]) - prefix.tau_shift[:, None]).clamp_min(0)  # max(z − τ, 0)
    return torch.where(mask, probs, 0.0), mask


# ----------------------------------------------------------------------------- autograd


class _SparsemaxDense(torch.autograd.Function):
    """p = max(z − τ, 0) row-wise on (N, M), scattered from the support; backward likewise."""

    @staticmethod
    def forward(ctx, z: Tensor, k: int | None) -> Tensor:  # type: ignore[override]
        cert = _certified_topk(z, k)
        width = max(1, cert.max_support)
        idx = cert.idx[:, :width]
        probs, mask = _support_probs(cert.vals[:, :width], cert.prefix)
        p = torch.zeros_like(z).scatter_(1, idx, probs)
        ctx.save_for_backward(idx, mask)
        return p

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        idx, mask = ctx.saved_tensors
        dz_support = _support_backward(g.gather(1, idx), mask)
        return torch.zeros_like(g).scatter_(1, idx, dz_support), None


class _SupportProbs(torch.autograd.Function):
    """probs = (z_S − z_max) − τ̂ on the padded support; backward dz = s (g − mean_S g)."""

    @staticmethod
    def forward(ctx, zk: Tensor, prefix: _Prefix) -> Tensor:  # type: ignore[override]
        probs, mask = _support_probs(zk, prefix)
        ctx.save_for_backward(mask)
        return probs

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return _support_backward(g, mask), None


def _support_backward(g: Tensor, s: Tensor) -> Tensor:
    """dz_i = s_i (g_i − mean_{j∈S} g_j) row-wise over the last dim."""
    gs = torch.where(s, g, 0.0)
    mean = gs.sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(s, g - mean, 0.0)


# ----------------------------------------------------------------------------- public API


def sparsemax(z: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
    """Sparsemax of ``z`` along ``dim``: p = max(z − τ(z), 0), exact, sort-free in the common case.

    ``k`` fixes the initial number of top-k candidates (default: adaptive); it only
    affects speed, never the result. Output has z's shape and dtype.
    """
    _check_k(k, "k")
    cdtype = _compute_dtype(z.dtype)
    rows, moved_shape = _rows(z, dim)
    p = _SparsemaxDense.apply(rows.to(cdtype), k)
    return p.to(z.dtype).reshape(moved_shape).movedim(-1, dim)


def sparsemax_threshold(z: Tensor, dim: int = -1, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Threshold τ and support size |S| of sparsemax along ``dim`` (that dim removed).

    τ = (Σ_{i≤k*} z_(i) − 1)/k* in the compute dtype (float32 for half inputs),
    +inf for all −inf rows; support size int64 (0 for all −inf rows). No gradient.
    """
    _check_k(k, "k")
    cdtype = _compute_dtype(z.dtype)
    rows, moved_shape = _rows(z, dim)
    with torch.no_grad():
        prefix = _certified_topk(rows.detach().to(cdtype), k).prefix
    tau = prefix.zmax + prefix.tau_shift
    return tau.reshape(moved_shape[:-1]), prefix.kstar.reshape(moved_shape[:-1])


class _PaddedSupport(NamedTuple):
    rows: Tensor  # (N, M) z in the compute dtype
    cert: _Certified
    width: int
    mask: Tensor  # (N, width) True on the support
    moved_shape: torch.Size


def _padded_support(z: Tensor, k_max: int | None) -> _PaddedSupport:
    """Certified candidates of z's rows (last dim) and the padded support's width and mask."""
    _check_k(k_max, "k_max")
    rows, moved_shape = _rows(z, -1)
    zc = rows.to(_compute_dtype(z.dtype))
    with torch.no_grad():
        cert = _certified_topk(zc.detach(), k_max, min_width=k_max or 1)
    m = zc.shape[1]
    width = max(1, cert.max_support) if k_max is None else max(min(k_max, m), cert.max_support)
    mask = torch.arange(width, device=z.device)[None, :] < cert.prefix.kstar[:, None]
    return _PaddedSupport(zc, cert, width, mask, moved_shape)


def sparsemax_mask(z: Tensor, k_max: int | None = None) -> tuple[Tensor, Tensor]:
    """(idx, mask) (..., K): the padded support of sparsemax over the last dim, without its values —
    what an SAE needs to read its own differentiable scores there. Same width and order as
    :func:`sparsemax_support`; no gradient."""
    sup = _padded_support(z, k_max)
    shape = (*sup.moved_shape[:-1], sup.width)
    return sup.cert.idx[:, : sup.width].reshape(shape), sup.mask.reshape(shape)


def sparsemax_support(z: Tensor, k_max: int | None = None) -> tuple[Tensor, Tensor]:
    """(idx, val) (..., K): sparsemax over the last dim on its padded support (see module docstring):
    val = max(z − τ, 0) at idx, 0 in padding, with the custom backward dz = s (g − mean_S g).

    Width K = ``k_max`` if every support fits in it, else the smallest certified width
    (never truncated); ``k_max=None``: K = the largest support size in the batch.
    """
    zc, cert, width, mask, moved_shape = _padded_support(z, k_max)
    idx = cert.idx[:, :width]
    prefix = cert.prefix
    if zc.requires_grad:
        probs = _SupportProbs.apply(zc.gather(1, idx), prefix)
    else:  # no autograd: the candidates already hold z at idx
        probs = _support_probs(cert.vals[:, :width], prefix, mask)[0]
    lead = moved_shape[:-1]
    return idx.reshape(*lead, width), probs.to(z.dtype).reshape(*lead, width)


def sparsemax_sort(z: Tensor, dim: int = -1) -> Tensor:
    """Reference sort formula (differentiable by plain autograd through sort/cumsum/gather).

    Sort descending, k = max{r : 1 + r z_(r) > Σ_{i≤r} z_(i)}, τ = (Σ_{i≤k} z_(i) − 1)/k,
    p = max(z − τ, 0). All −inf rows give p = 0 (as :func:`sparsemax`). Computes in
    float32 for half inputs; rows are shifted by their max like the fast path.
    """
    cdtype = _compute_dtype(z.dtype)
    rows, moved_shape = _rows(z, dim)
    zc = rows.to(cdtype)
    srt = torch.sort(zc, dim=1, descending=True).values
    top = srt[:, :1].detach()
    zmax = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = srt - zmax
    csum = shifted.cumsum(dim=1)
    r = torch.arange(1, zc.shape[1] + 1, device=z.device)
    kstar = ((1 + r * shifted > csum) * r).amax(dim=1, keepdim=True)  # max{r : 1 + r z_(r) > c_r}
    c_k = csum.gather(1, (kstar - 1).clamp_min(0))
    tau = torch.where(kstar > 0, (c_k - 1) / kstar.clamp_min(1), torch.inf)  # τ − z_max
    p = ((zc - zmax) - tau).clamp(min=0)
    return p.to(z.dtype).reshape(moved_shape).movedim(-1, dim)
