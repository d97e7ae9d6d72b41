"""Fixtures of the interoperability tests (real sae-lens, real eai-sparsify).

The tiny text dataset is the evaluator tests' own (``tests/evaluator``: a random 2-layer GPT-2 saved
with a word-level tokenizer trained in the test, its block-1 resid_pre activations on 48 contexts of
16 tokens written with the real store writer, 25% eval chunks), so CE degradation is really computed
on the dataset's model. Its fixtures and helpers are reused, not copied.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: sparsify's eager decoder

EVALUATOR_TESTS = Path(__file__).resolve().parents[1] / "evaluator"
sys.path.insert(0, str(EVALUATOR_TESTS))


def _evaluator_fixtures():
    spec = importlib.util.spec_from_file_location("evaluator_tests_conftest", EVALUATOR_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ev = _evaluator_fixtures()
tiny_gpt2 = _ev.tiny_gpt2
lm_folder = _ev.lm_folder
text_dataset = _ev.text_dataset


@pytest.fixture(scope="session")
def eval_rows(text_dataset):
    """(x, positions) of every row of the dataset's held-out eval split."""
    from store import ActivationLoader

    loader = ActivationLoader(text_dataset, 100_000, split="eval", seed=0, epochs=1, columns=("acts", "positions"))
    with loader:
        batch = next(iter(loader))
    return batch.acts_on("cpu"), batch.positions.long()
