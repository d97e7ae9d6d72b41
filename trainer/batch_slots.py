"""Batches handed from the feeder to the trainers of its node through shared memory.

The feeder (:mod:`trainer.feeder`) used to ``ray.put`` every batch it read: a copy into Ray's object
store at ~1.1 GB/s on the 2-core box, longer than the store read itself, so one feeder handed out
batches at ~0.25× the rate of a loader alone (``bench/feeder_bench.py``). Now the feeder's memory is
shared with the trainers of its node, in two ways, both anonymous shared-memory files
(``memfd_create``) that a trainer opens through ``/proc/<feeder pid>/fd/<fd>``, maps read-only once and
reads batches from zero-copy (:class:`SlotReader`):

* **Window buffers** (no copy at all): the feeder's loader allocates its window buffers here
  (:meth:`BatchSlots.allocate`, the loader's ``allocator``), and a batch that is a view of one window
  (most are) is handed out as the places of its columns in those buffers. The feeder keeps the batch
  (the loader's lease on its window) until no trainer may still read it, so the loader reuses that
  window's buffers only then.
* **Batch slots** (one copy): a batch the loader had to assemble (one that straddles two windows) is
  copied into a slot, reused once free. Each write bumps the slot's *generation*, stored in its
  header and in the reference; a reader given a reference whose generation is not the slot's raises
  rather than read another batch.

A trainer on another node gets an ObjectRef as before (Ray moves the batch between nodes), and so
does any trainer when shared memory cannot be had or opened (no ``/proc``, or a sandbox that forbids
it).

Nothing can leak: a memfd has no name, so its memory is freed when the last process holding it (the
feeder's descriptor and mapping, a trainer's mapping) lets go — however the feeder ends, killed
included (a sweep's end kills its feeder). A file under ``/dev/shm`` would outlive a killed feeder (Ray
kills a worker's child processes with it, Python's resource tracker included), and a container's
``/dev/shm`` is often only 64 MB.
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.batch import Batch

#: a slot's header holds its generation (uint64); columns start at 64-byte boundaries after it
HEADER = 64
ALIGN = 64

#: (column, dtype, shape, file, byte offset in it); a file is (fd, serial): the fd to open it by and
#: a number never reused by its owner (an fd number is reused once its file is closed)
File = tuple[int, int]
Column = tuple[str, str, tuple[int, ...], File, int]
#: files a trainer keeps mapped at most (least recently used dropped): the feeder's slots and window
#: buffers are a few dozen files, reused; a dropped window buffer's mapping goes with the LRU
MAX_MAPS = 256

_serials = itertools.count(1)


@dataclass(frozen=True)
class SlotRef:
    """Where a batch lies in process ``pid``'s shared memory (``owner``: that process's slot set):
    each column's file and offset; ``check``: (file, generation) of the slot whose header must hold
    that generation (``None`` for a window buffer, kept unchanged by the feeder's lease)."""

    owner: str
    pid: int
    columns: tuple[Column, ...]
    check: tuple[File, int] | None

    def path(self, file: File) -> Path:
        return Path(f"/proc/{self.pid}/fd/{file[0]}")


def slots_supported() -> bool:
    """Anonymous shared memory (``memfd_create``) that other processes can open through ``/proc`` (Linux)."""
    return hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir()


def _memfd(owner: str, nbytes: int) -> tuple[File, mmap.mmap]:
    """A new anonymous shared-memory file of ``nbytes`` (its pages reserved now: no memory left fails
    here with ENOSPC, never later as a SIGBUS on write), mapped read-write."""
    fd = os.memfd_create(owner, os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
        return (fd, next(_serials)), mmap.mmap(fd, max(nbytes, 1))
    except BaseException:
        os.close(fd)
        raise


def _slot_layout(batch: Batch) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """Each column's (name, dtype, shape, offset) in a slot, and the bytes the slot needs."""
    out, offset = [], HEADER
    for name, array in batch.arrays.items():
        out.append((name, array.dtype.str, tuple(array.shape), offset))
        offset += -(-array.nbytes // ALIGN) * ALIGN
    return out, offset


def slot_bytes(batch: Batch) -> int:
    """Bytes a slot needs to hold ``batch``."""
    return _slot_layout(batch)[1]


def _view(buf: np.ndarray, dtype: str, shape: tuple[int, ...], offset: int) -> np.ndarray:
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return buf[offset:offset + count * dt.itemsize].view(dt).reshape(shape)


class _Slot:
    """One slot: a shared-memory file of ``capacity`` bytes that holds one copied batch at a time."""

    def __init__(self, owner: str, capacity: int) -> None:
        self.capacity, self.generation = capacity, 0
        self.file, self.map = _memfd(owner, capacity)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.header = self.bytes[:8].view(np.uint64)

    def write(self, batch: Batch) -> tuple[tuple[Column, ...], tuple[File, int]]:
        """Copy ``batch`` in (the next generation): its columns and the generation check."""
        layout, _ = _slot_layout(batch)
        self.generation += 1
        self.header[0] = 0  # being written: no generation matches
        for name, dtype, shape, offset in layout:
            np.copyto(_view(self.bytes, dtype, shape, offset), batch.arrays[name])
        self.header[0] = self.generation
        return (tuple((name, dtype, shape, self.file, offset) for name, dtype, shape, offset in layout),
                (self.file, self.generation))


class BatchSlots:
    """A feeder's shared memory: window buffers for its loader (:meth:`allocate`) and batch slots for
    copies (:meth:`take`, :meth:`write`). Thread-safe."""

    def __init__(self) -> None:
        self.owner = f"dynsae-feeder-{os.getpid()}-{secrets.token_hex(4)}"
        self.slots: list[_Slot] = []
        self.regions: dict[int, tuple[int, File]] = {}  # window buffer address -> (end address, file)
        self.regions_made = 0
        self.lock = threading.Lock()

    # ---- window buffers (zero-copy) -------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """An uninitialised C-contiguous array in shared memory (page-aligned): the loader's
        ``allocator``. Its file is closed when the array and every view of it are gone."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        file, region = _memfd(self.owner, nbytes)
        array = np.frombuffer(region, dtype=np.uint8)[:nbytes].view(dt).reshape(shape)
        start = array.ctypes.data
        with self.lock:
            self.regions[start] = (start + nbytes, file)
            self.regions_made += 1
        weakref.finalize(region, self._drop_region, start, file[0]).atexit = False
        return array

    def _drop_region(self, start: int, fd: int) -> None:
        with self.lock:
            self.regions.pop(start, None)
        os.close(fd)

    def _locate(self, array: np.ndarray) -> tuple[File, int] | None:
        """(file, offset) of ``array``'s memory if it lies in one window buffer."""
        if not array.flags.c_contiguous:
            return None
        addr = array.ctypes.data
        with self.lock:
            for start, (end, file) in self.regions.items():
                if start <= addr and addr + array.nbytes <= end:
                    return file, addr - start
        return None

    def refer(self, batch: Batch) -> SlotRef | None:
        """A reference to ``batch`` where it lies, if every column is in a window buffer (no copy).
        The caller keeps ``batch`` alive (and unchanged) while anyone may read the reference."""
        columns = []
        for name, array in batch.arrays.items():
            place = self._locate(array)
            if place is None:
                return None
            columns.append((name, array.dtype.str, tuple(array.shape), *place))
        return SlotRef(self.owner, os.getpid(), tuple(columns), None)

    # ---- batch slots (one copy) -----------------------------------------------------------------
    def take(self, nbytes: int, free: list[int]) -> int | None:
        """A slot of at least ``nbytes`` among the ``free`` ones (indices), or a new one; ``None`` when
        no memory can be had (the caller falls back to Ray's object store)."""
        with self.lock:
            fits = [i for i in free if self.slots[i].capacity >= nbytes]
            if fits:
                return min(fits, key=lambda i: self.slots[i].capacity)
            try:
                self.slots.append(_Slot(self.owner, nbytes))
            except OSError:
                return None
            return len(self.slots) - 1

    def write(self, index: int, batch: Batch) -> SlotRef:
        """Copy ``batch`` into slot ``index`` (taken with :meth:`take`, written by one thread at a time)."""
        columns, check = self.slots[index].write(batch)
        return SlotRef(self.owner, os.getpid(), columns, check)

    def batch(self, index: int, ref: SlotRef) -> Batch:
        """The batch in slot ``index`` as views (in the feeder's process)."""
        slot = self.slots[index]
        return _read({slot.file: slot.bytes}, ref)

    def close(self) -> None:
        """Let go of every slot (trainers' mappings stay valid until they drop them). Window buffers
        go with the loader's arrays."""
        with self.lock:
            for slot in self.slots:
                os.close(slot.file[0])
            self.slots.clear()


def _read(maps: dict[File, np.ndarray], ref: SlotRef) -> Batch:
    """The batch ``ref`` points at, given each of its files' bytes (checked, for a slot)."""
    if ref.check is not None:
        file, generation = ref.check
        found = int(maps[file][:8].view(np.uint64)[0])
        if found != generation:
            raise RuntimeError(f"feeder slot {ref.path(file)} holds generation {found}, not {generation}: the "
                               "feeder reused a slot a trainer still held (a bug in trainer.feeder; please report it).")
    return Batch.of({name: _view(maps[file], dtype, shape, offset) for name, dtype, shape, file, offset in ref.columns})


class SlotReader:
    """A trainer's side: maps each of the feeder's files read-only once and reads batches from them
    zero-copy. The mappings live as long as the reader and the batches read through it."""

    def __init__(self) -> None:
        self.maps: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # (owner, serial) -> bytes

    def batch(self, ref: SlotRef) -> Batch:
        """The batch ``ref`` points at (read-only views). Raises ``OSError`` when a file cannot be
        opened (the feeder is gone, or this sandbox forbids reading its descriptors)."""
        files = {file for *_, file, _ in ref.columns} | ({ref.check[0]} if ref.check else set())
        return _read({file: self._map(ref, file) for file in files}, ref)

    def _map(self, ref: SlotRef, file: File) -> np.ndarray:
        key = (ref.owner, file[1])
        buf = self.maps.get(key)
        if buf is None:
            with open(ref.path(file), "rb") as f:
                buf = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
            self.maps[key] = buf
            while len(self.maps) > MAX_MAPS:
                self.maps.popitem(last=False)
        self.maps.move_to_end(key)
        return buf
