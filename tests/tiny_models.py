"""Tiny real models built offline for tests: a GPT-2 with a BPE tokenizer trained here.

Shared by the harvester tests and the end-to-end demo test (importable because pytest puts
``tests/`` on ``sys.path`` for the root conftest).
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders find features in the residual stream of a transformer.",
    "Pack the documents into contexts, join them with the end of text token.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
]


def build_tiny_gpt2(folder: Path, n_layer: int = 2, n_embd: int = 64, n_positions: int = 64) -> Path:
    """Save a random GPT-2 (``n_layer`` blocks) and a byte-level BPE tokenizer trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=4, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
