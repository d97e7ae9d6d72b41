"""The whole pipeline on a loopback S3 server whose endpoint and credentials are given only as
storage options (`--storage-options JSON`): no AWS_* variable is set in the processes that run it.

`dynsae demo` (harvest -> matched sweep on a fresh in-process Ray -> evaluation -> report) writes to
s3://, then `dynsae store verify`, `dynsae eval`, `dynsae report`, `dynsae export` and `dynsae
concepts` read and write there with the same flag. Without the flag the same command fails (the
endpoint really does come from the flag alone).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
from tiny_models import build_tiny_gpt2

from dynsae.demo import DEFAULT_CONFIG


@pytest.fixture
def private_s3(tmp_path):
    """A moto S3 server on 127.0.0.1 that only storage options point at; yields (bucket URL, options)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"private-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket=bucket)
    options = {"endpoint_url": endpoint, "key": "k", "secret": SECRET, "client_kwargs": {"region_name": "us-east-1"}}
    try:
        yield f"s3://{bucket}", options
    finally:
        server.stop()


#: The secret key of the storage options: no file written and no output printed may contain it.
SECRET = "s3cr3t-of-the-bucket-9c41"


def assert_secret_nowhere(bucket: str, options: dict, outputs: list[subprocess.CompletedProcess]) -> None:
    from store.io import filesystem

    fs, path = filesystem(bucket, options)
    for key in fs.find(path):
        assert SECRET.encode() not in fs.cat_file(key), key
    for done in outputs:
        assert SECRET not in done.stdout + done.stderr, done.args


@pytest.fixture
def clean_env(tmp_path):
    """The commands' environment: no AWS_* credentials, no RAY_ADDRESS, offline. Ray's socket paths live
    under RAY_TMPDIR and may not exceed 107 bytes, so it is a short folder under /tmp (a pytest-xdist
    worker's tmp_path is too deep), removed after the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="rs3", dir="/tmp")
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp,
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def dynsae(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynsae", *args], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.timeout(1200)
def test_pipeline_on_s3_with_storage_options_only(private_s3, clean_env, tmp_path):
    bucket, options = private_s3
    flag = ["--storage-options", json.dumps(options)]
    env = clean_env
    model = build_tiny_gpt2(tmp_path / "tiny_gpt2")
    overrides = {
        "harvest.output": f"{bucket}/acts", "harvest.model.name": str(model), "harvest.hook.layer": 1,
        "harvest.context_length": 32, "harvest.max_tokens": 2048, "harvest.batch_size": 16,
        "harvest.chunk_rows": 256, "harvest.shard_rows": 512,
        "sweep.base.runs_root": f"{bucket}/runs", "sweep.base.batch_size": 64, "sweep.base.tokens": 64 * 12,
        "sweep.base.checkpoint_every": 6, "sweep.base.log_every": 6, "sweep.base.sae.m": 32,
        "sweep.eval_max_tokens": 256, "sweep.evaluator_options.ce_contexts": 2, "sweep.ray.feeder_window": 16,
    }
    # The demo's synthetic phase is left out (its default output is the working directory's data/, and
    # tests/harvester/test_synth.py::test_synth_on_s3 covers synth on S3).
    argv = ["demo", str(DEFAULT_CONFIG), "--no-progress", *flag,
            "--set", "sweep.grid={sae.variant: [sparsemax, topk]}", "--set", "synth=null", "--set", "synth_sweep=null"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    done = dynsae(env, *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [done]

    from store import io

    sweep = f"{bucket}/runs/demo"
    summary = io.read_json(f"{sweep}/summary.json", options)
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
    assert io.exists(f"{sweep}/report.md", options) and io.exists(f"{sweep}/frontier.png", options)
    topk = io.read_json(f"{sweep}/variant-topk/config.json", options)["sae"]
    sparsemax_l0 = io.read_json(f"{sweep}/variant-sparsemax/eval.json", options)["l0"]
    assert topk["target_l0"] == round(sparsemax_l0, 3)  # matched through eval.json on S3
    dataset = io.read_json(f"{sweep}/variant-topk/config.json", options)["dataset"]

    assert dynsae(env, "store", "verify", dataset).returncode != 0  # no endpoint without the flag
    verified = dynsae(env, "store", "verify", dataset, *flag)
    outputs.append(verified)
    assert verified.returncode == 0, verified.stderr
    evaluated = dynsae(env, "eval", f"{sweep}/variant-topk", "--ce-contexts", "0", "--max-tokens", "256", *flag)
    outputs.append(evaluated)
    assert evaluated.returncode == 0, evaluated.stderr
    assert dynsae(env, "report", sweep, *flag).returncode == 0
    exported = dynsae(env, "export", f"{sweep}/variant-topk", f"{bucket}/export/topk", "--format", "sparsify", *flag)
    assert exported.returncode == 0, exported.stderr
    assert io.read_json(f"{bucket}/export/topk/cfg.json", options)["k"] == topk["k"]
    browser = dynsae(env, "concepts", f"{sweep}/variant-sparsemax", "--tokens", "256", *flag)
    assert browser.returncode == 0, browser.stderr
    assert io.exists(f"{sweep}/variant-sparsemax/concepts/index.html", options)
    assert_secret_nowhere(bucket, options, [*outputs, exported, browser])
