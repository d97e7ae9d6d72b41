"""The sweep's feeder: one store read per batch, shared by every trainer of a batch stream.

One :class:`Feeder` actor per batch stream (dataset, batch_size, data_seed — one per dataset in a
normal sweep) reads batch ``b`` with ``ActivationLoader.batch(b)`` (acts + positions, so each trainer
applies its own row filter), ``ray.put``s the :class:`store.batch.Batch` as the loader gave it (the
stored dtypes: a float16 dataset crosses the object store at half the bytes of float32; the trainer
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
batches' references per call to the actor: one call per batch per trainer would make the actor's
round trips, not the store, the feeder's ceiling (``bench/feeder_bench.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from store.batch import Batch
from store.loader import ActivationLoader
from trainer.config import BATCH_COLUMNS


class FeederCore:
    """The feeder's logic (a plain class so it can be used and tested in-process too).

    ``get`` returns an ObjectRef of the batch when Ray is up (the batch itself otherwise)."""

    def __init__(self, dataset: str, batch_size: int, data_seed: int, total_batches: int,
                 trainers: list[str], window: int = 32, prefetch: int = 2, lag_timeout_s: float = 120.0,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.loader = ActivationLoader(dataset, batch_size, split="train", seed=data_seed,
                                       columns=BATCH_COLUMNS, storage_options=storage_options)
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

    def _read(self, b: int) -> Batch:
        """Read batch ``b`` from the store (counted)."""
        batch = self.loader.batch(b)
        with self.cond:
            self.read_counts[b] += 1
            self.bytes_read += batch.nbytes
        return batch

    @staticmethod
    def _put(read: Future) -> Any:
        """Put a read batch, unchanged, in the object store (the batch itself when Ray is not up)."""
        batch = read.result()
        return ray.put(batch) if ray.is_initialized() else batch

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
            del self.held[b]

    def _start_read(self, b: int) -> Future:
        """Read batch ``b`` into the window (caller holds the lock)."""
        fut = self.held[b] = self.put_pool.submit(self._put, self.pool.submit(self._read, b))
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

    def get(self, b: int, trainer: str) -> Any:
        """The ObjectRef of batch ``b`` for ``trainer`` (read from the store only if not held)."""
        if not 0 <= b < self.total:
            raise IndexError(f"batch {b} outside 0..{self.total - 1}")
        with self.cond:
            self.requests += 1
            if trainer not in self.gone:
                self.cursors[trainer] = b
            self._wait_for_laggards(b, trainer)
            if b not in self.held:  # room for b and the batches read ahead after it
                self._evict(max(0, self.window - 1 - self.prefetch))
            fut = self.held[b] if b in self.held else self._start_read(b)
            for i in range(b + 1, min(b + 1 + self.prefetch, self.total)):  # read ahead into free room only
                if i not in self.held and len(self.held) < self.window and not self._laggards(i, trainer):
                    self._start_read(i)
        ref = fut.result()
        with self.cond:
            if trainer in self.cursors:
                self.cursors[trainer] = max(self.cursors[trainer], b + 1)
            self.cond.notify_all()
        return ref

    def get_span(self, b: int, n: int, trainer: str) -> list[Any]:
        """The ObjectRefs of batches ``b .. b+n-1`` (up to the stream's end) for ``trainer``, in one call:
        a trainer asks once per ``n`` batches, so one feeder serves many trainers at the loader's pace
        (each call to an actor costs both sides a round trip)."""
        return [self.get(i, trainer) for i in range(b, min(b + n, self.total))]

    def done(self, trainer: str) -> None:
        """``trainer`` finished (or gave up): nobody waits for it and it wants no batch any more, even if a
        request of its, in flight, arrives later."""
        with self.cond:
            self.gone.add(trainer)
            self.cursors.pop(trainer, None)
            self.cond.notify_all()

    def reads(self) -> dict[str, Any]:
        """Read statistics: store reads, distinct batches, re-reads, requests, bytes, window state."""
        with self.cond:
            reads = sum(self.read_counts.values())
            return {"reads": reads, "unique": len(self.read_counts), "rereads": reads - len(self.read_counts),
                    "requests": self.requests, "bytes_read": self.bytes_read, "held": len(self.held),
                    "lag_timeouts": self.lag_timeouts, "max_reads_per_batch":
                    max(self.read_counts.values(), default=0)}


@ray.remote(num_cpus=0, max_concurrency=64)
class Feeder(FeederCore):
    """Ray actor around :class:`FeederCore` (threaded: trainers' ``get`` calls run concurrently).
    Trainers take its batches with :func:`feeder_batches`."""


#: Batches a trainer takes from the feeder per call (:func:`feeder_batches`).
SPAN = 4


def feeder_batches(feeder: Any, trainer: str, span: int = SPAN) -> Callable[[int], Batch]:
    """Batch ``b`` for ``trainer`` from a :class:`Feeder` handle. Asked for a batch it does not hold, it
    takes the ObjectRefs of the next ``span`` batches in one call (:meth:`FeederCore.get_span`; each
    batch one ``ray.put`` shared by every trainer); the batch is the ref's value, a :class:`Batch` read
    zero-copy from the object store. Calls come from one thread at a time (the trainer's prefetcher)."""
    held: dict[int, Any] = {}

    def batch(b: int) -> Batch:
        if b not in held:
            held.clear()
            held.update(enumerate(ray.get(feeder.get_span.remote(b, span, trainer)), start=b))
        return ray.get(held.pop(b))

    return batch
