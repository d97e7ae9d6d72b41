"""Writer: round trip, commit protocol, resume after SIGKILL, concurrent writers (local + S3)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_testdata import CTX, SHARD_ROWS, build_dataset, make_manifest, shard_data, write_shards

from store import DatasetWriter, StatsAccumulator, UserError, open_dataset
from store.layout import read_commits

HERE = Path(__file__).parent
CHILD = [sys.executable, str(HERE / "store_testdata.py")]
ROOT_DIR = str(HERE.parent.parent)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tree_bytes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_values_lengths_and_commits(tmp_path):
    total = 3 * SHARD_ROWS + 24  # last shard short, and its last chunk partial
    url = str(tmp_path / "ds")
    build_dataset(url, total)
    ds = open_dataset(url)
    assert ds.num_rows == total and ds.manifest.sealed and ds.manifest.rows == total
    expect = np.concatenate([shard_data(s, min(SHARD_ROWS, total - s * SHARD_ROWS))["acts"] for s in range(4)])
    assert np.array_equal(ds.read(0, total), expect.astype(np.float16))
    assert np.array_equal(ds.read(0, total, "token_ids"), np.arange(total))
    assert np.array_equal(ds.read(0, total, "seq_ids"), np.arange(total) // CTX)
    assert np.array_equal(ds.read(0, total, "positions"), np.arange(total) % CTX)
    assert {n: a.shape[0] for n, a in ds.arrays.items()} == {n: total for n in ds.arrays}
    commits = read_commits(url)
    assert sorted(commits) == [0, 1, 2, 3]
    assert [c.rows for c in commits.values()] == [64, 64, 64, 24]
    assert commits[3].row_start == 192 and commits[3].seq_min == 24 and commits[3].seq_max == 26
    acts_obj = tmp_path / "ds" / commits[1].objects["acts"].key
    assert hashlib.sha256(acts_obj.read_bytes()).hexdigest() == commits[1].objects["acts"].sha256
    # statistics merged from the per-shard commit records equal a one-pass accumulation
    ref = StatsAccumulator().update(expect.astype(np.float16)).result()
    st = ds.manifest.stats
    assert st.rows == total
    np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-12)
    norms = np.linalg.norm(expect.astype(np.float16).astype(np.float64), axis=1)
    assert st.mean_norm == pytest.approx(norms.mean(), rel=1e-6)  # per-row norms in float32
    assert st.median_norm == pytest.approx(np.quantile(norms, 0.5, method="lower"), rel=0.003)


def test_committed_shard_is_not_rewritten_without_overwrite(tmp_path):
    url = str(tmp_path / "ds")
    w = DatasetWriter.create(url, make_manifest())
    write_shards(w, [0], 64)
    with pytest.raises(UserError, match="already committed"):
        write_shards(w, [0], 64)
    new = np.ones((64, 16), np.float32)
    w.write_shard(0, new, overwrite=True)
    w.seal()
    assert np.array_equal(open_dataset(url).read(0, 64), new.astype(np.float16))


def test_seal_refuses_gaps_short_middle_shards_and_wrong_totals(tmp_path):
    url = str(tmp_path / "ds")
    w = DatasetWriter.create(url, make_manifest())
    write_shards(w, [0, 2], 3 * 64)
    with pytest.raises(UserError, match=r"shards 1 of 0\.\.2 are not committed"):
        w.seal()
    w.write_shard(1, np.ones((32, 16), np.float32))
    with pytest.raises(UserError, match="only the last shard"):
        w.seal()
    w.write_shard(1, shard_data(1, 64)["acts"], overwrite=True)
    with pytest.raises(UserError, match="total_rows=100"):
        w.seal(total_rows=100)
    assert w.seal(total_rows=192).rows == 192
    with pytest.raises(UserError, match="is sealed"):
        write_shards(w, [3], 4 * 64)


def test_bad_shard_inputs_are_one_sentence(tmp_path):
    w = DatasetWriter.create(str(tmp_path / "ds"), make_manifest())
    with pytest.raises(UserError, match="d=16"):
        w.write_shard(0, np.zeros((64, 15), np.float32))
    with pytest.raises(UserError, match="whole number of sequences"):
        w.write_shard(0, np.zeros((12, 16), np.float32))
    with pytest.raises(UserError, match="1..64 rows"):
        w.write_shard(0, np.zeros((72, 16), np.float32))
    bad = np.zeros((64, 16), np.float32)
    bad[5, 3] = np.nan
    with pytest.raises(UserError, match="NaN or Inf"):
        w.write_shard(0, bad)
    big = np.full((64, 16), 1e6, np.float32)  # overflows float16
    with pytest.raises(UserError, match="NaN or Inf"):
        w.write_shard(0, big)
    with pytest.raises(UserError, match="token_ids has shape"):
        w.write_shard(0, np.zeros((64, 16), np.float32), token_ids=np.zeros(10))
    with pytest.raises(UserError, match="no class_names"):
        w.write_shard(0, np.zeros((64, 16), np.float32), labels=np.zeros(8))
    assert w.committed() == set()


def test_labels_are_per_image_and_indexed_by_seq_id(tmp_path):
    url = str(tmp_path / "img")
    m = make_manifest(class_names=["cat", "dog", "eel"], model={"name": "vit", "kind": "open_clip"})
    w = DatasetWriter.create(url, m)
    labels0 = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    w.write_shard(0, np.ones((64, 16)), labels=labels0)
    w.write_shard(1, np.ones((16, 16)), labels=[2, 2])
    with pytest.raises(UserError, match="labels must lie in 0..2"):
        w.write_shard(2, np.ones((16, 16)), labels=[0, 3])
    with pytest.raises(UserError, match="labels .* are required"):
        w.write_shard(2, np.ones((16, 16)))
    w.seal()
    ds = open_dataset(url)
    assert ds.labels().tolist() == labels0.tolist() + [2, 2]
    seq = ds.read(0, 80, "seq_ids")
    assert ds.labels()[seq][70] == 2 and ds.labels()[seq][9] == 1
    assert ds.read(0, 80, "token_ids").tolist() == [-1] * 80  # vision: no tokens


def test_create_resumes_same_manifest_and_refuses_a_different_one(tmp_path):
    url = str(tmp_path / "ds")
    w = DatasetWriter.create(url, make_manifest())
    write_shards(w, [0], 64)
    again = DatasetWriter.create(url, make_manifest(created=None))  # same identity: resume
    assert again.committed() == {0}
    with pytest.raises(UserError, match="differs in d"):
        DatasetWriter.create(url, make_manifest(d=32))
    fresh = DatasetWriter.create(url, make_manifest(d=32), overwrite=True)
    assert fresh.committed() == set() and fresh.manifest.d == 32


def test_writer_killed_with_sigkill_resumes_to_identical_bytes(tmp_path):
    total = 7 * SHARD_ROWS + 40
    shards = ",".join(str(s) for s in range(8))
    ref = tmp_path / "ref"
    build_dataset(str(ref), total)

    url = tmp_path / "killed"
    DatasetWriter.create(str(url), make_manifest())
    proc = subprocess.Popen(CHILD + [str(url), shards, "--total-rows", str(total), "--sleep", "0.25"],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    seen = []
    while len(seen) < 3:
        line = proc.stdout.readline()
        assert line, "child writer exited early"
        seen.append(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # a torn, uncommitted object of the next shard (as if the kill hit mid-write)
    writer = DatasetWriter.open(str(url))
    done = writer.committed()
    assert 3 <= len(done) < 8 and done == set(range(len(done)))
    torn = url / "acts" / "c" / str(len(done)) / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="not sealed"):
        open_dataset(str(url))
    partial = open_dataset(str(url), allow_partial=True)
    assert partial.num_rows == len(done) * SHARD_ROWS
    write_shards(writer, [s for s in range(8) if s not in done], total)
    writer.seal(total_rows=total)
    assert tree_bytes(url) == tree_bytes(ref)


def run_two_writers(url: str, total: int) -> None:
    procs = [subprocess.Popen(CHILD + [url, shards, "--total-rows", str(total)], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for shards in ("0,2,4", "1,3,5")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.count("committed") == 3


def test_two_writer_processes_disjoint_shards_local(tmp_path):
    total = 5 * SHARD_ROWS + 16
    url = str(tmp_path / "ds")
    DatasetWriter.create(url, make_manifest())
    run_two_writers(url, total)
    w = DatasetWriter.open(url)
    assert w.committed() == set(range(6))
    w.seal(total_rows=total)
    ds = open_dataset(url)
    assert np.array_equal(ds.read(0, total, "token_ids"), np.arange(total))
    ref = tmp_path / "ref"
    build_dataset(str(ref), total)
    assert tree_bytes(Path(url)) == tree_bytes(ref)


def test_two_writer_processes_disjoint_shards_s3(s3_bucket, tmp_path):
    total = 5 * SHARD_ROWS + 16
    url = f"{s3_bucket}/acts/ds"
    DatasetWriter.create(url, make_manifest())
    run_two_writers(url, total)
    w = DatasetWriter.open(url)
    w.seal(total_rows=total)
    ds = open_dataset(url)
    assert ds.num_rows == total
    expect = np.concatenate([shard_data(s, min(64, total - s * 64))["acts"] for s in range(6)])
    assert np.array_equal(ds.read(0, total), expect.astype(np.float16))
    assert np.array_equal(ds.read_chunk(20, "token_ids"), np.arange(320, 336))
    # stored objects on S3 are byte-identical to the same dataset written locally
    ref = tmp_path / "ref"
    build_dataset(str(ref), total)
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for rel, digest in tree_bytes(ref).items():
        assert hashlib.sha256(fs.cat_file(f"{url[5:]}/{rel}")).hexdigest() == digest, rel
    meta = json.loads(fs.cat_file(f"{url[5:]}/zarr.json"))
    assert meta["attributes"]["dynsae"]["sealed"] is True


def test_discard_uncommitted_leaves_each_shard_whole_or_absent(tmp_path):
    """What a writer killed mid-shard leaves on a local store (zarr's ``<object>.<uuid>.partial``
    files, torn objects, a commit record not yet renamed) is removed for the uncommitted shards;
    committed shards keep every byte."""
    url = tmp_path / "ds"
    writer = DatasetWriter.create(str(url), make_manifest())
    write_shards(writer, [0, 1], 4 * SHARD_ROWS)
    kept = tree_bytes(url)
    litter = [url / "acts" / "c" / "2" / "0", url / "acts" / "c" / "2" / "0.9f3ac2b1d0e84c7aa1b2c3d4e5f60718.partial",
              url / "token_ids" / "c" / "2.00ff00ff00ff00ff00ff00ff00ff00ff.partial", url / "seq_ids" / "c" / "2",
              url / "commits" / "2.json.tmp-4242"]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00torn")
    writer.discard_uncommitted({0, 1, 2, 3})
    assert tree_bytes(url) == kept
    assert writer.committed() == {0, 1}


def test_remove_partial_writes_before_a_resume(tmp_path):
    """After a SIGKILL nobody ran the discard: the resume removes every partial file in one walk
    and keeps every committed byte."""
    url = tmp_path / "ds"
    writer = DatasetWriter.create(str(url), make_manifest())
    write_shards(writer, [0], 4 * SHARD_ROWS)
    kept = tree_bytes(url)
    for path in (url / "acts" / "c" / "3" / "0.0123456789abcdef0123456789abcdef.partial",
                 url / "positions" / "c" / "1.fedcba9876543210fedcba9876543210.partial"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00torn")
    DatasetWriter.open(str(url)).remove_partial_writes()
    assert tree_bytes(url) == kept
