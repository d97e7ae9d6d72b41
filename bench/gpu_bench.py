"""Prepared GPU check: every variant's train step, the sparsemax op, the peer steps and the loader → GPU
batch rate on one CUDA device, each against its CPU reference, in ≤ 5 minutes.

``python -m bench gpu`` (= ``bench/gpu_bench.py``) on a machine with a GPU; on one without, it says so
and exits 0. ``--device cpu --quick`` runs the same code on the CPU at toy sizes (the test
``tests/test_bench_gpu.py``). Checks, each timed on the device:

1. **Train steps**: every variant of the zoo (``trainer.sae.variants()``) at d = 768, M = 3,072,
   B = 1,024 (quick: d = 64, M = 256, B = 128) takes STEPS Adam steps (forward, backward, Adam,
   ``post_step``) from the same initial weights on the same batch, on the CPU in fp32 (the
   reference) and on the device in fp32 and under bf16 autocast (as ``dtype: bfloat16`` trains). Reported:
   the largest relative difference ‖w_dev − w_cpu‖ / ‖w_cpu‖ over the weight tensors and whether it
   is within the stated tolerance (fp32: FP32_RTOL = 1e-4, summation order only; bf16: BF16_RTOL =
   0.1 — bf16 keeps 8 bits of mantissa, a near-tied latent may be selected differently, and a bias
   that starts at zero is small against its own change: b_dec of TopK moves 4 % under bf16 on the
   CPU at the quick sizes. A wrong step — a missing term, a sign, NaN — is off by ~1).
2. **Sparsemax op** (``trainer.sparsemax.sparsemax``) on the device against the sort formula
   (``sparsemax_sort``) on the same device, B = 4,096 × M = 24,576 (quick: 256 × 512), σ set for a
   support of ~30: max |Δp| and |Δ∇z| (goal: ≤ SPARSEMAX_ATOL) and the forward time of each.
3. **Peer steps** (``bench/peers_bench.py``'s ``run`` on the device: sparsify and SAELens TopK /
   BatchTopK against ours), one size (M = 24,576; quick: 256), 3 rounds.
4. **Loader → device**: a float16 dataset streamed by ``ActivationLoader`` with each batch copied to
   the device and cast there (``Batch.acts_on``), against the loader alone (rows/s and GB/s).

Writes ``bench/results/gpu.json`` (``--out``) and prints a one-screen summary; the exit status is 1
when a correctness check fails (so a lent GPU shows at once whether the GPU path is right).

A lent machine gives minutes, once: so each check runs on its own (``--only`` picks some), a check that
cannot run (a peer library missing or broken there, an out-of-memory) is recorded with its error and the
others still run (exit status 1, its summary line says why), and the JSON is rewritten after every check
(``"complete": false`` until the last has run), so a run cut short by its time limit keeps what it measured.
``--record-distributions FILE`` also writes the installed distributions this process imported (name →
version), which ``bench/device_kit.py`` uses to carry exactly what the lent machine's image lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer.sae as sae_zoo  # noqa: E402
from bench.sae_bench import make_batch, zoo_step  # noqa: E402
from trainer.sparsemax import sparsemax, sparsemax_sort  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
STEPS = 3
FP32_RTOL, BF16_RTOL, SPARSEMAX_ATOL = 1e-4, 1e-1, 1e-5


def sizes(quick: bool) -> dict[str, int]:
    """Problem sizes of a full run (one H100/H200, ≤ 5 minutes) or a quick one (CPU test)."""
    if quick:
        return {"d": 64, "m": 256, "batch": 128, "sm_rows": 256, "sm_m": 512, "peer_m": 256, "peer_d": 64,
                "peer_batch": 128, "peer_k": 8, "peer_reps": 1, "loader_rows": 65536, "loader_d": 64}
    return {"d": 768, "m": 3072, "batch": 1024, "sm_rows": 4096, "sm_m": 24576, "peer_m": 24576, "peer_d": 768,
            "peer_batch": 1024, "peer_k": 32, "peer_reps": 3, "loader_rows": 1 << 20, "loader_d": 768}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds) with the device's queue drained before the clock stops."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def trained_weights(variant: str, s: dict[str, int], device: torch.device, autocast: torch.dtype | None
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """The parameters after STEPS train steps on ``device`` (CPU copies) and the median step time."""
    torch.manual_seed(0)
    sae = sae_zoo.build({"variant": variant, "d": s["d"], "m": s["m"], "seed": 0}).to(device)
    step, _ = zoo_step(sae, make_batch(s["batch"], s["d"]).to(device))  # forward, backward, Adam, post_step
    times = []
    for _ in range(STEPS):
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext():
            times.append(timed(step, device)[1])
    # parameters only: buffers such as tokens-since-fired counters legitimately differ when a near-tied
    # latent is selected differently under bf16
    return {k: v.detach().float().cpu() for k, v in sae.named_parameters()}, statistics.median(times)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst floating-point tensor's ‖a − b‖ / ‖a‖ (Frobenius; an all-zero reference counts ‖a − b‖)
    and its name. Per-tensor norms, not elementwise maxima: under bf16 a few near-tied latents may be
    selected differently, moving their rows by ~lr, which must not read as a wrong step."""
    worst, name = 0.0, ""
    for key, ref in a.items():
        if not ref.is_floating_point() or ref.numel() == 0:
            continue
        scale = float(ref.norm())
        diff = float((ref - b[key]).norm())
        rel = diff / scale if scale > 0 else diff
        if rel >= worst:
            worst, name = rel, key
    return worst, name


def check_train_steps(s: dict[str, int], device: torch.device) -> dict[str, Any]:
    """Every variant: CPU fp32 reference vs the device in fp32 and bf16 autocast."""
    out = {}
    for variant in sae_zoo.variants():
        ref, cpu_s = trained_weights(variant, s, torch.device("cpu"), None)
        row: dict[str, Any] = {"cpu_fp32_step_s": cpu_s}
        for name, autocast, rtol in (("fp32", None, FP32_RTOL), ("bf16", torch.bfloat16, BF16_RTOL)):
            got, step_s = trained_weights(variant, s, device, autocast)
            diff, worst = relative_difference(ref, got)
            row[name] = {"step_s": step_s, "max_rel_diff": diff, "worst_tensor": worst, "rtol": rtol, "ok": diff <= rtol}
        out[variant] = row
    return out


def check_sparsemax(s: dict[str, int], device: torch.device) -> dict[str, Any]:
    """The op against the sort formula on the same device: p, ∇z for a random upstream gradient, time."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(s["sm_rows"], s["sm_m"], generator=gen) * 4.0).to(device)  # σ = 4: support ≈ 30
    up = torch.randn(s["sm_rows"], s["sm_m"], generator=gen).to(device)
    result = {}
    for name, op in (("ours", sparsemax), ("sort", sparsemax_sort)):
        zz = z.clone().requires_grad_(True)
        p, fwd_s = timed(lambda op=op, zz=zz: op(zz, dim=-1), device)
        (p * up).sum().backward()
        result[name] = (p.detach(), zz.grad, fwd_s)
    p_err = float((result["ours"][0] - result["sort"][0]).abs().max())
    g_err = float((result["ours"][1] - result["sort"][1]).abs().max())
    support = (result["ours"][0] > 0).sum(-1).float()
    return {"rows": s["sm_rows"], "m": s["sm_m"], "mean_support": float(support.mean()),
            "max_abs_diff_p": p_err, "max_abs_diff_grad": g_err, "atol": SPARSEMAX_ATOL,
            "ok": max(p_err, g_err) <= SPARSEMAX_ATOL, "ours_fwd_s": result["ours"][2],
            "sort_fwd_s": result["sort"][2], "speedup_fwd": result["sort"][2] / max(result["ours"][2], 1e-12)}


def check_peers(s: dict[str, int], device: torch.device) -> dict[str, Any]:
    """The peer step comparison (``bench/peers_bench.py``) on the device at one size."""
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is first imported
    from bench.peers_bench import run

    row = run([s["peer_m"]], s["peer_reps"], s["peer_d"], s["peer_batch"], s["peer_k"], device)[str(s["peer_m"])]
    return {"m": s["peer_m"], "d": s["peer_d"], "batch": s["peer_batch"], "k": s["peer_k"], "reps": s["peer_reps"],
            "steps": row}


def write_loader_dataset(url: str, rows: int, d: int) -> None:
    """A float16 dataset (the harvester's default dtype) of ``rows`` Gaussian rows."""
    from store import DatasetManifest, DatasetWriter

    shard_rows = min(rows, 65536)
    manifest = DatasetManifest(d=d, dtype="float16", shard_rows=shard_rows, chunk_rows=min(4096, shard_rows),
                               context_length=128, model={"name": "bench"}, hook={"layer": 0, "site": "resid_post"},
                               source={"name": "gaussian"}, split={"fraction": 0.0, "seed": 0})
    writer = DatasetWriter.create(url, manifest, overwrite=True)
    data = np.random.default_rng(0).standard_normal((shard_rows, d), dtype=np.float32).astype(np.float16)
    for shard in range(rows // shard_rows):
        writer.write_shard(shard, data)
    writer.seal()


def check_loader(s: dict[str, int], device: torch.device, epochs: int = 2) -> dict[str, Any]:
    """Rows/s of the loader alone and of the loader with each batch moved to the device and cast there
    (float32), over ``epochs`` epochs after one warm-up epoch of each (same loader settings). The scatter
    kernel is loaded first, as a long-lived loader has it: a lent machine has no numba disk cache yet, and
    its compilation in the background (~11 s of a core) would otherwise land inside the loader's timing."""
    from store import ActivationLoader
    from store.scatter import kernel_ready

    kernel_ready(None)
    with tempfile.TemporaryDirectory(prefix="gpubench", dir="/tmp") as tmp:
        url = os.path.join(tmp, "ds")
        write_loader_dataset(url, s["loader_rows"], s["loader_d"])

        def stream(to_device: bool) -> float:
            loader = ActivationLoader(url, batch_size=4096, split="all", seed=0, epochs=epochs + 1)
            per_epoch, rows, t0 = loader.rows_per_epoch, 0, 0.0
            for batch in loader:
                if to_device:
                    batch.acts_on(device)
                rows += batch.rows
                if rows == per_epoch:  # warm-up epoch done
                    synchronize(device)
                    t0 = time.perf_counter()
            synchronize(device)
            loader.close()
            return epochs * per_epoch / (time.perf_counter() - t0)

        alone, to_dev = stream(False), stream(True)
    row_bytes = s["loader_d"] * 2
    return {"rows": s["loader_rows"], "d": s["loader_d"], "stored_dtype": "float16", "batch_size": 4096,
            "loader_rows_s": alone, "loader_GB_s": alone * row_bytes / 1e9, "to_device_rows_s": to_dev,
            "to_device_GB_s": to_dev * row_bytes / 1e9, "ratio_to_device_over_loader": to_dev / alone}


CHECKS: dict[str, Callable[[dict[str, int], torch.device], dict[str, Any]]] = {
    "train_steps": check_train_steps, "sparsemax": check_sparsemax, "peers": check_peers, "loader": check_loader}


def run_check(name: str, s: dict[str, int], device: torch.device) -> dict[str, Any]:
    """One check's result, or ``{"error": ...}`` when it could not run (the other checks still run)."""
    print(f"== {name}", flush=True)
    try:
        return CHECKS[name](s, device)
    except Exception as err:  # noqa: BLE001 - recorded in the JSON and the summary; the next check runs
        error = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        print(f"   {name} could not run: {error}", flush=True)
        return {"error": error}


def checks_ok(result: dict[str, Any]) -> bool:
    """Every check that ran gave no error, and the correctness checks are within their tolerances."""
    ran = [result[name] for name in CHECKS if name in result]
    if any("error" in r for r in ran):
        return False
    steps = result.get("train_steps", {})
    return result.get("sparsemax", {}).get("ok", True) and all(
        row["fp32"]["ok"] and row["bf16"]["ok"] for row in steps.values())


def summary(result: dict[str, Any]) -> list[str]:
    """One screen: a line per variant, the sparsemax check, the peer ratios, the loader rates (the checks
    that ran; one line for each check that could not)."""
    lines = [f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{'quick' if result['quick'] else 'full'} sizes, {result['seconds']:.0f} s"]
    for name in CHECKS:
        if "error" in result.get(name, {}):
            lines.append(f"{name}: could not run: {result[name]['error']}")
    steps = {k: v for k, v in result.get("train_steps", {}).items() if k != "error"}
    if steps:
        lines.append(f"{'variant':<16} {'cpu fp32 ms':>11} {'dev fp32 ms':>11} {'rel diff':>9} "
                     f"{'dev bf16 ms':>11} {'rel diff':>9}  ok")
    for variant, row in steps.items():
        ok = "yes" if row["fp32"]["ok"] and row["bf16"]["ok"] else "NO"
        lines.append(f"{variant:<16} {row['cpu_fp32_step_s'] * 1e3:11.1f} {row['fp32']['step_s'] * 1e3:11.1f} "
                     f"{row['fp32']['max_rel_diff']:9.1e} {row['bf16']['step_s'] * 1e3:11.1f} "
                     f"{row['bf16']['max_rel_diff']:9.1e}  {ok}")
    sm = result.get("sparsemax", {})
    if "ok" in sm:
        lines.append(f"sparsemax {sm['rows']}x{sm['m']} (support {sm['mean_support']:.0f}): "
                     f"|dp| {sm['max_abs_diff_p']:.1e}, |dgrad| {sm['max_abs_diff_grad']:.1e} "
                     f"({'ok' if sm['ok'] else 'NOT within ' + str(sm['atol'])}); "
                     f"fwd {sm['ours_fwd_s'] * 1e3:.1f} ms vs sort {sm['sort_fwd_s'] * 1e3:.1f} ms")
    if "steps" in result.get("peers", {}):
        lines.append(f"peers M={result['peers']['m']}: " + ", ".join(
            f"{name} {entry['seconds'] * 1e3:.1f} ms ({entry['vs_sparsify_topk']:.2f}x sparsify)"
            for name, entry in result["peers"]["steps"].items()
            if name in ("sparsify_topk", "ours_topk", "ours_batchtopk", "saelens_topk")))
    ld = result.get("loader", {})
    if "loader_rows_s" in ld:
        lines.append(f"loader float16 d={ld['d']}: alone {ld['loader_rows_s']:,.0f} rows/s ({ld['loader_GB_s']:.2f} GB/s), "
                     f"to {result['device']} {ld['to_device_rows_s']:,.0f} rows/s ({ld['ratio_to_device_over_loader']:.2f}x)")
    lines.append("all correctness checks passed" if result["ok"] else "SOME CHECKS FAILED (see above)")
    return lines


def imported_distributions() -> dict[str, str]:
    """Installed distributions (name → version) that provide a module this process has imported."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    names = {dist for module in list(sys.modules) for dist in owners.get(module.partition(".")[0], [])}
    return {name: metadata.version(name) for name in sorted(names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to check (cuda, cuda:1, or cpu)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (the CPU test runs this)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="the checks to run")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--record-distributions", metavar="FILE",
                        help="also write the distributions this run imported (JSON; bench/device_kit.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU on this machine (torch.cuda.is_available() is False): nothing to check; "
              "run with --device cpu --quick for the same code path on the CPU.")
        return 0
    t0 = time.perf_counter()
    s = sizes(args.quick)
    result: dict[str, Any] = {
        "bench": "gpu", "device": str(device), "quick": args.quick, "sizes": s, "steps": STEPS,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "checks": args.only, "check_seconds": {},
        "complete": False}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in [c for c in CHECKS if c in args.only]:  # in a fixed order: the correctness checks first
        started = time.perf_counter()
        result[name] = run_check(name, s, device)
        result["check_seconds"][name] = time.perf_counter() - started
        result["ok"], result["seconds"] = checks_ok(result), time.perf_counter() - t0
        result["complete"] = all(c in result for c in args.only)
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every check: a run cut short keeps it
    if args.record_distributions:
        Path(args.record_distributions).write_text(json.dumps(imported_distributions(), indent=2) + "\n")
    print("\n".join(summary(result)))
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
