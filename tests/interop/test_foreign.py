"""``dynsae eval DIR --dataset URL`` / ``dynsae concepts DIR --dataset URL`` on SAEs made elsewhere: built
with SAELens's and sparsify's own constructors, saved with their own save functions, scored with our
metric definitions and checked against fvu computed directly with their forward pass."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

# found, not imported at collection (~7 s in every test process): the tests import them where they use them
for module, why in (("sae_lens", "sae-lens is not installed (the interop extra; `pip install -e '.[dev]'`)"),
                    ("sparsify", "eai-sparsify is not installed (the interop extra)")):
    if importlib.util.find_spec(module) is None:
        pytest.skip(why, allow_module_level=True)

from dynsae.cli import main as dynsae_main  # noqa: E402

D, M = 64, 48


def saelens_sae(architecture: str, d_in: int = D):
    """A SAELens SAE from its own constructor, with weights set to something that reconstructs."""
    import sae_lens

    torch.manual_seed(1)
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {})}
    cls, cfg_cls, extra = classes[architecture]
    sae = cls(cfg_cls(d_in=d_in, d_sae=M, **extra))
    with torch.no_grad():
        w = torch.randn(M, d_in)
        sae.W_dec.copy_(0.1 * w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(w.T / w.norm(dim=-1))
        if architecture == "jumprelu":
            sae.threshold.fill_(0.02)
        if architecture == "gated":
            sae.b_gate.fill_(-0.01)
            sae.r_mag.fill_(0.5)
    return sae


def direct_fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − μ‖² in float64."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def kept_rows(eval_rows):
    x, positions = eval_rows
    return x[positions != 0]  # the default row filter: BOS rows excluded


def run_eval(folder: str, dataset: str, *extra: str) -> dict:
    assert dynsae_main(["eval", folder, "--dataset", dataset, "--ce-contexts", "2", "--json", *extra]) == 0
    return json.loads(open(extra[extra.index("--out") + 1] if "--out" in extra else f"{folder}/eval.json").read())


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_folder_is_scored_with_our_metrics(architecture, tmp_path, text_dataset, eval_rows):
    sae = saelens_sae(architecture)
    folder = tmp_path / architecture
    sae.save_model(folder)
    report = run_eval(str(folder), text_dataset)
    x = kept_rows(eval_rows)
    with torch.no_grad():
        x_hat = sae(x)
        feats = sae.encode(x)
    assert report["variant"] == f"saelens:{architecture}" and report["m"] == M and report["d"] == D
    assert report["tokens"]["kept"] == x.shape[0]
    assert report["fvu"] == pytest.approx(direct_fvu(x_hat, x), rel=1e-5)
    assert report["l0"] == pytest.approx(float((feats != 0).sum(-1).double().mean()), rel=1e-9)
    assert report["dataset_url"] == text_dataset
    assert report["ce_degradation"] is not None and report["ce_skipped"] is None
    dead = float(((feats != 0).sum(0) == 0).double().mean())
    assert report["dead_frac"] == pytest.approx(dead)


def test_sparsify_folder_is_scored_with_our_metrics(tmp_path, text_dataset, eval_rows):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(2)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=M, k=5))
    with torch.no_grad():
        coder.W_dec.mul_(0.1)
    folder = tmp_path / "sparsify"
    coder.save_to_disk(folder)
    out = tmp_path / "elsewhere" / "scores.json"
    report = run_eval(str(folder), text_dataset, "--out", str(out))
    assert not (folder / "eval.json").exists()
    x = kept_rows(eval_rows)
    with torch.no_grad():
        x_hat = coder(x).sae_out
    assert report["variant"] == "sparsify:topk" and report["m"] == M
    assert report["fvu"] == pytest.approx(direct_fvu(x_hat, x), rel=1e-5)
    assert report["l0"] == pytest.approx(5.0)
    assert report["ce_degradation"] is not None


def test_our_export_round_trips_through_eval(tmp_path, text_dataset):
    """A run exported to SAELens and scored as a foreign folder gives the run's own numbers."""
    from ev_helpers import make_run, train_sae

    from evaluator.evaluate import evaluate_run

    run = make_run(str(tmp_path / "run"), text_dataset, train_sae(text_dataset, {"variant": "topk", "m": M, "k": 4,
                                                                                  "input_scale": 0.03}, steps=20))
    ours = evaluate_run(run, ce_contexts=0, progress=False, write=False)
    assert dynsae_main(["export", run, str(tmp_path / "sl")]) == 0
    theirs = evaluate_run(str(tmp_path / "sl"), dataset_url=text_dataset, ce_contexts=0, progress=False)
    assert theirs.fvu == pytest.approx(ours.fvu, rel=1e-4)
    assert theirs.l0 == pytest.approx(ours.l0, rel=1e-3)


def test_concepts_browser_of_a_saelens_folder(tmp_path, text_dataset):
    folder = tmp_path / "topk"
    saelens_sae("topk").save_model(folder)
    assert dynsae_main(["concepts", str(folder), "--dataset", text_dataset, "--tokens", "256", "--top", "3"]) == 0
    assert (folder / "concepts" / "index.html").exists()


def test_d_in_mismatch_is_one_sentence(tmp_path, text_dataset, capsys):
    folder = tmp_path / "narrow"
    saelens_sae("standard", d_in=32).save_model(folder)
    assert dynsae_main(["eval", str(folder), "--dataset", text_dataset]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "d_in = 32" in err and "d = 64" in err


def test_folder_of_neither_format_is_one_sentence(tmp_path, text_dataset, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\0")
    assert dynsae_main(["eval", str(folder), "--dataset", text_dataset]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SAELens folder" in err and "sparsify folder" in err


def test_foreign_folder_needs_a_dataset(tmp_path, capsys):
    folder = tmp_path / "std"
    saelens_sae("standard").save_model(folder)
    assert dynsae_main(["eval", str(folder)]) == 2
    assert "pass --dataset" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_corrupt_foreign_weights_are_one_sentence(fmt, tmp_path, text_dataset, capsys):
    folder = tmp_path / fmt
    if fmt == "saelens":
        saelens_sae("standard").save_model(folder)
        weights = folder / "sae_weights.safetensors"
    else:
        import sparsify

        sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=4)).save_to_disk(folder)
        weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated: the header says more than is there
    assert dynsae_main(["eval", str(folder), "--dataset", text_dataset]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(folder) in err


def test_remote_foreign_folder_leaves_no_temporary_copy(tmp_path, s3_bucket, monkeypatch):
    import tempfile

    from evaluator.foreign import load_foreign
    from store import io

    folder = tmp_path / "std"
    saelens_sae("standard").save_model(folder)
    io.put_dir(str(folder), f"{s3_bucket}/std")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert load_foreign(f"{s3_bucket}/std").config.m == M
    assert list(scratch.iterdir()) == []


def test_foreign_decoder_directions_are_unit_decoder_rows(tmp_path):
    """SAELens and sparsify folders: decoder_directions() = W_dec rows / their norms."""
    from sparsify import SparseCoder, SparseCoderConfig

    from evaluator.foreign import load_foreign

    sl = saelens_sae("standard")
    sl.save_model(tmp_path / "sl")
    torch.manual_seed(3)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=M, k=5))
    coder.save_to_disk(tmp_path / "sp")
    for folder, w_dec in ((tmp_path / "sl", sl.W_dec), (tmp_path / "sp", coder.W_dec)):
        u = load_foreign(str(folder)).decoder_directions()
        w = w_dec.detach().float()
        torch.testing.assert_close(u, w / w.norm(dim=-1, keepdim=True))
