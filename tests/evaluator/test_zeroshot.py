"""Zero-shot concept classification on a tiny random open_clip ViT and synthetic images."""

from __future__ import annotations

import pytest
import torch

from evaluator import zeroshot
from evaluator.zeroshot import ImageDatasetConfig, ZeroShotConfig
from store.errors import UserError
from trainer.sae import build

LAYER, SITE = 0, "resid_post"


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build({"variant": "relu", "d": 64, "m": 24, "seed": 1}).eval()


def _manual_predictions(model, preprocess, tokenizer, sae, images, index, templates, splice_sae):
    """Independent computation: a plain forward hook on the resblock, text embeddings by hand."""
    with torch.no_grad():
        text = []
        for name in images.class_names:
            e = model.encode_text(tokenizer([t.format(name) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            text.append(e.mean(0) / e.mean(0).norm())
        text = torch.stack(text)

        def hook(_m, _a, out):
            b, t, d = out.shape
            rows = out.reshape(-1, d)
            return sae.decode(sae.encode(rows), rows).reshape(b, t, d)

        handle = model.visual.transformer.resblocks[LAYER].register_forward_hook(hook) if splice_sae else None
        try:
            pixels = torch.stack([preprocess(images.loaders[int(i)]()) for i in index])
            f = model.encode_image(pixels)
        finally:
            if handle is not None:
                handle.remove()
        f = f / f.norm(dim=-1, keepdim=True)
        return (f @ text.T).argmax(-1)


def test_all_concepts_on_equals_sae_spliced(tiny_clip, image_folder, sae):
    model, preprocess, tokenizer = tiny_clip
    images = zeroshot.image_folder("synthetic", str(image_folder))
    assert images.class_names == ["blue sky", "green leaf", "red apple"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    res = zeroshot.zeroshot_dataset(model, preprocess, tokenizer, sae, images, LAYER, SITE,
                                    top_n=[1, 5, sae.config.m], templates=templates, batch_size=4)
    test_index = torch.tensor(res["test_index"])
    assert res["images_selection"] + res["images_test"] == 18
    # all M concepts on == the SAE spliced, image by image
    assert res["predictions"][f"top_{sae.config.m}"] == res["predictions"]["sae"]
    assert res["accuracy_top_n"][str(sae.config.m)] == res["accuracy_sae"]
    # independent computation of the clean and SAE-spliced predictions
    manual_sae = _manual_predictions(model, preprocess, tokenizer, sae, images, test_index, templates, True)
    manual_clean = _manual_predictions(model, preprocess, tokenizer, sae, images, test_index, templates, False)
    assert res["predictions"]["sae"] == manual_sae.tolist()
    assert res["predictions"]["clean"] == manual_clean.tolist()
    truth = images.labels[test_index]
    assert res["accuracy_clean"] == pytest.approx(float((manual_clean == truth).double().mean()))


def test_selection_counts_and_top_concepts(tiny_clip, image_folder, sae):
    model, preprocess, _ = tiny_clip
    images = zeroshot.image_folder("synthetic", str(image_folder))
    selection, test = images.split(0.5, seed=3)
    assert set(selection.tolist()).isdisjoint(test.tolist())
    assert sorted(selection.tolist() + test.tolist()) == list(range(18))
    for c in range(3):  # stratified: 3 of 6 per class selected
        assert int((images.labels[selection] == c).sum()) == 3
    counts = zeroshot.concept_counts(model, sae, images, selection, preprocess, LAYER, SITE, (0,), batch_size=4)
    # by hand: every image's rows at positions 1..16, encode, count non-zero per concept
    expected = torch.zeros(3, sae.config.m, dtype=torch.int64)
    with torch.no_grad():
        for i in selection.tolist():
            px = preprocess(images.loaders[i]())[None]
            h = zeroshot.hooked_rows(model, px, LAYER, SITE)[0, 1:]
            expected[images.labels[i]] += (sae.encode(h).to_dense() != 0).sum(0)
    assert torch.equal(counts, expected)
    assert int(counts.sum()) > 0


def test_top_concepts_by_hand():
    counts = torch.tensor([[5, 1, 5, 0], [0, 2, 3, 9]])
    keep = zeroshot.top_concepts(counts, 2)
    assert keep.tolist() == [[True, False, True, False], [False, False, True, True]]
    assert zeroshot.top_concepts(counts, 10).all()


def test_mask_codes_sparse_and_dense():
    from trainer.sae.base import Codes

    keep = torch.tensor([[True, False, True], [False, True, True]])
    sparse = Codes(m=3, idx=torch.tensor([[0, 1], [0, 2]]), val=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert zeroshot.mask_codes(sparse, keep).to_dense().tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 4.0]]
    dense = Codes(m=3, dense=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert zeroshot.mask_codes(dense, keep).to_dense().tolist() == [[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]]


def test_zeroshot_eval_config_skips_missing_and_disabled(tiny_clip, image_folder, sae, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    cfg = ZeroShotConfig(datasets=[
        ImageDatasetConfig(name="synthetic", path=str(image_folder), max_per_class=4),
        ImageDatasetConfig(name="missing", path=str(tmp_path / "nope")),
        ImageDatasetConfig(name="off", path=str(image_folder), enabled=False),
    ], top_n=[1, 5], templates=["a photo of a {}."], batch_size=8)
    res = zeroshot.zeroshot_eval(model, preprocess, tokenizer, sae, LAYER, SITE, cfg, skip_positions=[0])
    assert set(res["synthetic"]["accuracy_top_n"]) == {"1", "5"}
    assert res["synthetic"]["images_test"] == 6  # 4 per class, 2 selected, 2 tested
    assert "not available" in res["missing"]["skipped"]
    assert res["off"] == {"skipped": "disabled in the config"}
    with pytest.raises(UserError, match="exactly one of path"):
        zeroshot.load_images(ImageDatasetConfig(name="bad"))
