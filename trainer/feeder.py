"""The sweep's feeder: one store read per batch, shared by every trainer of a batch stream.

One :class:`Feeder` actor per batch stream (dataset, batch_size, data_seed — one per dataset in a
normal sweep) reads batch ``b`` with ``ActivationLoader.batch(b)`` (acts + positions, so each trainer
applies its own row filter; called in order, the loader reads the next window ahead, so trainers do not
wait for a whole window's read at each window's first batch), ``ray.put``s the :class:`store.batch.Batch`
as the loader gave it (the stored dtypes: a float16 dataset crosses the object store at half the bytes of float32; the trainer
casts on its device) and hands every trainer that asks the same ObjectRef.

Trainers whose cursors (next batch) lie within ``window`` batches of each other form a *cursor
group*: the group's batches are read once, and its leader waits for a laggard (up to
``lag_timeout_s``) rather than run more than a window ahead of it. A trainer ≥ 2 windows behind every
other one (a run resumed from an older checkpoint, a run started late, a restarted feeder facing runs
far apart) is a group of its own, waited for by nobody: each cursor group reads the batches it needs
once, so far-apart runs cost one store read per batch per group, never a stall. Read batches no
trainer of any group will ask for within a window are dropped when the window is full (so the feeder
holds about ``window`` batches per group); until then they serve restarted trainers and late
starters. ``Feeder.reads()`` reports the counts.

A trainer takes its batches with :func:`feeder_batches` (a :data:`trainer.run.BatchSource`), ``SPAN``
batches' references per request: one request per batch per trainer would make the round trips, not the
store, the feeder's ceiling (``bench/feeder_bench.py``). A trainer on the feeder's node makes its
requests at the feeder's hand-out board (:mod:`trainer.handout`: shared memory and a futex, no Ray
call; the board's pool threads run the same :meth:`FeederCore.get_span`); a trainer elsewhere, or one the
board cannot answer, makes them as Ray calls.

**How a batch travels.** A feeder running as a Ray actor (on Linux) keeps its loader's window buffers
in shared memory (:mod:`trainer.batch_slots`): a batch that is a view of one window is handed to the
trainers of its node as a :class:`~trainer.batch_slots.SlotRef` to where it lies (no copy), one that
straddles two windows is copied into a batch slot first; trainers map the feeder's memory and read
zero-copy. A trainer on another node gets an ObjectRef (the batch ``ray.put`` once, on first such
request), and so does any trainer when shared memory cannot be had or opened. Shared memory is reused
only when no trainer may still read its batch: each request says from which batch on the trainer may still hold batches
(``keep_from``: by default :data:`HOLD` before the batch it asks for — what a trainer's prefetcher and
step may still hold), and a trainer that is done holds nothing.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from store.batch import Batch
from store.dataset import open_dataset
from store.loader import ActivationLoader
from trainer.batch_slots import BatchSlots, SlotReader, SlotRef, slot_bytes, slots_supported
from trainer.config import BATCH_COLUMNS
from trainer.handout import BoardClient, FeederGone, HandOutBoard, Seat, board_supported

#: Batches a trainer takes from the feeder per call (:func:`feeder_batches`, which asks for the next
#: span while the trainer works through this one).
SPAN = 8
#: A trainer that needs batch ``b`` may still hold batches ``b − HOLD .. b − 1`` (its prefetcher reads 2
#: ahead of the step: it holds at most 3 before ``b``); their memory is not reused.
HOLD = 8


class _Stored:
    """A read batch as the feeder holds it: where it lies in shared memory (``slot``: its reference,
    for the trainers of this node) — in the loader's window buffer (``batch`` then holds the loader's
    lease on that window, so it stays unchanged) or copied into batch slot ``index`` —, as an ObjectRef
    ``ref`` (made when a trainer elsewhere asks, or when no shared memory could be had), or, without
    Ray, as the batch itself."""

    __slots__ = ("index", "slot", "ref", "batch")

    def __init__(self, index: int | None = None, slot: SlotRef | None = None, ref: Any = None,
                 batch: Batch | None = None) -> None:
        self.index, self.slot, self.ref, self.batch = index, slot, ref, batch


class FeederCore:
    """The feeder's logic (a plain class so it can be used and tested in-process too).

    ``get`` returns, for a trainer on the feeder's node (``node``), a :class:`SlotRef` when the feeder
    runs as a Ray actor with shared memory; otherwise an ObjectRef of the batch when Ray is up, and the
    batch itself without Ray."""

    def __init__(self, dataset: str, batch_size: int, data_seed: int, total_batches: int,
                 trainers: list[str], window: int = 32, prefetch: int = 2, lag_timeout_s: float = 120.0,
                 storage_options: dict[str, Any] | None = None) -> None:
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = context.get_node_id() if context is not None else None
        in_actor = context is not None and context.get_actor_id() is not None
        self.slots = BatchSlots() if in_actor and slots_supported() else None
        # the stream ends with the epoch of the last batch, so the loader's read-ahead (batch() called in
        # order reads the next window) fetches no window past it
        stored = open_dataset(dataset, storage_options=storage_options)
        with ActivationLoader(stored, batch_size, split="train") as plan:
            rows = plan.rows_per_epoch
        self.loader = ActivationLoader(stored, batch_size, split="train", seed=data_seed,
                                       epochs=max(1, math.ceil(total_batches * batch_size / rows)),
                                       columns=BATCH_COLUMNS, storage_options=storage_options,
                                       allocator=None if self.slots is None else self.slots.allocate)
        self.total = total_batches
        self.window, self.prefetch, self.lag_timeout_s = window, prefetch, lag_timeout_s
        # next batch each *live* trainer needs. A trainer becomes live with its first request: one
        # that Ray has not scheduled yet (more runs than slots) must not hold anyone back.
        self.cursors: dict[str, int] = {}
        # trainers that are done (finished, or failed for good): a request of theirs still in flight when
        # done() came (a process that died mid-span) gets its batch but makes nobody wait for it again
        self.gone: set[str] = set()
        self.held: dict[int, Future] = {}  # b -> future of the batch's ObjectRef
        self.read_counts: Counter[int] = Counter()
        self.bytes_read = 0
        self.requests = 0
        self.lag_timeouts = 0
        self.cond = threading.Condition()
        # one reader thread: batches are read in order (the loader reads each window's chunks in
        # parallel itself); concurrent batch() calls could fetch the same window twice. A second thread
        # puts what was read into the object store, so the read of batch b+1 overlaps the put of b (the
        # put is a copy into shared memory, as long as the read on this VM: ~5 ms for 6.3 MB).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="feeder")
        self.put_pool = ThreadPoolExecutor(1, thread_name_prefix="feeder-put")
        self.slot_batch: dict[int, int] = {}  # slot index -> the batch it holds
        self.slots_held: set[int] = set()  # slots of batches in self.held (or being written)
        self.pinned: list[tuple[int, _Stored]] = []  # dropped from the window, a trainer may still read
        # per trainer, the batches it may still hold: [lo, hi) (its slots are not reused)
        self.lent: dict[str, tuple[int, int]] = {}
        self.board: HandOutBoard | None = None  # made when the first trainer of this node asks for a seat

    def _read(self, b: int) -> Batch:
        """Read batch ``b`` from the store (counted)."""
        batch = self.loader.batch(b)
        with self.cond:
            self.read_counts[b] += 1
            self.bytes_read += batch.nbytes
        return batch

    def _put(self, read: Future, b: int) -> _Stored:
        """Store read batch ``b``, unchanged: where it lies when that is a window buffer in shared memory
        (no copy), else copied into a free batch slot, else in Ray's object store (the batch itself when
        Ray is not up)."""
        batch = read.result()
        index = None
        if self.slots is not None:
            ref = self.slots.refer(batch)
            if ref is not None:
                return _Stored(slot=ref, batch=batch)
            with self.cond:
                index = self.slots.take(slot_bytes(batch), self._free_slots())
                if index is not None:
                    self.slot_batch[index] = b
                    self.slots_held.add(index)
        if index is not None:
            return _Stored(index=index, slot=self.slots.write(index, batch))
        return _Stored(ref=ray.put(batch)) if ray.is_initialized() else _Stored(batch=batch)

    def _lent(self, b: int) -> bool:
        """Some trainer may still read batch ``b`` (caller holds the lock)."""
        return any(lo <= b < hi for lo, hi in self.lent.values())

    def _free_slots(self) -> list[int]:
        """Slots no held batch uses and no trainer may still read (caller holds the lock)."""
        return [i for i, b in self.slot_batch.items() if i not in self.slots_held and not self._lent(b)]

    def _release(self, b: int, stored: _Stored) -> None:
        """Batch ``b`` left the window: its slot is free, and its window buffer's lease goes back to the
        loader, once no trainer may still read it (caller holds the lock)."""
        self.slots_held.discard(stored.index)
        if stored.batch is not None and stored.slot is not None:
            self.pinned.append((b, stored))
        still = []
        for p, pinned in self.pinned:
            if self._lent(p):
                still.append((p, pinned))
            else:
                pinned.batch = None
        self.pinned = still

    def _lend(self, trainer: str, lo: int, hi: int) -> None:
        """``trainer`` may hold batches [lo, hi) now. A trainer's requests go forward, so one that goes back
        comes from a restarted trainer, whose old process holds nothing any more (caller holds the lock)."""
        old_lo, old_hi = self.lent.get(trainer, (lo, hi))
        self.lent[trainer] = (lo, max(old_hi, hi)) if lo >= old_lo else (lo, hi)

    def _handle(self, stored: _Stored, node: str | None) -> Any:
        """What a trainer on ``node`` is given for a stored batch: its slot on this node, else an ObjectRef
        (made once: the object store moves it between nodes), else the batch (no Ray)."""
        if stored.slot is not None and node is not None and node == self.node:
            return stored.slot
        if stored.slot is not None and stored.ref is None:  # the batch is lent to the asker: it stays
            stored.ref = ray.put(stored.batch if stored.index is None else self.slots.batch(stored.index, stored.slot))
        return stored.batch if stored.ref is None else stored.ref

    def _laggards(self, b: int, trainer: str) -> list[str]:
        """Trainers of ``trainer``'s cursor group that reading batch ``b`` would leave more than a window
        behind: w ≤ b − c < 2w. Farther behind is another group, which reads for itself (caller holds the lock)."""
        return [t for t, c in self.cursors.items() if t != trainer and self.window <= b - c < 2 * self.window]

    def _wanted(self, b: int) -> bool:
        """Some live trainer will ask for batch ``b`` within a window: 0 ≤ b − c < w (caller holds the lock)."""
        return any(0 <= b - c < self.window for c in self.cursors.values())

    def _evict(self, limit: int) -> None:
        """Drop the oldest read batches no live trainer wants until at most ``limit`` are held (caller holds the lock)."""
        if len(self.held) <= limit:
            return
        for b in sorted(b for b, fut in self.held.items() if fut.done() and not self._wanted(b)):
            if len(self.held) <= limit:
                return
            fut = self.held.pop(b)
            if fut.exception() is None:  # a failed read holds nothing
                self._release(b, fut.result())

    def _start_read(self, b: int) -> Future:
        """Read batch ``b`` into the window (caller holds the lock)."""
        fut = self.held[b] = self.put_pool.submit(self._put, self.pool.submit(self._read, b), b)
        return fut

    def _wait_for_laggards(self, b: int, trainer: str) -> None:
        """Let the laggards of ``trainer``'s group catch up before it reads ``b`` (bounded; caller holds the lock)."""
        deadline = time.monotonic() + self.lag_timeout_s
        while b not in self.held and self._laggards(b, trainer):
            left = deadline - time.monotonic()
            if left <= 0:
                self.lag_timeouts += 1
                return
            self.cond.wait(timeout=min(left, 1.0))

    def get(self, b: int, trainer: str, node: str | None = None, keep_from: int | None = None) -> Any:
        """Batch ``b`` for ``trainer`` on ``node`` (read from the store only if not held): its slot, its
        ObjectRef or itself (see the class). The trainer is done with every batch before ``keep_from``
        (``b − HOLD`` by default)."""
        if not 0 <= b < self.total:
            raise IndexError(f"batch {b} outside 0..{self.total - 1}")
        with self.cond:
            self.requests += 1
            if trainer not in self.gone:
                self.cursors[trainer] = b
                self._lend(trainer, b - HOLD if keep_from is None else keep_from, b + 1)
            self._wait_for_laggards(b, trainer)
            if b not in self.held:  # room for b and the batches read ahead after it
                self._evict(max(0, self.window - 1 - self.prefetch))
            fut = self.held[b] if b in self.held else self._start_read(b)
            for i in range(b + 1, min(b + 1 + self.prefetch, self.total)):  # read ahead into free room only
                if i not in self.held and len(self.held) < self.window and not self._laggards(i, trainer):
                    self._start_read(i)
        stored = fut.result()
        with self.cond:
            if trainer in self.cursors:
                self.cursors[trainer] = max(self.cursors[trainer], b + 1)
            self.cond.notify_all()
        return self._handle(stored, node)

    def get_span(self, b: int, n: int, trainer: str, node: str | None = None,
                 keep_from: int | None = None) -> list[Any]:
        """Batches ``b .. b+n-1`` (up to the stream's end: none from it on) for ``trainer`` on ``node``, as
        :meth:`get` gives them, in one call: a trainer asks once per ``n`` batches, so one feeder serves
        many trainers at the loader's pace (each call to an actor costs both sides a round trip). The
        trainer is done with every batch before ``keep_from`` (``b − HOLD`` by default)."""
        keep_from = b - HOLD if keep_from is None else keep_from
        return [self.get(i, trainer, node, keep_from) for i in range(b, min(b + n, self.total))]

    def seat(self, trainer: str, node: str | None) -> Seat | None:
        """A seat at this feeder's hand-out board (:mod:`trainer.handout`) for ``trainer`` on ``node``: its
        requests then go through shared memory instead of Ray calls. ``None`` (ask by Ray call) for a
        trainer on another node, a feeder without shared memory, or a board with no seat left."""
        if self.slots is None or node is None or node != self.node or not board_supported():
            return None
        with self.cond:
            if self.board is None:
                self.board = HandOutBoard(self.slots.owner, lambda b, n, name, keep:
                                          self.get_span(b, n, name, self.node, keep))
            board = self.board
        return board.seat(trainer)

    def done(self, trainer: str) -> None:
        """``trainer`` finished (or gave up): nobody waits for it and it wants no batch any more, even if a
        request of its, in flight, arrives later."""
        with self.cond:
            self.gone.add(trainer)
            self.cursors.pop(trainer, None)
            self.lent.pop(trainer, None)
            self.cond.notify_all()

    def reads(self) -> dict[str, Any]:
        """Read statistics: store reads, distinct batches, re-reads, requests, bytes, window state."""
        with self.cond:
            reads = sum(self.read_counts.values())
            return {"reads": reads, "unique": len(self.read_counts), "rereads": reads - len(self.read_counts),
                    "requests": self.requests, "bytes_read": self.bytes_read, "held": len(self.held),
                    "lag_timeouts": self.lag_timeouts, "max_reads_per_batch":
                    max(self.read_counts.values(), default=0),
                    "slots": 0 if self.slots is None else len(self.slots.slots),
                    "window_buffers": 0 if self.slots is None else len(self.slots.regions),
                    "window_buffers_made": 0 if self.slots is None else self.slots.regions_made,
                    **(HandOutBoard.no_stats() if self.board is None else self.board.stats())}

    def close(self) -> None:
        """Stop the hand-out board and remove the batch slots (a killed feeder's memory goes with its process)."""
        with self.cond:
            if self.board is not None:
                self.board.close()
            if self.slots is not None:
                self.slots.close()


@ray.remote(num_cpus=0, max_concurrency=64)
class Feeder(FeederCore):
    """Ray actor around :class:`FeederCore` (threaded: trainers' ``get`` calls run concurrently).
    Trainers take its batches with :func:`feeder_batches`."""


def feeder_batches(feeder: Any, trainer: str, span: int = SPAN, board: bool = True) -> Callable[[int], Batch]:
    """Batch ``b`` for ``trainer`` from a :class:`Feeder` handle (see :class:`FeederBatches`; ``board=False``:
    Ray calls even on the feeder's node, the baseline of ``bench/feeder_bench.py``)."""
    return FeederBatches(feeder, trainer, span, board)


class FeederBatches:
    """A trainer's :data:`trainer.run.BatchSource` over a :class:`Feeder`. Asked for a batch it does not
    hold, it takes the next ``span`` batches' handles in one request (:meth:`FeederCore.get_span`), and asks
    for the span after them at once, so that the feeder reads them while the trainer works through these
    (one request in flight: the feeder's reading and the trainer's steps overlap). On the feeder's node a
    request goes through the feeder's hand-out board (:mod:`trainer.handout`: shared memory, no Ray call)
    and a handle is a place in the feeder's shared memory, read zero-copy; elsewhere a request is a Ray
    call and a handle an ObjectRef, read zero-copy from the object store. Either way the :class:`Batch` is
    read-only and shared by every trainer. Calls come from one thread at a time (the trainer's
    prefetcher), in increasing ``b``, and the caller holds at most :data:`HOLD` batches before the one it
    asks for."""

    def __init__(self, feeder: Any, trainer: str, span: int = SPAN, board: bool = True) -> None:
        self.feeder, self.trainer, self.span = feeder, trainer, span
        self.held: dict[int, Any] = {}
        # the span asked ahead: (first batch, keep_from, ObjectRef of its handles or None: asked on the board)
        self.next: tuple[int, int, Any] | None = None
        self.node: str | None = ray.get_runtime_context().get_node_id()  # None: ObjectRefs from now on
        self.reader = SlotReader()
        self.board = self._sit() if board else None
        self.reasked_pid: int | None = None  # a feeder process whose missing file made this trainer ask again

    @property
    def asks_ahead(self) -> bool:
        """At the feeder's board, the next span is asked for while the trainer takes this one and a batch
        is then at hand: :class:`trainer.run.Prefetcher` calls this source directly, without its thread."""
        return self.board is not None

    def _sit(self) -> BoardClient | None:
        """A seat at the feeder's hand-out board, when the feeder is on this node and has one."""
        if self.node is None:
            return None
        seat = ray.get(self.feeder.seat.remote(self.trainer, self.node))
        try:
            return None if seat is None else BoardClient(seat)
        except OSError:  # its memory cannot be opened here: Ray calls (and the slots' own fallback) instead
            return None

    def _ray(self, b: int, keep_from: int) -> Any:
        return self.feeder.get_span.remote(b, self.span, self.trainer, self.node, keep_from)

    def _ask(self, b: int, keep_from: int) -> tuple[int, int, Any]:
        if self.board is not None:
            self.board.ask(b, self.span, keep_from)
            return b, keep_from, None
        return b, keep_from, self._ray(b, keep_from)

    def _handles(self, asked: tuple[int, int, Any]) -> list[Any]:
        """The handles of a span asked (on the board, else by Ray call)."""
        b, keep_from, ref = asked
        if ref is None and self.board is not None:
            try:
                handles = self.board.answer()
            except FeederGone:  # the feeder died: Ray restarts it; ask it by Ray call and sit at its new board
                self.board = None
                got = ray.get(self._ray(b, keep_from))
                self.board = self._sit()
                return got
            if handles is not None:
                return handles
        return ray.get(ref if ref is not None else self._ray(b, keep_from))

    def __call__(self, b: int) -> Batch:
        if b not in self.held:
            ahead, self.next = self.next, None
            if ahead is not None and ahead[0] == b:
                handles = self._handles(ahead)
            else:
                if ahead is not None and ahead[2] is None:
                    self._drain()  # a jump: the span asked ahead is not needed, but its answer must come first
                handles = self._handles(self._ask(b, b - HOLD))
            self.held = dict(enumerate(handles, start=b))
            if handles:  # the stream goes on: ask for the next span now (this one's batches stay lent)
                self.next = self._ask(b + len(handles), b - HOLD)
        handle = self.held.pop(b)
        if isinstance(handle, SlotRef):
            try:
                return self.reader.batch(handle)
            except OSError as err:
                if isinstance(err, FileNotFoundError) and handle.pid != self.reasked_pid:
                    return self._from_restarted_feeder(b, handle.pid)
                # the feeder's memory cannot be opened here: take ObjectRefs instead
                warnings.warn(f"trainer {self.trainer}: cannot open the feeder's batch slots ({err}); taking "
                              "batches through Ray's object store instead.", RuntimeWarning, stacklevel=2)
                self._drain()
                self.node, self.held, self.next, self.board = None, {}, None, None
                handle = ray.get(self.feeder.get.remote(b, self.trainer, None))
        return ray.get(handle)

    def _from_restarted_feeder(self, b: int, pid: int) -> Batch:
        """Batch ``b`` when a file that feeder process ``pid`` answered with is gone: the feeder died after
        answering, before this trainer opened it (its process may still be exiting). Ask again by Ray call,
        which Ray hands to the restarted feeder, and sit at its board; a file of that same process missing
        again is not a death (the caller then takes ObjectRefs, as when files cannot be opened)."""
        self.reasked_pid = pid
        self.next, self.board = None, None
        self.held = dict(enumerate(ray.get(self._ray(b, b - HOLD)), start=b))
        self.board = self._sit()
        return self(b)

    def _drain(self) -> None:
        """Wait out a request still on the board (its row takes one request at a time); if the board is gone
        meanwhile, sit at the restarted feeder's."""
        if self.board is not None and self.board.pending:
            try:
                self.board.answer()
            except FeederGone:
                self.board = self._sit()
