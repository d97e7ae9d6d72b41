"""store.batch.Batch: the one batch record — columns by name, extra columns, the cast on the device,
and the trip through pickle protocol 5 (Ray's object store) as zero-copy numpy buffers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from store_testdata import make_manifest

from store import ActivationLoader, DatasetWriter
from store.batch import Batch


def test_columns_rows_bytes_head_and_the_cast():
    acts = torch.arange(12, dtype=torch.float16).reshape(4, 3)
    batch = Batch.of({"acts": acts, "positions": torch.arange(4, dtype=torch.int16),
                      "true_l0": torch.ones(4, dtype=torch.int16)})
    assert list(batch.columns) == ["acts", "positions", "true_l0"] and batch.token_ids is None
    assert batch.extra.keys() == {"true_l0"} and batch.rows == 4
    assert batch.nbytes == 12 * 2 + 4 * 2 + 4 * 2  # stored widths, no cast
    head = batch.head(2)
    assert head.rows == 2 and torch.equal(head.extra["true_l0"], torch.ones(2, dtype=torch.int16))
    x = batch.acts_on("cpu")
    assert x.dtype == torch.float32 and torch.equal(x, acts.float()) and batch.acts.dtype == torch.float16
    with pytest.raises(ValueError, match="no acts column"):
        Batch.of({"positions": torch.zeros(2, dtype=torch.int16)}).acts_on("cpu")


def test_pickle_protocol_5_sends_the_columns_out_of_band():
    """Ray puts objects with pickle protocol 5: every column must travel as an out-of-band buffer (read
    zero-copy from the object store), and come back as the same tensors in the same dtypes."""
    batch = Batch.of({"acts": torch.randn(64, 32).half(), "seq_ids": torch.arange(64)})
    buffers: list = []
    payload = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 2 and len(payload) < 1024  # the bytes are in the buffers, not the pickle
    views = [np.frombuffer(b.raw(), dtype=np.uint8) for b in buffers]
    for v in views:
        v.setflags(write=False)  # as the object store hands them out
    back = pickle.loads(payload, buffers=views)
    assert back.acts.dtype == torch.float16 and torch.equal(back.acts, batch.acts)
    assert torch.equal(back.seq_ids, batch.seq_ids) and back.positions is None
    assert back.acts.data_ptr() == views[0].ctypes.data  # no copy on the way back


def test_the_loader_yields_extra_columns_in_their_stored_dtype(tmp_path):
    url = str(tmp_path / "ds")
    writer = DatasetWriter.create(url, make_manifest(extra_columns={"true_l0": "int16"}))
    for s in range(2):
        rows = np.arange(s * 64, (s + 1) * 64)
        writer.write_shard(s, np.random.default_rng(s).standard_normal((64, 16)).astype(np.float16),
                           token_ids=rows.astype(np.int32), extra={"true_l0": (rows % 7).astype(np.int16)})
    writer.seal()
    loader = ActivationLoader(url, batch_size=32, split="all", epochs=1, columns=("token_ids", "true_l0"))
    for batch in loader:
        assert batch.acts is None and batch.extra["true_l0"].dtype == torch.int16
        assert torch.equal(batch.extra["true_l0"].long(), batch.token_ids.long() % 7)
