"""CLI ls/info/verify (local and S3), corruption detection and one-sentence errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from store_testdata import SHARD_ROWS, build_dataset, make_manifest

from store import DatasetWriter, StatsAccumulator, UserError, open_dataset
from store.__main__ import main
from store.filters import RowFilter
from store.layout import read_commits

TOTAL = 3 * SHARD_ROWS + 16


def run(capsys, *argv) -> tuple[int, str, str]:
    from store.errors import run_cli

    code = run_cli(main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def local_ds(tmp_path):
    url = str(tmp_path / "root" / "ds")
    build_dataset(url, TOTAL)
    return url


def test_ls_info_verify_local(local_ds, tmp_path, capsys):
    DatasetWriter.create(str(tmp_path / "root" / "partial"), make_manifest())
    (tmp_path / "root" / "not-a-dataset").mkdir()
    code, out, _ = run(capsys, "ls", str(tmp_path / "root"))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ds  rows=208  d=16  float16") and "sealed" in lines[0]
    assert lines[1].startswith("partial") and "UNSEALED (0 shards committed)" in lines[1]
    code, out, _ = run(capsys, "info", local_ds, "--json")
    info = json.loads(out)
    assert code == 0 and info["num_rows"] == TOTAL and info["committed_shards"] == 4
    assert info["train_rows"] + info["eval_rows"] == TOTAL and info["manifest"]["sealed"] is True
    code, out, _ = run(capsys, "info", local_ds)
    assert "rows         208" in out and "d=16 float16" in out
    code, out, _ = run(capsys, "verify", local_ds)
    assert code == 0 and out.startswith("ok:")


def test_verify_catches_flipped_byte_and_deleted_shard(local_ds, capsys):
    commits = read_commits(local_ds)
    obj = os.path.join(local_ds, commits[1].objects["acts"].key)
    data = bytearray(open(obj, "rb").read())
    data[100] ^= 0x01
    open(obj, "wb").write(bytes(data))
    os.remove(os.path.join(local_ds, commits[2].objects["acts"].key))
    os.remove(os.path.join(local_ds, "commits", "3.json"))
    code, out, _ = run(capsys, "verify", local_ds)
    lines = out.strip().splitlines()
    assert code == 1
    assert any("acts/c/1/0" in line and "does not match its checksum" in line for line in lines)
    assert any("acts/c/2/0" in line and "is missing" in line for line in lines)
    assert any(line.startswith("shard 3 ") and "no commit record" in line for line in lines)
    assert any("uncommitted shard objects [3]" in line for line in lines)
    assert all(line.endswith(".") for line in lines)


def test_verify_catches_nan_and_wrong_lengths(tmp_path, capsys):
    url = str(tmp_path / "ds")
    build_dataset(url, TOTAL)
    # a NaN written behind the writer's back (valid checksum is recomputed to isolate the NaN check)
    import zarr

    arr = zarr.open_array(os.path.join(url, "acts"), mode="r+")
    arr[70, 3] = np.nan
    rec = read_commits(url)[1]
    data = open(os.path.join(url, rec.objects["acts"].key), "rb").read()
    rec.objects["acts"].sha256 = hashlib.sha256(data).hexdigest()
    open(os.path.join(url, "commits", "1.json"), "w").write(rec.model_dump_json())
    arr2 = zarr.open_array(os.path.join(url, "seq_ids"), mode="r+")
    arr2.resize((TOTAL - 8,))
    code, out, _ = run(capsys, "verify", url, "--sample-chunks", "1000")
    assert code == 1
    assert "NaN/Inf in chunks [4]" in out
    assert "array 'seq_ids'" in out and "different lengths" in out


def test_verify_reports_invalid_manifest_and_unsealed(tmp_path, capsys):
    url = str(tmp_path / "ds")
    w = DatasetWriter.create(url, make_manifest())
    w.write_shard(0, np.ones((64, 16)))
    code, out, _ = run(capsys, "verify", url)
    assert code == 1 and "is not sealed (1 shards committed)" in out
    meta_path = os.path.join(url, "zarr.json")
    meta = json.load(open(meta_path))
    meta["attributes"]["dynsae"]["chunk_rows"] = 7
    json.dump(meta, open(meta_path, "w"))
    code, out, _ = run(capsys, "verify", url)
    assert code == 1 and out.count("\n") == 1 and "manifest of" in out and "invalid" in out


def test_unsealed_missing_url_missing_bucket_and_disagreeing_manifest(tmp_path, s3_bucket, capsys):
    url = str(tmp_path / "ds")
    w = DatasetWriter.create(url, make_manifest())
    w.write_shard(0, np.ones((64, 16)))
    with pytest.raises(UserError, match=r"is not sealed .* allow_partial=True"):
        open_dataset(url)
    assert open_dataset(url, allow_partial=True).num_rows == 64
    code, _, err = run(capsys, "info", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("error: no dataset at") and err.count("\n") == 1
    code, _, err = run(capsys, "verify", "s3://no-such-bucket-xyz/ds")
    assert code == 1 or code == 2
    code, _, err = run(capsys, "info", "s3://no-such-bucket-xyz/ds")
    assert code == 2 and "bucket 'no-such-bucket-xyz'" in err and "does not exist" in err
    code, _, err = run(capsys, "ls", "s3://no-such-bucket-xyz/")
    assert code == 2 and "does not exist" in err
    w.seal()
    meta_path = os.path.join(url, "zarr.json")
    meta = json.load(open(meta_path))
    meta["attributes"]["dynsae"]["d"] = 32
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="manifest says d=32"):
        open_dataset(url)
    meta["attributes"]["dynsae"]["d"] = 16
    meta["attributes"]["dynsae"]["dtype"] = "float32"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="stores float16 but the manifest implies float32"):
        open_dataset(url)


def test_cli_on_s3(s3_bucket, capsys):
    url = f"{s3_bucket}/root/ds"
    build_dataset(url, TOTAL)
    code, out, err = run(capsys, "ls", f"{s3_bucket}/root")
    assert code == 0 and out.startswith("ds  rows=208"), err
    code, out, err = run(capsys, "verify", url)
    assert code == 0 and out.startswith("ok:"), out + err
    code, out, _ = run(capsys, "info", url, "--json")
    assert json.loads(out)["num_rows"] == TOTAL
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.rm(f"{url[5:]}/acts/c/1/0")
    # as a real command line: exit codes and no traceback
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "store"]
    ver = subprocess.run(cmd + ["verify", url], capture_output=True, text=True, env=env)
    assert ver.returncode == 1 and "acts/c/1/0" in ver.stdout and "Traceback" not in ver.stderr
    bad = subprocess.run(cmd + ["info", f"{s3_bucket}/root/missing"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no dataset at") and "Traceback" not in bad.stderr


def test_stats_accumulator_merge_and_quantiles():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 8)) * rng.uniform(0.1, 10, size=(3000, 1))
    whole = StatsAccumulator().update(x)
    parts = StatsAccumulator().update(x[:1000]).merge(StatsAccumulator().update(x[1000:2500]))
    parts.merge(StatsAccumulator.from_state(StatsAccumulator().update(x[2500:]).state()))
    a, b = whole.result(), parts.result()
    np.testing.assert_allclose(a.mean, x.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12, atol=1e-15)
    assert a.norm_quantiles == b.norm_quantiles
    norms = np.linalg.norm(x, axis=1)
    assert a.mean_norm == pytest.approx(norms.mean(), rel=1e-12)
    assert a.norm_quantiles["1.0"] == norms.max()
    for q in ("0.01", "0.1", "0.5", "0.9", "0.99"):
        exact = np.sort(norms)[int(np.floor(float(q) * (norms.size - 1)))]
        assert a.norm_quantiles[q] == pytest.approx(exact, rel=0.003), q


def test_row_filter():
    import torch

    acts = torch.tensor([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0], [6.0, 8.0]])  # norms 5, .5, 50, 10
    pos = torch.tensor([0, 1, 2, 3])
    f = RowFilter()
    assert f.keep_mask(acts, pos, None).tolist() == [False, True, True, True]
    assert f.keep_mask(acts, None, None).tolist() == [True] * 4
    g = RowFilter(exclude_positions=[1], max_norm_multiple=2.0)
    assert g.keep_mask(acts, pos, median_norm=5.0).tolist() == [True, False, False, True]
    assert "drop positions [1]" in g.describe() and "2 x median" in g.describe()
    with pytest.raises(UserError, match="median norm"):
        g.keep_mask(acts, pos, None)
    assert RowFilter(exclude_positions=[]).describe() == "keep all rows"


def test_manifest_validation_and_hash():
    m = make_manifest()
    assert m.manifest_hash() == make_manifest().manifest_hash()
    assert m.manifest_hash() != make_manifest(d=17).manifest_hash()
    with pytest.raises(ValueError, match="must divide shard_rows"):
        make_manifest(chunk_rows=24)
    with pytest.raises(ValueError, match="multiple of context_length"):
        make_manifest(context_length=5)
    with pytest.raises(ValueError):
        make_manifest(unknown_key=1)
