"""CE splicing on a tiny random GPT-2: exact identities and an independent hook-free computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluator.ce import splice_ce
from evaluator.splice import rows_edit, splice
from store.errors import UserError


def _nonlinear(h: torch.Tensor) -> torch.Tensor:
    """A deterministic, row-wise, non-trivial 'reconstruction'."""
    return 0.7 * h + 0.3 * torch.tanh(h) - 0.05


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_identity_splice_is_exact(tiny_gpt2, token_contexts, site, layer):
    res = splice_ce(tiny_gpt2, token_contexts, layer, site, lambda x: x.clone(), batch_size=3, progress=False)
    assert res["ce_degradation"] == 0.0
    assert res["kl"] == 0.0
    assert res["ce_sae"] == res["ce_clean"]
    assert res["ce_zero"] > res["ce_clean"] - 10  # finite, a real number
    assert res["ce_recovered"] == 1.0
    assert res["tokens"] == 8 * (12 - 2)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_zero_reconstruction_equals_zero_ablation(tiny_gpt2, token_contexts, site):
    res = splice_ce(tiny_gpt2, token_contexts, 1, site, torch.zeros_like, batch_size=4, progress=False)
    assert res["ce_sae"] == res["ce_zero"]
    assert res["ce_recovered"] == 0.0
    assert res["kl"] == res["kl_zero"] and res["kl"] > 0


def _manual_ce(model, ids, layer, site, fn):
    """Independent computation: run the GPT-2 blocks by hand, replacing rows at positions >= 1."""
    t = model.transformer
    with torch.no_grad():
        h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))[None]
        for i, block in enumerate(t.h):
            if i == layer and site == "resid_pre":
                h = torch.cat([h[:, :1], fn(h[:, 1:])], 1)
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
            if i == layer and site == "resid_post":
                h = torch.cat([h[:, :1], fn(h[:, 1:])], 1)
        logits = model.lm_head(t.ln_f(h))
    logits = logits[:, 1:-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 2:].reshape(-1))


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
@pytest.mark.parametrize("layer", [0, 1])
def test_splice_agrees_with_manual_block_loop(tiny_gpt2, token_contexts, layer, site):
    res = splice_ce(tiny_gpt2, token_contexts, layer, site, _nonlinear, batch_size=5, progress=False)
    manual_sae = _manual_ce(tiny_gpt2, token_contexts, layer, site, _nonlinear)
    manual_clean = _manual_ce(tiny_gpt2, token_contexts, layer, site, lambda h: h)
    manual_zero = _manual_ce(tiny_gpt2, token_contexts, layer, site, torch.zeros_like)
    assert res["ce_sae"] == pytest.approx(float(manual_sae), abs=1e-5)
    assert res["ce_clean"] == pytest.approx(float(manual_clean), abs=1e-5)
    assert res["ce_zero"] == pytest.approx(float(manual_zero), abs=1e-5)
    assert res["ce_degradation"] != 0.0


def test_layer0_resid_pre_agrees_with_inputs_embeds_path(tiny_gpt2, token_contexts):
    """resid_pre at layer 0 = wte + wpe: splicing it equals feeding inputs_embeds = x̂ − wpe."""
    ids = token_contexts
    t = tiny_gpt2.transformer
    with torch.no_grad():
        wpe = t.wpe(torch.arange(ids.shape[1]))[None]
        resid = t.wte(ids) + wpe
        spliced = torch.cat([resid[:, :1], _nonlinear(resid[:, 1:])], 1)
        logits = tiny_gpt2(inputs_embeds=spliced - wpe).logits[:, 1:-1]
        clean = tiny_gpt2(input_ids=ids).logits[:, 1:-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 2:].reshape(-1))
    lp_c, lp_s = F.log_softmax(clean.double(), -1), F.log_softmax(logits.double(), -1)
    expected_kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1).mean()
    res = splice_ce(tiny_gpt2, ids, 0, "resid_pre", _nonlinear, batch_size=8, progress=False)
    assert res["ce_sae"] == pytest.approx(float(expected), abs=1e-5)
    assert res["kl"] == pytest.approx(float(expected_kl), abs=1e-5)


@pytest.mark.parametrize("site,offset", [("resid_pre", 0), ("resid_post", 1)])
def test_hook_sees_hidden_states(tiny_gpt2, token_contexts, site, offset):
    seen = []

    def record(x):
        seen.append(x.clone())
        return x

    with torch.no_grad():
        with splice(tiny_gpt2, 0, site, rows_edit(record)):
            tiny_gpt2(input_ids=token_contexts)
        hs = tiny_gpt2(input_ids=token_contexts, output_hidden_states=True).hidden_states
    expected = hs[0 + offset][:, 1:].reshape(-1, hs[0].shape[-1])
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0], expected)


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, scale=1.0):
        return (hidden_states + self.lin(hidden_states) * scale, "extra")


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def forward(self, x, as_kwarg=False):
        for block in self.layers:
            x = block(hidden_states=x)[0] if as_kwarg else block(x)[0]
        return x


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_splice_handles_tuple_outputs_and_kwargs(as_kwarg):
    torch.manual_seed(0)
    model = _TupleModel()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        with splice(model, 1, "resid_post", lambda h: h * 0):
            assert torch.equal(model(x, as_kwarg), torch.zeros(2, 3, 4))
        with splice(model, 1, "resid_pre", lambda h: h * 0):
            expected = model.layers[1](torch.zeros(2, 3, 4))[0]
            assert torch.equal(model(x, as_kwarg), expected)
        # hooks are removed on exit
        assert not torch.equal(model(x, as_kwarg), expected)


def test_bad_inputs_are_user_errors(tiny_gpt2, token_contexts):
    with pytest.raises(UserError, match="hook site"):
        splice_ce(tiny_gpt2, token_contexts, 0, "attn_out", torch.clone, progress=False)
    with pytest.raises(UserError, match="layer 5 is out of range"):
        splice_ce(tiny_gpt2, token_contexts, 5, "resid_pre", torch.clone, progress=False)
    with pytest.raises(UserError, match="at least 3 tokens"):
        splice_ce(tiny_gpt2, token_contexts[:, :2], 0, "resid_pre", torch.clone, progress=False)
