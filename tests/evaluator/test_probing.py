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
