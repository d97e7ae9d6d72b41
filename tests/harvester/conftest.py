"""Tiny real models built in the test session: a GPT-2 with a BPE tokenizer trained here, and an
open_clip ViT (custom model config, random weights saved as a checkpoint) with synthetic images
in ImageFolder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders find features in the residual stream of a transformer.",
    "Pack the documents into contexts, join them with the end of text token.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
]


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


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
