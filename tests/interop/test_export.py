"""``dynsae export``: every variant, really trained on the tiny dataset, loaded by the real SAELens (and
a topk run by the real sparsify) and compared numerically with our own forward on held-out rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("sae_lens") is None:  # found, not imported at collection (~7 s a test process)
    pytest.skip("sae-lens is not installed (the interop extra; `pip install -e '.[dev]'`)", allow_module_level=True)

from ev_helpers import make_run, train_sae  # noqa: E402

from dynsae.cli import main as dynsae_main  # noqa: E402

# name -> SAE config; input_scale = E‖x‖/√d of the dataset (≈ 0.25/8) checks the fold of the activation
# scale, "unit" the per-token norm
CASES = {
    "relu": {"variant": "relu", "m": 48, "input_scale": 0.03},
    "topk": {"variant": "topk", "m": 48, "k": 4, "input_scale": 0.03},
    "jumprelu": {"variant": "jumprelu", "m": 48, "input_scale": 0.03, "threshold_init": 0.05},
    "gated": {"variant": "gated", "m": 48, "input_scale": 0.03},
    "batchtopk": {"variant": "batchtopk", "m": 48, "k": 4, "input_scale": 0.03},
    "attn_relu": {"variant": "attn_relu", "m": 48},
    "sparsemax": {"variant": "sparsemax", "m": 48},
    "sparsemax_probs": {"variant": "sparsemax", "m": 48, "activation": "probs"},
    "mlp_sparsemax": {"variant": "mlp_sparsemax", "m": 48, "input_scale": 0.03},
    "topk_unit": {"variant": "topk", "m": 48, "k": 4, "input_norm": "unit", "input_scale": 0.03},
    "relu_unit": {"variant": "relu", "m": 48, "input_norm": "unit", "l1": 1e-4},
    "gated_unit": {"variant": "gated", "m": 48, "input_norm": "unit"},
    "mlp_sparsemax_unit": {"variant": "mlp_sparsemax", "m": 48, "input_norm": "unit"},
}
ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "batchtopk": "jumprelu", "attn_relu": "standard", "sparsemax": "dynsae_sparsemax",
                "mlp_sparsemax": "dynsae_sparsemax"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset):
    """name -> run directory of a really trained SAE (40 Adam steps on the train split)."""
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(str(root / name), text_dataset, train_sae(text_dataset, cfg, steps=40))
            for name, cfg in CASES.items()}


def ours(run: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, dense codes) of our SAE."""
    from trainer.sae import load

    sae = load(run).eval()
    with torch.no_grad():
        codes = sae.encode(x)
        return sae.decode(codes, x).float(), codes.to_dense().float()


def assert_same_forward(x_hat: torch.Tensor, feats: torch.Tensor, ref_hat: torch.Tensor, ref_codes: torch.Tensor):
    """Reconstruction within 1e-4 relative per row; the same active latents on ≥ 99.9% of entries."""
    rel = (x_hat - ref_hat).norm(dim=-1) / ref_hat.norm(dim=-1).clamp_min(1e-12)
    assert float(rel.max()) < 1e-4, float(rel.max())
    agree = ((feats != 0) == (ref_codes != 0)).float().mean()
    assert float(agree) >= 0.999, float(agree)
    assert float((ref_codes != 0).sum(-1).float().mean()) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("name", list(CASES))
def test_saelens_export_matches_our_forward(name, runs, eval_rows, tmp_path, text_dataset, lm_folder):
    from sae_lens import SAE

    import dynsae.saelens  # noqa: F401  (our architectures; stock ones need nothing of ours, see below)
    from trainer.sae import load

    out = tmp_path / "saelens"
    assert dynsae_main(["export", runs[name], str(out), "--format", "saelens"]) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    variant = CASES[name]["variant"]
    assert cfg["architecture"] == ARCHITECTURE[variant]
    unit = load(runs[name]).unit_input  # x/‖x‖ in, ×‖x‖ out (input_norm unit, or always for the variant)
    cross_attention = variant in ("sparsemax", "attn_relu")  # folded to features ‖x‖·a: stateless
    unit = unit and not cross_attention
    assert cfg["normalize_activations"] == ("constant_norm_rescale" if unit else "none")
    sae = SAE.load_from_disk(out)
    x, _ = eval_rows
    ref_hat, ref_codes = ours(runs[name], x)
    with torch.no_grad():
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        forward = sae(x)
    assert_same_forward(x_hat, feats, ref_hat, ref_codes)
    assert_same_forward(forward, feats, ref_hat, ref_codes)
    meta = cfg["metadata"]
    assert meta["model_name"] == lm_folder
    assert meta["hook_name"] == "blocks.1.hook_resid_pre"
    assert meta["dynsae_hook_name"] == "resid_pre of block 1"
    assert meta["context_size"] == 16 and meta["prepend_bos"] is True
    assert meta["dataset_path"] == text_dataset
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert meta["training_architecture_details"]["variant"] == variant
    assert meta["dynsae_run"]["dataset"] == text_dataset


def test_topk_decoder_is_marked_unit_norm_and_folds(runs, eval_rows, tmp_path):
    """SAE-Dashboard folds decoder norms (``fold_W_dec_norm``): valid and output-preserving here."""
    from sae_lens import SAE

    out = tmp_path / "topk"
    assert dynsae_main(["export", runs["topk"], str(out)]) == 0
    sae = SAE.load_from_disk(out)
    assert sae.cfg.rescale_acts_by_decoder_norm is True and sae.cfg.k == 4
    x, _ = eval_rows
    with torch.no_grad():
        before = sae(x)
        sae.fold_W_dec_norm()
        after = sae(x)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


def test_stock_architectures_load_without_dynsae(runs, tmp_path):
    """relu/topk/jumprelu/gated/batchtopk/attn_relu folders load in a process that imports nothing of ours."""
    folders = {}
    for name in ("relu", "topk", "jumprelu", "gated", "batchtopk", "attn_relu", "topk_unit"):
        folders[name] = str(tmp_path / name)
        assert dynsae_main(["export", runs[name], folders[name]]) == 0
    code = ("import json, sys\nfrom sae_lens import SAE\nout = {n: type(SAE.load_from_disk(p)).__name__ "
            "for n, p in json.loads(sys.argv[1]).items()}\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in "
            "('dynsae', 'trainer', 'store', 'evaluator', 'harvester')]\nprint(json.dumps(out))")
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(folders)], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    classes = json.loads(res.stdout.strip().splitlines()[-1])
    assert classes == {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
                       "batchtopk": "JumpReLUSAE", "attn_relu": "StandardSAE", "topk_unit": "TopKSAE"}


def test_sparsify_export_matches_our_forward(runs, eval_rows, tmp_path):
    from sparsify import SparseCoder

    out = tmp_path / "sparsify"
    assert dynsae_main(["export", runs["topk"], str(out), "--format", "sparsify"]) == 0
    coder = SparseCoder.load_from_disk(out)
    assert coder.cfg.k == 4 and coder.num_latents == 48
    x, _ = eval_rows
    ref_hat, ref_codes = ours(runs["topk"], x)
    with torch.no_grad():
        enc = coder.encode(x)
        feats = torch.zeros(x.shape[0], 48).scatter_(1, enc.top_indices, enc.top_acts)
        x_hat = coder(x).sae_out
    assert_same_forward(x_hat, feats, ref_hat, ref_codes)


@pytest.mark.parametrize("name", ["relu", "sparsemax", "topk_unit"])
def test_sparsify_refuses_other_variants_in_one_sentence(name, runs, tmp_path, capsys):
    assert dynsae_main(["export", runs[name], str(tmp_path / "x"), "--format", "sparsify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--format saelens" in err
    assert not (tmp_path / "x").exists()


def test_export_between_fsspec_urls(runs, tmp_path):
    """Run read from memory://, folder written to memory://: the same bytes as a local export."""
    from store import io
    from trainer.sae import load

    src = "memory://interop/run"
    sae = load(runs["sparsemax"])
    sae.save(src)
    io.write_json(io.join_url(src, "config.json"),
                  json.loads((Path(runs["sparsemax"]) / "config.json").read_text()))
    assert dynsae_main(["export", src, "memory://interop/out"]) == 0
    assert dynsae_main(["export", runs["sparsemax"], str(tmp_path / "local")]) == 0
    remote = io.load_safetensors("memory://interop/out/sae_weights.safetensors")
    local = io.load_safetensors(str(tmp_path / "local" / "sae_weights.safetensors"))
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    assert io.read_json("memory://interop/out/cfg.json")["architecture"] == "dynsae_sparsemax"


def test_export_of_a_missing_run_is_one_sentence(tmp_path, capsys):
    assert dynsae_main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sparsemax_codes_match_the_trainer_op_with_wide_supports():
    """Supports wider than the first top-k (128) take the full-sort path; both activations exact."""
    from dynsae.saelens import sparsemax_codes
    from trainer.sparsemax import sparsemax, sparsemax_mask

    g = torch.Generator().manual_seed(0)
    z = torch.cat([0.002 * torch.randn(6, 600, generator=g), 3 * torch.randn(10, 600, generator=g)])
    p = sparsemax_codes(z, "probs")
    ref = sparsemax(z)
    assert torch.allclose(p, ref, atol=1e-6)
    assert int((ref[:6] != 0).sum(-1).min()) > 128 and int((ref[6:] != 0).sum(-1).max()) < 128
    idx, mask = sparsemax_mask(z)
    scores = torch.zeros_like(z).scatter_(1, idx, torch.where(mask, z.gather(1, idx), 0.0))
    assert torch.equal(sparsemax_codes(z, "scores"), scores)
    with pytest.raises(ValueError):
        sparsemax_codes(z, "softmax")


def test_missing_library_is_not_needed_to_export(runs, tmp_path):
    """The export itself writes JSON + safetensors through store.io: sae_lens is never imported by it."""
    code = ("import sys\nfrom dynsae.export import export\nexport(sys.argv[1], sys.argv[2])\n"
            "assert 'sae_lens' not in sys.modules and 'sparsify' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code, runs["topk"], str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "o" / "cfg.json").exists()

