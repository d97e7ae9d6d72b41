"""The hand-out board: a feeder answers the trainers of its node through shared memory, not Ray calls.

A trainer takes its batches from the feeder one span (:data:`trainer.feeder.SPAN` batches) per request.
As a Ray actor call, each request costs both processes a round trip through Ray's task machinery
(serialisation, gRPC, the actor's thread pool): at N = 8 trainers on the 2-core box the feeder's process
spent ~6 ms of CPU per batch for a loader that reads one in ~1.5 ms, and the feeder served its trainers
at ~0.4× the loader's rate (``bench/feeder_bench.py``, bench/README). The same requests through the
board cost a few microseconds of bookkeeping each; what the feeder does with a request is unchanged.

**How it works.** The feeder makes one anonymous shared-memory file (``memfd``, as its batch slots:
:mod:`trainer.batch_slots`) holding a *doorbell* word and one row per trainer *seat*:

* a trainer of the feeder's node asks the feeder once, by a Ray call, for a seat (:meth:`HandOutBoard.seat`)
  and maps the board through ``/proc/<feeder pid>/fd/<fd>``;
* to ask for batches ``b .. b+n-1`` (from ``keep_from`` on it may still hold batches), it writes them into its
  row, bumps the row's request number, writes a doorbell value no one wrote before (its row and request
  number) and wakes the feeder with a futex;
* the feeder's board thread sleeps on the doorbell, finds rows whose request number is new and hands each
  request to a pool thread, which calls :meth:`trainer.feeder.FeederCore.get_span` exactly as the Ray call
  did (cursor groups, laggard waits, lending, eviction, read-ahead: all unchanged) and writes the answer —
  the batches' :class:`~trainer.batch_slots.SlotRef` records as JSON, never pickle — into the row, then the
  row's answer number, and wakes the trainer with a futex.

The answer number is written after the answer and the doorbell after the request; x86-64 keeps stores
in program order for other cores, so a reader that sees the number sees what it announces. The board is
therefore only used on Linux x86-64 (:func:`board_supported`); elsewhere trainers make Ray calls.

**When the board is not used.** A trainer on another node, a feeder without shared memory, a board with
no seat left (:data:`ROWS` per feeder, seats are never reused), an answer that is not all
``SlotRef`` records (a batch the feeder could only put in Ray's object store) or that does not fit a row,
and a request the feeder failed to serve: in each of these the trainer makes the same request as a Ray
call (which raises the feeder's error, if it has one). A trainer waiting for an answer checks every
second that the feeder's board still exists (the feeder's process is alive); when it does not (the
feeder died and Ray restarts it) the trainer asks the restarted feeder by a Ray call, as before, and
takes a seat on its new board.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.batch_slots import SlotRef, _memfd, slots_supported

#: seats per board (a trainer takes one each time it starts: a run's retry takes another; seats are not reused)
ROWS = 256
#: bytes per seat: a 64-byte header, then the answer (JSON of up to a span of SlotRefs)
ROW_BYTES = 8192
_ROWS_AT = 64
_ANSWER_AT = 64
# a row's header: uint32 words 0 request number, 1 answer number, 2 status, 3 answer length;
# int64 words 2 first batch, 3 batches, 4 keep_from
_REQ, _ANS, _STATUS, _LEN = 0, 1, 2, 3
_FIRST, _COUNT, _KEEP = 2, 3, 4
_OK, _ASK_RAY = 0, 1
#: how long a waiting trainer sleeps before it checks the feeder is still alive (seconds)
LIVENESS_S = 1.0

_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 0, 1  # x86-64 Linux


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if platform.system() == "Linux" else None


def board_supported() -> bool:
    """Shared memory other processes can open (:func:`trainer.batch_slots.slots_supported`), futexes, and
    the x86-64 store order the board relies on."""
    return _libc is not None and platform.machine() in ("x86_64", "AMD64") and slots_supported()


def _futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the uint32 at ``addr`` holds ``expected`` (at most ``timeout_s``; a wake-up or a
    changed value ends it early)."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(expected), ctypes.byref(ts),
                  None, 0)


def _futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, ctypes.c_int(2**31 - 1), None, None, 0)


def encode_refs(refs: list[SlotRef]) -> bytes:
    """SlotRef records as JSON bytes (what a row's answer holds)."""
    return json.dumps([[r.owner, r.pid, [list(c) for c in r.columns], r.check] for r in refs],
                      separators=(",", ":")).encode()


def decode_refs(data: bytes) -> list[SlotRef]:
    """The SlotRef records :func:`encode_refs` wrote."""
    out = []
    for owner, pid, columns, check in json.loads(data):
        cols = tuple((name, dtype, tuple(shape), (file[0], file[1]), offset)
                     for name, dtype, shape, file, offset in columns)
        out.append(SlotRef(owner, pid, cols, None if check is None else ((check[0][0], check[0][1]), check[1])))
    return out


@dataclass(frozen=True)
class Seat:
    """A trainer's place on a board: the board's file (``pid``, ``fd``; ``inode`` proves it is still the
    same file) and the trainer's row."""

    pid: int
    fd: int
    inode: int
    row: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


class _Rows:
    """A board's memory as the doorbell and per-row uint32 and int64 views."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.map = buf
        self.u8 = np.frombuffer(buf, dtype=np.uint8)
        self.bell = self.u8[:4].view(np.uint32)
        rows = self.u8[_ROWS_AT:_ROWS_AT + ROWS * ROW_BYTES].reshape(ROWS, ROW_BYTES)
        self.rows = rows
        self.u32 = rows[:, :_ANSWER_AT].view(np.uint32)
        self.i64 = rows[:, :_ANSWER_AT].view(np.int64)
        self.base = self.u8.ctypes.data

    def addr_bell(self) -> int:
        return self.base

    def addr_answer(self, row: int) -> int:
        return self.base + _ROWS_AT + row * ROW_BYTES + 4 * _ANS


class HandOutBoard:
    """The feeder's side: seats trainers and answers their requests with ``serve(b, n, trainer, keep_from)``
    (:meth:`trainer.feeder.FeederCore.get_span` for the feeder's node) on a pool of threads (a request may
    wait for a laggard, as a Ray call may)."""

    def __init__(self, owner: str, serve: Callable[[int, int, str, int], list[Any]], threads: int = 64) -> None:
        self.serve = serve
        self.file, buf = _memfd(owner + "-board", _ROWS_AT + ROWS * ROW_BYTES)
        self.mem = _Rows(buf)
        self.inode = os.fstat(self.file[0]).st_ino
        self.trainers: list[str] = []
        self.served = np.zeros(ROWS, dtype=np.uint32)
        self.answers = 0
        self.asked_ray = 0
        self.lock = threading.Lock()
        self.stopped = False
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="feeder-board")
        self.thread = threading.Thread(target=self._loop, name="feeder-board", daemon=True)
        self.thread.start()

    def seat(self, trainer: str) -> Seat | None:
        """A row for ``trainer`` (one per :class:`trainer.feeder.FeederBatches`: a run's retry takes a new
        one), or ``None`` when every row is taken."""
        with self.lock:
            if self.stopped or len(self.trainers) >= ROWS:
                return None
            self.trainers.append(trainer)
            return Seat(os.getpid(), self.file[0], self.inode, len(self.trainers) - 1)

    def _loop(self) -> None:
        mem = self.mem
        while not self.stopped:
            bell = int(mem.bell[0])  # read before the rows: a request written after this changes it
            with self.lock:
                seated = len(self.trainers)
            new = np.nonzero(mem.u32[:seated, _REQ] != self.served[:seated])[0]
            for row in new.tolist():
                seq = int(mem.u32[row, _REQ])
                self.served[row] = seq
                first, count, keep = (int(x) for x in mem.i64[row, _FIRST:_KEEP + 1])
                try:
                    self.pool.submit(self._answer, row, seq, first, count, keep)
                except RuntimeError:  # closed meanwhile: the trainer finds the board gone and asks by Ray call
                    return
            if not len(new):
                _futex_wait(mem.addr_bell(), bell, LIVENESS_S)

    def _answer(self, row: int, seq: int, first: int, count: int, keep: int) -> None:
        status, data = _ASK_RAY, b""
        try:
            handles = self.serve(first, count, self.trainers[row], keep)
            if all(isinstance(h, SlotRef) for h in handles):
                data = encode_refs(handles)
                status = _OK if len(data) <= ROW_BYTES - _ANSWER_AT else _ASK_RAY
        except Exception:  # noqa: BLE001 - the trainer repeats the request as a Ray call, which raises it
            status = _ASK_RAY
        mem = self.mem
        if status == _OK:
            mem.rows[row, _ANSWER_AT:_ANSWER_AT + len(data)] = np.frombuffer(data, dtype=np.uint8)
        mem.u32[row, _STATUS] = status
        mem.u32[row, _LEN] = len(data) if status == _OK else 0
        mem.u32[row, _ANS] = seq  # last: the answer is complete
        with self.lock:
            self.answers += status == _OK
            self.asked_ray += status != _OK
        _futex_wake(mem.addr_answer(row))

    def stats(self) -> dict[str, int]:
        """Seats taken, requests answered through the board, and requests sent back to be asked by Ray call."""
        with self.lock:
            return {"board_seats": len(self.trainers), "board_answers": self.answers,
                    "board_sent_to_ray": self.asked_ray}

    @staticmethod
    def no_stats() -> dict[str, int]:
        """:meth:`stats` of a feeder that has no board."""
        return {"board_seats": 0, "board_answers": 0, "board_sent_to_ray": 0}

    def close(self) -> None:
        """Stop answering and close the board's file: a trainer waiting for an answer finds the board gone
        (as if the feeder had died) and asks by Ray call; the memory lives on in the mappings."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        _futex_wake(self.mem.addr_bell())
        self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.file[0])


class FeederGone(Exception):
    """The board a trainer sits at no longer exists (the feeder's process ended, or it closed the board)."""


class BoardClient:
    """A trainer's side of a :class:`HandOutBoard`: one request at a time (:meth:`ask`, then :meth:`answer`)."""

    def __init__(self, seat: Seat) -> None:
        with open(seat.path, "r+b") as f:
            if os.fstat(f.fileno()).st_ino != seat.inode:
                raise OSError(f"{seat.path} is not the feeder's board any more")
            buf = mmap.mmap(f.fileno(), 0)
        self.seat, self.mem = seat, _Rows(buf)
        self.seq = int(self.mem.u32[seat.row, _REQ])
        self.pending = False

    def ask(self, first: int, count: int, keep_from: int) -> None:
        """Ask for batches ``first .. first+count-1``; the caller may still hold batches from ``keep_from`` on."""
        mem, row = self.mem, self.seat.row
        mem.i64[row, _FIRST], mem.i64[row, _COUNT], mem.i64[row, _KEEP] = first, count, keep_from
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        mem.u32[row, _REQ] = self.seq
        mem.bell[0] = (row << 24) | (self.seq & 0xFFFFFF)  # never the value the feeder last read
        self.pending = True
        _futex_wake(mem.addr_bell())

    def answer(self) -> list[SlotRef] | None:
        """The answer to the request asked: its SlotRefs, or ``None`` when the feeder says to ask by Ray call.
        Raises :class:`FeederGone` when the feeder's process has ended."""
        mem, row = self.mem, self.seat.row
        addr = mem.addr_answer(row)
        while True:
            got = int(mem.u32[row, _ANS])
            if got == self.seq:
                break
            _futex_wait(addr, got, LIVENESS_S)
            if int(mem.u32[row, _ANS]) != self.seq and not self.alive():
                self.pending = False
                raise FeederGone(self.seat.path)
        self.pending = False
        if int(mem.u32[row, _STATUS]) != _OK:
            return None
        size = int(mem.u32[row, _LEN])
        return decode_refs(mem.rows[row, _ANSWER_AT:_ANSWER_AT + size].tobytes())

    def alive(self) -> bool:
        """The board's file is still open in the feeder's process (so the process lives and answers)."""
        try:
            return os.stat(self.seat.path).st_ino == self.seat.inode
        except OSError:
            return False

