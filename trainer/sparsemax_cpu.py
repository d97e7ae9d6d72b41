"""CPU candidate search for :mod:`trainer.sparsemax`: the top entries of each row without ``torch.topk``.

``torch.topk`` with the k ≈ 100 candidates a sparsemax support needs runs ``std::nth_element`` over
every row (k·64 > M selects it over a partial sort), ~25 ms for 1,024 × 3,072 on the 2-core CPU — the
largest cost of a Sparsemax-SAE step after the matmuls. This module finds the same candidates in
two linear passes per row, compiled with numba and parallel over rows:

1. **Threshold estimate** — Condat's algorithm ("Fast projection onto the simplex and the l1 ball",
   Math. Program. 2016, Fig. 2) computes ρ ≈ τ in one pass plus a short clean-up, accumulating in
   float64. −inf entries (masked concepts) are skipped; an all −inf row gets ρ = +inf.
2. **Candidates** — U = {z > ρ − margin} sorted descending, followed by the largest entry outside U
   (the "extra"; −inf if only −inf entries remain), padded with −inf to a common width.

The caller never trusts ρ: U ∪ {extra} are exactly the first |U| + 1 entries of the row's full sort
(ties aside, which do not change values), so running the sort formula on them and checking the
certificate k̂ < |U| + 1 (or |U| = M) is the same proof :func:`trainer.sparsemax._certified_topk`
uses for ``torch.topk`` candidates; a row that fails goes through the usual exact fallback. The
margin (1e-4 + 16·|S|·ε of the dtype, in the units of z) only makes such failures rare.

Used for float32/float64 CPU tensors when numba is importable and the caller did not fix k
(:func:`available`); otherwise ``torch.topk`` serves. Kernels compile on first use (cached on disk
by numba) and run serially per row range, on ``torch.get_num_threads()`` plain threads (they
release the GIL): a numba OpenMP pool measured slower here, its spinning threads competing with
torch's on 2 cores, and it is not fork-safe.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but a missing or broken install must not break sparsemax
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

__all__ = ["available", "candidates"]

TARGET_GROUPS = 512  # rows are cut into ≈ this many groups of ≥ 8 entries for the threshold estimate


def available(z: Tensor) -> bool:
    """Whether :func:`candidates` serves this (N, M) tensor."""
    return numba is not None and z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _condat_threshold(y):  # pragma: no cover - compiled
        """ρ ≈ τ with Σ max(y − τ, 0) = 1 (Condat 2016, Fig. 2, a = 1) and the size of its set v."""
        n = y.shape[0]
        first = 0
        while first < n and y[first] == -np.inf:
            first += 1
        if first == n:
            return np.inf, 0
        v = np.empty(n, np.float64)
        spill = np.empty(n, np.float64)
        v[0] = y[first]
        nv = 1
        ns = 0
        rho = v[0] - 1.0
        for j in range(first + 1, n):  # step 2: one pass
            yj = np.float64(y[j])
            if yj > rho:
                rho += (yj - rho) / (nv + 1)
                if rho > yj - 1.0:
                    v[nv] = yj
                    nv += 1
                else:
                    spill[ns:ns + nv] = v[:nv]
                    ns += nv
                    v[0] = yj
                    nv = 1
                    rho = yj - 1.0
        for t in range(ns):  # step 3: re-admit spilled entries above ρ
            if spill[t] > rho:
                v[nv] = spill[t]
                nv += 1
                rho += (spill[t] - rho) / nv
        changed = True
        while changed:  # step 4: drop entries at or below ρ until stable
            changed = False
            t = 0
            while t < nv:
                if v[t] <= rho and nv > 1:
                    gone = v[t]
                    nv -= 1
                    v[t] = v[nv]
                    rho += (rho - gone) / nv
                    changed = True
                else:
                    t += 1
        return rho, nv

    @numba.njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
    def _bounds(z, group, eps, bound, count, lo_row, hi_row):  # pragma: no cover - compiled
        """Rows [lo_row, hi_row): the candidate bound ρ − margin, ρ = τ of the row's group maxima (a
        subset of the row, so ρ ≤ τ), and |U| = #{z > bound}."""
        m = z.shape[1]
        n_groups = (m + group - 1) // group
        for b in range(lo_row, hi_row):
            row = z[b]
            maxima = np.empty(n_groups, np.float64)
            for g in range(n_groups):
                lo = g * group
                hi = min(lo + group, m)
                best = row[lo]
                for j in range(lo + 1, hi):
                    best = max(best, row[j])
                maxima[g] = best
            rho, nv = _condat_threshold(maxima)
            lb = rho - (1e-4 + 16.0 * nv * eps)
            c = 0
            for j in range(m):
                c += row[j] > lb
            bound[b] = lb
            count[b] = c

    @numba.njit(nogil=True, cache=True)
    def _fill(z, bound, count, width, vals, idx, lo_row, hi_row):  # pragma: no cover - compiled
        """Rows [lo_row, hi_row): U sorted descending, then the extra entry, then −inf padding (index
        repeated)."""
        m = z.shape[1]
        for b in range(lo_row, hi_row):
            c = count[b]
            lb = bound[b]
            cand_idx = np.empty(c, np.int64)
            cand_val = np.empty(c, z.dtype)
            k = 0
            extra = -1
            for j in range(m):
                zj = z[b, j]
                if zj > lb:
                    cand_idx[k] = j
                    cand_val[k] = zj
                    k += 1
                elif extra < 0 or zj > z[b, extra]:
                    extra = j
            order = np.argsort(-cand_val)
            for r in range(c):
                vals[b, r] = cand_val[order[r]]
                idx[b, r] = cand_idx[order[r]]
            last = cand_idx[order[c - 1]] if c > 0 else 0
            pos = c
            if extra >= 0:
                vals[b, pos] = z[b, extra]
                idx[b, pos] = extra
                last = extra
                pos += 1
            for r in range(pos, width):
                vals[b, r] = -np.inf
                idx[b, r] = last


def _run_rows(kernel, n_rows: int, *args) -> None:
    """Run ``kernel(*args, lo, hi)`` over row ranges on ``torch.get_num_threads()`` threads (the kernels
    release the GIL; plain threads, no OpenMP pool to spin against torch's or to break fork())."""
    threads = max(1, min(torch.get_num_threads(), n_rows // 16 or 1))
    edges = np.linspace(0, n_rows, threads + 1).astype(np.int64)
    if threads == 1:
        kernel(*args, 0, n_rows)
        return
    futures = [_pool(threads).submit(kernel, *args, int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    for future in futures:
        future.result()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="sparsemax-cpu")
    return _POOLS[threads]


def candidates(z: Tensor, min_width: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(vals (N, W), idx (N, W), widths (N,)) for z (N, M): each row's first ``widths[b]`` sorted
    entries are its ``widths[b]`` largest (U and the extra entry), the rest −inf padding;
    W = max(max widths, min(min_width, M))."""
    array = z.detach().contiguous().numpy()
    n_rows, m = array.shape
    eps = float(np.finfo(array.dtype).eps)
    group = max(8, -(-m // TARGET_GROUPS))
    bound = np.empty(n_rows, np.float64)
    count = np.empty(n_rows, np.int64)
    _run_rows(_bounds, n_rows, array, group, eps, bound, count)
    widths = np.minimum(count + 1, m)
    width = int(max(int(widths.max()) if n_rows else 1, min(min_width, m)))
    vals = np.empty((n_rows, width), dtype=array.dtype)
    idx = np.empty((n_rows, width), dtype=np.int64)
    _run_rows(_fill, n_rows, array, bound, count, width, vals, idx)
    return torch.from_numpy(vals), torch.from_numpy(idx), torch.from_numpy(widths)
