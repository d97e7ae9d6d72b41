"""GGUF parsing for the one-time conversion (:mod:`harvester.gguf_cache`): the plain-array reader sees exactly
what the stock ``gguf.GGUFReader`` sees, and :func:`fast_gguf_parsing` parses a file once and puts the stock
functions back."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from harvester.gguf_cache import fast_gguf_parsing, plain_reader_class


@pytest.fixture
def small_gguf(tmp_path: Path) -> Path:
    """A GGUF file with every kind of field transformers reads (scalars, a string, string and number arrays)
    and tensors in float32, float16 and a block-quantized type (Q8_0)."""
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_string("general.name", "small déjà vu")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc", "日本", ""])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 1])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(size=(5, 32)).astype(np.float32))
    writer.add_tensor("output_norm.weight", rng.normal(size=32).astype(np.float16))
    q8 = gguf.quantize(rng.normal(size=(4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_plain_array_reader_reads_what_the_stock_reader_reads(small_gguf):
    stock, plain = gguf.GGUFReader(small_gguf), plain_reader_class()(small_gguf)
    assert type(plain.data) is np.ndarray and type(stock.data) is np.memmap
    assert list(plain.fields) == list(stock.fields) and len(stock.fields) >= 8
    for name, field in stock.fields.items():
        mine = plain.fields[name]
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data), name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(mine.parts, field.parts)), name
        assert mine.contents() == field.contents(), name
    assert [t.name for t in plain.tensors] == [t.name for t in stock.tensors] == [
        "token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"]
    for mine, theirs in zip(plain.tensors, stock.tensors):
        assert (mine.tensor_type, list(mine.shape), mine.n_elements) == (theirs.tensor_type, list(theirs.shape),
                                                                          theirs.n_elements)
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data)
        assert np.array_equal(gguf.dequantize(mine.data, mine.tensor_type),
                              gguf.dequantize(theirs.data, theirs.tensor_type))


def test_fast_parsing_parses_each_file_once_and_restores_the_stock_functions(small_gguf):
    stock_reader, stock_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with fast_gguf_parsing():
        first = gguf.GGUFReader(small_gguf)
        assert gguf.GGUFReader(str(small_gguf)) is first  # the same file, parsed once
        assert isinstance(first, plain_reader_class()) and type(first.data) is np.ndarray
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("token_embd") == "token_embd"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (stock_reader, stock_map)
    assert gguf.GGUFReader(small_gguf) is not first
