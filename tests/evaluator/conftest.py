"""Fixtures for the evaluator tests: a tiny random GPT-2 built in the test (offline)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_gpt2():
    """GPT2LMHeadModel with 2 layers, d = 64, vocab 101, random weights, eval mode, float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def token_contexts():
    """Eight contexts of 12 tokens (vocab 101), BOS (= 0) first."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (8, 12), generator=g)
    ids[:, 0] = 0
    return ids
