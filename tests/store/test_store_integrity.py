"""Integrity on the read path: a damaged shard (index entries swapped, object truncated, index pointing
past the end) is refused by the loader with one sentence naming it, never read as other rows; ``store
verify`` only accepts commit records that describe the shard's own objects."""

from __future__ import annotations

import json
import os

import google_crc32c
import numpy as np
import pytest
from store_testdata import CHUNK_ROWS, SHARD_ROWS, build_dataset

from store import ActivationLoader, UserError
from store.errors import run_cli
from store.layout import shard_key
from store.verify import verify_dataset

TOTAL = 4 * SHARD_ROWS
CPS = SHARD_ROWS // CHUNK_ROWS
INDEX = 16 * CPS + 4  # (offset, nbytes) uint64 per chunk + crc32c


@pytest.fixture
def ds(tmp_path):
    url = str(tmp_path / "ds")
    build_dataset(url, TOTAL, dtype="float32")
    return url


def read_all(url: str, **kw) -> list[np.ndarray]:
    loader = ActivationLoader(url, batch_size=32, split="all", seed=1, epochs=1, columns=("acts", "token_ids"), **kw)
    with loader:
        return [b.token_ids.numpy() for b in loader]


def edit_index(path: str, edit, fix_crc: bool) -> None:
    """Apply ``edit`` to the (CPS, 2) index of the shard object at ``path``; recompute its crc32c or not."""
    data = bytearray(open(path, "rb").read())
    idx = np.frombuffer(bytes(data[-INDEX:-4]), dtype="<u8").reshape(CPS, 2).copy()
    edit(idx)
    data[-INDEX:-4] = idx.tobytes()
    if fix_crc:
        data[-4:] = google_crc32c.value(idx.tobytes()).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))


def swap_first_two(idx: np.ndarray) -> None:
    idx[[0, 1]] = idx[[1, 0]]


@pytest.mark.parametrize("use_mmap", [True, False])
def test_swapped_index_entries_are_refused(ds, use_mmap):
    assert len(read_all(ds, use_mmap=use_mmap)) == TOTAL // 32
    edit_index(os.path.join(ds, shard_key("acts", 2)), swap_first_two, fix_crc=False)
    with pytest.raises(UserError, match=r"shard 2 of 'acts' .*acts/c/2/0.*crc32c checksum does not match"):
        read_all(ds, use_mmap=use_mmap)


def test_swapped_index_entries_are_refused_on_s3(s3_bucket):
    from store.io import filesystem

    url = f"{s3_bucket}/ds"
    build_dataset(url, TOTAL, dtype="float32")
    fs, path = filesystem(url)
    key = f"{path}/{shard_key('acts', 1)}"
    data = bytearray(fs.cat_file(key))
    data[-INDEX:-INDEX + 32] = data[-INDEX + 16:-INDEX + 32] + data[-INDEX:-INDEX + 16]
    fs.pipe_file(key, bytes(data))
    with pytest.raises(UserError, match=r"shard 1 of 'acts'.*crc32c"):
        read_all(url)


def test_truncated_shard_is_refused(ds, capsys):
    path = os.path.join(ds, shard_key("acts", 3))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"shard 3 of 'acts'.*truncated"):
        read_all(ds)
    from store.__main__ import main

    assert run_cli(main, ["verify", ds]) == 1  # verify reports it too (as a finding, not a traceback)
    assert "acts/c/3/0" in capsys.readouterr().out


def test_index_past_the_end_is_refused_even_with_a_valid_checksum(ds):
    def far(idx: np.ndarray) -> None:
        idx[3, 0] = 10**6

    edit_index(os.path.join(ds, shard_key("acts", 0)), far, fix_crc=True)
    with pytest.raises(UserError, match=r"shard 0 of 'acts'.*past the end"):
        read_all(ds)


def test_verify_requires_each_record_to_name_its_own_shard(ds):
    """A commit record that vouches for another (intact) shard's objects must not make a damaged shard pass."""
    assert verify_dataset(ds) == []
    victim = os.path.join(ds, shard_key("acts", 1))
    data = bytearray(open(victim, "rb").read())
    data[10] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    rec1, rec0 = (json.loads(open(os.path.join(ds, "commits", f"{s}.json")).read()) for s in (1, 0))
    rec1["objects"] = rec0["objects"]  # every key and checksum now those of shard 0
    open(os.path.join(ds, "commits", "1.json"), "w").write(json.dumps(rec1))
    problems = verify_dataset(ds)
    assert any("commit record of shard 1" in p and "not the shard's own 'acts/c/1/0'" in p for p in problems)
