"""Ray sweeps on the real local Ray instance: artifacts and summary, one read per batch, a trainer
process that really dies and resumes to the uninterrupted result, validation before any actor."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testkit import base_config, make_store

from store.errors import UserError, run_cli
from trainer.__main__ import main
from trainer.config import SweepConfig, TrainConfig
from trainer.run import train
from trainer.sweep import Feeder, run_sweep

VARIANTS = ["relu", "topk", "sparsemax"]
STEPS = 16


def sweep_dict(store: str, runs_root: str, **base_over) -> dict:
    base = base_config(store, runs_root, tokens=64 * STEPS, **base_over)
    base.pop("name")
    base["sae"]["k"] = 4
    return {"name": "sw", "base": base, "grid": {"sae.variant": VARIANTS},
            "ray": {"num_cpus_per_trainer": 0.5, "max_restarts": 2, "feeder_window": 64}}


def test_three_variant_sweep_with_crashes(ray_local, tiny_store, tmp_path):
    """Every trainer process dies once at step 7 (after the step-5 checkpoint); Ray restarts it and it
    resumes. Each run ends equal to an uninterrupted run; the feeder read each batch once (the crashed
    trainers' re-requests are served from its window); every artifact and the summary are written."""
    sweep = SweepConfig.model_validate(sweep_dict(tiny_store, str(tmp_path), fail_at_step=7))
    summary = run_sweep(sweep, progress=False)

    reads = next(iter(summary["feeder_reads"].values()))
    assert reads["reads"] == STEPS and reads["rereads"] == 0 and reads["max_reads_per_batch"] == 1
    assert reads["requests"] >= 3 * STEPS  # three trainers, plus re-requests after the crashes
    rows = {r["name"]: r for r in summary["runs"]}
    assert sorted(rows) == sorted(f"variant-{v}" for v in VARIANTS)
    for variant in VARIANTS:
        run_dir = tmp_path / "sw" / f"variant-{variant}"
        for name in ("config.json", "sae.safetensors", "trainer_state.pt", "metrics.jsonl", "eval.json"):
            assert (run_dir / name).exists(), (variant, name)
        marker = (run_dir / "fault_injected").read_text().split()
        assert marker[0] == "7"
        row = rows[f"variant-{variant}"]
        assert row["status"] == "finished" and row["step"] == STEPS and row["sae.variant"] == variant
        with pytest.raises(ProcessLookupError):  # the process that crashed is really gone
            os.kill(int(marker[1]), 0)
        assert 0 < row["eval_fvu"] < 1.5 and row["eval_l0"] > 0
        # the same config trained straight through in this process gives the same weights
        cfg = _straight_config(run_dir, tmp_path / "straight")
        straight = train(cfg, progress=False)
        from safetensors.torch import load_file

        a, b = load_file(run_dir / "sae.safetensors"), load_file(Path(straight) / "sae.safetensors")
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (variant, key)
    with open(tmp_path / "sw" / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["sae.variant"] for r in table] == VARIANTS
    assert {"name", "status", "fvu", "l0", "dead_frac", "eval_fvu"} <= set(table[0])
    assert json.loads((tmp_path / "sw" / "summary.json").read_text())["runs"][0]["name"] == "variant-relu"


@pytest.mark.timeout(300)
def test_more_runs_than_slots_finish(ray_local, tiny_store, tmp_path):
    """Three runs of one CPU each (and the evaluator) on a 2-CPU Ray: finished trainers must give
    their slot back, or the third run and the evaluator never start."""
    data = sweep_dict(tiny_store, str(tmp_path))
    data["ray"] = {"num_cpus_per_trainer": 1.0, "feeder_window": 64}
    summary = run_sweep(SweepConfig.model_validate(data), progress=False)
    assert [r["status"] for r in summary["runs"]] == ["finished"] * 3
    assert all(r["eval_l0"] > 0 for r in summary["runs"])
    assert next(iter(summary["feeder_reads"].values()))["reads"] == STEPS  # late run served from the window


def _straight_config(run_dir: Path, runs_root: Path) -> TrainConfig:
    """The run's config.json as an uninterrupted, stand-alone run under another root."""
    record = json.loads((run_dir / "config.json").read_text())
    for key in ("filter", "dataset_manifest_hash", "total_steps", "dead_tokens_resolved"):
        record.pop(key)
    record.update(runs_root=str(runs_root), fail_at_step=None, sweep=None)
    return TrainConfig.model_validate(record)


@pytest.mark.parametrize("n_trainers", [1, 4])
def test_feeder_reads_each_batch_once(ray_local, tiny_store, n_trainers):
    """N consumers, consumer i lagging i batches behind the first (within the 4-batch window), get the
    same ObjectRefs and the store is read once per batch; a consumer asking for a batch that has left
    the window (a restart) causes one counted re-read, with the same contents."""
    import ray

    total = 12
    names = [f"t{i}" for i in range(n_trainers)]
    feeder = Feeder.remote(tiny_store, 64, 0, total, names, 4, 1, 60.0)
    refs: dict[int, set] = {}
    for step in range(total + n_trainers - 1):
        for i, name in enumerate(names):
            if 0 <= step - i < total:
                inner = ray.get(feeder.get.remote(step - i, name))
                refs.setdefault(step - i, set()).add(inner.hex())
    for name in names:
        ray.get(feeder.done.remote(name))
    stats = ray.get(feeder.reads.remote())
    assert stats["reads"] == total and stats["unique"] == total and stats["rereads"] == 0
    assert all(len(r) == 1 for r in refs.values())  # one object per batch, shared
    from store.loader import ActivationLoader

    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    got = ray.get(ray.get(feeder.get.remote(3, "late")))
    assert torch.equal(torch.from_numpy(got["acts"].copy()), loader.batch(3)["acts"])
    assert ray.get(feeder.reads.remote())["rereads"] == 1  # batch 3 had left the window
    ray.kill(feeder)


def test_unscheduled_trainers_do_not_pin_the_window(tiny_store):
    """More runs than Ray slots: trainers that have not started yet must not hold the window, or the
    running ones would wait out the lag timeout on every batch. The first trainer streams through a
    2-batch window with no forced eviction; the late one re-reads what left the window."""
    from trainer.sweep import FeederCore

    total = 8
    feeder = FeederCore(tiny_store, 64, 0, total, ["early", "late"], window=2, prefetch=0, lag_timeout_s=0.2)
    for b in range(total):
        feeder.get(b, "early")
    assert feeder.reads()["forced_evictions"] == 0
    assert feeder.reads()["reads"] == total
    feeder.get(0, "late")
    assert feeder.reads()["rereads"] == 1


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_sweeps_fail_before_any_actor(tiny_store, tmp_path, capsys):
    unsealed = make_store(str(tmp_path / "unsealed"), shards=1, sealed=False)
    good = sweep_dict(tiny_store, str(tmp_path / "runs"))
    cases = {
        "unknown key": ({**good, "grdi": {}}, "unknown key 'grdi'"),
        "unknown grid key": ({**good, "grid": {"sae.variant": ["relu"], "learning_rate": [1e-3]}},
                             "unknown key 'learning_rate'"),
        "unknown variant": ({**good, "grid": {"sae.variant": ["relu", "gelu"]}}, "unknown SAE variant 'gelu'"),
        "m <= 0": ({**good, "grid": {"sae.m": [64, 0]}}, "sae.m must be a positive integer"),
        "unsealed": ({**good, "base": {**good["base"], "dataset": unsealed}}, unsealed),
    }
    for label, (data, needle) in cases.items():
        path = write_yaml(tmp_path / f"{label.replace(' ', '_')}.yaml", data)
        assert run_cli(main, ["sweep", path, "--no-progress"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0 and needle in err, (label, err)
    assert not (tmp_path / "runs").exists()  # nothing was started
    with pytest.raises(UserError, match="is not sealed"):
        run_sweep(SweepConfig.model_validate(cases["unsealed"][0]), progress=False)
