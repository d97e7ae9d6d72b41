"""Sparsemax op bench: trainer.sparsemax vs the sort formula and vs the entmax package.

Run: ``.venv/bin/python bench/sparsemax_bench.py [--quick]``. Everything is timed side by
side in this process with ``torch.set_num_threads(2)``, fp32 on CPU, B = 4,096 rows,
M ∈ {3,072, 24,576}, scores z = σ·N(0, 1) with σ calibrated so the mean support size is
about 30 ("narrow") or 150 ("wide"). Per case, forward and forward+backward times
(best of ``reps``) for

* ``ours``: :func:`trainer.sparsemax.sparsemax` as it runs here (CPU: the linear-time candidate
  search of :mod:`trainer.sparsemax_cpu`), after one warm-up call as in a training loop,
* ``ours_topk``: the same op with ``torch.topk`` candidates and its adaptive k (the path other
  devices take),
* ``sort``: :func:`trainer.sparsemax.sparsemax_sort`, the sort formula, autograd backward,
* ``entmax``: ``entmax.sparsemax`` (full sort, its custom backward) and ``entmax_k``
  (its top-k mode with k = 2 × the target support and its doubling fallback).

Errors: max |p − p_sort| and max |∇ − ∇_sort| over all rows, max |p − p_ref| against the
float64 sort formula on the first 256 rows, and the number of rows whose support size
differs from the sort formula's. Results go to bench/results/sparsemax.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from trainer import sparsemax_cpu
from trainer.sparsemax import adaptive_state, sparsemax, sparsemax_sort, sparsemax_threshold

RESULTS = Path(__file__).resolve().parent / "results" / "sparsemax.json"
B = 4096
SIZES = (3072, 24576)
SUPPORTS = {"narrow": 30, "wide": 150}


def calibrate_scale(m: int, target: int, seed: int = 0) -> float:
    """σ such that sparsemax(σ·N(0,1)) has mean support ≈ target (bisection on log σ, 64 rows)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, m, generator=g)
    lo, hi = -8.0, 4.0  # log σ: support shrinks as σ grows
    for _ in range(30):
        mid = (lo + hi) / 2
        size = sparsemax_threshold(z * float(torch.tensor(mid).exp()), k=m)[1].float().mean()
        lo, hi = (mid, hi) if size > target else (lo, mid)
    return float(torch.tensor((lo + hi) / 2).exp())


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Best wall time of ``reps`` calls (seconds)."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(op: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, g: torch.Tensor):
    """(p, dz) of op at z for upstream gradient g."""
    zr = z.clone().requires_grad_(True)
    p = op(zr)
    p.backward(g)
    return p.detach(), zr.grad


def sparsemax_topk_candidates(z: torch.Tensor) -> torch.Tensor:
    """Our op with ``torch.topk`` candidates (adaptive k) instead of the CPU linear-time search."""
    enabled = sparsemax_cpu.ENABLED
    sparsemax_cpu.ENABLED = False
    try:
        return sparsemax(z)
    finally:
        sparsemax_cpu.ENABLED = enabled


def entmax_ops(target: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]] | str:
    """The entmax package's sparsemax (full sort and top-k mode), or why it is unavailable."""
    try:
        from entmax import sparsemax as entmax_sparsemax
    except Exception as err:  # record the failure instead of the numbers
        return f"entmax import failed: {err!r}"
    return {
        "entmax": lambda t: entmax_sparsemax(t, dim=-1),
        "entmax_k": lambda t: entmax_sparsemax(t, dim=-1, k=2 * target),
    }


def run_case(m: int, label: str, target: int, reps: int, slow_reps: int) -> dict:
    """Time and check every op on one (M, support) case."""
    sigma = calibrate_scale(m, target)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, m, generator=g) * sigma
    grad = torch.randn(B, m, generator=g)
    sparsemax(z)  # warm the adaptive k for this M
    ops: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours": sparsemax, "ours_topk": sparsemax_topk_candidates, "sort": sparsemax_sort,
    }
    sparsemax_topk_candidates(z)  # warm its adaptive k too
    extra = entmax_ops(target)
    if isinstance(extra, dict):
        ops.update(extra)
    case: dict = {"M": m, "B": B, "support": label, "sigma": sigma, "k_ours": adaptive_state(m, z.device).propose(m)}
    if isinstance(extra, str):
        case["entmax_error"] = extra
    p_sort, dz_sort = forward_backward(sparsemax_sort, z, grad)
    sizes_sort = (p_sort > 0).sum(-1)
    case["support_mean"] = float(sizes_sort.float().mean())
    case["support_max"] = int(sizes_sort.max())
    ref64 = sparsemax_sort(z[:256].double())
    for name, op in ops.items():
        n = reps if name in ("ours", "ours_topk", "entmax_k") else slow_reps
        with torch.no_grad():
            fwd = best_time(lambda op=op: op(z), n)
        fwdbwd = best_time(lambda op=op: forward_backward(op, z, grad), n)
        p, dz = forward_backward(op, z, grad)
        case[name] = {
            "forward_s": fwd,
            "forward_backward_s": fwdbwd,
            "max_abs_err_vs_sort": float((p - p_sort).abs().max()),
            "max_abs_err_vs_float64": float((p[:256].double() - ref64).abs().max()),
            "max_abs_grad_err_vs_sort": float((dz - dz_sort).abs().max()),
            "rows_support_size_differs": int(((p > 0).sum(-1) != sizes_sort).sum()),
        }
        del p, dz
    for name in ops:
        if name != "ours":
            case[name]["speedup_ours_forward"] = case[name]["forward_s"] / case["ours"]["forward_s"]
            case[name]["speedup_ours_forward_backward"] = (
                case[name]["forward_backward_s"] / case["ours"]["forward_backward_s"]
            )
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 3,072 only, one rep (smoke run)")
    parser.add_argument("--reps", type=int, default=3, help="reps for the fast ops (best of)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    sizes = SIZES[:1] if args.quick else SIZES
    reps = 1 if args.quick else args.reps
    cases = [(m, label, target) for m in sizes for label, target in SUPPORTS.items()]
    results = []
    for m, label, target in tqdm(cases, desc="sparsemax bench", unit="case"):
        results.append(run_case(m, label, target, reps=reps, slow_reps=1))
        tqdm.write(summary_line(results[-1]))
    payload = {
        "bench": "sparsemax",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "dtype": "float32",
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown_table(results))
    print(f"wrote {args.out}")
    return 0


def summary_line(case: dict) -> str:
    ours = case["ours"]
    return (
        f"M={case['M']} {case['support']} (mean support {case['support_mean']:.0f}): ours fwd "
        f"{ours['forward_s']:.3f}s fwd+bwd {ours['forward_backward_s']:.3f}s; sort x{case['sort']['speedup_ours_forward']:.1f}"
        f" / x{case['sort']['speedup_ours_forward_backward']:.1f}"
    )


def markdown_table(results: list[dict]) -> str:
    """README table: times of ours and speedups over each baseline, plus errors."""
    baselines = [name for name in ("ours_topk", "sort", "entmax", "entmax_k") if name in results[0]]
    head = ["M", "support (mean/max)", "ours fwd s", "ours fwd+bwd s"]
    head += [f"vs {b} fwd / fwd+bwd" for b in baselines]
    head += ["max err vs sort (p / ∇)", "max err vs fp64", "support rows differ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results:
        o = c["ours"]
        row = [
            f"{c['M']:,}",
            f"{c['support']} ({c['support_mean']:.0f}/{c['support_max']})",
            f"{o['forward_s']:.3f}",
            f"{o['forward_backward_s']:.3f}",
        ]
        row += [f"{c[b]['speedup_ours_forward']:.1f}× / {c[b]['speedup_ours_forward_backward']:.1f}×" for b in baselines]
        row += [
            f"{o['max_abs_err_vs_sort']:.1e} / {o['max_abs_grad_err_vs_sort']:.1e}",
            f"{o['max_abs_err_vs_float64']:.1e}",
            str(o["rows_support_size_differs"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
