"""`ray job submit --working-dir <repo> -- python -m dynsae sweep X.yaml` (the README's cluster command)
against a real head node on 127.0.0.1 that this test starts (its own ports and temp dir) and stops (only
its own processes, waiting until they are gone). Once a run has checkpointed, the test kills a trainer's
worker process (SIGKILL, from outside, as a crash would); Ray restarts the actor, which resumes, and
every run ends with the weights of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import yaml
from trainer_testkit import (
    assert_same_weights,
    base_config,
    checkpoint_step,
    kill_pids_using,
    no_pids_using,
    process_ended,
    straight_config,
    wait_until,
)

from trainer.run import train

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {seconds}s")
        time.sleep(0.1)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Kill the head's process group, then SIGKILL any process still running from its temp dir and wait
    (with a deadline) until they are all gone: a killed process takes a moment to exit. (SIGKILL at once:
    on SIGTERM, `ray start --block` shuts its node down gracefully, and took more than 20 s here.)"""
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    kill_pids_using(temp_dir)
    no_pids_using(temp_dir)


def submit_when_agent_ready(cmd: list[str], env: dict[str, str], seconds: float = 120) -> subprocess.CompletedProcess:
    """Run ``ray job submit``; while the head's job agent has not registered yet (the dashboard
    answers before it does, more so on a loaded machine) Ray says "No available agent ... try
    again later": do exactly that, for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr:
            return job
        if time.monotonic() > deadline:
            return job
        time.sleep(0.5)


STEPS = 300
RUNS = ("variant-relu", "variant-topk")


def training_worker(head_pid: int) -> psutil.Process | None:
    """A worker of the head's process family running a trainer's ``train`` (Ray titles it
    ``ray::train_run``)."""
    for proc in psutil.Process(head_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::train_run"):
                return proc
        except psutil.Error:
            continue
    return None


def kill_a_trainer_mid_run(head_pid: int, run_dirs: list[Path], submit: threading.Thread) -> int | None:
    """Once a run has a checkpoint short of the end, SIGKILL a training worker; returns its pid (None:
    the job ended first, which the caller reports with the job's output)."""
    def target() -> psutil.Process | bool | None:
        if not submit.is_alive():
            return True
        if any(0 < checkpoint_step(d) < STEPS // 2 for d in run_dirs):
            return training_worker(head_pid)
        return None

    proc = wait_until(target, 400, "a trainer mid-run", 0.02)
    if proc is True:
        return None
    proc.kill()
    return proc.pid


def test_sweep_via_ray_job_submit(tiny_store, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    base = base_config(tiny_store, str(tmp_path / "runs"), tokens=64 * STEPS, checkpoint_every=10, log_every=10)
    base.pop("name")
    sweep = {"name": "job", "base": base, "grid": {"sae.variant": ["relu", "topk"]},
             "ray": {"num_cpus_per_trainer": 0.5}}
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(sweep))
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--temp-dir", temp_dir, "--disable-usage-stats", "--num-cpus", "2",
         # its own agent ports: the session's in-process Ray (ray_local) already holds the defaults,
         # and a head whose dashboard agent cannot bind never accepts a job
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--min-worker-port", "20000", "--max-worker-port", "20999"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dirs = [tmp_path / "runs" / "job" / name for name in RUNS]
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        result: dict = {}
        submit = threading.Thread(target=lambda: result.update(job=submit_when_agent_ready(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--", "python", "-m", "dynsae", "sweep", str(sweep_path), "--no-progress"], env)), daemon=True)
        submit.start()
        killed = kill_a_trainer_mid_run(head.pid, run_dirs, submit)
        submit.join(timeout=500)
        job = result["job"]
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert killed is not None, "the job ended before a trainer could be killed mid-run"
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert process_ended(killed)
        summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
        assert [(r["status"], r["step"]) for r in summary["runs"]] == [("finished", STEPS)] * 2
        for run_dir in run_dirs:
            for f in ("config.json", "sae.safetensors", "trainer_state.pt", "metrics.jsonl", "eval.json"):
                assert (run_dir / f).exists(), (run_dir.name, f)
        assert (tmp_path / "runs" / "job" / "summary.csv").exists()
        assert all(r["eval_fvu"] is not None for r in summary["runs"])  # dynsae sweep evaluates
    finally:
        try:
            stop_head(head, temp_dir)  # asserts, with a deadline, that none of its processes is left
        finally:
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)
    for run_dir in run_dirs:  # the killed trainer resumed exactly: every step trained once, same weights
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == sorted(set(steps)) and steps[-1] == STEPS
        assert_same_weights(run_dir, train(straight_config(run_dir, tmp_path / "straight"), progress=False))
