"""store.cluster, the one home of the project's Ray plumbing: a local instance that takes a token and
leaves nothing behind, worker settings through the runtime environment, and nobody else starting Ray
or switching its authentication off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from store.cluster import RaySession, worker_env_vars

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("store", "harvester", "trainer", "evaluator", "dynsae")

#: Run in a fresh process: start a local instance through store.cluster, then talk to its GCS as a
#: stranger on the network would (no token), and with the token Ray generated.
PROBE = r"""
import json, os, sys
import grpc, psutil
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from store.cluster import ray_session

info = {}
with ray_session() as session:
    ray = session.ray
    info["temp_dir"] = session.temp_dir
    info["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
    gcs = ray.get_runtime_context().gcs_address
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(gcs))
    request = gcs_service_pb2.GetAllNodeInfoRequest()
    try:
        stub.GetAllNodeInfo(request, timeout=20)
        info["without_token"] = "answered"
    except grpc.RpcError as err:
        info["without_token"] = err.code().name
    token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    reply = stub.GetAllNodeInfo(request, timeout=20, metadata=[("authorization", f"Bearer {token}")])
    info["with_token"] = len(reply.node_info_list)
    info["processes"] = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
info["temp_dir_left"] = os.path.exists(info["temp_dir"])
print(json.dumps(info))
"""


@pytest.mark.timeout(300)
def test_local_instance_takes_a_token_and_leaves_nothing(tmp_path):
    """With RAY_AUTH_MODE unset (as a user runs it), the local instance uses Ray's token authentication:
    its GCS refuses a caller without the token and answers one with it. The dashboard (which Ray
    runs in its minimal form without a frontend even when told not to include it) listens on 127.0.0.1
    only, and when the session ends its temp dir is gone with every process that used it."""
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rcl", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=280)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info["temp_dir"].startswith(ray_tmp)
        assert info["auth_mode"] == "token"  # Ray's default for a local ray.init; nothing of ours turned it off
        assert info["without_token"] == "UNAUTHENTICATED"
        assert info["with_token"] == 1
        assert (home / ".ray" / "auth_token").exists()
        heads = [p.split() for p in info["processes"] if "dashboard/dashboard.py" in p]  # Ray's minimal head
        assert all("--host=127.0.0.1" in p and "--disable-frontend" in p for p in heads), heads
        assert not info["temp_dir_left"]
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uses(p, ray_tmp)]
    assert not leftover, leftover


def _uses(proc_dir: Path, path: str) -> bool:
    try:
        return path in (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def test_options_carry_the_drivers_settings_in_the_runtime_env():
    """On a Ray the session did not start, credentials and hub settings travel in the runtime env of
    each actor and task (never as arguments); a local instance's workers inherit them instead."""
    import ray

    environ = {"AWS_SECRET_ACCESS_KEY": "planted-secret", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
               "HF_HUB_OFFLINE": "1", "HOME": "/root", "RAY_AUTH_MODE": "token"}
    joined = RaySession(ray, env_vars=worker_env_vars(environ))
    assert joined.options(num_cpus=2) == {"num_cpus": 2, "runtime_env": {"env_vars": {
        "AWS_SECRET_ACCESS_KEY": "planted-secret", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}}}
    assert RaySession(ray, started=True, connected=True).options(num_cpus=2) == {"num_cpus": 2}


def test_only_store_cluster_starts_ray_and_nobody_turns_auth_off():
    """One module starts Ray; no package sets RAY_AUTH_MODE (a test or CI environment may)."""
    starts, auth = [], []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if re.search(r"\bray\.init\(", text) and path != REPO / "store" / "cluster.py":
                starts.append(str(path.relative_to(REPO)))
            if re.search(r"""(environ(\.setdefault\(|\[)|putenv\()\s*['"]RAY_AUTH_MODE""", text):
                auth.append(str(path.relative_to(REPO)))
    assert starts == [] and auth == []


def test_unmet_demands_by_hand():
    """A cluster places each actor or task on some node by itself; a single node must hold them together."""
    from store.cluster import unmet_demand

    gpu_node, cpu_node = {"CPU": 48.0, "GPU": 4.0, "gpu_node": 1.0}, {"CPU": 16.0}
    feeder, trainer = ("feeder", {"CPU": 4.0}), ("training task", {"CPU": 1.0, "GPU": 0.25, "gpu_node": 0.0})
    assert unmet_demand([feeder, feeder, trainer], [cpu_node, gpu_node], single_node=False) is None
    assert unmet_demand([("feeder", {"CPU": 64.0}), trainer], [cpu_node, gpu_node], single_node=False) == \
        ("a feeder", {"CPU": 64.0})
    assert unmet_demand([feeder, trainer], [cpu_node], single_node=False) == ("a training task", {"CPU": 1.0, "GPU": 0.25})
    # one node: 4 + 4 + 1 CPUs together fit 48 but not 8; an absent resource is 0; a zero demand needs nothing
    assert unmet_demand([feeder, feeder, trainer], [gpu_node], single_node=True) is None
    assert unmet_demand([feeder, feeder, trainer], [{"CPU": 8.0, "GPU": 1.0}], single_node=True) == \
        ("2 feeders and 1 training task", {"CPU": 9.0, "GPU": 0.25})
    assert unmet_demand([("feeder", {"CPU": 0.0})], [{}], single_node=True) is None


def test_a_demand_no_node_can_meet_is_one_sentence_on_a_local_instance_and_a_warning_on_a_cluster(ray_local):
    """Checked against the session's real Ray (one node, 2 CPUs, no GPU): as a local instance the session
    started, a sweep whose feeder reserves both CPUs beside a 1-CPU trainer is refused in one sentence
    naming the amounts and the fix; joined as a cluster (where an autoscaler may add nodes) it warns; what
    fits passes silently."""
    import warnings

    from store.errors import UserError

    demands = [("feeder", {"CPU": 2.0}), ("training task", {"CPU": 1.0, "GPU": 0.0})]
    with pytest.raises(UserError) as err:
        RaySession(ray_local, started=True).check_demands(demands, "lower ray.feeder_num_cpus.")
    assert str(err.value) == ("1 feeder and 1 training task ask for CPU 3 together but the local Ray instance has "
                              "CPU 2, so nothing would ever run; lower ray.feeder_num_cpus.")
    with pytest.raises(UserError, match=r"^1 training task asks for CPU 1, GPU 1 but the local Ray instance has CPU 2, "
                                        r"GPU 0, so nothing would ever run; drop the GPU.$"):
        RaySession(ray_local, started=True).check_demands([("training task", {"CPU": 1.0, "GPU": 1.0})], "drop the GPU.")
    with pytest.warns(RuntimeWarning, match=r"no node of the Ray cluster offers what a training task asks for "
                                            r"\(CPU 1, GPU 0.5\) now: it waits until such a node joins"):
        RaySession(ray_local).check_demands([("training task", {"CPU": 1.0, "GPU": 0.5})], "drop the GPU.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RaySession(ray_local, started=True).check_demands([("feeder", {"CPU": 1.0}), ("training task", {"CPU": 1.0})],
                                                          "unused")
