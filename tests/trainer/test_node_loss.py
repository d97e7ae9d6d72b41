"""Node loss: a sweep whose trainers run on a worker node (``ray.trainer_resources: {worker: 1}``; the
head has no CPU for them) that is killed once a run has checkpointed finishes when another worker node
joins, and every run ends with an uninterrupted run's weights, finished once.

The cluster (``ray.cluster_utils.Cluster``: head + worker node on this machine, in a temp dir of this
test's) is driven by this file run as a script in a subprocess, so it never meets the session's
in-process Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from trainer_testkit import (
    assert_same_weights,
    base_config,
    checkpoint_step,
    kill_pids_using,
    no_pids_using,
    straight_config,
    wait_until,
)

RUNS = ("variant-relu", "variant-topk")
STEPS = 150  # the worker node dies at the first checkpoint (step 10): the runs still have most of theirs to go
WORKER = {"num_cpus": 2, "resources": {"worker": 2}}


def drive(sweep_path: str, out_path: str) -> None:
    """Start the cluster and run the sweep (in a thread: adding a node must happen on the main thread);
    at the first checkpoint kill the worker node, record where the runs stood, add a fresh worker node."""
    import ray
    from ray.cluster_utils import Cluster

    from store.config import load_config
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    sweep = load_config(SweepConfig, sweep_path)
    run_dirs = [Path(sweep.base["runs_root"], sweep.name, name) for name in RUNS]
    # no dashboard: nothing here reads it, and its web server is most of an idle head's CPU
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    worker = cluster.add_node(**WORKER)
    cluster.connect()
    record: dict = {}

    def sweep_thread() -> None:
        try:
            record["summary"] = run_sweep(sweep, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported to the test through the record
            record["error"] = repr(err)

    thread = threading.Thread(target=sweep_thread, daemon=True)
    thread.start()
    try:
        wait_until(lambda: not thread.is_alive() or any((d / "trainer_state.pt").exists() for d in run_dirs),
                   300, "a checkpoint", 0.02)
        cluster.remove_node(worker, allow_graceful=False)
        record["steps_at_kill"] = [checkpoint_step(d) for d in run_dirs]
        cluster.add_node(**WORKER)
        thread.join(timeout=400)
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(out_path).write_text(json.dumps(record))


@pytest.mark.timeout(600)
def test_sweep_survives_losing_its_worker_node(tiny_store, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rnl", dir="/tmp")
    base = base_config(tiny_store, str(tmp_path / "runs"), tokens=64 * STEPS, checkpoint_every=10, log_every=10)
    base.pop("name")
    sweep = {"name": "nl", "base": base, "grid": {"sae.variant": ["relu", "topk"]},
             "ray": {"num_cpus_per_trainer": 0.5, "trainer_resources": {"worker": 1}, "max_restarts": 3,
                     "feeder_window": 8}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}"
           f"{Path(__file__).resolve().parents[2]}"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, __file__, str(tmp_path / "sweep.yaml"), str(tmp_path / "out.json")],
                              env=env, capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-4000:]
        no_pids_using(ray_tmp)
    finally:
        kill_pids_using(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    record = json.loads((tmp_path / "out.json").read_text())
    assert "error" not in record, record["error"]
    assert all(s < STEPS for s in record["steps_at_kill"]), record["steps_at_kill"]  # killed mid-run
    rows = record["summary"]["runs"]
    assert [(r["name"], r["status"], r["step"]) for r in rows] == [(n, "finished", STEPS) for n in RUNS]

    from trainer.run import train

    for name in RUNS:
        run_dir = tmp_path / "runs" / "nl" / name
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == STEPS  # every step logged once: trained once
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2])
