"""``dynsae synth``: a sealed dataset with a known dictionary, deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest

from dynsae.cli import main as dynsae_main
from harvester import ground_truth
from harvester.synth import SynthConfig, data_key, draw_block, firing_probabilities, synthesize, true_features
from store import open_dataset
from store.errors import UserError
from store.io import read_bytes
from store.layout import read_commits
from store.verify import verify_dataset

SMALL = {"d": 16, "features": 64, "rows": 3000, "chunk_rows": 250, "shard_rows": 1000, "eval_fraction": 0.25,
         "simple_l0": (1, 3), "complex_l0": (8, 12)}


def make(tmp_path, sub: str = "a", **kw) -> str:
    return synthesize(SynthConfig(output=str(tmp_path / sub), **{**SMALL, **kw}), progress=False).url


@pytest.fixture(scope="module")
def synth_url(tmp_path_factory) -> str:
    return make(tmp_path_factory.mktemp("synth"), noise=0.0)


def test_sealed_verified_and_in_the_store_contract(synth_url):
    ds = open_dataset(synth_url)
    m = ds.manifest
    assert m.sealed and m.rows == 3000 and m.d == 16 and m.context_length == 1
    assert m.extra_columns == {"true_l0": "int16"}
    assert m.generator == data_key(SynthConfig(output="x", **SMALL, noise=0.0))
    assert m.model.kind == "synthetic"
    assert verify_dataset(synth_url) == []
    np.testing.assert_array_equal(ds.read(0, 3000, "seq_ids"), np.arange(3000))  # each row its own sequence
    assert (ds.read(0, 3000, "positions") == 1).all()  # kept by the default exclude_positions=[0]
    assert ds.split_rows("eval") > 0


def test_truth_matches_the_rows(synth_url):
    """true_l0 = |S_t|; with noise 0 each eval row lies in the span of exactly its listed features, with
    positive coefficients; k_t of simple rows lies in 1..3 and of complex rows in 8..12."""
    ds = open_dataset(synth_url)
    truth = ground_truth.load(synth_url, 16)
    np.testing.assert_allclose(np.linalg.norm(truth.features, axis=1), 1.0, rtol=1e-6)
    eval_rows = np.concatenate([np.arange(a, b) for a, b in ds.split_row_ranges("eval")])
    np.testing.assert_array_equal(truth.support_rows, eval_rows)  # the store's own eval split
    true_l0 = ds.read(0, 3000, "true_l0")
    np.testing.assert_array_equal(truth.true_l0(), true_l0[eval_rows])
    assert set(np.unique(true_l0)) <= set(range(1, 4)) | set(range(8, 13))
    assert (true_l0 <= 3).any() and (true_l0 >= 8).any()
    acts = ds.read(0, 3000, "acts").astype(np.float64)
    present = truth.presence(eval_rows[:50]).numpy()
    for r, row in enumerate(eval_rows[:50]):
        f = truth.features[present[r]].astype(np.float64)
        coef, *_ = np.linalg.lstsq(f.T, acts[row], rcond=None)
        np.testing.assert_allclose(f.T @ coef, acts[row], atol=1e-4)
        assert (coef > 0).all()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    c = make(tmp_path, "c", seed=1)
    digests = [{s: {k: o.sha256 for k, o in r.objects.items()} for s, r in read_commits(u).items()} for u in (a, b, c)]
    assert digests[0] == digests[1] and digests[0] != digests[2]
    gt = [read_bytes(ground_truth.url_of(u)) for u in (a, b, c)]
    assert gt[0] == gt[1] and gt[0] != gt[2]
    # the rows do not depend on how they are cut into shards
    d = make(tmp_path, "d", shard_rows=3000, chunk_rows=250)
    np.testing.assert_array_equal(open_dataset(a).read(0, 3000), open_dataset(d).read(0, 3000))


def test_power_law_and_groups():
    cfg = SynthConfig(d=64, features=40, rows=4096, group_size=4, group_cosine=0.5, frequency_exponent=1.0,
                      complex_l0=(8, 12))
    f = true_features(cfg).astype(np.float64)
    cos = f @ f.T
    within = [cos[i, j] for i in range(40) for j in range(40) if i != j and i // 4 == j // 4]
    across = [cos[i, j] for i in range(40) for j in range(40) if i // 4 != j // 4]
    assert abs(np.mean(within) - 0.5) < 0.1 and abs(np.mean(across)) < 0.05
    blk = draw_block(cfg, true_features(cfg), firing_probabilities(cfg), 0)
    counts = np.bincount(blk.indices, minlength=40)
    assert counts[:5].sum() > 2 * counts[-5:].sum()  # p_i ∝ 1/(i+1): early features fire more


def test_cli_prints_the_url_last_and_resumes(tmp_path, capsys):
    args = ["synth", "--no-progress", "--set", f"output={tmp_path}", "--set", "d=8", "--set", "features=16",
            "--set", "rows=600", "--set", "chunk_rows=100", "--set", "shard_rows=200", "--set", "complex_l0=[5,9]"]
    assert dynsae_main(args) == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    assert open_dataset(url).manifest.rows == 600
    assert dynsae_main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == url and out[0].startswith("already generated")


@pytest.mark.parametrize("override, words", [
    ("complex_l0=[20,80]", "complex_l0 = [20, 80] is invalid (Value error, it reaches 80 active features but there "
                           "are only features = 64"),
    ("shard_rows=150", "shard_rows = 150 is invalid (Value error, it must be a multiple of chunk_rows = 100)"),
    ("simple_l0=[3,1]", "simple_l0 = [3, 1] is invalid (Value error, the range [3, 1] must satisfy 1 ≤ low ≤ high)"),
    ("bogus=1", "unknown key 'bogus'"),
])
def test_bad_generator_configs_are_one_sentence(tmp_path, capsys, override, words):
    assert dynsae_main(["synth", "--set", f"output={tmp_path}", "--set", "features=64", "--set", "chunk_rows=100",
                        "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and err.count("\n") == 1


def test_corrupt_or_misshaped_ground_truth_is_one_sentence_naming_the_file(tmp_path, synth_url):
    with pytest.raises(UserError, match="ground_truth.safetensors holds features of shape .* d = 32"):
        ground_truth.load(synth_url, 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ground_truth.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="ground_truth.safetensors is not a readable safetensors file"):
        ground_truth.load(str(bad), 16)
    assert ground_truth.load(str(tmp_path), 16) is None


def test_synth_on_s3(s3_bucket):
    url = synthesize(SynthConfig(output=f"{s3_bucket}/synth", d=8, features=16, rows=500, chunk_rows=100,
                                 shard_rows=200, complex_l0=(5, 9)), progress=False).url
    assert url.startswith("s3://") and verify_dataset(url) == []
    assert ground_truth.load(url, 8).n == 16


def test_deploy_configs_of_the_ground_truth_comparison_validate():
    """deploy/configs/synth-d768.yaml and sweep-synth-d768.yaml are valid configs at the paper's scale."""
    from pathlib import Path

    from store.config import load_config
    from trainer.config import SweepConfig, grid_points

    repo = Path(__file__).resolve().parents[2]
    synth = load_config(SynthConfig, repo / "deploy/configs/synth-d768.yaml")
    assert synth.d == 768 and synth.features == 8192
    sweep = load_config(SweepConfig, repo / "deploy/configs/sweep-synth-d768.yaml")
    assert sweep.match_l0 == "sparsemax" and sweep.grid["sae.m"] == [3072, 6144, 12288, 24576]
    assert len(grid_points(sweep)) == 84  # 7 families x 4 sizes x 3 seeds
