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

__all__ = ["sampled_dot", "scatter_rows", "select_linear", "sparse_decode"]


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


def scatter_rows(idx: Tensor, coef: Tensor, y: Tensor, m: int) -> Tensor:
    """dW (M, d), dW[j] = Σ_{(b,k): idx[b,k]=j} coef[b,k] · y_b: a (M × B) sparse matrix times y."""
    return (scatter_rows_csr if _uses_csr(y) else scatter_rows_coo)(idx, coef, y, m)


def scatter_rows_csr(idx: Tensor, coef: Tensor, y: Tensor, m: int) -> Tensor:
    """:func:`scatter_rows` with a CSR matrix whose rows are the concepts (one stable sort of idx)."""
    b, k = idx.shape
    flat = idx.reshape(-1)
    dtype = _csr_dtype(y.dtype)
    order = torch.argsort(flat, stable=True)  # entries grouped by concept j
    crow = torch.zeros(m + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.bincount(flat, minlength=m).cumsum(0)
    sparse = _csr(crow, order // k, coef.reshape(-1)[order].to(dtype), (m, b))  # column = sample b
    return (sparse @ y.to(dtype)).to(y.dtype)


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
    def forward(ctx, idx: Tensor, val: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, val, weight)
        return F.embedding_bag(idx, weight, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        idx, val, weight = ctx.saved_tensors
        dval = sampled_dot(idx, g, weight).to(val.dtype) if ctx.needs_input_grad[1] else None
        dw = scatter_rows(idx, val, g, weight.shape[0]).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return None, dval, dw


def sparse_decode(idx: Tensor, val: Tensor, weight: Tensor) -> Tensor:
    """x̂_b = Σ_k val[b,k] · W[idx[b,k]]  (B, d); forward and backward touch only the indexed rows."""
    return _SparseDecode.apply(idx, val.to(weight.dtype), weight)


class _SelectLinear(torch.autograd.Function):
    """s[b,k] = (x Wᵀ)[b, idx[b,k]] read from ``full``; backward: dx = Σ_k g W[idx], dW[idx] += g x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, idx: Tensor, full: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, idx)
        return full.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight, idx = ctx.saved_tensors
        dx = sparse_decode(idx, g, weight) if ctx.needs_input_grad[0] else None
        dw = scatter_rows(idx, g, x, weight.shape[0]).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def select_linear(x: Tensor, weight: Tensor, idx: Tensor, full: Tensor | None = None) -> Tensor:
    """(x Wᵀ)[b, idx[b,k]] (B, K) with a sparse backward; ``full`` = x Wᵀ if already computed."""
    if full is None:
        return (weight[idx] * x[:, None, :]).sum(-1)  # explicit row gather, plain autograd
    return _SelectLinear.apply(x, weight, idx, full.detach())
