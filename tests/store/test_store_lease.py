"""One writer at a time: the lease of a dataset or run directory (store.lease), and a dataset location that
holds anything but a dataset is never overwritten."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from store_testdata import build_dataset, make_manifest

from store import DatasetWriter, UserError
from store.lease import LEASE_FILE, Lease, LeaseLost, LeaseRecord, leased


def planted(folder: Path, **over) -> None:
    """A lease record of another writer in ``folder``."""
    record = {"owner": "someone", "host": "elsewhere", "pid": 4242, "purpose": "harvest", "started": time.time(),
              "heartbeat": time.time(), **over}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEASE_FILE).write_text(json.dumps(record))


def test_a_held_lease_stops_a_second_writer_with_one_sentence(tmp_path):
    with leased(str(tmp_path / "ds"), "harvest"):
        with pytest.raises(UserError, match=r"is being written by harvest by .*\(owner [0-9a-f]+\), heartbeat 0 s ago"):
            Lease(str(tmp_path / "ds"), "harvest").acquire(wait=False)
    assert not (tmp_path / "ds" / LEASE_FILE).exists()  # given back
    with leased(str(tmp_path / "ds"), "harvest"):
        pass


def test_only_one_of_many_simultaneous_takers_gets_it(tmp_path):
    url, results, barrier = str(tmp_path / "ds"), [], threading.Barrier(8)

    def take():
        barrier.wait()
        try:
            results.append(Lease(url, "run").acquire(wait=False))
        except UserError:
            results.append(None)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    winners[0].release()


def test_a_waiting_writer_gets_the_lease_once_it_is_given_back(tmp_path):
    url = str(tmp_path / "ds")
    first = leased(url, "harvest")
    timer = threading.Timer(1.0, first.release)
    timer.start()
    t0 = time.monotonic()
    with leased(url, "harvest") as second:
        assert time.monotonic() - t0 >= 0.9
        assert LeaseRecord.model_validate_json((tmp_path / "ds" / LEASE_FILE).read_text()).owner == second.record.owner
    timer.join()


def test_a_stale_lease_is_taken_over_only_when_asked(tmp_path):
    folder = tmp_path / "ds"
    planted(folder, heartbeat=time.time() - 3600)
    with pytest.raises(UserError, match=r"leased to harvest by elsewhere:4242 .*heartbeat 3600 s ago.*"
                                        r"take_over_stale_lease set to true"):
        Lease(str(folder), "harvest").acquire()
    assert json.loads((folder / LEASE_FILE).read_text())["owner"] == "someone"  # untouched
    with leased(str(folder), "harvest", take_over_stale=True) as mine:
        assert json.loads((folder / LEASE_FILE).read_text())["owner"] == mine.record.owner


def test_a_dead_local_owner_is_taken_over_at_once(tmp_path):
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    planted(tmp_path / "ds", host=socket.gethostname(), pid=int(gone.stdout))
    with leased(str(tmp_path / "ds"), "run", wait=False):
        pass


def test_an_owner_notices_a_takeover(tmp_path):
    lease = leased(str(tmp_path / "ds"), "run")
    planted(tmp_path / "ds")  # someone else's record replaced ours
    with pytest.raises(LeaseLost, match="taken over"):
        lease._rewrite()
    lease.release()
    assert json.loads((tmp_path / "ds" / LEASE_FILE).read_text())["owner"] == "someone"  # not ours to delete


def test_lease_on_s3_is_an_exclusive_conditional_put(s3_bucket):
    url = f"{s3_bucket}/ds"
    first = leased(url, "harvest")
    with pytest.raises(UserError, match="is being written by harvest"):
        Lease(url, "harvest").acquire(wait=False)
    first._rewrite()  # a heartbeat: If-Match on the ETag it wrote
    from store.io import write_bytes

    write_bytes(f"{url}/{LEASE_FILE}", json.dumps({"owner": "x", "host": "h", "pid": 1, "purpose": "harvest",
                                                   "started": 0.0, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseLost):
        first._rewrite()
    first.release()


def test_a_location_holding_files_is_never_overwritten(tmp_path):
    url = tmp_path / "ds"
    build_dataset(str(url), 3 * 64)
    (url / "NOTES.txt").write_text("mine")
    (url / "zarr.json").unlink()  # a partial copy: no group metadata
    before = sorted(p.relative_to(url) for p in url.rglob("*"))
    with pytest.raises(UserError, match=r"already holds .* but no dataset .*nothing there is overwritten"):
        DatasetWriter.create(str(url), make_manifest())
    assert sorted(p.relative_to(url) for p in url.rglob("*")) == before
    planted(tmp_path / "fresh")  # only a lease record there: a dataset may be created
    DatasetWriter.create(str(tmp_path / "fresh"), make_manifest())
