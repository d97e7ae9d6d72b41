"""The `make demo` pipeline at a tiny size, through the same code path (`dynsae demo`).

Same config file as the demo (dynsae/configs/demo.yaml) — python_docs labelled by module family, all its variants
from one feeder on Ray, an evaluation task per run, the report — with only the sizes and the model swapped for a tiny
GPT-2 built in the test: 160 steps of 64 rows per run. Every variant trains at M = 64; the reference (sparsemax)
and one steered baseline (topk) also at M = 256, so the sweep still spans two dictionary sizes (the report's
size columns, fvu vs M, matching at each M) with 11 runs instead of 18.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tiny_models import build_tiny_gpt2

from dynsae.demo import DEFAULT_CONFIG
from dynsae.demo import main as demo_main

#: the demo's own grid (every variant of its matched-sparsity sweep)
VARIANTS: list[str] = yaml.safe_load(DEFAULT_CONFIG.read_text())["sweep"]["grid"]["sae.variant"]
#: the variants also trained at the second dictionary size: the matching reference and one steered baseline
AT_BOTH_SIZES: list[str] = ["sparsemax", "topk"]
#: every (variant, M) of the test's grid
GRID: list[tuple[str, int]] = [(v, 64) for v in VARIANTS] + [(v, 256) for v in AT_BOTH_SIZES]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("demo")
    model = build_tiny_gpt2(root / "tiny_gpt2")
    overrides = {
        "harvest.output": str(root / "data"),
        "harvest.model.name": str(model),
        "harvest.hook.layer": 1,
        "harvest.context_length": 32,
        "harvest.max_tokens": 4096,
        "harvest.batch_size": 16,
        "harvest.chunk_rows": 256,
        "harvest.shard_rows": 1024,
        "sweep.base.runs_root": str(root / "runs"),
        "sweep.base.batch_size": 64,
        "sweep.base.tokens": 64 * 160,
        "sweep.base.checkpoint_every": 80,
        "sweep.base.log_every": 20,
        "sweep.base.sae.m": 64,
        "sweep.eval_max_tokens": 1024,
        "sweep.evaluator_options.ce_contexts": 4,
        "sweep.ray.feeder_window": 192,  # as in the demo: the window holds every batch of the run
        # the synthetic ground-truth phase, tiny: 2 families x 2 seeds at matched L0
        "synth.output": str(root / "data"),
        "synth.d": 16,
        "synth.features": 32,
        "synth.rows": 2048,
        "synth.complex_l0": "[4, 8]",
        "synth.chunk_rows": 256,
        "synth.shard_rows": 1024,
        "synth_sweep.base.runs_root": str(root / "runs"),
        "synth_sweep.base.batch_size": 64,
        "synth_sweep.base.tokens": 64 * 80,
        "synth_sweep.base.checkpoint_every": 40,
        "synth_sweep.base.log_every": 20,
        "synth_sweep.base.sae.m": 32,
        "synth_sweep.eval_max_tokens": 512,
        "synth_sweep.ray.feeder_window": 96,
        "synth_sweep.grid": "{sae.variant: [sparsemax, topk], sae.seed: [0, 1]}",
    }
    argv = [str(DEFAULT_CONFIG), "--no-progress"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    variants = ", ".join(VARIANTS)
    both = ", ".join(AT_BOTH_SIZES)
    argv += ["--set", f"sweep.grid=[{{sae.variant: [{variants}], sae.m: [64]}}, {{sae.variant: [{both}], sae.m: [256]}}]"]
    assert demo_main(argv) == 0
    return root


def test_every_run_trained_and_evaluated(demo_out):
    from store import open_dataset

    summary = json.loads((demo_out / "runs" / "demo" / "summary.json").read_text())
    runs = summary["runs"]
    assert sorted((r["sae.variant"], r["sae.m"]) for r in runs) == sorted(GRID)
    assert all(r["status"] == "finished" for r in runs)
    # matched sparsity at each dictionary size: the steered runs aim at the sparsemax SAE's held-out L0 at their M
    reference = {r["sae.m"]: r["eval_l0"] for r in runs if r["sae.variant"] == "sparsemax"}
    for r in runs:
        if r["sae.variant"] == "topk":
            assert r["target_l0"] == pytest.approx(reference[r["sae.m"]], abs=1e-3)  # stored to 3 decimals
    assert reference[64] != reference[256]
    # one feeder served all the trainers: every batch index was read from the store once
    (reads,) = summary["feeder_reads"].values()
    ds = open_dataset(json.loads((demo_out / "runs" / "demo" / runs[0]["name"] / "config.json").read_text())["dataset"])
    assert ds.manifest.class_names[0] == "language" and ds.manifest.documents  # labelled by module family
    assert reads["reads"] == reads["unique"] == 160 and reads["max_reads_per_batch"] == 1
    for r in runs:
        ev = json.loads((demo_out / "runs" / "demo" / r["name"] / "eval.json").read_text())
        assert math.isfinite(ev["fvu"]) and ev["fvu"] >= 0
        assert math.isfinite(ev["ce_degradation"]), (r["name"], ev.get("ce_skipped"))
        assert ev["filter"]["exclude_positions"] == [0]
        assert 0 <= ev["dead_frac"] <= 1
        assert ev["l0"] > 0
        # the labelled python_docs corpus: every eval pass probes (the demo's ~90 held-out documents), or
        # at this test's size (a few documents: the tiny tokenizer cuts Python's docs into many tokens)
        # says why it could not
        if ev["probe_skipped"] is None:
            assert all(0 <= ev[k] <= 1 for k in ("probe_top1", "probe_top50", "probe_raw_top1", "probe_raw_all"))
        else:
            assert "fewer than two classes with two documents each" in ev["probe_skipped"]


def test_report_has_every_section(demo_out):
    report = (demo_out / "runs" / "demo" / "report.md").read_text()
    assert "## About this run" in report
    assert f"{64 * 160:,} tokens" in report  # the report says how small the budget is
    table = report.split("| variant | M = 64 | M = 256 |", 1)[1].split("\n\n", 1)[0]
    for variant in VARIANTS:
        assert f"| {variant} |" in table
    for variant in AT_BOTH_SIZES:  # a value in both size columns
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {variant} |")]
        assert all(cell.strip() for cell in row.strip("|").split("|")), row
    assert "## Concept quality" in report
    for picture in ("fvu_vs_m.png", "l0_fvu.png", "support_variant-sparsemax_m-64.png"):
        assert f"]({picture})" in report
        assert (demo_out / "runs" / "demo" / picture).stat().st_size > 1000
    assert "suggested K" in report


def test_synthetic_phase_scores_every_run_against_the_truth(demo_out):
    """The demo's synthetic phase: every run has the ground-truth metrics in eval.json and the summary,
    the TopK runs are matched to the Sparsemax SAE's held-out L0, CE is skipped with a reason."""
    summary = json.loads((demo_out / "runs" / "demo-synth" / "summary.json").read_text())
    runs = summary["runs"]
    assert sorted((r["sae.variant"], r["sae.seed"]) for r in runs) == [("sparsemax", 0), ("sparsemax", 1),
                                                                      ("topk", 0), ("topk", 1)]
    assert all(r["status"] == "finished" for r in runs)
    l0 = [r["eval_l0"] for r in runs if r["sae.variant"] == "sparsemax"]
    for r in runs:
        assert 0 < r["eval_gt_mcc"] <= 1 and 0 <= r["eval_gt_recovered"] <= 1 and 0 <= r["eval_gt_f1"] <= 1
        assert "synthetic dataset" in r["eval_ce_skipped"]
        if r["sae.variant"] == "topk":
            assert r["target_l0"] == pytest.approx(sum(l0) / 2, abs=1e-3)  # stored to 3 decimals
    report = (demo_out / "runs" / "demo-synth" / "report.md").read_text()
    assert "## About this run" in report and "known unit features" in report
