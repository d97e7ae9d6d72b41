"""Sources, packing, sizes and config hashing (no Ray, no model forward)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harvester.config import HarvestConfig, config_hash, dataset_name
from harvester.job import chunk_and_shard_rows
from harvester.packing import TokenSpec, pack_contexts, token_spec
from harvester.sources import SourceConfig, image_items, iter_documents
from harvester.sources.python_docs import python_doc_texts as python_docs
from store.errors import UserError


def as_lists(contexts):
    return [c.tolist() for c in contexts]


def test_pack_contexts_puts_bos_first_and_drops_the_tail():
    pieces = [np.array([1, 2, 3, 9]), np.array([4, 5, 9]), np.array([6, 9])]  # 9 = separator
    # body of 2 tokens per context after BOS 0: [1 2][3 9][4 5][9 6], tail [9] dropped
    assert as_lists(pack_contexts(pieces, 3, 0)) == [[0, 1, 2], [0, 3, 9], [0, 4, 5], [0, 9, 6]]
    assert as_lists(pack_contexts(pieces, 3, None)) == [[1, 2, 3], [9, 4, 5], [9, 6, 9]]
    assert as_lists(pack_contexts(pieces, 3, 0, max_contexts=2)) == [[0, 1, 2], [0, 3, 9]]
    assert as_lists(pack_contexts([np.array([1, 2])], 4, None)) == []


def test_token_spec_prefers_bos_and_eos_then_cls_and_sep(tiny_gpt2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert token_spec(tok, "gpt") == TokenSpec(bos_id=eot, sep_id=eot)


def test_python_docs_is_offline_and_deterministic():
    from pydoc_data.topics import topics

    first = [doc for _, doc in zip(range(len(topics) + 3), python_docs())]
    again = [doc for _, doc in zip(range(len(topics) + 3), python_docs())]
    assert first == again
    assert first[0] == topics[sorted(topics)[0]]
    assert first[len(topics)].startswith("abc\n\n")  # stdlib docstrings follow, modules sorted by name


def test_text_files_in_sorted_order_with_jsonl_field(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n\n" + json.dumps({"body": "y"}) + "\n")
    cfg = SourceConfig(kind="text_files", paths=[str(tmp_path)], text_field="body")
    assert list(iter_documents(cfg)) == ["first file", "second file", "x", "y"]
    bad = SourceConfig(kind="text_files", paths=[str(tmp_path / "c.jsonl")])
    with pytest.raises(UserError, match="c.jsonl line 1 has no 'text' key"):
        list(iter_documents(bad))
    with pytest.raises(UserError, match="matches no files|does not exist"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(tmp_path / "nope*.txt")])))


def test_image_items_are_a_seeded_sample_across_classes(tiny_clip):
    cfg = SourceConfig(kind="image_folder", path=str(tiny_clip["images"]))
    everything = image_items(cfg, seed=0, max_images=None)
    assert everything.class_names == ["cat", "dog", "eel"]
    assert len(everything.items) == 7 + 8 + 9
    files = sorted(str(p) for p in tiny_clip["images"].rglob("*.png"))  # class dirs sort like class names
    order = np.random.default_rng(0).permutation(len(files))
    assert everything.items == [files[i] for i in order]
    assert everything.labels.tolist() == [["cat", "dog", "eel"].index(files[i].split("/")[-2]) for i in order]
    assert image_items(cfg, seed=0, max_images=5).items == everything.items[:5]
    with pytest.raises(UserError, match="holds no images"):
        image_items(SourceConfig(kind="image_folder", path=str(tiny_clip["empty"])), 0, None)


def test_chunk_and_shard_rows_hold_whole_sequences():
    assert chunk_and_shard_rows(128, None, None) == (4096, 65536)
    assert chunk_and_shard_rows(197, None, None) == (197 * 20, 197 * 20 * 16)
    assert chunk_and_shard_rows(5000, None, None) == (5000, 65000)
    with pytest.raises(UserError, match="chunk_rows=4096 is not a multiple of the 197 rows.*chunk_rows=3940"):
        chunk_and_shard_rows(197, 4096, None)
    with pytest.raises(UserError, match="shard_rows=1000 is not a multiple of chunk_rows=256"):
        chunk_and_shard_rows(32, 256, 1000)


def test_dataset_name_hashes_what_changes_the_data_only():
    base = HarvestConfig(max_tokens=1000)
    assert dataset_name(base) == f"gpt2-l8-resid_pre-{config_hash(base)[:8]}"
    same = base.model_copy(update={"workers": 4, "batch_size": 7, "output": "s3://elsewhere"})
    assert config_hash(same) == config_hash(base)
    other = HarvestConfig(max_tokens=1000, hook={"layer": 6})
    assert config_hash(other) != config_hash(base)
    assert dataset_name(HarvestConfig(name="mine")).startswith("mine-")
