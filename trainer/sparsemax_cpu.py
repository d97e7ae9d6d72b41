"""CPU candidate search for :mod:`trainer.sparsemax`: the top entries of each row without ``torch.topk``.

``torch.topk`` with the k ≈ 100 candidates a sparsemax support needs runs ``std::nth_element`` over
every row (k·64 > M selects it over a partial sort), ~20–25 ms for 1,024 × 3,072 on the 2-core CPU —
the largest cost of a Sparsemax-SAE step after the matmuls. This module finds the same candidates
with **one** pass over each row, compiled with numba:

1. **Group maxima** — the row is cut into G ≈ 512 strided groups (entry j in group j mod G); their
   maxima come from an element-wise max of the row's contiguous blocks of G entries (one pass).
2. **Threshold bound** — for any subset T of a row with |T| = r, (Σ_T z − 1)/r ≤ (c_r − 1)/r ≤ τ.
   Michelot's iteration on the maxima (ρ ← (Σ_{y > ρ} y − 1)/#{y > ρ}, from ρ = max − 1, float64
   sums; −inf entries, i.e. masked concepts, never count; all −inf gives +inf) produces such
   bounds, increasing to the sparsemax threshold of the maxima, which is tight: most support
   entries are the maxima of their groups.
3. **Candidates** — U = {z > ρ − margin} can only lie in groups whose maximum exceeds the bound,
   so only those groups (about |S| of them) are read again. U is sorted descending and followed by
   the largest entry outside U (the "extra": the larger of the best non-candidate in those groups
   and the largest maximum of the other groups; −inf if only −inf entries remain), then padded with
   −inf to a common width.

The caller never trusts the bound: U ∪ {extra} are exactly the first |U| + 1 entries of the row's
full sort (ties aside, which do not change values), so running the sort formula on them and checking
the certificate k̂ < |U| + 1 (or |U| = M) is the same proof :func:`trainer.sparsemax._certified_topk`
uses for ``torch.topk`` candidates; a row that fails goes through the usual exact fallback. The
margin (1e-4 + 16·|v|·ε of the dtype, in the units of z) only absorbs rounding in ρ.

Used for float32/float64 CPU tensors when numba is importable, the caller did not fix k and
``DYNSAE_SPARSEMAX_CPU`` is not ``0`` (:func:`available`); otherwise ``torch.topk`` serves. Kernels
compile on first use (cached on disk by numba) and run serially per row range on
``torch.get_num_threads()`` plain threads (they release the GIL): a numba OpenMP pool measured
slower here, its spinning threads competing with torch's on 2 cores, and it is not fork-safe."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but a missing or broken install must not break sparsemax
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

__all__ = ["ENABLED", "available", "candidates"]

#: The numba path is on when numba imports and ``DYNSAE_SPARSEMAX_CPU`` is not "0".
ENABLED = numba is not None and os.environ.get("DYNSAE_SPARSEMAX_CPU", "1") != "0"

TARGET_GROUPS = 512  # strided groups per row for the threshold bound (fewer when M is smaller)


def available(z: Tensor) -> bool:
    """Whether :func:`candidates` serves this (N, M) tensor (``DYNSAE_SPARSEMAX_CPU=0`` turns it off)."""
    return ENABLED and z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64)


if numba is not None:

    @numba.njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
    def _subset_bound(y):  # pragma: no cover - compiled
        """A lower bound ρ ≤ τ(y) by Michelot's iteration ρ ← (Σ_{y > ρ} y − 1)/#{y > ρ} from
        ρ = max(y) − 1: every iterate is (Σ_T y − 1)/|T| for a subset T, hence ≤ τ, and they increase
        to τ(y) in finitely many steps (at most 16 here; any iterate is a valid bound). Returns
        (ρ, |T|); all −inf gives (+inf, 0)."""
        top = -np.inf
        for g in range(y.shape[0]):
            top = max(top, y[g])
        if top == -np.inf:
            return np.inf, 0
        rho = np.float64(top) - 1.0
        n = 0
        for _ in range(16):
            total = 0.0
            n = 0
            for g in range(y.shape[0]):  # branch-free, so the loop vectorises
                above = y[g] > rho
                total += np.float64(y[g]) if above else 0.0
                n += above
            new = (total - 1.0) / n
            if new <= rho:
                break
            rho = new
        return rho, n

    @numba.njit(nogil=True, cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
    def _bounds(z, maxima, eps, bound, count, lo_row, hi_row):  # pragma: no cover - compiled
        """Rows [lo_row, hi_row): the strided group maxima (into ``maxima``), the bound ρ − margin with
        ρ the sparsemax threshold of the maxima (≤ τ), and |U| = #{z > bound} read from the groups
        whose maximum exceeds the bound."""
        m = z.shape[1]
        n_groups = maxima.shape[1]
        for b in range(lo_row, hi_row):
            row = z[b]
            mx = maxima[b]
            for g in range(n_groups):
                mx[g] = row[g]
            for start in range(n_groups, m, n_groups):  # element-wise max of contiguous blocks
                stop = min(start + n_groups, m)
                for g in range(stop - start):
                    mx[g] = max(mx[g], row[start + g])
            rho, nv = _subset_bound(mx)
            lb = rho - (1e-4 + 16.0 * nv * eps)
            c = 0
            for g in range(n_groups):
                if mx[g] > lb:
                    for j in range(g, m, n_groups):
                        c += row[j] > lb
            bound[b] = lb
            count[b] = c

    @numba.njit(nogil=True, cache=True)
    def _fill(z, maxima, bound, count, width, vals, idx, lo_row, hi_row):  # pragma: no cover - compiled
        """Rows [lo_row, hi_row): U sorted descending, then the extra entry, then −inf padding (index
        repeated); only the groups whose maximum exceeds the bound are read."""
        m = z.shape[1]
        n_groups = maxima.shape[1]
        scratch_idx = np.empty(width, np.int64)
        scratch_val = np.empty(width, z.dtype)
        for b in range(lo_row, hi_row):
            row = z[b]
            mx = maxima[b]
            lb = bound[b]
            c = count[b]
            cand_idx = scratch_idx[:c]
            cand_val = scratch_val[:c]
            k = 0
            extra = -1  # best non-candidate inside the active groups
            other = -1  # inactive group with the largest maximum
            for g in range(n_groups):
                if mx[g] > lb:
                    for j in range(g, m, n_groups):
                        zj = row[j]
                        if zj > lb:
                            cand_idx[k] = j
                            cand_val[k] = zj
                            k += 1
                        elif extra < 0 or zj > row[extra]:
                            extra = j
                elif other < 0 or mx[g] > mx[other]:
                    other = g
            if other >= 0 and (extra < 0 or mx[other] > row[extra]):
                extra = other
                for j in range(other, m, n_groups):  # where that maximum sits
                    if row[j] > row[extra]:
                        extra = j
            order = np.argsort(-cand_val)
            for r in range(c):
                vals[b, r] = cand_val[order[r]]
                idx[b, r] = cand_idx[order[r]]
            last = cand_idx[order[c - 1]] if c > 0 else 0
            pos = c
            if extra >= 0:
                vals[b, pos] = row[extra]
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
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the parent's threads


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
    maxima = np.empty((n_rows, min(m, TARGET_GROUPS)), array.dtype)
    bound = np.empty(n_rows, np.float64)
    count = np.empty(n_rows, np.int64)
    _run_rows(_bounds, n_rows, array, maxima, eps, bound, count)
    widths = np.minimum(count + 1, m)
    width = int(max(int(widths.max()) if n_rows else 1, min(min_width, m)))
    vals = np.empty((n_rows, width), dtype=array.dtype)
    idx = np.empty((n_rows, width), dtype=np.int64)
    _run_rows(_fill, n_rows, array, maxima, bound, count, width, vals, idx)
    return torch.from_numpy(vals), torch.from_numpy(idx), torch.from_numpy(widths)


def compile_kernels() -> dict[str, str]:
    """Compile the kernels for every dtype :func:`available` accepts (float32, float64) into numba's
    on-disk cache, so later processes load them (~0.1 s) instead of compiling them (~11 s of CPU on the
    2-core box, paid by every process that starts before the cache exists). Returns, per dtype,
    "compiled" or "loaded" (from the cache); empty when the numba path is off."""
    done = {}
    for dtype in (torch.float32, torch.float64):
        z = torch.zeros(2, 4, dtype=dtype)
        if available(z):
            misses = sum(sum(k.stats.cache_misses.values()) for k in (_bounds, _fill))
            candidates(z)
            compiled = sum(sum(k.stats.cache_misses.values()) for k in (_bounds, _fill)) > misses
            done[str(dtype).removeprefix("torch.")] = "compiled" if compiled else "loaded"
    return done
