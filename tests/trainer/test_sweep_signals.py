"""SIGINT/SIGTERM to ``python -m trainer sweep`` while its driver waits on Ray (SIGINT, SIGTERM, SIGINT:
each signal honoured, and one of them again in a run already interrupted twice): honoured every time,
exit 128 + signal with one sentence on how to resume, nothing of the sweep's left running (its own
in-process Ray, in a temp dir of this test's, is gone), and the re-run ends with the weights of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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

from trainer.run import train

REPO = Path(__file__).resolve().parents[2]
RUNS = ("variant-relu",)
STEPS = 600  # several times what three interrupted attempts get through (88 steps on a loaded 2-core machine)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGINT)


def interrupt_once(cmd: list[str], env: dict[str, str], run_dirs: list[Path], sig: int) -> None:
    """Start the sweep, wait until the driver waits on its trainers (one has committed a new checkpoint),
    send ``sig``; the sweep must exit within 30 s with 128 + sig and one sentence on how to resume."""
    before = [checkpoint_step(d) for d in run_dirs]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or any(checkpoint_step(d) > b for d, b in zip(run_dirs, before)),
                   300, "a new checkpoint")
        assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)  # honoured within 30 s, or this raises
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, (sig, proc.returncode, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (") and "running the same command again resumes it" in last, last


@pytest.mark.timeout(900)
def test_interrupts_leave_nothing_behind_and_resume_exactly(tiny_store, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rsig", dir="/tmp")  # RAY_TMPDIR: the sweep's own Ray lives here
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    base = base_config(tiny_store, str(tmp_path / "runs"), tokens=64 * STEPS, checkpoint_every=4, log_every=50)
    base.pop("name")
    sweep = {"name": "sig", "base": base, "grid": {"sae.variant": ["relu"]}, "ray": {"num_cpus_per_trainer": 0.5}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cmd = [sys.executable, "-m", "trainer", "sweep", str(tmp_path / "sweep.yaml"), "--no-progress"]
    run_dirs = [tmp_path / "runs" / "sig" / name for name in RUNS]
    try:
        for sig in SIGNALS:
            interrupt_once(cmd, env, run_dirs, sig)
            no_pids_using(ray_tmp)  # its Ray, trainers and feeder are all gone
            reached = [checkpoint_step(d) for d in run_dirs]  # (loading them: whole checkpoints)
            assert all(0 < s < STEPS for s in reached), reached

        final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "training only, no evaluation" in final.stdout
        no_pids_using(ray_tmp)
    finally:
        kill_pids_using(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((tmp_path / "runs" / "sig" / "summary.json").read_text())
    assert [(r["name"], r["status"], r["step"]) for r in summary["runs"]] == [(n, "finished", STEPS) for n in RUNS]
    for run_dir in run_dirs:
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))
