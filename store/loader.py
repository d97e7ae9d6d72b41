"""ActivationLoader: windowed block shuffle with random access by batch index (DESIGN §3).

The row stream of one rank is the concatenation of epochs e = 0, 1, 2, ...; epoch e is:

1. the rank's chunks of the split (split chunks ``[rank::world]`` — disjoint across ranks,
   together covering the split; fixed, so every epoch of a rank has the same rows) in the
   order of a permutation seeded by ``(seed, e)``;
2. cut into windows of ``window_chunks`` consecutive chunks (the last may be smaller);
3. the rows of each window permuted by a permutation seeded by ``(seed, e, w)``.

Batch ``b`` is rows [b·B, (b+1)·B) of that stream (within a batch, each window's rows come in
window order: the shuffle decides which rows share a batch, and a sorted gather is one sequential
pass), so it is a pure function of
(dataset, split, seed, rank, world, window_chunks, batch_size, b): ``loader.batch(b)``
re-reads it on demand and ``iter_batches(start=b)`` resumes exactly. Batches may straddle
windows and epochs. Every row of the rank's split appears exactly once per epoch. With
finite ``epochs`` the stream ends after ``epochs`` epochs and the last batch is short if
``epochs · rows_per_epoch`` is not a multiple of B; ``len(loader)`` is then the number of
batches yielded. With ``epochs=None`` the stream is endless and ``len(loader)`` is
``ceil(rows_per_epoch / B)``, the batches per epoch.

Reading: a window's chunks are read concurrently by a thread pool — on object storage one
ranged GET per run of the window's chunks that lie back to back in a shard object (one per chunk
when the window's chunks are scattered over many shards; a shard mostly inside the window whose
index is not cached yet is fetched whole, index included, in one GET), copied into the window
buffer; for local uncompressed ``acts`` each chunk is memory-mapped (populated) so batches are
gathered straight from the page cache with no intermediate copy (``use_mmap=False`` reads into
buffers instead, one ``pread`` per chunk) — and the next ``prefetch`` windows are submitted
before the current one is consumed. Batches are assembled (gather + cast to float32) by a
background thread into a small queue, so the consumer only waits when I/O is really the
bottleneck. Memory ≈ (prefetch + 2) × window_chunks × chunk_rows × d × itemsize.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from store.dataset import Dataset, open_dataset
from store.errors import UserError
from store.io import is_local
from store.layout import ACTS, ROW_ARRAYS

WindowKey = tuple[int, int]
Batch = torch.Tensor | dict[str, torch.Tensor]
_DONE = object()


class _Window:
    """One window being fetched: per-column buffers (or memory-mapped chunk views), the read
    futures, the row offset of each chunk within the window and the window's row permutation."""

    def __init__(self, bufs: dict[str, np.ndarray], futures: list[Future], perm: np.ndarray,
                 offsets: np.ndarray, mapped: dict[str, list[Future]]) -> None:
        self.bufs, self.futures, self.perm, self.offsets, self.mapped = bufs, futures, perm, offsets, mapped
        self.views: dict[str, list[np.ndarray]] | None = None

    def wait(self) -> _Window:
        if self.views is None:
            for fut in self.futures:
                fut.result()
            self.views = {c: [fut.result() for fut in futs] for c, futs in self.mapped.items()}
        return self

    def gather(self, column: str, lo: int, hi: int) -> np.ndarray:
        """The rows ``perm[lo:hi]`` of the window for one column (a fresh array), in window order.

        The shuffle decides *which* rows form a batch; within the batch they come sorted by their
        place in the window. Order inside a batch does not change a mean loss, and sorted rows make
        the gather one forward pass with one copy per byte (per chunk: a ``take`` straight into a
        contiguous slice of the output) instead of a gather followed by a scatter.
        """
        p = np.sort(self.perm[lo:hi])
        if column in self.bufs:
            src = self.bufs[column]
            out = np.empty((p.size,) + src.shape[1:], dtype=src.dtype)
            parallel_take([(src, p, 0, p.size)], out)
            return out
        views = self.wait().views[column]
        k = np.searchsorted(self.offsets, p, side="right") - 1  # chunk of each row (non-decreasing)
        r = p - self.offsets[k]  # row within that chunk
        out = np.empty((p.size,) + views[0].shape[1:], dtype=views[0].dtype)
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], p.size]
        parallel_take([(views[int(k[a])], r, int(a), int(b)) for a, b in zip(starts, ends)], out)
        return out


GATHER_THREADS = max(1, min(4, os.cpu_count() or 1))
_gather_pool: ThreadPoolExecutor | None = None
_gather_lock = threading.Lock()


def parallel_take(segments: list[tuple[np.ndarray, np.ndarray, int, int]], out: np.ndarray) -> None:
    """``out[a:b] = src[rows[a:b]]`` for every (src, rows, a, b), the output rows split evenly across
    :data:`GATHER_THREADS` threads (``np.take`` releases the GIL: on 2 cores this nearly doubles a
    page-cache gather)."""
    global _gather_pool
    n = out.shape[0]

    def part(lo: int, hi: int) -> None:
        # ndarray.take directly (np.take's wrapper costs a few us per call, ~64 calls per batch);
        # mode="clip": the rows are in range by construction, and under the default mode="raise"
        # numpy writes out= through a temporary buffer, a second copy of every byte
        for src, rows, a, b in segments:
            a2, b2 = max(a, lo), min(b, hi)
            if a2 < b2:
                src.take(rows[a2:b2], axis=0, out=out[a2:b2], mode="clip")

    if GATHER_THREADS == 1 or out.nbytes < (1 << 20):
        part(0, n)
        return
    with _gather_lock:
        if _gather_pool is None:
            _gather_pool = ThreadPoolExecutor(GATHER_THREADS - 1, thread_name_prefix="gather")
    cuts = [n * i // GATHER_THREADS for i in range(GATHER_THREADS + 1)]
    futures = [_gather_pool.submit(part, cuts[i], cuts[i + 1]) for i in range(1, GATHER_THREADS)]
    part(cuts[0], cuts[1])  # the calling thread takes the first share itself
    for fut in futures:
        fut.result()


class ActivationLoader:
    """Shuffled float32 batches of a dataset split; see the module docstring."""

    def __init__(self, url: str | Dataset, batch_size: int, split: str = "train", seed: int = 0,
                 window_chunks: int = 64, epochs: int | None = None, columns: tuple[str, ...] | str = ("acts",),
                 rank: int = 0, world: int = 1, prefetch: int = 2, storage_options: dict | None = None,
                 io_threads: int | None = None, allow_partial: bool = False, use_mmap: bool = True) -> None:
        self.dataset = url if isinstance(url, Dataset) else open_dataset(url, allow_partial, storage_options)
        cols = (columns,) if isinstance(columns, str) else tuple(columns)
        bad = [c for c in cols if c not in ROW_ARRAYS]
        if not cols or bad:
            raise UserError(f"columns {list(cols)} must be a non-empty subset of {list(ROW_ARRAYS)}.")
        checks = [(batch_size >= 1, f"batch_size={batch_size} must be at least 1"),
                  (window_chunks >= 1, f"window_chunks={window_chunks} must be at least 1"),
                  (epochs is None or epochs >= 1, f"epochs={epochs} must be None or at least 1"),
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
        split_chunks = self.dataset.split_chunks(split)
        self.chunks = split_chunks[rank::world]
        if self.chunks.size == 0:
            raise UserError(f"split {split!r} of {self.url} has {split_chunks.size} chunks, none for rank "
                            f"{rank} of {world}; use fewer ranks, a smaller chunk_rows or more data.")
        self.sizes = self.dataset.chunk_sizes[self.chunks]
        self.rows_per_epoch = int(self.sizes.sum())
        self.windows_per_epoch = math.ceil(self.chunks.size / self.window_chunks)
        self.total_rows = None if epochs is None else epochs * self.rows_per_epoch
        threads = io_threads or (min(8, 2 * (os.cpu_count() or 1)) if is_local(self.url) else 16)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-io")
        self._readers = {c: self.dataset.reader(c) for c in cols}
        self._cache: OrderedDict[WindowKey, _Window] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._free: list[dict[str, np.ndarray]] = []
        self._free_lock = threading.Lock()
        self._stops: list[threading.Event] = []

    # ---- the plan (pure functions of the settings) ----------------------------------------------
    @lru_cache(maxsize=4)  # noqa: B019 - per-instance cache of small arrays; the loader lives long
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk ids in epoch order, their sizes, row offset of each window within the epoch)."""
        perm = np.random.default_rng([self.seed, epoch, 0xC4C4]).permutation(self.chunks.size)
        sizes = self.sizes[perm]
        cum = np.concatenate([[0], np.cumsum(sizes)])
        return self.chunks[perm], sizes, cum[:: self.window_chunks]

    def _window_span(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        order, sizes, _ = self._epoch_order(epoch)
        sl = slice(w * self.window_chunks, (w + 1) * self.window_chunks)
        return order[sl], sizes[sl]

    def _window_perm(self, epoch: int, w: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, w, 0x5117]).permutation(n)

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
    def _buffers(self, n: int, cols: list[str]) -> dict[str, np.ndarray]:
        if not cols:
            return {}
        with self._free_lock:
            for i, bufs in enumerate(self._free):
                if set(bufs) == set(cols) and next(iter(bufs.values())).shape[0] >= n:
                    self._free.pop(i)
                    return {c: b[:n] for c, b in bufs.items()}
        d = self.dataset.manifest.d
        return {c: np.empty((n, d) if c == ACTS else (n,), dtype=self.dataset.column_dtype(c))
                for c in cols}

    def _recycle(self, win: _Window) -> None:
        if not win.bufs:
            return
        with self._free_lock:
            if len(self._free) < self.prefetch + 2:
                self._free.append({c: b.base if b.base is not None else b for c, b in win.bufs.items()})

    def _fetch(self, key: WindowKey) -> _Window:
        """Start reading window ``key`` (returns at once; ``.wait()`` for the data)."""
        ids, sizes = self._window_span(*key)
        n = int(sizes.sum())
        mapped_cols = [c for c, r in self._readers.items() if self.use_mmap and r.can_map]
        bufs = self._buffers(n, [c for c in self.columns if c not in mapped_cols])
        mapped: dict[str, list[Future]] = {c: [] for c in mapped_cols}
        futures = []
        groups: dict[tuple[str, int], list] = {}  # (column, shard) -> its chunks in this window
        offset = 0
        for chunk, rows in zip(ids.tolist(), sizes.tolist()):
            for c, reader in self._readers.items():
                if c in mapped:
                    mapped[c].append(self._pool.submit(reader.map_chunk, chunk, rows))
                elif reader.local:  # one pread per chunk, straight into the window buffer
                    futures.append(self._pool.submit(reader.read_into, chunk, rows,
                                                     bufs[c][offset:offset + rows]))
                else:  # object storage: a shard's chunks that lie back to back are one ranged GET
                    groups.setdefault((c, chunk // reader.cps), []).append(
                        (chunk, rows, bufs[c][offset:offset + rows]))
            offset += rows
        for (c, _), items in groups.items():
            futures.append(self._pool.submit(self._readers[c].read_chunks_into, items))
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return _Window(bufs, futures, self._window_perm(key[0], key[1], n), offsets, mapped)

    def _next_key(self, key: WindowKey) -> WindowKey | None:
        epoch, w = key
        if w + 1 < self.windows_per_epoch:
            return epoch, w + 1
        if self.epochs is not None and epoch + 1 >= self.epochs:
            return None
        return epoch + 1, 0

    def _assemble(self, pieces: list[tuple[_Window, int, int]]) -> Batch:
        out: dict[str, torch.Tensor] = {}
        for c in self.columns:
            parts = []
            for win, lo, hi in pieces:
                # numpy's gather into fresh memory is several times faster than index_select here
                part = torch.from_numpy(win.gather(c, lo, hi))
                parts.append(part.float() if c == ACTS else part.long())
            out[c] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out[self.columns[0]] if len(self.columns) == 1 else out

    # ---- random access ------------------------------------------------------------------------
    def _cached_window(self, key: WindowKey) -> _Window:
        with self._cache_lock:
            win = self._cache.get(key)
            if win is not None:
                self._cache.move_to_end(key)
                return win
        win = self._fetch(key).wait()
        with self._cache_lock:
            self._cache[key] = win
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return win

    def batch(self, b: int) -> Batch:
        """Batch ``b`` of the stream (pure function of the settings and ``b``)."""
        start, stop = self._batch_range(b)
        return self._assemble([(self._cached_window(k), lo, hi) for k, lo, hi in self._pieces(start, stop)])

    # ---- streaming ----------------------------------------------------------------------------
    def _produce(self, start_batch: int, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: keep ``prefetch`` windows in flight, assemble batches in order."""
        inflight: OrderedDict[WindowKey, _Window] = OrderedDict()

        def ensure(key: WindowKey | None) -> None:
            for _ in range(self.prefetch + 1):
                if key is None:
                    return
                if key not in inflight:
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
                        self._recycle(inflight.pop(key).wait())
                ensure(first)
                if not put(batch):
                    return
                b += 1
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(err)
        finally:
            for win in inflight.values():
                for fut in win.futures:
                    fut.cancel()

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
        self._cache.clear()
        self._free.clear()

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
