"""Fixtures for the evaluator tests: tiny random GPT-2 / open_clip built in the test (offline), a tiny
store dataset, really trained tiny SAEs."""

from __future__ import annotations

import pytest
import torch
from ev_helpers import train_sae, write_text_dataset


@pytest.fixture(scope="session")
def tiny_gpt2():
    """GPT2LMHeadModel with 2 layers, d = 64, vocab 101, random weights, eval mode, float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def token_contexts():
    """Eight contexts of 12 tokens (vocab 101), BOS (= 0) first."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (8, 12), generator=g)
    ids[:, 0] = 0
    return ids


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess, tokenizer): an open_clip CLIP from a custom config, random weights, 32 px images."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32,
                 vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    preprocess = open_clip.transform.image_transform(32, is_train=False)
    return model, preprocess, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """ImageFolder of synthetic 32x32 PNGs: 3 classes x 6 images, each class a colour with noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    colours = {"red_apple": (200, 30, 30), "green_leaf": (30, 200, 30), "blue_sky": (30, 30, 200)}
    for name, rgb in colours.items():
        (root / name).mkdir()
        for i in range(6):
            noise = torch.randint(-40, 40, (32, 32, 3), generator=g)
            arr = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


# ---- a tiny text dataset in the real store, and run directories with really trained SAEs --------

@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory, tiny_gpt2):
    """The tiny GPT-2 saved with a word-level tokenizer trained in the test (loadable by harvester)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 101)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)
    tiny_gpt2.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory, tiny_gpt2, lm_folder):
    """URL of a sealed tiny text dataset whose model is the saved tiny GPT-2 (CE can load it)."""
    return write_text_dataset(str(tmp_path_factory.mktemp("data") / "tiny"), tiny_gpt2, lm_folder)


@pytest.fixture(scope="session")
def trained_relu(text_dataset):
    return train_sae(text_dataset, {"variant": "relu", "m": 32})
