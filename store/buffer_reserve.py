"""The process's reserve of window buffers: a loader's start-up memory is paid once per process.

A loader's window buffers are its one large allocation (≈ (prefetch + 1) × window rows × d × itemsize),
and memory new to a process costs its first touch: on the bench VM, which hands freed memory back to
its host at once, a second loader's first epoch over four 128 MiB windows took 1.6–2.7 s with new
buffers, 3 s after the first loader freed its own, against 0.17–0.27 s with the first one's
(``bench/README.md``, "The buffer reserve"). A real host pays less for a first touch, but still about
as much as the read itself. Loaders that come and go in one process — the eval pass every
``eval_every`` steps, the evaluation after training, a Ray worker that runs one run after another —
paid it every time.

So a loader that lets go of a window buffer set (when it closes, when the last batch lent from a set
it has closed over is freed, or when it has more free sets than it keeps) gives its blocks to this
reserve, and a loader that needs a set takes blocks from it before it allocates. Only loaders with the
default allocator take part: the sweep's feeder puts its windows in shared memory and keeps them.

A block is handed out once and comes back only when nothing points into it any more (the loader's
leases, see ``store.loader._BufferPool``) and no read task writes into it, so a block reused by a new
loader never changes a batch somebody holds. A loader gives its blocks back to the reserve it was made
with (:data:`RESERVE` at the time).

Bounds, so a closed loader never holds memory for long:

* at most ``DYNSAE_BUFFER_RESERVE_MB`` MiB (default 2048) are held; past that, the oldest blocks go;
  ``0`` turns the reserve off (every loader allocates its own, as before);
* a block unused for :data:`IDLE_S` seconds is freed (a timer thread; a block is taken again by the
  next eval pass long before that in a training run);
* :func:`release_window_buffers` frees everything at once.

A block is taken for a request of ``n`` bytes when it holds between ``n`` and ``2n`` bytes (the
smallest such block), so a large block never serves a small column.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from store.scatter import aligned_empty

#: Bytes the reserve holds at most (``DYNSAE_BUFFER_RESERVE_MB``, default 2048 MiB; 0 turns it off).
LIMIT_BYTES = int(float(os.environ.get("DYNSAE_BUFFER_RESERVE_MB", "2048")) * (1 << 20))
#: A block held this long without being taken is freed.
IDLE_S = 120.0


class ClosedPool(Protocol):
    """A closed loader's window buffer pool (``store.loader._BufferPool``)."""

    def settle(self) -> bool:
        """Give back the sets whose last lease came back; True once it owes none."""


class BufferReserve:
    """Aligned byte blocks handed from loaders that let go of them to loaders that need them."""

    def __init__(self, limit_bytes: int = LIMIT_BYTES, idle_s: float = IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_bytes, self.idle_s, self.clock = int(limit_bytes), float(idle_s), clock
        self._blocks: list[tuple[float, np.ndarray]] = []  # (when given, block), oldest first
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._watched: list[ClosedPool] = []  # closed loaders' pools that still owe sets (late leases)
        self.taken = self.given = 0  # blocks handed out from the reserve / blocks given to it

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(block.nbytes for _, block in self._blocks)

    def watch(self, pool: ClosedPool) -> None:
        """``pool`` (a closed loader's) gives its sets here as their last leases come back; they are counted
        when a block is next taken or the reserve is trimmed."""
        with self._lock:
            if pool not in self._watched:
                self._watched.append(pool)
            self._arm()

    def _settle_watched(self) -> None:
        """Collect the sets whose last lease came back since; forget the pools that owe none any more."""
        with self._lock:
            pools = list(self._watched)
        done = [pool for pool in pools if pool.settle()]  # gives sets back through give(), unlocked here
        with self._lock:
            self._watched = [pool for pool in self._watched if pool not in done]

    def take(self, nbytes: int) -> np.ndarray | None:
        """The smallest held block of ``nbytes`` to ``2·nbytes`` bytes (removed from the reserve), or None."""
        self._settle_watched()
        with self._lock:
            fits = [i for i, (_, block) in enumerate(self._blocks) if nbytes <= block.nbytes <= 2 * nbytes]
            if not fits:
                return None
            best = min(fits, key=lambda i: self._blocks[i][1].nbytes)
            self.taken += 1
            return self._blocks.pop(best)[1]

    def array(self, shape: tuple[int, ...], dtype: np.dtype | str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(an uninitialised 64-byte aligned array of ``shape``, the block it is a view of, whether the block
        came from this reserve). :meth:`give` the block back once nothing points into it."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        block = self.take(nbytes)
        reused = block is not None
        if block is None:
            block = aligned_empty((nbytes,), np.uint8)
        return block[:nbytes].view(dtype).reshape(shape), block, reused

    def give(self, block: np.ndarray) -> None:
        """Keep ``block`` for the next loader (nothing may point into it); the oldest blocks go past the limit."""
        if block.nbytes > self.limit_bytes:
            return
        with self._lock:
            self.given += 1
            self._blocks.append((self.clock(), block))
            while sum(b.nbytes for _, b in self._blocks) > self.limit_bytes:
                self._blocks.pop(0)
            self._arm()

    def trim(self) -> None:
        """Free the blocks held for :attr:`idle_s` or longer."""
        self._settle_watched()
        with self._lock:
            now = self.clock()
            self._blocks = [(t, block) for t, block in self._blocks if now - t < self.idle_s]
            if self._timer is threading.current_thread():  # (a direct call leaves the pending timer be)
                self._timer = None
            self._arm()

    def release(self) -> None:
        """Free every held block."""
        self._settle_watched()
        with self._lock:
            self._blocks.clear()

    def _arm(self) -> None:
        """Have :meth:`trim` run when the oldest held block turns idle (lock held)."""
        if self._timer is not None or not (self._blocks or self._watched):
            return
        oldest = self._blocks[0][0] if self._blocks else self.clock()
        wait = max(0.0, oldest + self.idle_s - self.clock())
        self._timer = threading.Timer(wait, self.trim)
        self._timer.daemon = True
        self._timer.start()


#: The one reserve of this process.
RESERVE = BufferReserve()


def release_window_buffers() -> None:
    """Free the window buffers that closed loaders left to the next loader in this process."""
    RESERVE.release()
