"""Object-store faults are survived: a harvest, a sweep and an eval through an S3 endpoint that fails 8% of
requests (500 InternalError / 503 ServiceUnavailable, and 503 SlowDown throttles; tests/faulty_s3.py) end
with exactly the bytes and numbers of the same work against the clean endpoint.

The retries are botocore's, raised through the storage options a cluster user would set
(``config_kwargs.retries``; deploy/README.md): 8 attempts leave a request failing for good with probability
0.08⁸ ≈ 2·10⁻⁹, where botocore's default 5 (legacy mode) would leave ~3·10⁻⁶ per request — a few thousand
requests per test would make the test fail now and then.
"""

from __future__ import annotations

import json

import pytest
from faulty_s3 import FaultyS3
from tiny_models import build_tiny_gpt2

RETRIES = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "standard"}}}
VOLATILE = ("url", "created", "seconds", "per_s", "elapsed")


@pytest.fixture(scope="module")
def faulty(s3_endpoint):
    with FaultyS3(s3_endpoint, seed=7, fail=0.06, slowdown=0.02) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def stable(report: dict) -> dict:
    return {k: v for k, v in report.items() if not any(word in k for word in VOLATILE)}


def objects(url: str, options: dict) -> dict[str, bytes]:
    """Every stored object under ``url`` (but leases and temporary keys), by relative key."""
    from store.io import filesystem

    fs, path = filesystem(url, options)
    return {key[len(path):]: fs.cat_file(key) for key in fs.find(path)
            if not key.endswith("lease.json") and ".tmp-" not in key}


@pytest.mark.timeout(900)
def test_harvest_sweep_and_eval_through_a_faulty_endpoint_match_a_clean_run(ray_local, s3_bucket, faulty, model,
                                                                             tmp_path):
    from evaluator.__main__ import main as evaluator_main
    from evaluator.actor import EvaluatorActor
    from harvester.config import HarvestConfig
    from harvester.job import harvest
    from store.errors import run_cli
    from store.io import read_json
    from store.verify import verify_dataset
    from trainer.config import SweepConfig
    from trainer.sweep import run_sweep

    results = {}
    for kind, options in (("clean", dict(RETRIES)), ("faulty", {"endpoint_url": faulty.url, **RETRIES})):
        root = f"{s3_bucket}/{kind}"
        cfg = HarvestConfig.model_validate({
            "output": f"{root}/data", "source": {"kind": "python_docs"}, "model": {"kind": "hf_causal_lm",
            "name": str(model)}, "hook": {"layer": 1, "site": "resid_pre"}, "context_length": 32,
            "max_tokens": 256 * 4, "chunk_rows": 64, "shard_rows": 256, "batch_size": 4, "eval_fraction": 0.25,
            "storage_options": options})
        dataset = harvest(cfg, progress=False).url
        assert verify_dataset(dataset, options) == []
        sweep = SweepConfig.model_validate({
            "name": "sw", "grid": {"sae.variant": ["relu", "sparsemax"]},
            "base": {"dataset": dataset, "runs_root": f"{root}/runs", "sae": {"variant": "relu", "m": 32},
                     "batch_size": 64, "tokens": 64 * 8, "checkpoint_every": 4, "log_every": 2, "device": "cpu",
                     "storage_options": options},
            "ray": {"num_cpus_per_trainer": 0.5, "feeder_window": 16}, "eval_max_tokens": 256,
            "evaluator_options": {"ce_contexts": 2}})
        summary = run_sweep(sweep, progress=False, evaluator=EvaluatorActor)
        assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
        run = f"{root}/runs/sw/variant-sparsemax"
        out = f"{root}/eval-again.json"
        assert run_cli(evaluator_main, ["run", run, "--ce-contexts", "2", "--max-tokens", "256", "--out", out,
                                        "--storage-options", json.dumps(options)]) == 0
        results[kind] = {
            "data": objects(f"{root}/data", options),
            "weights": {v: objects(f"{root}/runs/sw/variant-{v}", options)["/sae.safetensors"] for v in ("relu", "sparsemax")},
            "evals": [stable(read_json(f"{root}/runs/sw/variant-{v}/eval.json", options)) for v in ("relu", "sparsemax")],
            "eval_again": stable(read_json(out, options)),
        }
    clean, bad = results["clean"], results["faulty"]
    assert sorted(clean["data"]) == sorted(bad["data"])
    for key in clean["data"]:
        if key.endswith("zarr.json") and "/" not in key.strip("/"):
            continue  # the group metadata holds the manifest's created time
        assert clean["data"][key] == bad["data"][key], key
    assert clean["weights"] == bad["weights"]
    assert clean["evals"] == bad["evals"] and clean["eval_again"] == bad["eval_again"]
    counts = faulty.counts
    failed = counts["InternalError"] + counts["ServiceUnavailable"]
    assert counts["requests"] > 500 and failed >= 0.05 * counts["requests"] and counts["SlowDown"] > 0, counts
