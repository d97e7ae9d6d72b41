"""SAE train-step benchmark: one step (forward + backward + Adam + post_step) of every
variant of the zoo at d = 768, M ∈ {3072, 24576}, B = 1024, CPU fp32, 2 threads.

Baselines timed in the same process:
* ``topk`` (K = 32) of the zoo at the same M — goal: sparsemax step ≤ 1.5× topk step;
* ``authors`` — the authors' formulation of the Sparsemax SAE, written here as a plain reference:
  C W_K and C W_V formed every step, dense scores, full-sort sparsemax (:func:`sparsemax_sort`),
  dense decoder, same loss — goal: the zoo's sparsemax step ≥ 3× faster.

The steered baselines (relu, gated, jumprelu, attn_relu) run with ``target_l0`` = K; relu, gated and
jumprelu are put at that L0 before timing and held there (:func:`settle_at_l0`, :func:`zoo_step`), so every variant is timed at L0 ≈ 32 (the L0 of
each variant's last step is recorded).

Inputs are a fixed Gaussian batch with a shared mean direction (so norms and cosines vary like
residual-stream activations). Steps are timed **interleaved**: each round runs one step of every
variant and of the authors' formulation in turn (sparsemax, topk and authors first, back to back),
``--reps`` rounds after a warm-up round. Times are medians over rounds; ratios are medians of the
per-round ratios (paired) — on a shared virtual machine whose speed drifts by ±20 % over minutes, a
slow spell then hits both sides of a ratio alike.
Writes ``bench/results/sae.json``; ``--quick`` runs a small configuration for smoke checks.

    .venv/bin/python bench/sae_bench.py [--reps 11] [--sizes 3072 24576] [--out bench/results/sae.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import trainer.sae as sae_zoo
from trainer.sparsemax import sparsemax_sort

D, BATCH, K = 768, 1024, 32
#: Variants whose penalty is steered to a target L0 (trainer.sae.steering); timed at target_l0 = K.
STEERED = ("relu", "gated", "jumprelu", "attn_relu")
#: Steered variants that :func:`settle_at_l0` puts at their target (and :func:`zoo_step` holds there).
SETTLED = ("relu", "gated", "jumprelu")


class AuthorsSparsemaxSAE(nn.Module):
    """The authors' formulation (reference): x̂ = ‖x‖ · (z ⊙ 1_S) (C W_V), z = x_n (C W_K)ᵀ, forming both
    products every step, a dense (B, M) code matrix and a full sort for sparsemax."""

    def __init__(self, m: int, d: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        c = torch.randn(m, d, generator=gen)
        self.C = nn.Parameter(c / c.norm(dim=-1, keepdim=True))
        self.W_K = nn.Parameter(torch.eye(d))
        self.W_V = nn.Parameter(torch.eye(d))

    def forward(self, x: Tensor) -> Tensor:
        """The authors' loss mean_{t,i}(x̂ − x)²/‖x_t‖."""
        norms = x.norm(dim=-1, keepdim=True)
        z = (x / norms) @ (self.C @ self.W_K).T  # z = x_n (C W_K)ᵀ
        support = sparsemax_sort(z) > 0
        a = z * support  # a = z ⊙ 1_S
        x_hat = norms * (a @ (self.C @ self.W_V))  # x̂ = ‖x‖ a (C W_V)
        return ((x_hat - x).pow(2) / norms).mean()


def make_batch(b: int, d: int, seed: int = 0) -> Tensor:
    """Gaussian activations with a shared mean direction and varying norms."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=gen)
    scale = 0.5 + torch.rand(b, 1, generator=gen) * 1.5
    return scale * (torch.randn(b, d, generator=gen) + 0.5 * mean)


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int, bar: tqdm) -> dict[str, list[float]]:
    """Seconds per step of each closure in each of ``reps`` rounds, after one warm-up round; every round
    runs each closure once in turn, so a slow spell of the (shared, virtual) machine hits neighbours
    alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(reps + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)
            bar.update(1)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round time ratio (a paired comparison: both steps ran back to back)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def zoo_step(sae: sae_zoo.SAE, x: Tensor) -> tuple[Callable[[], None], dict]:
    """A train step closure for a zoo SAE and a dict that records the last step's mean support size.

    A settled variant (:data:`SETTLED`) is held where :func:`settle_at_l0` put it: its Adam runs with
    lr = 0 — the same arithmetic, no move. On the bench's one fixed batch, with a cold Adam whose first
    steps move every weight by ±lr, its L0 would otherwise leave the target within a few steps (relu:
    32 → ~1,800), where a real run's controller holds it."""
    lr = 0.0 if sae.variant in SETTLED and getattr(sae.config, "target_l0", None) else 3e-4
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.99))
    info: dict = {}

    def step() -> None:
        _, codes, losses = sae(x)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        sae.post_step()
        info["l0"] = float(codes.support_sizes().float().mean())

    return step, info


def authors_step(model: AuthorsSparsemaxSAE, x: Tensor) -> Callable[[], None]:
    """A train step closure for the reference formulation."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.99))

    def step() -> None:
        loss = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_config(variant: str, d: int, m: int) -> dict:
    """The variant's SAE config at (d, m), with K where the variant has one, or target_l0 = K where it is
    steered (a step's cost depends on its L0: these are timed at the L0 of the TopK they are compared to)."""
    fields = sae_zoo.variant_class(variant).config_class.model_fields
    extra = {"k": K} if "k" in fields else {"target_l0": float(K)} if variant in STEERED else {}
    return {"variant": variant, "d": d, "m": m, **extra}


def top_count_thresholds(pre: Tensor, l0: float) -> Tensor:
    """(M,) thresholds t_j with exactly c_j entries of column j of π (B, M) above them, c_j ∈ {⌊r⌋, ⌈r⌉},
    r = L·B/M, spread so that Σ_j c_j = round(M·r): the batch's L0 is then L (ties aside)."""
    b, m = pre.shape
    r = min(l0 * b / m, b - 1.0)
    j = torch.arange(m + 1, dtype=torch.float64)
    counts = torch.floor(j[1:] * r) - torch.floor(j[:-1] * r)  # Bresenham: ⌊r⌋ or ⌈r⌉ each, summing right
    top = torch.topk(pre, int(counts.max()) + 1, dim=0).values  # (⌈r⌉ + 1, M), descending
    return top.gather(0, counts.to(torch.int64)[None]).squeeze(0)  # the (c_j + 1)-th largest


@torch.no_grad()
def settle_at_l0(sae: sae_zoo.SAE, x: Tensor) -> sae_zoo.SAE:
    """A steered relu, gated or jumprelu SAE put in the state its controller converges to: ``target_l0``
    active latents per row of x on average. relu/gated: b_enc (gated: the gate bias) = −t_j, jumprelu:
    its first-batch init (b_dec = batch mean), then θ_j = t_j, with t from :func:`top_count_thresholds`
    over (x − b_dec) W_encᵀ (jumprelu: π). A real run reaches that L0 through its controller within a few
    hundred steps; a step's cost depends on the L0 it runs at, not on how it got there. Other variants
    are returned unchanged."""
    target = getattr(sae.config, "target_l0", None)
    if sae.variant not in SETTLED or target is None:
        return sae
    if sae.variant == "jumprelu":
        sae.train()
        sae._init_from_batch(x)
        sae.log_threshold.copy_(top_count_thresholds(sae.pre_acts(x), target).clamp_min(1e-6).log())
        return sae
    sae.b_enc.copy_(-top_count_thresholds(sae.centered(x) @ sae.W_enc.T, target))
    return sae
    h = sae.centered(x) @ sae.W_enc.T
    rows = h.shape[0]
    k = min(rows, max(1, round((1.0 - min(target / sae.config.m, 1.0)) * rows)))
    sae.b_enc.copy_(-torch.kthvalue(h, k, dim=0).values)
    return sae


def run(sizes: list[int], reps: int, d: int, batch: int) -> dict:
    """Time every variant and the authors' formulation at each M, interleaved; ratios against topk and
    authors."""
    x = make_batch(batch, d)
    results: dict = {}
    leading = ["sparsemax", "topk"]  # timed back to back, then "authors", at the head of each round
    variants = leading + [v for v in sae_zoo.variants() if v not in leading]
    bar = tqdm(total=len(sizes) * (len(variants) + 1) * (reps + 1), desc="sae train steps", unit="step")
    for m in sizes:
        bar.set_postfix_str(f"M={m}")
        steps, infos = {}, {}
        for variant in variants:
            steps[variant], infos[variant] = zoo_step(settle_at_l0(sae_zoo.build(bench_config(variant, d, m)), x), x)
            if variant == "topk":
                steps["authors"] = authors_step(AuthorsSparsemaxSAE(m, d), x)
        times = time_interleaved(steps, reps, bar)
        row: dict = {name: {"seconds": statistics.median(values)} for name, values in times.items()}
        for variant in variants:
            row[variant]["l0"] = infos[variant]["l0"]
        for name, entry in row.items():
            entry["vs_topk"] = paired_ratio(times[name], times["topk"])
        row["sparsemax"]["speedup_vs_authors"] = paired_ratio(times["authors"], times["sparsemax"])
        results[str(m)] = row
        del steps
    bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3072, 24576])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="d=64, B=128, M=256: a smoke run")
    parser.add_argument("--out", default="bench/results/sae.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, batch, sizes = (64, 128, [256]) if args.quick else (D, BATCH, args.sizes)
    results = run(sizes, args.reps, d, batch)
    goals = {
        m: {
            "sparsemax_vs_topk": row["sparsemax"]["vs_topk"],
            "sparsemax_vs_topk_goal_le_1.5": row["sparsemax"]["vs_topk"] <= 1.5,
            "speedup_vs_authors": row["sparsemax"]["speedup_vs_authors"],
            "speedup_vs_authors_goal_ge_3": row["sparsemax"]["speedup_vs_authors"] >= 3,
        }
        for m, row in results.items()
    }
    out = {
        "bench": "sae_train_step",
        "d": d, "batch": batch, "k": K, "dtype": "float32", "threads": args.threads, "reps": args.reps,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "step": "forward + backward + Adam + post_step",
        "results": results, "goals": goals,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for m, row in results.items():
        for name, entry in row.items():
            extra = f" speedup vs authors {entry['speedup_vs_authors']:.2f}x" if "speedup_vs_authors" in entry else ""
            print(f"M={m:>6} {name:<14} {entry['seconds'] * 1e3:9.1f} ms  {entry['vs_topk']:5.2f}x topk{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
