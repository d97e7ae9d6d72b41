"""Sparse products of padded codes (idx, val) (B, K) with a concept matrix W (M, d), forward and backward.

Three products cover every sparse variant of the zoo:

* :func:`sparse_decode` — x̂_b = Σ_k val[b,k] · W[idx[b,k]]: ``embedding_bag`` (only the K indexed rows
  per sample are read).
* :func:`sampled_dot` — s[b,k] = ⟨y_b, W[idx[b,k]]⟩ = (y Wᵀ)[b, idx[b,k]], the "sampled dense-dense
  matmul" (SDDMM) behind ∂/∂val of a decode and the selected encoder scores.
* :func:`scatter_rows` — dW[j] = Σ_{(b,k): idx[b,k]=j} coef[b,k] · y_b, the weight gradient of both.

:func:`select_linear` (s = (x Wᵀ)[b, idx], read from an already computed dense x Wᵀ) and
:func:`sparse_decode` are autograd functions built from them, so the backward of a sparse encoder or
decoder costs O(B·K·d), never O(B·M·d).

Kernels (measured at B = 1024, d = 768, K ∈ {32, 60} on the 2-core CPU, fp32, 2 threads): on CPU
both :func:`sampled_dot` and :func:`scatter_rows` run as MKL sparse CSR products —
``torch.sparse.sampled_addmm`` over the (B × M) pattern of idx (4–13 ms, against 45–95 ms for a
``W[idx]`` gather + ``bmm``, which copies B·K·d floats, and 17–20 ms for the dense (y Wᵀ) + gather at
M = 3072), and a (M × B) CSR matrix (rows = concepts, built by one sort of the B·K indices) times
y (4–7 ms at M = 3072 against 20–35 ms dense and 9–13 ms COO; at M = 24576 all sparse forms take
~60 ms, a third of it the zero fill of the (M, d) result). Half types are computed in float32
(MKL's CSR kernels take float32/float64 only). Other devices use the generic forms (row gather +
``bmm``; COO ``sparse.mm``), whose kernels exist everywhere.

Padding entries carry coef/val = 0 and any valid index (repeats allowed), so they add nothing.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SupportPattern", "sampled_dot", "scatter_rows", "select_linear", "sparse_decode"]


class SupportPattern:
    """The index structure of padded codes idx (B, K) over M concepts, built lazily once and shared by
    every sparse product with the same idx (an encoder's selected scores and the decoder, forward and
    backward), so the sort behind the weight scatter runs once per batch."""

    def __init__(self, idx: Tensor, m: int) -> None:
        self.idx = idx
        self.m = m
        self._by_concept: tuple[Tensor, Tensor, Tensor] | None = None

    def by_concept(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow (M+1,), sample (B·K,), order (B·K,)): the entries of idx grouped by concept j (a stable
        sort), as the row pointers and column (= sample b) indices of a (M × B) CSR matrix."""
        if self._by_concept is None:
            k = self.idx.shape[1]
            flat = self.idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            crow = torch.zeros(self.m + 1, dtype=torch.int64, device=flat.device)
            crow[1:] = torch.bincount(flat, minlength=self.m).cumsum(0)
            self._by_concept = (crow, order // k, order)
        return self._by_concept


def _uses_csr(t: Tensor) -> bool:
    """The MKL CSR kernels serve CPU tensors."""
    return t.device.type == "cpu"


def _csr_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 as they are; half types computed in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor from trusted parts (no invariant check; torch's beta warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def sampled_dot(idx: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """s[b,k] = ⟨y_b, W[idx[b,k]]⟩  (B, K), in y's dtype."""
    return (sampled_dot_csr if _uses_csr(y) else sampled_dot_gather)(idx, y, weight)


def sampled_dot_csr(idx: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """:func:`sampled_dot` as an MKL SDDMM: (y Wᵀ) evaluated only on the (B × M) CSR pattern of idx."""
    b, k = idx.shape
    dtype = _csr_dtype(y.dtype)
    crow = torch.arange(0, b * k + 1, k, device=idx.device)  # row b holds entries [bK, (b+1)K)
    pattern = _csr(crow, idx.reshape(-1), y.new_zeros(b * k, dtype=dtype), (b, weight.shape[0]))
    out = torch.sparse.sampled_addmm(pattern, y.to(dtype), weight.T.to(dtype), beta=0.0)
    return out.values().view(b, k).to(y.dtype)


def sampled_dot_gather(idx: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """:func:`sampled_dot` by a row gather W[idx] (B, K, d) and a batched matrix-vector product."""
    return torch.bmm(weight[idx], y[:, :, None].to(weight.dtype))[:, :, 0].to(y.dtype)


def scatter_rows(idx: Tensor, coef: Tensor, y: Tensor, m: int, pattern: SupportPattern | None = None) -> Tensor:
    """dW (M, d), dW[j] = Σ_{(b,k): idx[b,k]=j} coef[b,k] · y_b: a (M × B) sparse matrix times y.

    ``pattern`` (of this idx) reuses the grouping by concept of an earlier product."""
    if not _uses_csr(y):
        return scatter_rows_coo(idx, coef, y, m)
    return scatter_rows_csr(idx, coef, y, m, pattern)


def scatter_rows_csr(idx: Tensor, coef: Tensor, y: Tensor, m: int, pattern: SupportPattern | None = None) -> Tensor:
    """:func:`scatter_rows` with a CSR matrix whose rows are the concepts, multiplied straight into a
    fresh (M, d) result (``addmm`` with β = 0 and ``out=``: no zero fill, no copy)."""
    b = idx.shape[0]
    dtype = _csr_dtype(y.dtype)
    crow, sample, order = (pattern or SupportPattern(idx, m)).by_concept()
    sparse = _csr(crow, sample, coef.reshape(-1)[order].to(dtype), (m, b))
    out = y.new_empty(m, y.shape[1], dtype=dtype)
    torch.addmm(out, sparse, y.to(dtype), beta=0.0, out=out)  # β = 0: out's contents are ignored
    return out.to(y.dtype)


def scatter_rows_coo(idx: Tensor, coef: Tensor, y: Tensor, m: int) -> Tensor:
    """:func:`scatter_rows` with an uncoalesced COO matrix and ``torch.sparse.mm``."""
    b, k = idx.shape
    cols = torch.arange(b, device=idx.device).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), cols]), coef.reshape(-1).to(y.dtype), (m, b),
                                     check_invariants=False)
    return torch.sparse.mm(sparse, y)


class _SparseDecode(torch.autograd.Function):
    """x̂_b = Σ_k val[b,k] W[idx[b,k]]; backward: dval[b,k] = ⟨g_b, W[idx[b,k]]⟩, dW[idx] += val ⊗ g."""

    @staticmethod
    def forward(ctx, idx: Tensor, val: Tensor, weight: Tensor, pattern: SupportPattern | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, val, weight)
        ctx.pattern = pattern
        return F.embedding_bag(idx, weight, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        idx, val, weight = ctx.saved_tensors
        dval = sampled_dot(idx, g, weight).to(val.dtype) if ctx.needs_input_grad[1] else None
        dw = scatter_rows(idx, val, g, weight.shape[0], ctx.pattern).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return None, dval, dw, None


def sparse_decode(idx: Tensor, val: Tensor, weight: Tensor, pattern: SupportPattern | None = None) -> Tensor:
    """x̂_b = Σ_k val[b,k] · W[idx[b,k]]  (B, d); forward and backward touch only the indexed rows.
    ``pattern``: the :class:`SupportPattern` of idx when another product shares it."""
    return _SparseDecode.apply(idx, val.to(weight.dtype), weight, pattern)


class _SelectLinear(torch.autograd.Function):
    """s[b,k] = (x Wᵀ)[b, idx[b,k]] read from ``full``; backward: dx = Σ_k g W[idx], dW[idx] += g x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, idx: Tensor, full: Tensor,  # type: ignore[override]
                pattern: SupportPattern | None) -> Tensor:
        ctx.save_for_backward(x, weight, idx)
        ctx.pattern = pattern
        return full.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight, idx = ctx.saved_tensors
        dx = F.embedding_bag(idx, weight, per_sample_weights=g.to(weight.dtype), mode="sum") if ctx.needs_input_grad[0] else None
        dw = scatter_rows(idx, g, x, weight.shape[0], ctx.pattern).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


def select_linear(x: Tensor, weight: Tensor, idx: Tensor, full: Tensor | None = None,
                  pattern: SupportPattern | None = None) -> Tensor:
    """(x Wᵀ)[b, idx[b,k]] (B, K) with a sparse backward; ``full`` = x Wᵀ if already computed;
    ``pattern``: the :class:`SupportPattern` of idx when another product shares it."""
    if full is None:
        return (weight[idx] * x[:, None, :]).sum(-1)  # explicit row gather, plain autograd
    return _SelectLinear.apply(x, weight, idx, full.detach(), pattern)
