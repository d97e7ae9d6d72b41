"""ActivationLoader: windowed block shuffle with random access by batch index (``docs/store-format.md``).

The row stream of one rank is the concatenation of epochs e = 0, 1, 2, ...; epoch e is:

1. the rank's chunks of the split (split chunks ``[rank::world]`` — disjoint across ranks,
   together covering the split; fixed, so every epoch of a rank has the same rows) in the
   order of a permutation seeded by ``(seed, e)``;
2. cut into windows of ``window_chunks`` consecutive chunks (the last may be smaller);
3. the rows of each window permuted by a permutation seeded by ``(seed, e, w)``.

Batch ``b`` is rows [b·B, (b+1)·B) of that stream, with each window's rows of a batch in window
order (the shuffle decides which rows share a batch; their order inside it does not change a mean
loss), so it is a pure function of
(dataset, split, seed, rank, world, window_chunks, batch_size, b): ``loader.batch(b)``
re-reads it on demand and ``iter_batches(start=b)`` resumes exactly. Batches may straddle
windows and epochs. Every row of the rank's split appears exactly once per epoch. With
finite ``epochs`` the stream ends after ``epochs`` epochs and the last batch is short if
``epochs · rows_per_epoch`` is not a multiple of B; ``len(loader)`` is then the number of
batches yielded. With ``epochs=None`` the stream is endless and ``len(loader)`` is
``ceil(rows_per_epoch / B)``, the batches per epoch. ``max_rows`` ends the stream after its first
``max_rows`` rows (the same rows, in the same batches; with ``epochs`` too, whichever ends it first):
no window past them is read, read ahead or given a buffer — an eval pass that scores 65,536 rows
reads the window that holds them, not two more besides.

Reading: a window's chunks are read concurrently by a thread pool, and each read task (locally: a
run of the window's chunks, up to :data:`TASK_BYTES` of one column) scatters its chunks' rows to their
places in the window's *batch order* (``store.scatter``: each chunk is
read sequentially once and rows are written with streaming stores; a gather of each batch's rows
at random costs ~4× as much, see ``bench/README.md``), so a batch is then one contiguous slice of
the window buffer, handed out as is: a :class:`store.batch.Batch` of views in the stored dtypes
(float16 acts stay float16; the consumer casts once, on its device). The window's buffer is
reused only once every batch lent from it has been freed (see :class:`_BufferPool`), so a batch
is the caller's: modifying it changes no other batch; keeping one keeps its window's buffer
alive, so ``clone()`` a batch you keep for long. Local uncompressed chunks are scattered straight
from the page cache (each shard file memory-mapped once per reader; ``use_mmap=False`` reads each
chunk with one ``pread`` and scatters from the bytes read); on object
storage a task reads one shard's chunks of the window with one ranged GET per run of chunks that
lie back to back (a shard mostly inside the window whose index is not cached yet is fetched whole,
index included, in one GET). The next ``prefetch`` windows are submitted before the current one is
consumed, and batches are assembled by a background thread into a small queue, so the consumer
only waits when I/O is really the bottleneck (``batch(b)`` called in order reads ahead the same way).
Memory ≈ (prefetch + 1) × window_chunks × chunk_rows × d × itemsize for a consumer that lets go of its
batches (window buffers are recycled: a window two or more ahead waits for the passed window's
buffers; ``batch(b)`` walking one place in order: 3 sets, the two cached windows and the next), more for
one that keeps them. Window buffers outlive their loader: a set the loader lets go of (when it closes, or
when a batch that kept it is freed after that) goes to the process's reserve, and the next loader in the
process takes its buffers from there before it allocates new memory (:mod:`store.buffer_reserve`: first
touching new memory costs about as much as the read itself; bounded, freed when left idle).
``allocator(shape, dtype)`` (default: blocks of that reserve, else new aligned ones) makes the window
buffers: the sweep's feeder puts them in shared memory, so the batches it hands its node's trainers are
these very bytes (``trainer.batch_slots``); a loader with its own allocator keeps out of the reserve.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial

import numpy as np

from store import buffer_reserve
from store.batch import Batch
from store.dataset import Dataset, open_dataset
from store.errors import UserError
from store.io import is_local
from store.layout import ACTS, row_columns
from store.scatter import scatter_rows

WindowKey = tuple[int, int]
_DONE = object()
#: local reads: a read task takes the window's chunks in window order, up to this many stored bytes of its column
#: (at least one chunk). Each task costs the pool a hand-off, a future and a GIL hand-over between threads
#: (~0.07 ms of CPU on the 2-core box); one task per chunk made a window of 1,024-row chunks 2 × 64 tasks,
#: one per 8 KiB of positions, and its reading used 1.5–2.1 ms of CPU per float16 batch (d = 768, B = 4,096)
#: against 1.1 ms grouped (bench/README, "Fewer read tasks").
TASK_BYTES = 4 << 20


class _Window:
    """One window being fetched: per column, a buffer that receives the window's rows in *batch
    order* (see :meth:`ActivationLoader._batch_order`), and the read futures (each reads a run of
    chunks — up to :data:`TASK_BYTES` locally, a shard's chunks on object storage — and scatters their
    rows to their places)."""

    def __init__(self, bufs: dict[str, np.ndarray], futures: list[Future]) -> None:
        self.bufs, self.futures = bufs, futures
        self.ready = False
        self.lent: set[tuple[int, int]] = set()  # row ranges handed out as views
        self.leases = 0  # of those, the ones still alive
        self.retired = False  # the stream or the cache has passed this window

    def wait(self) -> _Window:
        if not self.ready:
            for fut in self.futures:
                fut.result()
            self.ready = True
        return self

    def rows(self, column: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of the window in batch order (a view): the rows ``perm[lo:hi]`` sorted by
        their place in the window, when ``[lo, hi)`` is a piece of one batch.

        The shuffle decides *which* rows form a batch; within the batch they come sorted by their
        place in the window. Order inside a batch does not change a mean loss, and it lets each
        chunk's rows be scattered to their places in one sequential pass over the chunk.
        """
        return self.wait().bufs[column][lo:hi]


class _BufferPool:
    """Window buffers, reused once nothing points into them.

    A batch that is one piece of one window is handed out as a view of the window buffer, not a
    copy, and the window gets a *lease* until that view is freed (``weakref.finalize`` on the
    numpy view that the batch, and every tensor made from it, keeps alive; the finalizer only
    appends to a deque, so it may run in any thread). The stream hands out each row range once,
    and ``batch(b)`` reads a window again when a range it asks for was lent before, so modifying a
    batch in place changes no other batch. A
    window's buffers are reused when the stream or the cache has passed it (``retire``; a window
    with reads still running is retired when they are done) and its last lease is back; a consumer
    that keeps a batch keeps that memory alive. A set the pool no longer keeps — more free sets than
    ``keep``, or any set once the loader is closed — goes to ``let_go`` (the process's
    :mod:`store.buffer_reserve`), which sees a closed pool's late leases when it next :meth:`settle` s it.
    """

    def __init__(self, keep_windows: int, let_go: Callable[[dict[str, np.ndarray]], None] | None = None) -> None:
        self.keep = keep_windows  # free sets kept at most
        self.free: list[dict[str, np.ndarray]] = []
        self.returned: deque[_Window] = deque()  # one entry per lease given back
        self.lock = threading.Lock()
        self.let_go = let_go  # takes a set this pool no longer keeps, if any
        self.closed = False
        self.owed = 0  # retired windows with leases out, and windows to retire once their reads end

    def _settle(self) -> None:
        """Count the leases given back; reuse retired windows whose last lease is back (lock held)."""
        while self.returned:
            win = self.returned.popleft()
            win.leases -= 1
            if win.retired and win.leases == 0:
                self.owed -= 1
                self._reuse(win)

    def _reuse(self, win: _Window) -> None:
        if not self.closed and len(self.free) < self.keep:
            self.free.append(win.bufs)
        elif self.let_go is not None:
            self.let_go(win.bufs)

    def settle(self) -> bool:
        """Count the leases given back; True once the pool is closed and owes no set any more."""
        with self.lock:
            self._settle()
            return self.closed and self.owed == 0

    def has_free(self) -> bool:
        """Some window buffer set is free (all are allocated at the same size)."""
        with self.lock:
            self._settle()
            return bool(self.free)

    def take(self, n: int) -> dict[str, np.ndarray] | None:
        """A free window buffer set of at least ``n`` rows, or None."""
        with self.lock:
            self._settle()
            for i, bufs in enumerate(self.free):
                if next(iter(bufs.values())).shape[0] >= n:
                    return self.free.pop(i)
        return None

    def retire(self, win: _Window, deferred: bool = False) -> None:
        """The stream or the cache has passed ``win`` (no read task writes into it any more)."""
        with self.lock:
            self._settle()
            self.owed -= deferred
            if win.retired:
                return
            win.retired = True
            if win.leases == 0:
                self._reuse(win)
            else:
                self.owed += 1

    def retire_when_read(self, win: _Window) -> None:
        """Retire ``win`` now if none of its read tasks runs (the queued ones are cancelled), else once
        the last running one ends: its buffers are reused only when nothing writes into them."""
        running = [fut for fut in win.futures if not fut.cancel() and not fut.done()]
        if not running:
            self.retire(win)
            return
        with self.lock:
            self.owed += 1
        left = [len(running)]
        count = threading.Lock()

        def one_ended(_: Future) -> None:
            with count:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.retire(win, deferred=True)

        for fut in running:
            fut.add_done_callback(one_ended)

    def lend(self, win: _Window, view: np.ndarray) -> np.ndarray:
        """``view`` (memory of ``win``) handed out under a lease."""
        with self.lock:
            win.leases += 1
        weakref.finalize(view, self.returned.append, win).atexit = False
        return view

    def close(self) -> None:
        """Let go of the free sets; a set whose last lease comes back later is let go of at a later
        :meth:`settle`."""
        with self.lock:
            self._settle()
            self.closed = True
            free, self.free = self.free, []
        for bufs in free:
            if self.let_go is not None:
                self.let_go(bufs)


def _give_to_reserve(reserve: buffer_reserve.BufferReserve, blocks: dict[int, np.ndarray],
                     bufs: dict[str, np.ndarray]) -> None:
    """A window buffer set a loader lets go of (nothing points into it) goes to ``reserve``, the one it
    took its blocks from; ``blocks``: the loader's map from its window buffers to their blocks."""
    for arr in bufs.values():
        block = blocks.pop(id(arr), None)
        if block is not None:
            reserve.give(block)


class ActivationLoader:
    """Shuffled :class:`~store.batch.Batch` es of a dataset split (stored dtypes); see the module docstring."""

    def __init__(self, url: str | Dataset, batch_size: int, split: str = "train", seed: int = 0,
                 window_chunks: int = 64, epochs: int | None = None, columns: tuple[str, ...] | str = ("acts",),
                 rank: int = 0, world: int = 1, prefetch: int = 2, storage_options: dict | None = None,
                 io_threads: int | None = None, allow_partial: bool = False, use_mmap: bool = True,
                 allocator: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
                 max_rows: int | None = None) -> None:
        self.dataset = url if isinstance(url, Dataset) else open_dataset(url, allow_partial, storage_options)
        cols = (columns,) if isinstance(columns, str) else tuple(columns)
        known = row_columns(self.dataset.manifest)
        bad = [c for c in cols if c not in known]
        if not cols or bad:
            raise UserError(f"columns {list(cols)} must be a non-empty subset of {list(known)}.")
        checks = [(batch_size >= 1, f"batch_size={batch_size} must be at least 1"),
                  (window_chunks >= 1, f"window_chunks={window_chunks} must be at least 1"),
                  (epochs is None or epochs >= 1, f"epochs={epochs} must be None or at least 1"),
                  (max_rows is None or max_rows >= 1, f"max_rows={max_rows} must be None or at least 1"),
                  (0 <= rank < world, f"rank={rank} must lie in 0..world-1 (world={world})"),
                  (prefetch >= 0, f"prefetch={prefetch} must be at least 0")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg + "; fix the loader settings.")
        self.url = self.dataset.url
        self.batch_size, self.split, self.seed = int(batch_size), split, int(seed)
        self.window_chunks, self.epochs, self.columns = int(window_chunks), epochs, cols
        self.rank, self.world, self.prefetch = int(rank), int(world), int(prefetch)
        self.use_mmap = bool(use_mmap)
        self.allocator = allocator
        split_chunks = self.dataset.split_chunks(split)
        self.chunks = split_chunks[rank::world]
        if self.chunks.size == 0:
            raise UserError(f"split {split!r} of {self.url} has {split_chunks.size} chunks, none for rank "
                            f"{rank} of {world}; use fewer ranks, a smaller chunk_rows or more data.")
        self.sizes = self.dataset.chunk_sizes[self.chunks]
        self.rows_per_epoch = int(self.sizes.sum())
        self.windows_per_epoch = math.ceil(self.chunks.size / self.window_chunks)
        self.max_window_rows = int(np.sort(self.sizes)[-self.window_chunks:].sum())
        ends = [n for n in (None if epochs is None else epochs * self.rows_per_epoch, max_rows) if n is not None]
        self.total_rows = min(ends) if ends else None  # the stream's rows; None: endless
        threads = io_threads or (min(8, 2 * (os.cpu_count() or 1)) if is_local(self.url) else 16)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-io")
        self._readers = {c: self.dataset.reader(c) for c in cols}
        self._cache: OrderedDict[WindowKey, _Window] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._ahead: dict[WindowKey, _Window] = {}  # windows batch() reads ahead of the caller
        self._recent: deque[int] = deque([-1], maxlen=4)  # batch()'s last calls' batches (from 0: reads ahead)
        self._blocks: dict[int, np.ndarray] = {}  # id(window buffer) -> its block of the process's reserve
        # the process's reserve when this loader was made (its own allocator: none)
        self._reserve = buffer_reserve.RESERVE if allocator is None else None
        self._buffer_pool = _BufferPool(keep_windows=self.prefetch + 2,  # (no reference to self: no cycle)
                                        let_go=None if self._reserve is None else
                                        partial(_give_to_reserve, self._reserve, self._blocks))
        self._buffers_made = 0
        self.buffer_bytes = {"new": 0, "reused": 0}  # window buffer memory new to the process / from the reserve
        self._stops: list[threading.Event] = []
        self._orders: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # see _epoch_order

    # ---- the plan (pure functions of the settings) ----------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk ids in epoch order, their sizes, row offset of each window within the epoch); the last
        four epochs' are kept by this loader (a class-wide ``lru_cache`` kept dropped loaders alive, their
        window buffers with them, and made loaders in one process evict each other's)."""
        got = self._orders.get(epoch)
        if got is None:
            perm = np.random.default_rng([self.seed, epoch, 0xC4C4]).permutation(self.chunks.size)
            sizes = self.sizes[perm]
            cum = np.concatenate([[0], np.cumsum(sizes)])
            got = self._orders[epoch] = (self.chunks[perm], sizes, cum[:: self.window_chunks])
            for old in list(self._orders)[:-4]:  # (list() of a dict is one step: other threads may insert)
                self._orders.pop(old, None)
        return got

    def _window_span(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        order, sizes, _ = self._epoch_order(epoch)
        sl = slice(w * self.window_chunks, (w + 1) * self.window_chunks)
        return order[sl], sizes[sl]

    def _window_perm(self, epoch: int, w: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, w, 0x5117]).permutation(n)

    def _batch_order(self, epoch: int, w: int, n: int) -> np.ndarray:
        """``place[i]``: where window row ``i`` goes in the window's batch order.

        Batch order is the window's permuted rows ``perm`` cut at the stream's batch boundaries
        (the first piece is the tail of a batch that started in an earlier window), each piece
        sorted: rows ``[lo, hi)`` of it are batch piece ``(lo, hi)`` of :meth:`_pieces`.
        """
        perm = self._window_perm(epoch, w, n)
        first = epoch * self.rows_per_epoch + int(self._epoch_order(epoch)[2][w])  # stream row of row 0
        phase = -first % self.batch_size  # rows until the first batch boundary in the window
        seat = np.empty(n, dtype=np.int64)
        seat[perm] = np.arange(n, dtype=np.int64)  # row r is perm[seat[r]]
        piece = (seat - phase) // self.batch_size + 1  # the batch piece row r falls in
        if n // self.batch_size + 2 < 1 << 16:
            piece = piece.astype(np.uint16)  # numpy's stable sort is a radix sort for 16-bit keys
        order = np.argsort(piece, kind="stable")  # by piece, rows of a piece in window order
        place = np.empty(n, dtype=np.int64)
        place[order] = np.arange(n, dtype=np.int64)
        return place

    def _pieces(self, start: int, stop: int) -> list[tuple[WindowKey, int, int]]:
        """Split stream rows [start, stop) into (window, lo, hi) pieces of window-local rows."""
        out = []
        R = self.rows_per_epoch
        while start < stop:
            epoch, r = divmod(start, R)
            offsets = self._epoch_order(epoch)[2]
            w = int(np.searchsorted(offsets, r, side="right") - 1)
            w_end = int(offsets[w + 1]) if w + 1 < offsets.size else R
            take = min(stop - start, w_end - r)
            out.append(((epoch, w), r - int(offsets[w]), r - int(offsets[w]) + take))
            start += take
        return out

    def _batch_range(self, b: int) -> tuple[int, int]:
        start = b * self.batch_size
        stop = start + self.batch_size
        if self.total_rows is not None:
            if start >= self.total_rows or b < 0:
                raise IndexError(f"batch {b} is past the end ({len(self)} batches)")
            stop = min(stop, self.total_rows)
        elif b < 0:
            raise IndexError(f"batch {b} is negative")
        return start, stop

    def __len__(self) -> int:
        rows = self.total_rows if self.total_rows is not None else self.rows_per_epoch
        return math.ceil(rows / self.batch_size)

    # ---- fetching ---------------------------------------------------------------------------
    def _buffers(self, n: int) -> dict[str, np.ndarray]:
        """Window buffers of at least ``n`` rows per column (a recycled set when one is free)."""
        bufs = self._buffer_pool.take(n)
        if bufs is not None:
            return bufs
        d, rows = self.dataset.manifest.d, max(n, self.max_window_rows)  # any window fits any set
        self._buffers_made += 1
        return {c: self._allocate((rows, d) if c == ACTS else (rows,), self.dataset.column_dtype(c))
                for c in self.columns}

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """One window buffer: the caller's ``allocator``'s, else a block of the process's reserve
        (:mod:`store.buffer_reserve`) or a new aligned one."""
        if self._reserve is None:
            arr = self.allocator(shape, dtype)
            self.buffer_bytes["new"] += arr.nbytes
            return arr
        arr, block, reused = self._reserve.array(shape, dtype)
        self._blocks[id(arr)] = block
        self.buffer_bytes["reused" if reused else "new"] += arr.nbytes
        return arr

    def _read_and_scatter(self, column: str, items: list[tuple[int, int, int]], buf: np.ndarray,
                          place: np.ndarray) -> None:
        """Read chunks ``(chunk, rows, window offset)`` of one column and scatter their rows to their
        places in the window buffer, straight from the page cache when the chunk can be mapped, else
        from the fetched bytes (local: one ``pread`` per chunk; object storage: the items are one
        shard's chunks, fetched with as few ranged GETs as lie back to back)."""
        reader = self._readers[column]
        if self.use_mmap and reader.can_map:
            for chunk, rows, offset in items:
                scatter_rows(reader.map_chunk(chunk, rows), buf, place[offset:offset + rows])
            return
        for i, rows in reader.iter_chunks([(chunk, n) for chunk, n, _ in items]):
            offset = items[i][2]
            scatter_rows(rows, buf, place[offset:offset + rows.shape[0]])

    def _fetch(self, key: WindowKey) -> _Window:
        """Start reading window ``key`` (returns at once; ``.wait()`` for the data)."""
        ids, sizes = self._window_span(*key)
        n = int(sizes.sum())
        bufs = self._buffers(n)
        place = self._batch_order(key[0], key[1], n)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        tasks: list[tuple[str, list[tuple[int, int, int]]]] = []
        for c, reader in self._readers.items():
            items = list(zip(ids.tolist(), sizes.tolist(), offsets))
            if reader.local:  # runs of the window's chunks, up to TASK_BYTES of this column each
                per_task = max(1, TASK_BYTES // (reader.row_bytes * max(1, int(sizes.max()))))
                tasks += [(c, items[i:i + per_task]) for i in range(0, len(items), per_task)]
            else:  # object storage: a shard's chunks in this window are one task (few ranged GETs)
                groups: dict[int, list[tuple[int, int, int]]] = {}
                for item in items:
                    groups.setdefault(item[0] // reader.cps, []).append(item)
                tasks += [(c, group) for group in groups.values()]
        futures = [self._pool.submit(self._read_and_scatter, c, items, bufs[c], place) for c, items in tasks]
        return _Window(bufs, futures)

    def _next_key(self, key: WindowKey) -> WindowKey | None:
        """The window after ``key`` in the stream; None when the stream ends before it."""
        epoch, w = key
        nxt = (epoch, w + 1) if w + 1 < self.windows_per_epoch else (epoch + 1, 0)
        if self.total_rows is None:
            return nxt
        first_row = nxt[0] * self.rows_per_epoch + int(self._epoch_order(nxt[0])[2][nxt[1]])
        return None if first_row >= self.total_rows else nxt

    def _assemble(self, pieces: list[tuple[_Window, int, int]]) -> Batch:
        """The batch of ``pieces``, every column in its stored dtype: one piece is lent as a view of
        its window buffer (see :class:`_BufferPool`); a batch that straddles windows is a copy."""
        out: dict[str, np.ndarray] = {}
        for c in self.columns:
            if len(pieces) > 1:
                out[c] = np.concatenate([win.rows(c, lo, hi) for win, lo, hi in pieces])
                continue
            win, lo, hi = pieces[0]
            win.lent.add((lo, hi))
            out[c] = self._buffer_pool.lend(win, win.rows(c, lo, hi))
        return Batch.of(out)

    # ---- random access ------------------------------------------------------------------------
    def batch(self, b: int) -> Batch:
        """Batch ``b`` of the stream (pure function of the settings and ``b``).

        The last two windows read stay cached, so consecutive batches read each window once; asked
        for rows it has lent before (which their holder may have modified), a window is read again.
        Called in order (``b`` one of the last few calls' or one past it) with ``prefetch`` ≥ 1, it reads
        the next window ahead, so a caller that walks the stream — the sweep's feeder — does not wait
        for a whole window's read at each window's first batch. At most ``prefetch`` windows are held
        read ahead, the oldest one the current walk does not want going first, so a caller that walks
        up to ``prefetch`` places in turn (a feeder serving several cursor groups) keeps each one's.
        Calls are serialised: a window the cache drops has its buffers recycled."""
        start, stop = self._batch_range(b)
        with self._cache_lock:
            in_order = b in self._recent or b - 1 in self._recent
            pieces = []
            for key, lo, hi in self._pieces(start, stop):
                win = self._cache.pop(key, None) or self._ahead.pop(key, None)
                if win is not None and (lo, hi) in win.lent:
                    self._buffer_pool.retire_when_read(win)
                    win = None
                win = (win or self._fetch(key)).wait()
                self._cache[key] = win  # most recently used last
                pieces.append((win, lo, hi))
            batch = self._assemble(pieces)
            while len(self._cache) > 2:
                self._buffer_pool.retire(self._cache.popitem(last=False)[1])
            if in_order:
                self._read_ahead(key)  # the window after the batch's last one
            self._recent.append(b)
        return batch

    def _read_ahead(self, key: WindowKey) -> None:
        """Have the window after ``key`` read ahead; then drop the oldest windows read ahead that it is not,
        down to ``prefetch`` (caller holds the cache lock)."""
        nxt = self._next_key(key) if self.prefetch else None
        if nxt is not None and nxt not in self._cache and nxt not in self._ahead:
            self._ahead[nxt] = self._fetch(nxt)
        for stale in [k for k in self._ahead if k != nxt][:max(0, len(self._ahead) - self.prefetch)]:
            win = self._ahead.pop(stale)
            wait([*win.futures])  # its read tasks still write into its buffers
            self._buffer_pool.retire(win)

    # ---- streaming ----------------------------------------------------------------------------
    def _may_read_ahead(self) -> bool:
        """Whether a window two or more ahead of the one being handed out may be read now: always while
        fewer than (prefetch + 1) buffer sets exist, then only into a recycled set. The set of the window
        just passed frees a few batches into the next one (once the consumer lets go of its batches),
        long before a window two ahead is needed, so a stream runs on (prefetch + 1) sets instead of
        (prefetch + 2) and a fresh loader's first epoch touches one set less of new memory (bench/README,
        "Fewer buffers in a first epoch"). The next window is always read ahead, so a consumer that keeps
        its batches still overlaps reading with consuming."""
        return self._buffers_made < self.prefetch + 1 or self._buffer_pool.has_free()

    def _produce(self, start_batch: int, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: keep ``prefetch`` windows in flight, assemble batches in order."""
        inflight: OrderedDict[WindowKey, _Window] = OrderedDict()

        def ensure(key: WindowKey | None) -> None:
            for ahead in range(self.prefetch + 1):
                if key is None:
                    return
                if key not in inflight:
                    if ahead >= 2 and not self._may_read_ahead():
                        return  # until the passed window's set is free (asked again at the next batch)
                    inflight[key] = self._fetch(key)
                key = self._next_key(key)

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            b = start_batch
            while not stop.is_set():
                try:
                    start, end = self._batch_range(b)
                except IndexError:
                    break
                pieces = self._pieces(start, end)
                ensure(pieces[0][0])
                for key, _, _ in pieces:
                    ensure(key)
                wins = [(inflight[k].wait(), lo, hi) for k, lo, hi in pieces]
                batch = self._assemble(wins)
                first = pieces[-1][0]
                for key in list(inflight):  # drop windows the stream has passed
                    if key < first:
                        self._buffer_pool.retire(inflight.pop(key).wait())
                ensure(first)
                if not put(batch):
                    return
                b += 1
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(err)
        finally:
            for win in inflight.values():
                self._buffer_pool.retire_when_read(win)

    def iter_batches(self, start: int = 0) -> Iterator[Batch]:
        """Stream batches ``start, start+1, ...`` (to the end when ``epochs`` is finite)."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        self._stops.append(stop)
        thread = threading.Thread(target=self._produce, args=(start, q, stop), daemon=True,
                                  name="store-loader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_batches(0)

    def close(self) -> None:
        """Stop background threads and release buffers."""
        for stop in self._stops:
            stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._cache_lock:
            wins = [*self._cache.values(), *self._ahead.values()]
            self._cache.clear()
            self._ahead.clear()
        for win in wins:
            self._buffer_pool.retire_when_read(win)
        self._buffer_pool.close()
        if self._reserve is not None:
            self._reserve.watch(self._buffer_pool)

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
