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
from store.config import validate
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


def test_text_files_read_any_plain_text_file_and_refuse_binary_ones(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# markdown")
    (docs / "b.rst").write_text("restructured\n============")
    (docs / "c.py").write_text('print("python")\n')
    (docs / "sub" / "README").write_text("no extension")
    (docs / "sub" / "d.jsonl").write_text(json.dumps({"text": "json line"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row", None]}), docs / "sub" / "e.parquet")
    (docs / ".hidden").write_bytes(b"\x00 skipped: hidden files are not documents")
    # a 3-byte character cut by the 1 KiB sniff window is still text
    (docs / "sub" / "f.txt").write_bytes(b"x" * 1023 + "€ after the boundary".encode())
    cfg = SourceConfig(kind="text_files", paths=[str(docs)])
    assert list(iter_documents(cfg)) == ["# markdown", "restructured\n============", 'print("python")\n',
                                         "no extension", "json line", "parquet row",
                                         "x" * 1023 + "€ after the boundary"]
    single = SourceConfig(kind="text_files", paths=[str(docs / "sub" / "README"), str(docs / "a.md")])
    assert list(iter_documents(single)) == ["no extension", "# markdown"]

    (docs / "sub" / "model.bin").write_bytes(b"GGUF\x00\x01\x02")
    with pytest.raises(UserError, match=rf"source file {docs}/sub/model.bin is not plain text \(a NUL byte at "
                                        r"offset 4\); remove it from source.paths"):
        list(iter_documents(cfg))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not plain text \(invalid UTF-8 at byte 3\)"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(latin1)])))
    late = tmp_path / "late.txt"
    late.write_bytes(b"y" * 4096 + b"\xff")
    with pytest.raises(UserError, match=r"late.txt is not plain text \(invalid UTF-8 at byte 4096\)"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(late)])))


def test_source_sections_are_checked_per_kind():
    with pytest.raises(UserError, match=r"unknown key 'source.split'"):
        validate(HarvestConfig, {"source": {"kind": "text_files", "paths": ["x"], "split": "train"}})
    # (?:\w+, )*: a plugin test in another pytest-xdist worker may have a source module of its own in
    # harvester/sources/ for a moment, and discovery lists it too
    with pytest.raises(UserError, match=r"source.kind = 'nope' is invalid \(unknown source kind; use one of "
                                        r"hf_dataset, hf_image_dataset, image_folder, python_docs, (?:\w+, )*text_files"):
        validate(HarvestConfig, {"source": {"kind": "nope"}})
    with pytest.raises(UserError, match=r"model.kind hf_causal_lm does not use model.pretrained"):
        validate(HarvestConfig, {"model": {"pretrained": "openai"}})
    assert type(HarvestConfig().source).__name__ == "HFDatasetSource"  # kind defaults to hf_dataset


def test_dataset_names_of_the_flat_config_era_are_kept():
    """The hash covers the source as the one flat SourceConfig dumped it, so these names stay."""
    cases = {"gpt2-l8-resid_pre-d80fd4f3": {"max_tokens": 1000},
             "gpt2-l8-resid_pre-762707ee": {"source": {"kind": "text_files", "paths": ["a", "b"],
                                                       "text_field": "body"}},
             "vit-b-16-l8-resid_pre-7fe55a3c": {"source": {"kind": "image_folder", "path": "/x"}, "max_images": 10,
                                                "model": {"kind": "open_clip", "name": "ViT-B-16",
                                                          "pretrained": "openai"}}}
    for name, data in cases.items():
        assert dataset_name(HarvestConfig.model_validate(data)) == name


def test_damaged_jsonl_and_parquet_sources_are_one_sentence(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{broken} line 2 is not UTF-8 text \(invalid byte at column 14\)"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(broken)])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b"] * 50}), table)
    table.write_bytes(table.read_bytes()[:-30])  # the footer is cut off
    with pytest.raises(UserError, match=rf"{table} is not a readable Parquet file .*truncated or corrupt"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(table)])))
    table.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")  # garbage between the magic bytes
    with pytest.raises(UserError, match="is not a readable Parquet file"):
        list(iter_documents(SourceConfig(kind="text_files", paths=[str(table)])))


# ---- labelled text ------------------------------------------------------------------------------

def test_pack_documents_never_joins_documents_and_keeps_label_and_id():
    from harvester.packing import pack_documents

    docs = [(np.array([1, 2, 3, 4, 5, 9]), (1, 0)),  # 6 tokens: pieces [1 2][3 4][5 9]
            (np.array([6, 9]), (0, 1)),              # one piece [6 9]
            (np.array([7]), (1, 2))]                 # shorter than a piece: no context
    out = [(c.tolist(), lab, doc) for c, lab, doc in pack_documents(docs, 3, 0)]
    assert out == [([0, 1, 2], 1, 0), ([0, 3, 4], 1, 0), ([0, 5, 9], 1, 0), ([0, 6, 9], 0, 1)]
    no_bos = [(c.tolist(), doc) for c, _, doc in pack_documents(docs, 4, None)]
    assert no_bos == [([1, 2, 3, 4], 0)]  # the tail [5 9] of document 0 is dropped
    assert len(list(pack_documents(docs, 3, 0, max_contexts=2))) == 2


def labelled_folder(root, classes: dict[str, list[str]]):
    for name, texts in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (root / name / f"d{i}.txt").write_text(text)
    return root


def test_text_files_label_from_folder(tmp_path):
    root = labelled_folder(tmp_path / "corpus", {"b_cls": ["b0", "b1"], "a_cls": ["a0", "a1", "a2"]})
    (root / "a_cls" / ".hidden").write_text("skipped")
    cfg = SourceConfig(kind="text_files", paths=[str(root)], label_from="folder")
    assert cfg.document_classes() == ["a_cls", "b_cls"]
    docs = list(cfg.labelled_documents())
    assert sorted(docs) == [("a0", 0), ("a1", 0), ("a2", 0), ("b0", 1), ("b1", 1)]
    assert docs == list(cfg.labelled_documents())  # a fixed permutation
    assert SourceConfig(kind="text_files", paths=[str(root)]).document_classes() is None


@pytest.mark.parametrize("classes, message", [
    ({"only": ["x", "y"]}, "has 1 document class"),
    ({"a": ["x", "y"], "b": []}, "has no documents of class 'b'"),
    ({"a": ["x"], "b": [], "c": []}, r"more classes \(3\) than documents \(1\)"),
])
def test_bad_label_folders_are_one_sentence_naming_the_source(tmp_path, classes, message):
    root = labelled_folder(tmp_path / "corpus", classes)
    cfg = SourceConfig(kind="text_files", paths=[str(root)], label_from="folder")
    with pytest.raises(UserError, match=f"source text_files {root}.*{message}"):
        cfg.document_classes()


def test_text_files_label_field_jsonl(tmp_path):
    lines = [{"text": "t0", "topic": "sport"}, {"text": "t1", "topic": "art"}, {"text": "t2", "topic": "sport"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    cfg = SourceConfig(kind="text_files", paths=[str(tmp_path / "a.jsonl")], label_field="topic")
    assert cfg.document_classes() == ["art", "sport"]
    assert list(cfg.labelled_documents()) == [("t0", 1), ("t1", 0), ("t2", 1)]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "t3"}) + "\n")
    missing = SourceConfig(kind="text_files", paths=[str(tmp_path / "b.jsonl")], label_field="topic")
    with pytest.raises(UserError, match="b.jsonl line 1 has no 'topic' label"):
        missing.document_classes()


def test_python_docs_labelled_by_module_family():
    from pydoc_data.topics import topics

    from harvester.sources.python_docs import LANGUAGE, MODULE_FAMILIES, family_documents

    cfg = SourceConfig(kind="python_docs", label_by="family")
    names = cfg.document_classes()
    assert names == [LANGUAGE, *MODULE_FAMILIES]
    docs = family_documents()
    assert list(docs[:len(topics)]) == [(topics[k], 0) for k in sorted(topics)]
    counts = np.bincount([lab for _, lab in docs], minlength=len(names))
    assert (counts > 10).all()  # every family has documents
    json_docs = [lab for text, lab in docs if text.startswith("json.") or text.startswith("json\n")]
    assert json_docs and set(json_docs) == {names.index("data formats")}
    first = [doc for _, doc in zip(range(50), cfg.labelled_documents())]
    assert len({lab for _, lab in first}) > 3  # permuted: the first documents span the classes


def test_labels_change_the_dataset_name_and_only_then():
    plain = {"source": {"kind": "python_docs"}}
    labelled = {"source": {"kind": "python_docs", "label_by": "family"}}
    assert dataset_name(HarvestConfig.model_validate(plain)) == dataset_name(
        HarvestConfig.model_validate({"source": {"kind": "python_docs", "label_by": None}}))
    assert config_hash(HarvestConfig.model_validate(plain)) != config_hash(HarvestConfig.model_validate(labelled))
    folder = {"source": {"kind": "text_files", "paths": ["a"], "label_from": "folder"}}
    field = {"source": {"kind": "text_files", "paths": ["a"], "label_field": "label"}}
    hashes = {config_hash(HarvestConfig.model_validate(c)) for c in
              (folder, field, {"source": {"kind": "text_files", "paths": ["a"]}})}
    assert len(hashes) == 3


def test_family_documents_are_parsed_once_and_read_back_equal(tmp_path, monkeypatch):
    """The labelled documents are kept in the cache folder: what is read back equals what was parsed; a
    damaged file is parsed again and replaced."""
    from harvester.sources import python_docs as pd

    monkeypatch.setenv("DYNSAE_CACHE_DIR", str(tmp_path))
    path = pd.family_cache_path()
    assert path.is_relative_to(tmp_path) and not path.exists()
    pd.family_documents.cache_clear()
    try:
        parsed = pd.family_documents()  # parsed, and written
        assert path.is_file() and parsed[0][1] == 0 and len(parsed) > 1000
        pd.family_documents.cache_clear()
        assert pd.family_documents() == parsed  # read back from the file
        path.write_text('[["a document", "not a number"]]')
        pd.family_documents.cache_clear()
        assert pd.family_documents() == parsed and json.loads(path.read_text())[0] == [parsed[0][0], 0]
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    finally:
        pd.family_documents.cache_clear()
