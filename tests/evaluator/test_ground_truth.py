"""Ground-truth metrics in the eval pass on a ``dynsae synth`` dataset: an oracle SAE (a SAELens folder
whose decoder is the stored truth) scores gt_mcc ≈ 1, a random one scores what random directions score,
our own runs get the gt_* fields, CE/zero-shot are skipped with a reason, a bad truth file is one sentence."""

from __future__ import annotations

import json

import pytest
import torch

from dynsae.cli import main as dynsae_main
from evaluator.evaluate import SYNTHETIC_NO_MODEL, evaluate_run
from evaluator.metrics import feature_matching
from harvester import ground_truth
from harvester.synth import SynthConfig, synthesize

D, N, M = 32, 24, 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    cfg = SynthConfig(output=str(tmp_path_factory.mktemp("gt")), d=D, features=N, rows=2048, chunk_rows=128,
                      shard_rows=1024, eval_fraction=0.25, simple_l0=(1, 2), complex_l0=(4, 6), noise=0.01)
    return synthesize(cfg, progress=False).url


def saelens_folder(path, w_dec: torch.Tensor, threshold: float):
    """A SAELens "standard" SAE: f = ReLU(x W_enc + b_enc), x̂ = f W_dec + b_dec, saved with its own save."""
    import sae_lens

    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=w_dec.shape[0]))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.fill_(-threshold)
        sae.b_dec.zero_()
    sae.save_model(path)
    return str(path)


def run_eval(folder: str, dataset: str) -> dict:
    assert dynsae_main(["eval", folder, "--dataset", dataset, "--json"]) == 0
    return json.loads(open(f"{folder}/eval.json").read())


def test_oracle_saelens_folder_scores_one_and_random_scores_chance(synth, tmp_path):
    pytest.importorskip("sae_lens", reason="sae-lens is not installed (the interop extra)")
    truth = ground_truth.load(synth, D)
    features = torch.from_numpy(truth.features)
    # the oracle: decoder = the true features (plus spare latents), encoder = their transpose, a threshold
    g = torch.Generator().manual_seed(5)
    spare = torch.randn(M - N, D, generator=g)
    oracle = run_eval(saelens_folder(tmp_path / "oracle", torch.cat([features, spare / spare.norm(dim=1, keepdim=True)]),
                                     threshold=0.35), synth)
    assert oracle["gt_mcc"] == pytest.approx(1.0, abs=1e-5) and oracle["gt_recovered"] == 1.0
    assert oracle["gt_f1"] > 0.5 and oracle["gt_l0_spearman"] > 0.5  # measured 0.64 and 0.75
    assert oracle["gt_skipped"] is None and oracle["ground_truth"]["features"] == N
    assert oracle["ce_skipped"] == SYNTHETIC_NO_MODEL and oracle["zeroshot_skipped"] == SYNTHETIC_NO_MODEL
    # a random SAE: its mcc is what any random set of M directions scores against the truth
    rand = torch.randn(M, D, generator=g)
    scored = run_eval(saelens_folder(tmp_path / "random", rand / rand.norm(dim=1, keepdim=True), 0.35), synth)
    other = torch.randn(M, D, generator=g)
    chance = feature_matching(features, other)["gt_mcc"]
    assert abs(scored["gt_mcc"] - chance) < 0.1 and scored["gt_mcc"] < 0.6
    assert scored["gt_recovered"] < 0.1 and scored["gt_f1"] < oracle["gt_f1"] - 0.2


def test_our_runs_get_the_fields_and_trained_beats_untrained(synth, tmp_path):
    """A topk SAE of ours trained on the synthetic rows recovers more of the truth than its own init."""
    from ev_helpers import make_run

    from store import ActivationLoader
    from trainer.sae import build

    cfg = {"variant": "topk", "d": D, "m": M, "k": 4, "seed": 0}
    init = make_run(str(tmp_path / "init"), synth, build(cfg).eval())
    sae = build(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    loader = ActivationLoader(synth, 128, split="train", seed=0)
    for b in range(150):
        loss = sae(loader.batch(b).acts)[2]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.post_step()
    trained = make_run(str(tmp_path / "trained"), synth, sae.eval())
    before = evaluate_run(init, progress=False)
    after = evaluate_run(trained, progress=False)
    assert after.gt_mcc > before.gt_mcc + 0.1 and after.gt_f1 > before.gt_f1
    assert after.gt_l0_spearman is not None and after.gt_recovered >= before.gt_recovered
    assert after.tokens.kept == after.tokens.eval_rows == after.ground_truth["rows"]


def test_misshaped_ground_truth_is_one_sentence_naming_the_file(synth, tmp_path, capsys):
    """A truth file of another d next to the dataset: `dynsae eval` exits 2 with one sentence."""
    import shutil

    from ev_helpers import make_run

    from trainer.sae import build

    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    truth = ground_truth.load(synth, D)
    truth.features = torch.eye(D + 1)[:N].numpy()  # a truth of another dimension
    ground_truth.save(str(copy), truth)
    run = make_run(str(tmp_path / "run"), str(copy), build({"variant": "relu", "d": D, "m": M, "seed": 0}))
    assert dynsae_main(["eval", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"copy/ground_truth.safetensors holds features of shape ({N}, {D + 1})" in err
    assert err.count("\n") == 1
