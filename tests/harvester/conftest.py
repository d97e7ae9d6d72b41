"""Tiny real models built in the test session: a GPT-2 with a BPE tokenizer trained here, and an
open_clip ViT (custom model config, random weights saved as a checkpoint) with synthetic images
in ImageFolder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import CORPUS, build_tiny_gpt2


def write_corpus(folder: Path, n_docs: int = 60) -> list[Path]:
    """Deterministic small corpus: some .txt files and one .jsonl file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = " ".join(CORPUS).split()
    paths = []
    for i in range(4):
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(rng.choice(words, size=80 + 10 * i)))
        paths.append(path)
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=40))}) for _ in range(n_docs)]
    jsonl = folder / "more.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    paths.append(jsonl)
    return paths


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-block GPT-2 (n_embd=64) with a byte-level BPE tokenizer trained on a tiny corpus."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, Path]:
    """A tiny open_clip ViT (32px, patch 8 -> 17 tokens, 3 blocks, width 32) and 3 classes of images."""
    import open_clip
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    config_path = folder / "tiny-vit-test.json"
    config_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-test")
    ckpt = folder / "tiny-vit-test.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    images = folder / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (images / name).mkdir(parents=True)
        for i in range(7 + c):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / name / f"{i:02d}.png")
    (folder / "empty" / "cls").mkdir(parents=True)
    return {"config": config_path, "ckpt": ckpt, "images": images, "empty": folder / "empty"}
