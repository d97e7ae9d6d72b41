"""Ray sweeps on the real local Ray instance: artifacts and summary, one read per batch, a trainer
process that really dies and resumes to the uninterrupted result, runs resumed far apart, grids
(unions, seeds), validation before any actor."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testkit import DieAt, assert_same_weights, base_config, make_store, straight_config

from evaluator.task import evaluate_run_task
from store.errors import UserError, run_cli
from trainer.__main__ import main
from trainer.config import SweepConfig, expand_sweep
from trainer.run import train
from trainer.sweep import run_sweep

VARIANTS = ["relu", "topk", "sparsemax"]
STEPS = 16


def sweep_dict(store: str, runs_root: str, **base_over) -> dict:
    base = base_config(store, runs_root, tokens=64 * STEPS, **base_over)
    base.pop("name")
    return {"name": "sw", "base": base, "grid": {"sae.variant": VARIANTS},
            "ray": {"num_cpus_per_trainer": 0.5, "max_restarts": 2, "feeder_window": 64}}


def test_three_variant_sweep_with_crashes(ray_local, tiny_store, tmp_path):
    """Every trainer process dies once at step 7 (after the step-5 checkpoint; the test's on_step hook
    DieAt); Ray restarts it and it resumes. Each run ends equal to an uninterrupted run; the feeder
    read each batch once (the crashed trainers' re-requests are served from its window); every
    artifact, the evaluator's eval.json and the summary are written."""
    sweep = SweepConfig.model_validate(sweep_dict(tiny_store, str(tmp_path)))
    summary = run_sweep(sweep, progress=False, evaluator=evaluate_run_task, on_step=DieAt({"*": 7}))

    reads = next(iter(summary["feeder_reads"].values()))
    assert reads["reads"] == STEPS and reads["rereads"] == 0 and reads["max_reads_per_batch"] == 1
    assert reads["requests"] >= 3 * STEPS  # three trainers, plus re-requests after the crashes
    # every attempt of every run (3 runs, each crashed once) asked at the feeder's hand-out board, on its node
    assert reads["board_seats"] == 6 and reads["board_answers"] >= 6 and reads["board_sent_to_ray"] == 0
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
        assert row["seed"] == 0 and row["target_l0"] is None
        with pytest.raises(ProcessLookupError):  # the process that crashed is really gone
            os.kill(int(marker[1]), 0)
        assert 0 < row["eval_fvu"] < 1.5 and row["eval_l0"] > 0
        # the same config trained straight through in this process gives the same weights
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))
    with open(tmp_path / "sw" / "summary.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["sae.variant"] for r in table] == VARIANTS
    assert {"name", "seed", "target_l0", "status", "fvu", "l0", "train_dead_frac", "eval_dead_frac", "eval_fvu"} <= set(table[0])
    assert json.loads((tmp_path / "sw" / "summary.json").read_text())["runs"][0]["name"] == "variant-relu"


@pytest.mark.timeout(300)
def test_more_runs_than_slots_finish(ray_local, tiny_store, tmp_path):
    """Three runs of one CPU each (and an evaluation task of one CPU per run) on a 2-CPU Ray: finished
    trainers must give their slot back, or the third run and the evaluations never start."""
    data = sweep_dict(tiny_store, str(tmp_path))
    data["ray"] = {"num_cpus_per_trainer": 1.0, "feeder_window": 64}
    summary = run_sweep(SweepConfig.model_validate(data), progress=False, evaluator=evaluate_run_task)
    assert [r["status"] for r in summary["runs"]] == ["finished"] * 3
    assert all(r["eval_l0"] > 0 for r in summary["runs"])
    assert next(iter(summary["feeder_reads"].values()))["reads"] == STEPS  # late run served from the window


def test_resume_far_apart_runs(ray_local, tiny_store, tmp_path):
    """Two runs (grid sae.seed = 0, 1) stopped at steps 3 and 60 by the test hook (no restarts, so the
    first sweep ends with both failed), then the sweep run again: a fresh feeder with a 4-batch window
    serves both without stalling (no lag timeout), reads each batch at most once per cursor group, and
    both runs end with an uninterrupted run's weights; the summary has each run's init seed."""
    total = 64
    base = base_config(tiny_store, str(tmp_path), tokens=64 * total, checkpoint_every=3)
    base.pop("name")
    data = {"name": "far", "base": base, "grid": {"sae.seed": [0, 1]},
            "ray": {"num_cpus_per_trainer": 0.5, "max_restarts": 0, "feeder_window": 4,
                    "feeder_lag_timeout_s": 60.0}}
    with pytest.raises(UserError, match="2 of 2 runs failed"):
        run_sweep(SweepConfig.model_validate(data), progress=False, on_step=DieAt({"seed-0": 3, "seed-1": 60}))
    stopped = {name: torch.load(tmp_path / "far" / name / "trainer_state.pt", weights_only=False)["step"]
               for name in ("seed-0", "seed-1")}
    assert stopped == {"seed-0": 3, "seed-1": 60}

    summary = run_sweep(SweepConfig.model_validate(data), progress=False)
    assert [(r["name"], r["status"], r["step"], r["seed"]) for r in summary["runs"]] == [
        ("seed-0", "finished", total, 0), ("seed-1", "finished", total, 1)]
    reads = next(iter(summary["feeder_reads"].values()))
    assert reads["lag_timeouts"] == 0
    assert reads["unique"] == total - 3  # batches 3..63, nothing else
    assert reads["max_reads_per_batch"] <= 2 and reads["rereads"] <= total - 60  # only 60..63 twice
    for name in ("seed-0", "seed-1"):
        run_dir = tmp_path / "far" / name
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))


def test_union_grid_and_seeds_expand(tiny_store, tmp_path):
    """A list of grids is the union of their products, in order, with readable unique names."""
    base = base_config(tiny_store, str(tmp_path))
    base.pop("name")
    grid = [{"sae.variant": ["sparsemax"], "sae.m": [32, 64]},
            {"sae.variant": ["topk", "relu"], "sae.seed": [0, 1]}]
    runs = expand_sweep(SweepConfig.model_validate({"name": "u", "base": base, "grid": grid}))
    assert [(cfg.name, assignment) for assignment, cfg in runs] == [
        ("variant-sparsemax_m-32", {"sae.variant": "sparsemax", "sae.m": 32}),
        ("variant-sparsemax_m-64", {"sae.variant": "sparsemax", "sae.m": 64}),
        ("variant-topk_seed-0", {"sae.variant": "topk", "sae.seed": 0}),
        ("variant-topk_seed-1", {"sae.variant": "topk", "sae.seed": 1}),
        ("variant-relu_seed-0", {"sae.variant": "relu", "sae.seed": 0}),
        ("variant-relu_seed-1", {"sae.variant": "relu", "sae.seed": 1}),
    ]
    assert [cfg.sae for _, cfg in runs][1] == {"variant": "sparsemax", "m": 64}
    assert [cfg.sae for _, cfg in runs][3] == {"variant": "topk", "m": 32, "seed": 1}
    assert all(cfg.sweep == "u" for _, cfg in runs)


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
        "empty union": ({**good, "grid": []}, "the grid is an empty list"),
        "empty grid in a union": ({**good, "grid": [{"sae.variant": ["relu"]}, {}]}, "grid[1] is an empty mapping"),
        "grid entry not a mapping": ({**good, "grid": ["sae.m"]}, "grid[0] must be a mapping"),
        "values not a list": ({**good, "grid": {"sae.m": 64}}, "grid key 'sae.m' must hold a list of values"),
        "one name twice": ({**good, "grid": [{"sae.variant": ["relu"]}, {"sae.variant": ["topk", "relu"]}]},
                           "both get the run name 'variant-relu'"),
    }
    for label, (data, needle) in cases.items():
        path = write_yaml(tmp_path / f"{label.replace(' ', '_')}.yaml", data)
        assert run_cli(main, ["sweep", path, "--no-progress"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0 and needle in err, (label, err)
    assert not (tmp_path / "runs").exists()  # nothing was started
    with pytest.raises(UserError, match="is not sealed"):
        run_sweep(SweepConfig.model_validate(cases["unsealed"][0]), progress=False)


def test_a_sweep_no_node_could_place_is_refused_before_any_actor(ray_local, tiny_store, tmp_path):
    """On a local instance the sweep started (here the session's real Ray: one node, 2 CPUs), one feeder
    reserving 1.5 CPUs beside a 1-CPU trainer could never run both: one sentence with the amounts and the
    settings to change, before any feeder or trainer starts. Two streams count two feeders."""
    from store.cluster import RaySession
    from trainer.sweep import check_placement, validate_sweep

    data = sweep_dict(tiny_store, str(tmp_path / "runs"))
    data["ray"] = {"feeder_num_cpus": 1.5, "num_cpus_per_trainer": 1}
    sweep = SweepConfig.model_validate(data)
    local = RaySession(ray_local, started=True)
    with pytest.raises(UserError, match=r"^1 feeder and 1 training task ask for CPU 2.5 together but the local Ray "
                                        r"instance has CPU 2, so nothing would ever run; lower ray.feeder_num_cpus"):
        check_placement(validate_sweep(sweep, "sweep"), sweep.ray, local)
    fits = sweep.ray.model_copy(update={"feeder_num_cpus": 1.0})
    check_placement(validate_sweep(sweep, "sweep"), fits, local)
    data["grid"] = {"data_seed": [0, 1]}  # two batch streams: two feeders
    two = SweepConfig.model_validate(data)
    with pytest.raises(UserError, match=r"^2 feeders and 1 training task ask for CPU 3 together"):
        check_placement(validate_sweep(two, "sweep"), fits, local)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(600)
def test_two_sweeps_on_one_directory_leave_one_consistent_result(ray_local, tiny_store, tmp_path):
    """A sweep subprocess and an in-process sweep of the same config and runs root at the same time: one
    holds the sweep directory's lease and trains, the other waits and then finds the runs finished. Both
    succeed; every run equals an uninterrupted one; no lease is left behind. The subprocess joins the
    session's Ray (``RAY_ADDRESS``), as a second job on one cluster would: the lease, not the Ray, keeps the
    two apart (and no Ray of its own is started)."""
    import subprocess
    import sys

    data = sweep_dict(tiny_store, str(tmp_path / "runs"))
    data["grid"] = {"sae.variant": ["relu", "sparsemax"]}
    path = write_yaml(tmp_path / "sweep.yaml", data)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "sweep", path, "--no-progress"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        summary = run_sweep(SweepConfig.model_validate(data), progress=False)
        _, err = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
    assert not list((tmp_path / "runs").rglob("lease.json"))
    for variant in ("relu", "sparsemax"):
        run_dir = tmp_path / "runs" / "sw" / f"variant-{variant}"
        state = torch.load(run_dir / "trainer_state.pt", weights_only=True)
        assert state["step"] == STEPS
        assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == \
            list(range(2, STEPS + 1, 2))
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))


def test_gpu_training_tasks_get_a_fresh_process_and_cpu_ones_share_them():
    """A CPU run's worker process trains the next run (torch imported once per slot); a GPU run gets a
    process of its own, since Ray sets CUDA_VISIBLE_DEVICES per task and a process that has started CUDA
    cannot change it (Ray's max_calls=1, which it applies by itself only to num_gpus in @ray.remote)."""
    from trainer.sweep import train_on_cpu, train_on_gpu

    assert train_on_gpu._default_options.get("max_calls") == 1
    assert not train_on_cpu._default_options.get("max_calls")  # 0 / unset: reused without limit


def test_gpu_evaluation_tasks_get_a_fresh_process_and_cpu_ones_share_them():
    """As for training: a CPU evaluation's worker process (with the models it cached) serves the next
    evaluation or run; a GPU evaluation gets a process of its own. Each task is made once per process, so
    every sweep of a Ray job submits the same function."""
    from trainer.sweep import evaluation_task

    assert evaluation_task(evaluate_run_task, True)._default_options.get("max_calls") == 1
    assert not evaluation_task(evaluate_run_task, False)._default_options.get("max_calls")
    assert evaluation_task(evaluate_run_task, False) is evaluation_task(evaluate_run_task, False)


def test_evaluation_tasks_are_the_sessions_to_cancel_and_their_errors_land_in_the_row(ray_local, tmp_path):
    """The sweep's evaluation tasks belong to its Ray session: collected, a report fills its row's eval_*
    columns, a failed evaluation leaves eval_error, and neither is left for the session to cancel; one
    still running when the session closes (as on a signal) is cancelled, its worker process killed."""
    import time

    from trainer_testkit import process_ended, wait_until

    from store.cluster import RaySession
    from trainer.config import RayConfig
    from trainer.sweep import EvaluatorTask, collect_evals, evaluation_task, placement

    started = tmp_path / "started"

    def evaluate(run_url: str, *, seconds: float) -> dict:
        if run_url == "broken":
            raise ValueError(f"no run at {run_url}")
        started.write_text(str(os.getpid()))
        time.sleep(seconds)
        return {"fvu": 0.25, "run_url": run_url, "tokens": {"kept": 1}}

    session = RaySession(ray_local)  # a Ray it did not start: close() cancels and waits, Ray stays up
    remote = evaluation_task(evaluate, False).options(**placement(RayConfig(num_cpus_per_trainer=0.5), session))
    quick, slow = EvaluatorTask(remote, {"seconds": 0.0}), EvaluatorTask(remote, {"seconds": 600.0})
    rows: dict[str, dict] = {"ok": {}, "bad": {}}
    collect_evals(rows, {quick.submit("ok", session): "ok", quick.submit("broken", session): "bad"}, session)
    assert rows == {"ok": {"eval_fvu": 0.25, "eval_run_url": "ok"}, "bad": {"eval_error": "no run at broken"}}
    assert session.tasks == []

    started.unlink()
    ref = slow.submit("slow", session)
    pid = int(wait_until(lambda: started.exists() and started.read_text(), 60, "the evaluation to start"))
    session.close()
    with pytest.raises(ray_local.exceptions.TaskCancelledError):
        ray_local.get(ref, timeout=30)
    wait_until(lambda: process_ended(pid), 30, "the cancelled evaluation's process to end")
