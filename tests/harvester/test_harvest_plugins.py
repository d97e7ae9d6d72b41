"""A new source kind is one new module in harvester/sources/ with nothing else edited."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

import harvester.sources as sources
from harvester.config import HarvestConfig
from harvester.job import harvest
from store import open_dataset
from store.config import validate
from store.errors import UserError

PLUGIN = textwrap.dedent('''
    """``{kind}``: the configured lines, each one reversed, as documents (a test plugin)."""

    from __future__ import annotations

    from typing import Literal

    from harvester.sources import SourceConfig, register_source


    @register_source
    class ReversedLines(SourceConfig):
        kind: Literal["{kind}"] = "{kind}"
        lines: list[str]

        def documents(self, storage_options=None):
            for line in self.lines:
                yield line[::-1]
''')


def plugin_module(package, registry: dict, template: str, stem: str):
    """Write a module from ``template`` into ``package``'s directory for the duration of a test; yields its
    kind and removes the file, its bytecode, the imported module and its registration afterwards."""
    name = f"zz_test_{stem}_{uuid.uuid4().hex[:8]}"
    kind = f"{stem}_{uuid.uuid4().hex[:6]}"
    path = Path(package.__file__).parent / f"{name}.py"
    path.write_text(template.format(kind=kind))
    try:
        yield kind
    finally:
        path.unlink()
        for cached in path.parent.glob(f"__pycache__/{name}.*"):
            cached.unlink()
        sys.modules.pop(f"{package.__name__}.{name}", None)
        registry.pop(kind, None)


@pytest.fixture
def plugin_kind():
    """A source-kind module in harvester/sources/ (the recipe's one file)."""
    yield from plugin_module(sources, sources._REGISTRY, PLUGIN, "reversed")


def test_a_new_source_module_is_a_new_kind_and_harvests(ray_local, tiny_gpt2, tmp_path, plugin_kind):
    from transformers import AutoTokenizer

    assert plugin_kind not in sources._REGISTRY  # the registry was built before the file existed
    lines = [f"line {i} of the plugin source, with some words to tokenize" for i in range(40)]
    data = {"output": str(tmp_path), "source": {"kind": plugin_kind, "lines": lines},
            "model": {"kind": "hf_causal_lm", "name": str(tiny_gpt2)}, "hook": {"layer": 1},
            "context_length": 16, "max_tokens": 64, "chunk_rows": 32, "shard_rows": 32, "batch_size": 2}
    cfg = validate(HarvestConfig, data)
    assert type(cfg.source).__module__.startswith("harvester.sources.zz_test_reversed_")
    with pytest.raises(UserError, match=r"unknown key 'source.paths'"):
        validate(HarvestConfig, {**data, "source": {"kind": plugin_kind, "lines": [], "paths": ["x"]}})
    result = harvest(cfg, progress=False)
    ds = open_dataset(result.url)
    assert ds.manifest.sealed and ds.num_rows == 64 and ds.manifest.source.kind == plugin_kind
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = [t for line in lines for t in [*tok(line[::-1], add_special_tokens=False).input_ids, eot]]
    expected = np.array([[eot, *stream[i * 15:(i + 1) * 15]] for i in range(4)])
    np.testing.assert_array_equal(ds.read(0, 64, "token_ids").reshape(4, 16), expected)


def test_every_built_in_kind_is_discovered():
    assert {"hf_dataset", "text_files", "python_docs", "image_folder", "hf_image_dataset"} <= set(
        sources.source_kinds())
    from harvester.models import model_kinds

    assert {"hf_causal_lm", "hf_encoder", "open_clip"} <= set(model_kinds())


MODEL_PLUGIN = textwrap.dedent('''
    """``{kind}``: a causal LM read without revision or GGUF support (a test plugin)."""

    from harvester.models.base import register_model
    from harvester.models.hf_causal_lm import HFCausalLM


    @register_model
    class PlainCausalLM(HFCausalLM):
        kind = "{kind}"
        fields = ()
''')


@pytest.fixture
def model_plugin_kind():
    """A model-kind module in harvester/models/ (the recipe's one file)."""
    import harvester.models as models
    from harvester.models import base

    yield from plugin_module(models, base._REGISTRY, MODEL_PLUGIN, "plain")


def test_a_new_model_module_is_a_new_kind_and_harvests(ray_local, tiny_gpt2, tmp_path, model_plugin_kind):
    """ARCHITECTURE.md's "Add a model adapter": one file in harvester/models/, nothing else edited; it
    harvests the same activations as the adapter it builds on, and refuses a field it does not use."""
    data = {"output": str(tmp_path), "source": {"kind": "python_docs"}, "hook": {"layer": 1},
            "context_length": 16, "max_tokens": 64, "chunk_rows": 32, "shard_rows": 32, "batch_size": 2}
    plugin = validate(HarvestConfig, {**data, "model": {"kind": model_plugin_kind, "name": str(tiny_gpt2)}})
    with pytest.raises(UserError, match=f"model.kind {model_plugin_kind} does not use model.revision"):
        validate(HarvestConfig, {**data, "model": {"kind": model_plugin_kind, "name": "x", "revision": "main"}})
    built_in = validate(HarvestConfig, {**data, "model": {"kind": "hf_causal_lm", "name": str(tiny_gpt2)},
                                        "output": str(tmp_path / "ref")})
    ours, ref = open_dataset(harvest(plugin, progress=False).url), open_dataset(harvest(built_in, progress=False).url)
    assert ours.manifest.model.kind == model_plugin_kind and ours.manifest.sealed
    np.testing.assert_array_equal(ours.read(0, 64, "acts"), ref.read(0, 64, "acts"))
