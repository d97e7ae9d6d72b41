"""match_l0: which runs train first, which are steered, and to what target (hand-written expectations)."""

from __future__ import annotations

import pytest

from store.errors import UserError
from trainer.config import TrainConfig
from trainer.matching import reference_l0, split_phases, with_targets


def run(name: str, **sae) -> tuple[dict, TrainConfig]:
    cfg = TrainConfig(dataset="unused", runs_root="unused", name=name, sae=sae, tokens=64)
    return {}, cfg


RUNS = [run("sm0", variant="sparsemax", m=64, seed=0), run("sm1", variant="sparsemax", m=64, seed=1),
        run("sm-big", variant="sparsemax", m=128), run("mlp", variant="mlp_sparsemax", m=64),
        run("relu", variant="relu", m=64), run("topk", variant="topk", m=64),
        run("gated-fixed", variant="gated", m=64, target_l0=10.0), run("relu-big", variant="relu", m=128)]


def test_phases_targets_and_errors():
    first, matched = split_phases(RUNS, "sparsemax")
    assert [c.name for _, c in first] == ["sm0", "sm1", "sm-big", "mlp", "gated-fixed"]
    assert [c.name for _, c in matched] == ["relu", "topk", "relu-big"]
    targets = reference_l0(first, "sparsemax", {"sm0": 30.0, "sm1": 34.0, "sm-big": 50.2, "mlp": 3.0})
    assert targets == {64: 32.0, 128: 50.2}
    steered = {c.name: c.sae for _, c in with_targets(matched, targets, "sparsemax")}
    assert steered["relu"]["target_l0"] == 32.0 and steered["relu-big"]["target_l0"] == 50.2
    assert steered["topk"]["target_l0"] == 32.0
    with pytest.raises(UserError, match="reference run sm1 has no held-out l0"):
        reference_l0(first, "sparsemax", {"sm0": 30.0, "sm1": None, "sm-big": 50.2})
    with pytest.raises(UserError, match="sm1 has no held-out l0 .its training or evaluation failed: disk full"):
        reference_l0(first, "sparsemax", {"sm0": 30.0, "sm1": None, "sm-big": 50.2}, {"sm1": "disk full"})
    with pytest.raises(UserError, match="no run of the sweep is of variant 'topk'"):
        split_phases([r for r in RUNS if r[1].name != "topk"], "topk")
    with pytest.raises(UserError, match="M = 128 but no sparsemax run has that M"):
        with_targets(matched, {64: 32.0}, "sparsemax")


def test_matched_sweep_end_to_end(ray_local, tiny_store, tmp_path):
    """Phase 1 trains and evaluates the Sparsemax SAE (two seeds); relu and topk then train with
    sae.target_l0 = its mean held-out L0, from the same feeder (each batch read once); a re-run of the
    sweep resumes every run directory (the targets come out the same)."""
    import json
    from pathlib import Path

    from trainer_testkit import base_config

    from evaluator.task import evaluate_run_task
    from evaluator.training import TrainingEvaluation
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    base = base_config(tiny_store, str(tmp_path), tokens=64 * 12, sae={"m": 32})
    base.pop("name")
    sweep = SweepConfig.model_validate({
        "name": "mt", "base": base, "match_l0": "sparsemax",
        "grid": [{"sae.variant": ["sparsemax"], "sae.seed": [0, 1]}, {"sae.variant": ["relu", "topk"]}],
        "ray": {"num_cpus_per_trainer": 0.5, "feeder_window": 64}})
    summary = run_sweep(sweep, progress=False, evaluator=evaluate_run_task, evaluation=TrainingEvaluation())
    rows = {r["name"]: r for r in summary["runs"]}
    reference = (rows["variant-sparsemax_seed-0"]["eval_l0"] + rows["variant-sparsemax_seed-1"]["eval_l0"]) / 2
    for name in ("variant-relu", "variant-topk"):
        sae = json.loads((Path(tmp_path) / "mt" / name / "config.json").read_text())["sae"]
        assert sae["target_l0"] == round(reference, 3) == rows[name]["target_l0"]
        assert rows[name]["status"] == "finished" and rows[name]["eval_l0"] > 0
    topk = json.loads((Path(tmp_path) / "mt" / "variant-topk" / "config.json").read_text())["sae"]
    assert topk["k"] == max(1, round(reference))
    assert rows["variant-sparsemax_seed-0"]["target_l0"] is None
    (reads,) = summary["feeder_reads"].values()
    assert reads["reads"] == reads["unique"] == 12  # both phases from one read of each batch
    again = run_sweep(sweep, progress=False, evaluator=evaluate_run_task, evaluation=TrainingEvaluation())
    assert [r["target_l0"] for r in again["runs"]] == [r["target_l0"] for r in summary["runs"]]
