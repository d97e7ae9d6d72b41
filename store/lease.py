"""One writer at a time: a lease on a dataset or a run directory, held by an owner record with a heartbeat.

A writer (a harvest on its dataset, a run or a sweep on its directory) takes the lease before it reads
what is there to resume, and gives it back when it ends. The lease is the file ``lease.json`` in the leased
folder (:class:`LeaseRecord`: owner id, host, pid, what it is doing, when it started, its last heartbeat):

* taken with an exclusive create: ``O_CREAT | O_EXCL`` on local files, a conditional PUT
  (``If-None-Match: *``) on S3, so two writers starting together cannot both get it;
* kept alive by a heartbeat thread that rewrites the record every :data:`HEARTBEAT_S` seconds (on S3 a
  conditional ``If-Match`` PUT on the ETag it last wrote, so an owner whose lease was taken over notices);
* given back by deleting the record (only by its owner).

A lease whose owner ran on this machine and whose process has ended (a killed writer) is taken over at
once. A second writer that finds the lease held otherwise waits while the owner's heartbeat is fresh (printing who it waits
for, once) and then takes the free lease (a harvest then finds its dataset complete, a run or sweep its runs
finished: both end with the owner's result). With ``wait=False`` it stops with one sentence naming the owner
and its heartbeat's age. An owner whose heartbeat is older than :data:`STALE_S` is presumed gone; its lease
is taken over only when asked explicitly (``take_over_stale_lease``), since a writer on a stalled machine
may still wake up. Heartbeat ages compare the record's wall-clock time with this machine's clock: hosts
sharing a bucket must keep their clocks in sync (NTP) to within a fraction of :data:`STALE_S`.

Object stores other than S3 (and local files) without a conditional create fall back to
check-then-write, which narrows but does not close the window between two writers starting together.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from store import io
from store.config import StrictModel
from store.errors import UserError

LEASE_FILE = "lease.json"
#: Seconds between heartbeats, and the heartbeat age after which an owner is presumed gone.
HEARTBEAT_S = float(os.environ.get("DYNSAE_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("DYNSAE_LEASE_STALE_S", "120"))
POLL_S = 0.5


class LeaseRecord(StrictModel):
    """The owner record of a lease (``lease.json``)."""

    owner: str
    host: str
    pid: int
    purpose: str
    started: float  # unix time
    heartbeat: float  # unix time of the owner's last heartbeat


class LeaseLost(UserError):
    """The lease was taken over while this writer held it (its heartbeat had gone stale)."""


def describe(record: LeaseRecord, now: float | None = None) -> str:
    """``harvest by host:pid (owner ab12cd34), heartbeat 3 s ago`` — who holds a lease, for a sentence."""
    age = max(0.0, (time.time() if now is None else now) - record.heartbeat)
    return f"{record.purpose} by {record.host}:{record.pid} (owner {record.owner}), heartbeat {age:.0f} s ago"


def owner_gone(record: LeaseRecord) -> bool:
    """True when the owner ran on this machine and its process has ended (a killed writer's lease)."""
    if record.host != socket.gethostname() or record.pid <= 0 or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """The lease of the folder ``url`` for one owner (this process); a context manager."""

    def __init__(self, url: str, purpose: str, storage_options: io.StorageOptions = None) -> None:
        self.folder = url.rstrip("/")
        self.url = io.join_url(self.folder, LEASE_FILE)
        self.purpose = purpose
        self.storage_options = storage_options
        self.record = LeaseRecord(owner=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
                                  purpose=purpose, started=time.time(), heartbeat=time.time())
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # ---- reading and writing the record --------------------------------------------------------
    def read(self) -> LeaseRecord | None:
        """The record in place now, or None (no lease, or a record torn beyond reading: treated as free
        only once it is older than STALE_S, see :meth:`_held_by_other`)."""
        raw = io.read_bytes(self.url, self.storage_options)
        if raw is None:
            return None
        try:
            return LeaseRecord.model_validate_json(raw)
        except ValueError:
            return LeaseRecord(owner="unreadable", host="?", pid=0, purpose="an unreadable lease record",
                               started=0.0, heartbeat=0.0)

    def _data(self) -> bytes:
        return self.record.model_dump_json(indent=1).encode()

    def _create(self) -> bool:
        """Write the record only if no lease file exists (exclusive create); True when it was written."""
        data = self._data()
        if io.is_local(self.url):
            path = io.local_path(self.url)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as err:  # a file where a folder should be, no permission, a read-only disk
                raise UserError(f"cannot create the {self.purpose} lease {path}: {err.strerror}; choose a location "
                                "that is a writable folder (or can become one).") from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        fs, path = io.filesystem(self.url, self.storage_options)
        if io.protocol(self.url) in ("s3", "s3a"):
            try:
                out = fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                held = self.read()  # a retried PUT whose first try succeeded finds our own record
                return held is not None and held.owner == self.record.owner
            self._etag = (out or {}).get("ETag") if isinstance(out, dict) else None
            return True
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True

    def _rewrite(self) -> None:
        """Rewrite our record (a heartbeat); raise LeaseLost when someone else's record is in place."""
        held = self.read()
        if held is None or held.owner != self.record.owner:
            who = "nobody" if held is None else describe(held)
            raise LeaseLost(f"the lease on {self.folder} was taken over ({who} holds it now); this writer stops "
                            "so that the new owner's work is not mixed with its own.")
        self.record.heartbeat = time.time()
        data = self._data()
        if io.is_local(self.url):
            io.write_bytes(self.url, data, self.storage_options)
            return
        fs, path = io.filesystem(self.url, self.storage_options)
        if io.protocol(self.url) in ("s3", "s3a") and self._etag:
            try:
                out = fs.pipe_file(path, data, IfMatch=self._etag)
            except OSError as err:  # 412: the record changed under us
                raise LeaseLost(f"the lease on {self.folder} was taken over while this writer held it "
                                f"({type(err).__name__}); this writer stops.") from None
            self._etag = (out or {}).get("ETag") if isinstance(out, dict) else None
            return
        fs.pipe_file(path, data)

    # ---- taking, keeping, giving back ------------------------------------------------------------
    def acquire(self, wait: bool = True, take_over_stale: bool = False, take_over_key: str = "take_over_stale_lease",
                timeout_s: float | None = None) -> Lease:
        """Take the lease (see the module docstring); returns self. ``take_over_key`` names the setting that
        allows a stale takeover, for the sentence."""
        waited = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._create():
                break
            held = self.read()
            if held is None:
                continue  # given back between our create and our read: try again
            if owner_gone(held):  # its process on this machine has ended: nothing can write any more
                self._take_over(held)
                break
            age = time.time() - held.heartbeat
            if age > STALE_S:
                if not take_over_stale:
                    raise UserError(f"{self.folder} is leased to {describe(held)}, which looks gone (no heartbeat "
                                    f"for more than {STALE_S:.0f} s); if no such writer runs any more, re-run with "
                                    f"{take_over_key} set to true to take its lease over.")
                self._take_over(held)
                break
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise UserError(f"{self.folder} is being written by {describe(held)}; wait until it has finished "
                                "(then re-run: its work is kept) or use another name.")
            if not waited:
                print(f"waiting for {self.folder}: it is being written by {describe(held)}", file=sys.stderr,
                      flush=True)
                waited = True
            time.sleep(POLL_S)
        self._thread = threading.Thread(target=self._beat, name="dynsae-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: LeaseRecord) -> None:
        """Replace a gone owner's record by ours."""
        print(f"taking over the lease on {self.folder} from {describe(stale)}", file=sys.stderr, flush=True)
        io.remove(self.url, self.storage_options)
        if not self._create():
            held = self.read()
            raise UserError(f"{self.folder} was leased to {describe(held) if held else 'another writer'} while "
                            "its stale lease was being taken over; wait for that writer or try again.")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._rewrite()
            except LeaseLost as err:
                self.lost = str(err)
                return
            except Exception:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
                continue

    def check(self) -> None:
        """Raise LeaseLost when the heartbeat found the lease taken over (call before committing work)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the record if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            held = self.read()
            if held is not None and held.owner == self.record.owner:
                io.remove(self.url, self.storage_options)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def leased(url: str, purpose: str, storage_options: io.StorageOptions = None, *, wait: bool = True,
           take_over_stale: bool = False, take_over_key: str = "take_over_stale_lease") -> Lease:
    """Take the lease of ``url`` (a context manager that gives it back)."""
    return Lease(url, purpose, storage_options).acquire(wait=wait, take_over_stale=take_over_stale,
                                                       take_over_key=take_over_key)
