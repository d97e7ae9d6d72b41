"""Train step against the peers (issue 17): one step of sparsify's TopK, SAELens' TopK and BatchTopK and
of our topk, batchtopk, sparsemax, relu, jumprelu and gated (the last three steered to target_l0 = K and
timed at that L0: :func:`bench.sae_bench.settle_at_l0`) at d = 768,
B = 1024, K = 32, M ∈ {3072, 24576}, fp32, as each library's own trainer does a step.

What one step is, per library (bookkeeping included, logging and schedulers left out):

* **sparsify** (eai-sparsify 1.3.3, ``Trainer.fit``): ``set_decoder_norm_to_unit_norm``, the forward
  pass with the dead mask (AuxK α = 1/32, as ours), ``fvu + α·auxk`` backward,
  ``remove_gradient_parallel_to_decoder_directions``, Adam step, ``zero_grad``, the
  tokens-since-fired counters (``SPARSIFY_DISABLE_TRITON=1`` off CUDA: its eager decoder);
* **saelens** (sae-lens 6.54, ``SAETrainer._train_step``): ``training_forward_pass`` with the dead
  neuron mask, the firing bookkeeping, backward, ``clip_grad_norm_(1.0)``, Adam step, ``zero_grad``;
* **ours** (:func:`bench.sae_bench.zoo_step`): forward, backward, Adam, ``post_step``.

Steps are timed interleaved with :func:`bench.sae_bench.time_interleaved` (one step of each in turn
per round, ``--reps`` rounds after a warm-up); times are medians, ratios medians of per-round
(paired) ratios against sparsify's TopK step and against our TopK step. Goals: our topk ≤ 0.9×
sparsify topk; our batchtopk ≤ 1.25× our topk; our steered relu, jumprelu and gated at L0 ≈ K ≤ 1.5×
our topk (at M = 24,576 in issue 17; recorded at every size). Writes ``bench/results/peers.json``; ``--quick`` is a
tiny smoke run; ``--device cuda`` runs the same steps on a GPU (synchronised around each step).

    .venv/bin/python bench/peers_bench.py [--reps 7] [--sizes 3072 24576] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer.sae as sae_zoo
from bench.sae_bench import BATCH, D, K, make_batch, paired_ratio, settle_at_l0, time_interleaved, zoo_step

AUXK_ALPHA = 1 / 32
LR = 3e-4


def ours(k: int) -> dict[str, dict]:
    """Our variants in the comparison: name -> config overrides (K or a target L0 of K)."""
    return {
        "ours_topk": {"variant": "topk", "k": k},
        "ours_batchtopk": {"variant": "batchtopk", "k": k},
        "ours_sparsemax": {"variant": "sparsemax"},
        "ours_relu": {"variant": "relu", "target_l0": k},
        "ours_jumprelu": {"variant": "jumprelu", "target_l0": k},
        "ours_gated": {"variant": "gated", "target_l0": k},
    }


def sparsify_step(x: Tensor, m: int, k: int) -> Callable[[], None]:
    """One step of eai-sparsify's ``Trainer.fit`` for a TopK ``SparseCoder`` (see module docstring)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=m, k=k), device=x.device)
    opt = torch.optim.Adam(coder.parameters(), lr=LR)
    since_fired = torch.zeros(m, dtype=torch.long, device=x.device)
    dead_threshold = 10_000_000
    total_variance = (x - x.mean(0)).pow(2).sum()

    def step() -> None:
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x, dead_mask=since_fired > dead_threshold, total_variance=total_variance)
        did_fire = torch.zeros(m, dtype=torch.bool, device=x.device)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0

    return step


def saelens_step(x: Tensor, m: int, k: int, batch_topk: bool) -> Callable[[], None]:
    """One step of SAELens' ``SAETrainer._train_step`` for its TopK or BatchTopK training SAE."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    config_class, sae_class = ((BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE) if batch_topk
                               else (TopKTrainingSAEConfig, TopKTrainingSAE))
    sae = sae_class(config_class(d_in=x.shape[1], d_sae=m, k=k, device=str(x.device)))
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
    since_fired = torch.zeros(m, device=x.device)
    act_freq = torch.zeros(m, device=x.device)
    dead_window = 1000
    coefficients = {name: (c.value if hasattr(c, "value") else c) for name, c in sae.get_coefficients().items()}

    def step() -> None:
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients=coefficients, dead_neuron_mask=since_fired > dead_window,
            n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def synced(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` followed by a device synchronisation (so the timer sees the work), on CUDA."""
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)

    return run


def steps_at(x: Tensor, m: int, k: int) -> tuple[dict[str, Callable[[], None]], dict[str, dict]]:
    """The step closures at size M in round order — sparsify topk, ours topk, ours batchtopk first, back to
    back (the goals' pairs), then SAELens and our other variants — and our L0 records."""
    steps: dict[str, Callable[[], None]] = {"sparsify_topk": sparsify_step(x, m, k)}
    infos: dict[str, dict] = {}
    for name, overrides in ours(k).items():
        sae = settle_at_l0(sae_zoo.build({"d": x.shape[1], "m": m, "seed": 0, **overrides}).to(x.device), x)
        steps[name], infos[name] = zoo_step(sae, x)
        if name == "ours_batchtopk":
            steps["saelens_topk"] = saelens_step(x, m, k, batch_topk=False)
            steps["saelens_batchtopk"] = saelens_step(x, m, k, batch_topk=True)
    return {name: synced(step, x.device) for name, step in steps.items()}, infos


def run(sizes: list[int], reps: int, d: int, batch: int, k: int, device: torch.device) -> dict:
    """Median seconds per step and paired ratios vs sparsify's and our TopK step at each M."""
    x = make_batch(batch, d).to(device)
    results: dict = {}
    n_steps = 3 + len(ours(k))
    bar = tqdm(total=len(sizes) * n_steps * (reps + 1), desc="peer train steps", unit="step")
    for m in sizes:
        bar.set_postfix_str(f"M={m}")
        steps, infos = steps_at(x, m, k)
        times = time_interleaved(steps, reps, bar)
        row = {name: {"seconds": statistics.median(values),
                      "vs_sparsify_topk": paired_ratio(values, times["sparsify_topk"]),
                      "vs_ours_topk": paired_ratio(values, times["ours_topk"])}
               for name, values in times.items()}
        for name, info in infos.items():
            row[name]["l0"] = info["l0"]
        results[str(m)] = row
        del steps
    bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3072, 24576])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="d=64, B=128, M=256, K=8, 2 rounds: a smoke run")
    parser.add_argument("--out", default="bench/results/peers.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is first imported
    torch.set_num_threads(args.threads)
    d, batch, sizes, k, reps = (64, 128, [256], 8, 2) if args.quick else (D, BATCH, args.sizes, K, args.reps)
    results = run(sizes, reps, d, batch, k, device)
    goals = {
        m: {
            "topk_vs_sparsify_topk": row["ours_topk"]["vs_sparsify_topk"],
            "topk_vs_sparsify_topk_goal_le_0.9": row["ours_topk"]["vs_sparsify_topk"] <= 0.9,
            "batchtopk_vs_topk": row["ours_batchtopk"]["vs_ours_topk"],
            "batchtopk_vs_topk_goal_le_1.25": row["ours_batchtopk"]["vs_ours_topk"] <= 1.25,
            **{f"{v}_vs_topk": row[f"ours_{v}"]["vs_ours_topk"] for v in ("relu", "jumprelu", "gated")},
            "steered_vs_topk_goal_le_1.5": max(row[f"ours_{v}"]["vs_ours_topk"]
                                               for v in ("relu", "jumprelu", "gated")) <= 1.5,
        }
        for m, row in results.items()
    }
    versions = {name: _version(name) for name in ("sae-lens", "eai-sparsify")}
    out = {
        "bench": "peers_train_step",
        "d": d, "batch": batch, "k": k, "dtype": "float32", "threads": args.threads, "reps": reps,
        "device": str(device), "torch": torch.__version__, "peers": versions,
        "machine": platform.machine(), "processor": platform.processor(),
        "step": {"sparsify": "unit-norm decoder, forward (AuxK dead mask), backward, remove parallel gradient, "
                             "Adam, tokens-since-fired",
                 "saelens": "training_forward_pass (dead mask), firing bookkeeping, backward, clip_grad_norm 1.0, "
                            "Adam",
                 "ours": "forward, backward, Adam, post_step"},
        "results": results, "goals": goals,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for m, row in results.items():
        for name, entry in row.items():
            l0 = f"  L0 {entry['l0']:.0f}" if "l0" in entry else ""
            print(f"M={m:>6} {name:<18} {entry['seconds'] * 1e3:9.1f} ms  {entry['vs_sparsify_topk']:5.2f}x sparsify "
                  f"{entry['vs_ours_topk']:5.2f}x ours_topk{l0}")
    return 0


def _version(dist: str) -> str | None:
    """The installed version of ``dist`` (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
