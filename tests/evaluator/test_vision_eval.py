"""evaluate_run on a vision dataset (tiny open_clip ViT from a model-config JSON): fvu + zero-shot section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ev_helpers import make_run, train_sae

from evaluator import zeroshot
from evaluator.evaluate import evaluate_run
from evaluator.zeroshot import ImageDatasetConfig, ZeroShotConfig

CLIP_CFG = {"embed_dim": 32,
            "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def vision_dataset(tmp_path_factory, image_folder):
    from harvester.config import ModelConfig
    from harvester.models import load_model
    from store import DatasetWriter
    from store.manifest import DatasetManifest

    base = tmp_path_factory.mktemp("vision")
    cfg_path = base / "tinyclip-test.json"
    cfg_path.write_text(json.dumps(CLIP_CFG))
    adapter = load_model(ModelConfig(kind="open_clip", name=str(cfg_path)), "cpu")
    images = zeroshot.image_folder("synthetic", str(image_folder))
    with torch.no_grad():
        pixels = torch.stack([adapter.preprocess(load()) for load in images.loaders])
        acts = zeroshot.hooked_rows(adapter.model, pixels, 0, "resid_post")  # (18, 17, 64)
    n, t, d = acts.shape
    manifest = DatasetManifest(d=d, dtype="float32", shard_rows=4 * t, chunk_rows=2 * t, context_length=t,
                               model={"name": str(cfg_path), "kind": "open_clip"},
                               hook={"layer": 0, "site": "resid_post"}, source={"name": "synthetic"},
                               class_names=images.class_names, split={"fraction": 0.3, "seed": 1})
    url = str(base / "ds")
    writer = DatasetWriter.create(url, manifest)
    rows = acts.reshape(-1, d).numpy()
    for shard, first in enumerate(range(0, n, 4)):
        imgs = np.arange(first, min(first + 4, n))
        sl = slice(first * t, (imgs[-1] + 1) * t)
        writer.write_shard(shard, rows[sl], seq_ids=np.repeat(imgs, t), positions=np.tile(np.arange(t), imgs.size),
                           labels=images.labels[imgs].numpy())
    writer.seal()
    return url


def test_vision_run_with_zeroshot(tmp_path, vision_dataset, image_folder):
    sae = train_sae(vision_dataset, {"variant": "relu", "m": 16}, steps=15)
    run = make_run(str(tmp_path / "run"), vision_dataset, sae)
    cfg = ZeroShotConfig(datasets=[ImageDatasetConfig(name="synthetic", path=str(image_folder))],
                         top_n=[1, 16], templates=["a photo of a {}."], batch_size=9)
    report = evaluate_run(run, zeroshot=cfg, progress=False)
    assert "not an HF causal LM" in report.ce_skipped
    assert report.tokens.kept == report.tokens.eval_rows - report.tokens.eval_rows // 17  # CLS rows dropped
    zs = report.zeroshot["synthetic"]
    assert zs["images_test"] == 9 and zs["classes"] == 3
    assert zs["accuracy_top_n"]["16"] == zs["accuracy_sae"]  # all M concepts on == the SAE spliced
    assert all(0.0 <= v <= 1.0 for v in [zs["accuracy_clean"], *zs["accuracy_top_n"].values()])
    assert report.zeroshot_skipped is None
