"""Shared fixtures: offline environment, a real S3 endpoint on loopback, a real local Ray.

* ``s3_endpoint`` starts moto's S3 *server* (a real HTTP endpoint) on 127.0.0.1 at a
  random free port for the session and exports AWS_* variables (including
  AWS_ENDPOINT_URL) so s3fs / boto3 / the store talk to it with no code changes.
* ``s3_bucket`` creates a fresh bucket per test and yields ``s3://<bucket>``.
* ``ray_local`` starts one in-process Ray instance for the session (2 CPUs, no
  dashboard, its own short temp dir) and shuts it down at the end.
* ``DYNSAE_CACHE_DIR`` (GGUF weights converted once, :mod:`harvester.gguf_cache`) and
  ``DYNSAE_TEST_SHARED_DIR`` (fixtures made once per run, ``tests/shared_fixtures.py``) are temporary
  folders, one each per test run, shared by its processes (xdist workers, Ray workers) and removed at the end.
* The summary says in one line when the browser tests were skipped for want of Chromium.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import uuid

import pytest
from shared_fixtures import SHARED_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch (OpenMP) thread per process: the suite's tensors are tiny and its processes (xdist workers,
# Ray workers, subprocesses) share 2 cores, where two spinning OpenMP threads per process made a tiny
# training step ~9x dearer in CPU (200 steps: 10.8 -> 1.2 s). Set before torch is imported; children
# inherit it. tests/sparsemax sets its own thread count (the CPU kernel's threaded path).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# botocore's 2026 retry backoff (opt-in by this variable in botocore 1.43, read when botocore is imported; the
# session's Ray workers inherit it): a 500/503 is retried after rand(0, 1) × 50 ms instead of rand(0, 1) × 1 s,
# a throttle (SlowDown) still after rand(0, 1) × 1 s. Only tests/test_object_store_faults.py meets errors: alone
# it kept the box 5-20% busy for ~55 s of its 78 s (an estimated ~80 retries, 8% of its requests failing);
# with this it takes 51 s. The retries, their number (the storage options' max_attempts) and the bytes checked
# are the same.
os.environ.setdefault("AWS_NEW_RETRIES_2026", "true")


# The run's folders (variable -> name prefix), made by the first process of the run; "_<variable>_OWNER" holds its pid.
RUN_FOLDERS = {"DYNSAE_CACHE_DIR": "dynsae-cache-", SHARED_ENV: "dynsae-shared-"}


def pytest_configure(config):
    """One conversion cache and one shared-fixture folder per test run: made by the first process (the xdist
    controller, or the only one) before any worker or Ray starts, so every process of the run inherits
    them. (A torch imported before this file, by another plugin, gets the thread count too.)"""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for var, prefix in RUN_FOLDERS.items():
        if var not in os.environ:
            os.environ[var] = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
            os.environ[f"_{var}_OWNER"] = str(os.getpid())


def pytest_unconfigure(config):
    for var in RUN_FOLDERS:
        if os.environ.get(f"_{var}_OWNER") == str(os.getpid()):
            shutil.rmtree(os.environ.pop(var), ignore_errors=True)
            os.environ.pop(f"_{var}_OWNER")


# The longest files (one to three minutes each on 2 cores: own Ray clusters, subprocess pipelines, SmolLM2,
# S3 retries) run first, longest first (measured 2026-12-06, `--durations`), so pytest-xdist's workers
# (whole files each, `make test`) finish together instead of one of them starting a long file last.
# Any other file keeps its place after these.
LONG_FILES = (
    "harvester/test_harvest_job.py", "trainer/test_steering_smollm2.py", "demo/test_demo_pipeline.py",
    "trainer/test_sweep.py", "test_object_store_faults.py", "trainer/test_sweep_signals.py",
    "test_storage_options_s3.py", "trainer/test_job_submit.py", "harvester/test_harvest_slow.py",
    "trainer/test_node_loss.py", "trainer/test_feeder.py", "interop/test_export.py", "trainer/test_matching.py",
    "trainer/test_new_variant.py", "sae/test_learning.py",
    # ten to twenty seconds on one core each: not the last file of a worker, where the other core sits idle
    "trainer/test_run.py", "store/test_store_cluster.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order inside each file, and of the other files, is kept


def pytest_terminal_summary(terminalreporter):
    """One line when browser tests were skipped because Debian's Chromium is not installed."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "chromium" in str(r.longrepr).lower()]
    if skipped:
        terminalreporter.write_line(f"browser tests: {len(skipped)} skipped, Chromium is not installed "
                                    "(apt-get install -y chromium runs them)", yellow=True, bold=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL with AWS_* env set."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3")}
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    })
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the loopback S3 server; yields ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"


#: The session's Ray keeps idle worker processes for the next test's tasks (up to 6, kept while idle) instead
#: of killing those above its 2 CPUs after a second idle: a task of the next sweep then finds torch (and
#: often transformers) imported. Ray's defaults: num_workers_soft_limit = num_cpus, 1 s.
WARM_WORKERS = {"num_workers_soft_limit": 6, "idle_worker_killing_time_threshold_ms": 10**9}
#: The session's Ray idles for most of the run (between and after the tests that use it), its warm workers with
#: it: no test reads its metrics, task events or event stats, so their periodic reports are off or rare. Measured
#: on an idle instance with 7 warm workers: 5.0 -> 4.0 s of CPU a minute (GCS, raylet, agent and workers).
QUIET = {"enable_metrics_collection": False, "metrics_report_interval_ms": 600_000,
         "task_events_report_interval_ms": 60_000, "event_stats": False}
#: Ray starts one idle worker per CPU for the first driver, without a runtime environment; every task the project
#: sends to the session's Ray carries one (``RaySession.options``: the driver's HF_* / AWS_* settings), so those two
#: never run anything: each cost ~1.2 s of CPU to start and 0.2–0.4 s a minute idle for the whole run (measured
#: 2026-12-07: 2 idle workers by default, none with this; a task with a runtime env took 1.6 s to its first
#: result either way). A worker is started when a task asks for one instead.
NO_PRESTART = {"prestart_worker_first_driver": False}


@pytest.fixture(scope="session")
def ray_local():
    """One real in-process Ray instance for the test session."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 ignore_reinit_error=True, _node_ip_address="127.0.0.1", _system_config={**WARM_WORKERS, **QUIET, **NO_PRESTART})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
