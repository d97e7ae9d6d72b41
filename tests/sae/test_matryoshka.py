"""Matryoshka BatchTopK (trainer/sae/matryoshka.py): the loss on a hand-computed case, BatchTopK's own
selection, the one-decode prefix reconstructions against a dense reference (values and gradients), the
groups config, learning, and the SAELens export round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

import trainer.sae as sae_zoo
from store.errors import UserError


def _hand_case() -> tuple[sae_zoo.SAE, torch.Tensor]:
    """d = 2, M = 4 in two groups {0, 1}, {2, 3}; W_dec rows e1, e2, −e1, (e1 + e2)/√2, W_enc = W_dec,
    zero biases: π = x W_decᵀ."""
    sae = sae_zoo.build({"variant": "matryoshka", "d": 2, "m": 4, "k": 2, "group_sizes": [2, 2]})
    r = 1 / math.sqrt(2)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [r, r]])
    with torch.no_grad():
        sae.decoder.weight.copy_(w)
        sae.W_enc.copy_(w)
    return sae, torch.tensor([[2.0, 0.5], [0.2, 1.0]])


def test_loss_is_the_sum_of_the_prefix_reconstructions_by_hand():
    sae, x = _hand_case()
    x_hat, codes, losses = sae(x)
    # π = [[2, .5, −2, 2.5/√2 ≈ 1.77], [.2, 1, −.2, 1.2/√2 ≈ .85]]; batch top K·B = 4: (0,0) 2, (0,3) 1.77,
    # (1,1) 1, (1,3) .85
    dense = codes.to_dense()
    expected = torch.tensor([[2.0, 0.0, 0.0, 2.5 / math.sqrt(2)], [0.0, 1.0, 0.0, 1.2 / math.sqrt(2)]])
    assert torch.allclose(dense, expected, atol=1e-6)
    # prefix 1 (latents 0, 1): x̂_1 = [[2, 0], [0, 1]]; (x̂_1 − x)² = 0, .25, .04, 0 → mean .0725
    # prefix 2 (all):  x̂_2 = x̂_1 + a_3 (e1 + e2)/√2 = [[3.25, 1.25], [.6, 1.6]]; (x̂_2 − x)² = 1.5625, .5625, .16, .36
    #                  → mean .66125
    assert torch.allclose(x_hat, torch.tensor([[3.25, 1.25], [0.6, 1.6]]), atol=1e-6)
    losses = {k: float(v.detach()) for k, v in losses.items()}
    assert losses["prefix_mse"] == pytest.approx(0.0725, abs=1e-6)
    assert losses["recon"] == pytest.approx(0.66125, abs=1e-6)
    assert losses["auxk"] == 0.0  # no latent is dead yet
    assert losses["loss"] == pytest.approx(0.0725 + 0.66125, abs=1e-6)


@pytest.mark.parametrize("setting", [{}, {"loss": "norm_mse", "input_norm": "unit"}])
def test_prefix_reconstructions_equal_a_dense_reference_with_gradients(setting):
    """The one sparse decode over B·G rows + cumsum equals x̂_g = (f ⊙ 1[i < M_g]) W_dec + b_dec, forward and
    backward (W_enc, b_enc, W_dec, b_dec), with uneven groups and a decoder bias; each prefix's loss is
    the variant's own (mse, or norm_mse on x/‖x‖ rescaled by ‖x‖)."""
    cfg = {"variant": "matryoshka", "d": 12, "m": 40, "k": 5, "group_sizes": [3, 7, 10, 20], "seed": 3, **setting}
    fast, ref = sae_zoo.build(cfg), sae_zoo.build(cfg)
    with torch.no_grad():
        fast.b_dec.copy_(0.1 * torch.randn(12, generator=torch.Generator().manual_seed(0)))
        fast.b_enc.copy_(0.05 * torch.randn(40, generator=torch.Generator().manual_seed(1)))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(24, 12, generator=torch.Generator().manual_seed(2))

    loss_fast = fast(x)[2]["loss"]
    codes = ref.encode(x)  # training mode: the same batch selection
    f = codes.to_dense()
    ends = [3, 10, 20, 40]
    w = ref.decoder.rows()
    n = x.norm(dim=-1, keepdim=True) if setting else torch.ones(24, 1)
    prefix = [n * ((f * (torch.arange(40) < e)) @ w + ref.b_dec) for e in ends]  # x̂_g (×‖x‖ with unit input)
    loss_ref = sum(((p - x).pow(2) / (n if setting else 1)).mean() for p in prefix)  # auxk is 0: nothing dead
    assert float(loss_fast.detach()) == pytest.approx(float(loss_ref.detach()), rel=1e-5)
    loss_fast.backward()
    loss_ref.backward()
    for name, p in fast.named_parameters():
        q = dict(ref.named_parameters())[name]
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_selection_and_threshold_are_batchtopks():
    cfg = {"d": 16, "m": 64, "k": 4, "seed": 5}
    mat = sae_zoo.build({"variant": "matryoshka", **cfg})
    btk = sae_zoo.build({"variant": "batchtopk", **cfg})
    assert isinstance(mat, type(btk))  # derived from BatchTopKSAE: its select() and threshold
    btk.load_state_dict(mat.state_dict())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # training: the batch top-K·B, and the inference threshold follows it identically
        x = torch.randn(32, 16, generator=gen)
        a, b = mat.encode(x), btk.encode(x)
        assert torch.equal(a.idx, b.idx) and torch.equal(a.val, b.val)
    assert bool(mat.threshold_set) and float(mat.threshold) == float(btk.threshold)
    mat.eval()
    btk.eval()
    x = torch.randn(32, 16, generator=gen)
    assert torch.equal(mat.encode(x).to_dense(), btk.encode(x).to_dense())  # π ⊙ 1[π > θ]


def test_groups_config():
    cfg = sae_zoo.validate_sae({"variant": "matryoshka", "d": 8, "m": 64})
    assert cfg.prefix_ends() == [4, 8, 16, 32, 64]  # default: the prefix doubles
    assert sae_zoo.validate_sae({"variant": "matryoshka", "d": 8, "m": 10, "group_fractions": [0.3, 0.7]}
                                ).prefix_ends() == [3, 10]
    assert sae_zoo.validate_sae({"variant": "matryoshka", "d": 8, "m": 10, "target_l0": 6.4}).k == 6  # steerable
    with pytest.raises(UserError, match=r"group_sizes \[4, 4\] must be positive and sum to m = 10"):
        sae_zoo.build({"variant": "matryoshka", "d": 8, "m": 10, "group_sizes": [4, 4]})
    with pytest.raises(UserError, match=r"group_fractions \[0.5, 0.6\] must be positive and sum to 1"):
        sae_zoo.build({"variant": "matryoshka", "d": 8, "m": 8, "group_fractions": [0.5, 0.6]})
    # at a small M a group that rounds to nothing is dropped: M/16 = 0.625 → 1, M/8 = 1.25 → 1
    assert sae_zoo.validate_sae({"variant": "matryoshka", "d": 8, "m": 10}).prefix_ends() == [1, 2, 5, 10]
    assert sae_zoo.variant_class("matryoshka").has_l0_knob


def _train(sae: sae_zoo.SAE, data, steps: int, batch: int) -> None:
    """Adam (lr 3e-3, betas (0.9, 0.99)) on fresh batches of the synthetic data."""
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.9, 0.99))
    for _ in range(steps):
        loss = sae(data.batch(batch))[2]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.post_step()


def test_learns_and_its_prefixes_reconstruct(dictionary_data):
    data = dictionary_data(d=32, m_true=64, active=4, noise=0.01, seed=1)
    sae = sae_zoo.build({"variant": "matryoshka", "d": 32, "m": 128, "k": 6, "group_sizes": [16, 112]})
    x_eval = data.batch(1024)

    def losses() -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in sae(x_eval)[2].items()}

    start = losses()
    _train(sae, data, steps=150, batch=256)
    end = losses()  # measured: loss 0.26 → 0.11, recon 0.14 → 0.04, prefix_mse 0.12 → 0.07
    assert end["loss"] < 0.5 * start["loss"]
    assert end["recon"] < 0.4 * start["recon"]
    assert end["prefix_mse"] < 0.75 * start["prefix_mse"]  # the 16-latent prefix learned to reconstruct alone


def test_saelens_export_round_trip(tmp_path, dictionary_data):
    """Exported (no dataset: a bare sae.save() folder) and loaded by the real SAELens as a JumpReLU SAE with
    the global threshold: the same codes and reconstruction as ours; sparsify refuses in one sentence."""
    pytest.importorskip("sae_lens")
    from sae_lens import SAE

    from dynsae.export import export

    data = dictionary_data(d=16, m_true=32, active=3, noise=0.01, seed=2)
    sae = sae_zoo.build({"variant": "matryoshka", "d": 16, "m": 48, "k": 4, "input_scale": 0.5,
                         "group_sizes": [8, 40]})
    _train(sae, data, steps=30, batch=128)
    sae.save(str(tmp_path / "run"))
    export(str(tmp_path / "run"), str(tmp_path / "saelens"), "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "dynsae_matryoshka"
    loaded = SAE.load_from_disk(str(tmp_path / "saelens"))
    assert type(loaded).__name__ == "JumpReLUSAE"
    ours = sae_zoo.load(str(tmp_path / "run")).eval()
    x = data.batch(200)
    with torch.no_grad():
        codes = ours.encode(x)
        ref_hat, ref_codes = ours.decode(codes), codes.to_dense()
        feats = loaded.encode(x)
        x_hat = loaded.decode(feats)
    assert float((ref_codes != 0).sum(-1).float().mean()) > 0
    assert torch.equal(feats != 0, ref_codes != 0)
    assert torch.allclose(feats, ref_codes * 0.5, rtol=1e-4, atol=1e-5)  # features folded by c = s
    assert torch.allclose(x_hat, ref_hat, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match=r"cannot be exported to sparsify: .*global threshold.*--format saelens"):
        export(str(tmp_path / "run"), str(tmp_path / "sparsify"), "sparsify")
    assert not (tmp_path / "sparsify").exists()
