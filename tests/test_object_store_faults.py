"""Object-store faults are survived: a harvest, a sweep and an eval through an S3 endpoint that fails 8% of
requests (500 InternalError / 503 ServiceUnavailable, and 503 SlowDown throttles; tests/faulty_s3.py) end
with exactly the bytes and numbers of the same work against the clean endpoint.

The retries are botocore's, raised through the storage options a cluster user would set
(``config_kwargs.retries``; deploy/README.md): 8 attempts leave a request failing for good with probability
0.08⁸ ≈ 2·10⁻⁹, where botocore's default 5 (legacy mode) would leave ~3·10⁻⁶ per request — a few thousand
requests per test would make the test fail now and then. The test session opts into botocore's 2026
backoff (tests/conftest.py: a 500/503 is retried after up to 50 ms, not up to 1 s), which changes how long the
retries wait, not whether they happen.
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


def stable(report: dict, kind: str) -> dict:
    """An eval.json without what differs between two equal runs at two URLs: times, URLs (also inside
    sentences) and the manifest hash (the manifest records when the dataset was created)."""
    text = json.dumps(report).replace(f"/{kind}/", "/ROOT/")
    return {k: v for k, v in json.loads(text).items()
            if not any(word in k for word in VOLATILE) and k != "dataset_manifest_hash"}


def undated(raw: bytes) -> object:
    """A JSON document without its ``created`` fields (the one thing two harvests may differ in)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "created"}
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(json.loads(raw))


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
    from evaluator.task import evaluate_run_task
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
            "name": "sw", "grid": {"sae.variant": ["topk"], "sae.seed": [0, 1]},
            "base": {"dataset": dataset, "runs_root": f"{root}/runs", "sae": {"variant": "topk", "m": 32, "k": 4},
                     "batch_size": 64, "tokens": 64 * 8, "checkpoint_every": 4, "log_every": 2, "device": "cpu",
                     "storage_options": options},
            "ray": {"num_cpus_per_trainer": 0.5, "feeder_window": 16}, "eval_max_tokens": 256,
            "evaluator_options": {"ce_contexts": 2}})
        summary = run_sweep(sweep, progress=False, evaluator=evaluate_run_task)
        assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
        names = [r["name"] for r in summary["runs"]]
        run = f"{root}/runs/sw/{names[0]}"
        out = f"{root}/eval-again.json"
        assert run_cli(evaluator_main, ["run", run, "--ce-contexts", "2", "--max-tokens", "256", "--out", out,
                                        "--storage-options", json.dumps(options)]) == 0
        results[kind] = {
            "data": objects(f"{root}/data", options),
            "weights": {n: objects(f"{root}/runs/sw/{n}", options)["/sae.safetensors"] for n in names},
            "evals": [stable(read_json(f"{root}/runs/sw/{n}/eval.json", options), kind) for n in names],
            "eval_again": stable(read_json(out, options), kind),
        }
    clean, bad = results["clean"], results["faulty"]
    assert sorted(clean["data"]) == sorted(bad["data"])
    for key in clean["data"]:
        if key.endswith("zarr.json") and key.strip("/").count("/") == 1:
            # the dataset group's metadata holds the manifest, with its created time
            assert undated(clean["data"][key]) == undated(bad["data"][key]), key
            continue
        assert clean["data"][key] == bad["data"][key], key
    assert clean["weights"] == bad["weights"]
    for a, b in zip([*clean["evals"], clean["eval_again"]], [*bad["evals"], bad["eval_again"]]):
        assert a == b, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    counts = faulty.counts
    failed = counts["InternalError"] + counts["ServiceUnavailable"]
    assert counts["requests"] > 500 and failed >= 0.05 * counts["requests"] and counts["SlowDown"] > 0, counts
