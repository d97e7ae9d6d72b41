"""Sparse probing (evaluator.metrics): pooling, split, ranking and the probe, on hand-built data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator.metrics import (
    PROBE_SIZES,
    DocumentMeans,
    probe_metrics,
    probe_split,
    rank_latents,
    sparse_probe,
)


def test_document_means_pool_rows_by_document_over_batches():
    pool = DocumentMeans(np.array([3, 7, 9]), width=2)
    pool.update(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([7, 3]))
    pool.update(torch.tensor([[5.0, 4.0]]), torch.tensor([7]))
    docs, means = pool.result()
    assert docs.tolist() == [3, 7]  # document 9 has no row
    np.testing.assert_allclose(means, [[3.0, 2.0], [3.0, 2.0]])  # doc 7: mean of (1,0) and (5,4)
    with pytest.raises(ValueError, match="not in the documents list"):
        pool.update(torch.zeros(1, 2), torch.tensor([4]))


def test_rank_latents_by_class_mean_difference():
    x = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 2.0, 5.0], [0.0, 4.0, 5.0]])
    # class 0: mean (2, 0, 5), rest (0, 3, 5): |diff| = (2, 3, 0)
    assert rank_latents(x, np.array([True, True, False, False])).tolist() == [1, 0, 2]


def test_probe_split_is_per_class_seeded_and_keeps_a_training_document():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    test = probe_split(labels, 0.3, seed=0)
    assert test[labels == 0].sum() == 3 and test[labels == 1].sum() == 1 and test[labels == 2].sum() == 0
    assert np.array_equal(test, probe_split(labels, 0.3, seed=0))
    assert not np.array_equal(test, probe_split(labels, 0.3, seed=1))


def separable(n_docs: int = 90, classes: int = 3, noise_latents: int = 40, seed: int = 0):
    """Pooled codes where latent c is 1 exactly on class c's documents, plus noise latents."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_docs) % classes
    codes = np.concatenate([np.eye(classes)[labels], rng.random((n_docs, noise_latents))], axis=1)
    return codes, labels


def test_a_perfectly_separable_latent_probes_to_accuracy_one():
    codes, labels = separable()
    test = probe_split(labels)
    assert sparse_probe(codes, labels, test, 1) == 1.0
    raw = np.random.default_rng(1).normal(size=(len(labels), 8))
    out = probe_metrics(codes, raw, labels)
    assert all(out[f"probe_top{n}"] == 1.0 for n in PROBE_SIZES)
    assert out["probe"]["test_documents"] == 27 and out["probe"]["classes"] == 3
    assert abs(out["probe_raw_all"] - 1 / 3) < 0.25  # random raw activations: about chance


def test_shuffled_labels_probe_to_about_chance():
    codes, labels = separable(n_docs=600, classes=3)
    shuffled = np.random.default_rng(2).permutation(labels)
    accs = [probe_metrics(codes, codes[:, :3], shuffled)[f"probe_top{n}"] for n in (1, 5, 10)]
    assert all(abs(a - 1 / 3) < 0.1 for a in accs), accs


def test_too_few_labelled_documents_skip_the_probe_with_a_reason():
    out = probe_metrics(np.zeros((3, 4)), np.zeros((3, 2)), np.array([0, 0, 1]))
    assert set(out) == {"probe_skipped"} and "fewer than two classes" in out["probe_skipped"]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), classes=st.integers(2, 4))
def test_probe_accuracy_does_not_depend_on_class_ids(seed, classes):
    """Renaming the classes (a permutation of the ids) keeps the split and every prediction."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 40)
    labels[:classes] = np.arange(classes)
    labels[classes:2 * classes] = np.arange(classes)
    codes = rng.random((40, 12)) + labels[:, None] * rng.random(12) * 0.5
    rename = rng.permutation(classes)
    test = probe_split(labels)
    assert np.array_equal(test, probe_split(rename[labels]))
    a = sparse_probe(codes, labels, test, 5)
    assert 0.0 <= a <= 1.0
    assert a == sparse_probe(codes, rename[labels], test, 5)


# ---- in the eval pass: a labelled store dataset, documents spanning several sequences --------------

D, CTX, CLASSES = 8, 4, ("alpha", "beta", "gamma")


def write_labelled_dataset(url: str) -> str:
    """60 documents of 1-3 sequences (class = doc % 3; rows = 2·e_class + noise), labels and doc_ids."""
    from store import DatasetWriter
    from store.manifest import DatasetManifest

    rng = np.random.default_rng(0)
    doc_of_seq = np.concatenate([[doc] * (1 + doc % 3 if doc % 5 else 1) for doc in range(60)])
    labels = (doc_of_seq % 3).astype(np.int32)
    rows = np.repeat(2.0 * np.eye(D)[labels], CTX, axis=0) + rng.normal(0, 1.0, (len(labels) * CTX, D))
    manifest = DatasetManifest(d=D, dtype="float32", shard_rows=32, chunk_rows=8, context_length=CTX,
                               model={"name": "none", "kind": "hf_causal_lm"}, hook={"layer": 0, "site": "resid_pre"},
                               source={"name": "hand-made"}, class_names=list(CLASSES), documents=True,
                               split={"fraction": 0.5, "seed": 0})
    writer = DatasetWriter.create(url, manifest)
    per_shard = 32 // CTX
    for shard, s0 in enumerate(range(0, len(labels), per_shard)):
        s1 = min(s0 + per_shard, len(labels))
        writer.write_shard(shard, rows[s0 * CTX:s1 * CTX].astype(np.float32), labels=labels[s0:s1],
                           doc_ids=doc_of_seq[s0:s1])
    writer.seal()
    return url


def relu_mirror_sae():
    """A ReLU SAE with codes relu([x, −x]) (W_enc = [I; −I], no biases): pooled codes are checkable by hand."""
    from trainer.sae import build

    sae = build({"variant": "relu", "d": D, "m": 2 * D, "seed": 0})
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(D), -torch.eye(D)]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_eval_pass_pools_codes_per_document_and_probes(tmp_path):
    from ev_helpers import make_run

    from evaluator.evaluate import evaluate_run
    from store import open_dataset

    url = write_labelled_dataset(str(tmp_path / "labelled"))
    run = make_run(str(tmp_path / "run"), url, relu_mirror_sae(), exclude_positions=(0,))
    report = evaluate_run(run, ce_contexts=0, batch_size=20, progress=False)
    # the same numbers from the stored arrays directly: per eval document, mean over rows at positions ≥ 1
    ds = open_dataset(url)
    seqs = np.concatenate([np.arange(a // CTX, b // CTX) for a, b in ds.split_row_ranges("eval")])
    docs = np.unique(ds.doc_ids()[seqs])
    x = np.concatenate([ds.read(a, b) for a, b in ds.split_row_ranges("eval")]).astype(np.float64)
    pos = np.concatenate([ds.read(a, b, "positions") for a, b in ds.split_row_ranges("eval")])
    row_doc = np.repeat(ds.doc_ids()[seqs], CTX)

    def doc_means(values: np.ndarray) -> np.ndarray:
        return np.stack([values[(row_doc == doc) & (pos != 0)].mean(0) for doc in docs])

    raw = doc_means(x)
    codes = doc_means(np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=1))
    labels = ds.labels()[seqs][np.searchsorted(ds.doc_ids()[seqs], docs)]
    expect = probe_metrics(codes, raw, labels)
    assert report.probe["documents"] == len(docs) < len(seqs)  # documents span several sequences
    for key in [f"probe_top{n}" for n in PROBE_SIZES] + [f"probe_raw_top{n}" for n in PROBE_SIZES] + ["probe_raw_all"]:
        assert getattr(report, key) == pytest.approx(expect[key]), key
    assert report.probe_raw_all > 0.8 and report.probe_skipped is None  # 2·e_class in noise of std 1
