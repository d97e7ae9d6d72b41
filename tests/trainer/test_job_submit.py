"""`ray job submit --working-dir <repo> -- python -m dynsae sweep X.yaml` (the README's cluster command)
against a real head node on 127.0.0.1 that this test starts (its own ports and temp dir) and stops (only
its own processes, waiting until they are gone). One trainer dies once mid-run (the test-only hook
DYNSAE_TEST_FAIL_AT_STEP, set through the job's runtime env) and resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from trainer_testkit import base_config, kill_pids_using, no_pids_using

from trainer.run import FAIL_AT_STEP_ENV

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
        time.sleep(1)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Terminate the head's process group, then SIGKILL any process still running from its temp dir and
    wait (with a deadline) until they are all gone: a killed process takes a moment to exit."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
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
        time.sleep(3)


def test_sweep_via_ray_job_submit(tiny_store, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    base = base_config(tiny_store, str(tmp_path / "runs"), tokens=64 * 6)
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
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        job = submit_when_agent_ready(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"env_vars": {FAIL_AT_STEP_ENV: "variant-relu=3"}}),
             "--", "python", "-m", "dynsae", "sweep", str(sweep_path), "--no-progress"], env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
        assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
        for name in ("variant-relu", "variant-topk"):
            for f in ("config.json", "sae.safetensors", "trainer_state.pt", "metrics.jsonl", "eval.json"):
                assert (tmp_path / "runs" / "job" / name / f).exists(), (name, f)
        assert (tmp_path / "runs" / "job" / "summary.csv").exists()
        assert (tmp_path / "runs" / "job" / "variant-relu" / "fault_injected").read_text().split()[0] == "3"
        assert not (tmp_path / "runs" / "job" / "variant-topk" / "fault_injected").exists()
        assert all(r["eval_fvu"] is not None for r in summary["runs"])  # dynsae sweep evaluates
    finally:
        try:
            stop_head(head, temp_dir)  # asserts, with a deadline, that none of its processes is left
        finally:
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)
