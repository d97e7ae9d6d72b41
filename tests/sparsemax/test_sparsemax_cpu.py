"""trainer.sparsemax_cpu: the linear-time candidates are exactly each row's largest entries, and the
sparsemax built on them is exact on both candidate paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainer import sparsemax_cpu
from trainer.sparsemax import sparsemax, sparsemax_sort, sparsemax_threshold

pytestmark = pytest.mark.skipif(sparsemax_cpu.numba is None, reason="numba is not installed")


def check_candidates(z: torch.Tensor, min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's first widths[b] candidates are its widths[b] largest entries in descending order, the
    rest is −inf padding with a valid index, and widths[b] exceeds the support size (or equals M)."""
    vals, idx, widths = sparsemax_cpu.candidates(z, min_width)
    n, m = z.shape
    assert vals.shape == idx.shape and vals.shape[1] == max(int(widths.max()), min(min_width, m))
    assert vals.dtype == z.dtype and idx.dtype == torch.int64
    support = (sparsemax_sort(z) > 0).sum(-1)
    for b in range(n):
        w = int(widths[b])
        expected = torch.topk(z[b], w).values
        assert torch.equal(vals[b, :w], expected), b
        assert torch.equal(z[b, idx[b, :w]], vals[b, :w])  # indices point at those values
        assert len(set(idx[b, :w].tolist())) == w  # no entry twice
        assert torch.all(vals[b, w:] == -math.inf) and torch.all((idx[b] >= 0) & (idx[b] < m))
        assert w == m or w > int(support[b])
    return vals, idx, widths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.02, 0.3, 5.0])
def test_candidates_are_the_largest_entries(dtype: torch.dtype, scale: float) -> None:
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(40, 3072, generator=g) * scale).to(dtype)  # 40 rows: split over threads
    check_candidates(z)


def test_candidates_edge_rows() -> None:
    z = torch.randn(7, 1001, generator=torch.Generator().manual_seed(12))  # M not a multiple of the group
    z[0] = -math.inf  # all masked: no candidate, the extra entry is −inf
    z[1, :-3] = -math.inf  # three finite entries
    z[2] = 0.5  # all equal: every entry is in the support
    z[3] *= 1e-7  # support = the whole row
    z[4, ::2] = -math.inf
    z[5] = z[5] * 1e6 + 1e6
    vals, idx, widths = check_candidates(z, min_width=5)
    assert int(widths[0]) == 1 and vals[0, 0] == -math.inf
    assert int(widths[2]) == 1001 and int(widths[3]) == 1001


@pytest.mark.parametrize("m", [1, 2, 7, 9, 100])
def test_candidates_small_rows(m: int) -> None:
    z = torch.randn(3, m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    check_candidates(z)


@pytest.mark.parametrize("path", ["cpu_kernel", "topk"])
def test_sparsemax_is_exact_on_both_candidate_paths(path: str, monkeypatch) -> None:
    if path == "topk":
        monkeypatch.setattr(sparsemax_cpu, "available", lambda z: False)
    else:
        assert sparsemax_cpu.available(torch.zeros(1, 1))
    g = torch.Generator().manual_seed(13)
    z = torch.randn(64, 5000, generator=g, dtype=torch.float64) * torch.logspace(-4, 1, 64, dtype=torch.float64)[:, None]
    z[3, :100] = -math.inf
    ref = sparsemax_sort(z)
    torch.testing.assert_close(sparsemax(z), ref, rtol=0, atol=1e-12)
    zf = z.float()
    p = sparsemax(zf)
    assert torch.equal(p, sparsemax_sort(zf))  # same float32 arithmetic on the same sorted prefix
    assert torch.equal(sparsemax_threshold(zf)[1], (p > 0).sum(-1))


def _child_sparsemax(queue) -> None:
    z = torch.randn(64, 500, generator=torch.Generator().manual_seed(14))
    queue.put(bool(torch.equal(sparsemax(z), sparsemax_sort(z))))


def test_forked_child_after_parent_used_the_kernel() -> None:
    """The kernel's thread pool is per process: a fork() child (DataLoader workers, multiprocessing)
    gets fresh threads instead of waiting forever on the parent's."""
    import multiprocessing

    sparsemax(torch.randn(64, 500))  # the parent's pool now has threads
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_sparsemax, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():  # hung: do not leave it behind
        child.kill()
        child.join()
    assert child.exitcode == 0 and queue.get(timeout=5) is True


def test_kernels_command_leaves_them_in_numba_disk_cache_for_the_next_process(capsys):
    """`dynsae kernels` (run by `make install`) compiles every CPU kernel into numba's disk cache: an index
    file per kernel lies next to its source, and a new dispatcher of the same function — what a new process
    makes — loads each from there instead of compiling it."""
    import numba

    from dynsae.kernels import main
    from store import scatter

    assert main(["--json"]) == 0
    here = json.loads(capsys.readouterr().out)["kernels"]
    assert set(here) == {"sparsemax_cpu[float32]", "sparsemax_cpu[float64]", "row_scatter"}
    assert set(here.values()) <= {"compiled", "loaded"}
    for kernel in (sparsemax_cpu._bounds, sparsemax_cpu._fill, scatter._scatter64):
        source = Path(kernel.py_func.__code__.co_filename)
        assert list((source.parent / "__pycache__").glob(f"{source.stem}.{kernel.__name__}-*.nbi")), kernel
        options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}  # njit implies it
        fresh = numba.njit(cache=True, **options)(kernel.py_func)
        for signature in kernel.signatures:
            fresh.compile(signature)
        assert sum(fresh.stats.cache_hits.values()) == len(kernel.signatures) >= 1, kernel
        assert not fresh.stats.cache_misses, kernel
