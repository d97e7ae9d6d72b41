"""Opening a dataset for reading: validation, split helpers and fast chunk reads.

``open_dataset(url)`` checks the manifest against the stored arrays (d, dtype, lengths)
and refuses an unsealed dataset unless ``allow_partial=True``. A partial dataset exposes
exactly the rows of its committed shards (possibly with gaps); its eval split uses the
same prefix-stable rule as the sealed dataset will (:mod:`store.split`).

Reads of whole inner chunks go through :class:`ChunkReader`, which decodes the Zarr
sharding index itself (cached per shard) and fetches each chunk with one byte-range read
(``pread`` into the caller's buffer locally, one ranged GET on object storage). The data
stay ordinary Zarr v3: any Zarr reader sees the same values (``Dataset.arrays``).
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Iterator
from typing import Any

import google_crc32c
import numpy as np
import zarr

from store.errors import UserError
from store.io import filesystem, is_local, join_url, local_path, zarr_store
from store.layout import (
    ACTS,
    DOC_IDS,
    LABELS,
    SEQ_ARRAYS,
    array_names,
    column_dtype,
    read_commits,
    read_manifest,
    row_columns,
    shard_key,
)
from store.manifest import CommitRecord, DatasetManifest
from store.split import chunks_for_split, eval_chunk_mask

EMPTY = np.uint64(2**64 - 1)
#: Shard files a reader keeps memory-mapped (a default window of 64 chunks touches at most 64
#: shards). Each mapping holds a file descriptor (Python's mmap keeps a duplicate open).
MAPPED_SHARDS = 64


def read_array_meta(url: str, name: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The ``zarr.json`` of array ``name`` in the dataset at ``url``."""
    fs, path = filesystem(url, storage_options)
    try:
        return json.loads(fs.cat_file(join_url(path, name, "zarr.json")))
    except FileNotFoundError:
        raise UserError(f"array {name!r} is missing from {url}; the dataset is incomplete or corrupt, "
                        "re-harvest it.") from None


class ChunkReader:
    """Reads inner chunks of one sharded row array by byte range (thread-safe)."""

    def __init__(self, url: str, name: str, manifest: DatasetManifest, commits: dict[int, CommitRecord],
                 storage_options: dict | None = None, meta: dict | None = None) -> None:
        self.url, self.name, self.manifest, self.commits = url, name, manifest, commits
        self.fs, self.path = filesystem(url, storage_options)
        self.local = is_local(url)
        self.root = local_path(url) if self.local else self.path
        meta = meta or read_array_meta(url, name, storage_options)
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.width = manifest.d if name == ACTS else 1
        self.row_bytes = self.dtype.itemsize * self.width
        self.cps = manifest.chunks_per_shard
        self.zstd = self._parse_codecs(meta)
        self._index: dict[int, np.ndarray] = {}
        self._maps: dict[int, np.ndarray] = {}  # shard -> its mapped bytes, LRU order
        self._lock = threading.Lock()
        self._storage_options = storage_options

    def _parse_codecs(self, meta: dict) -> bool:
        codecs = meta.get("codecs", [])
        ok = (len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed")
        cfg = codecs[0].get("configuration", {}) if ok else {}
        inner = [c["name"] for c in cfg.get("codecs", [])]
        index = [c["name"] for c in cfg.get("index_codecs", [])]
        if not ok or inner not in (["bytes"], ["bytes", "zstd"]) or index != ["bytes", "crc32c"] \
                or cfg.get("index_location", "end") != "end" \
                or cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            raise UserError(f"array {self.name!r} of {self.url} has codecs {codecs!r} that this store does "
                            "not write; the dataset was not written by dynsae.")
        return inner == ["bytes", "zstd"]

    def _read_range(self, key: str, start: int, stop: int, out: memoryview | None = None) -> bytes | None:
        """Bytes [start, stop) of object ``key``; read straight into ``out`` locally when given."""
        if self.local:
            fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
            try:
                if out is not None:
                    got = 0
                    while got < len(out):
                        n = os.preadv(fd, [out[got:]], start + got)
                        if n == 0:
                            raise UserError(f"{self.url}/{key} is shorter than its shard index says; "
                                            "the dataset is corrupt (run `python -m store verify`).")
                        got += n
                    return None
                return os.pread(fd, stop - start, start)
            finally:
                os.close(fd)
        data = self.fs.cat_file(join_url(self.path, key), start=start, end=stop)
        if out is not None:
            out[:] = data
            return None
        return data

    def _object_size(self, shard: int) -> int:
        """Stored size of the shard object (from its commit record when there is one)."""
        rec = self.commits.get(shard)
        if rec is not None and self.name in rec.objects:
            return int(rec.objects[self.name].nbytes)
        key = shard_key(self.name, shard)
        if self.local:
            return os.path.getsize(os.path.join(self.root, key))
        return int(self.fs.size(join_url(self.path, key)))

    def _cache_index(self, shard: int, tail: bytes | memoryview, size: int) -> np.ndarray:
        """Check, parse and cache a shard index from the last ``16 * cps + 4`` bytes of its ``size``-byte
        object: the index's crc32c must match and every chunk it locates must lie inside the object, so a
        damaged shard is refused instead of read as other rows (crc32c of 16·cps bytes: see bench/store_bench)."""
        n_index = 16 * self.cps + 4
        problem = None
        if len(tail) != n_index:
            problem = "is shorter than its commit record says (truncated)"
        elif google_crc32c.value(bytes(tail[:-4])) != int.from_bytes(bytes(tail[-4:]), "little"):
            problem = "has a shard index whose crc32c checksum does not match"
        else:
            idx = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.cps, 2).copy()  # never pin a whole object
            stored = idx[idx[:, 0] != EMPTY]
            if stored.size and int((stored[:, 0] + stored[:, 1]).max()) > size - n_index:
                problem = "has a shard index pointing past the end of the object (truncated)"
        if problem is not None:
            raise UserError(f"shard {shard} of {self.name!r} in {self.url} ({shard_key(self.name, shard)}) {problem}; "
                            f"it is damaged — run `python -m store verify {self.url}` and re-harvest that shard.")
        with self._lock:
            self._index[shard] = idx
        return idx

    def shard_index(self, shard: int) -> np.ndarray:
        """(chunks_per_shard, 2) uint64 [offset, nbytes] of each inner chunk of a shard."""
        idx = self._index.get(shard)
        if idx is not None:
            return idx
        size = self._object_size(shard)
        n_index = 16 * self.cps + 4  # uint64 (offset, nbytes) per chunk + crc32c
        return self._cache_index(shard, self._read_range(shard_key(self.name, shard), max(size - n_index, 0), size),
                                 size)

    @property
    def can_map(self) -> bool:
        """True when chunks can be memory-mapped (local file, no compression)."""
        return self.local and not self.zstd

    def map_chunk(self, chunk: int, rows: int) -> np.ndarray:
        """Read-only view of the first ``rows`` rows of a chunk, straight from the page cache.

        Each shard file is memory-mapped once (whole, not populated: a sequential pass over a chunk
        faults its pages in with the kernel's fault-around) and the mapping is kept for the next
        windows and epochs, up to :data:`MAPPED_SHARDS` shards (least recently used dropped; a
        dropped mapping lives on while views of it do).
        """
        shard, j = divmod(chunk, self.cps)
        offset, _ = (int(v) for v in self.shard_index(shard)[j])
        if offset == int(EMPTY):
            return self._empty(rows)
        return self._shard_map(shard)[offset:offset + rows * self.row_bytes].view(self.dtype).reshape(self._shape(rows))

    def _shard_map(self, shard: int) -> np.ndarray:
        """The whole shard object as read-only bytes, memory-mapped (cached)."""
        with self._lock:
            mapped = self._maps.pop(shard, None)
            if mapped is not None:
                self._maps[shard] = mapped  # most recently used last
                return mapped
        fd = os.open(os.path.join(self.root, shard_key(self.name, shard)), os.O_RDONLY)
        try:
            mapped = np.frombuffer(mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ), dtype=np.uint8)
        finally:
            os.close(fd)
        with self._lock:
            self._maps[shard] = mapped
            while len(self._maps) > MAPPED_SHARDS:
                self._maps.pop(next(iter(self._maps)))
        return mapped

    def read_into(self, chunk: int, rows: int, out: np.ndarray) -> None:
        """Read the first ``rows`` rows of inner chunk ``chunk`` into ``out`` (C-contiguous)."""
        shard, j = divmod(chunk, self.cps)
        offset, _ = (int(v) for v in self.shard_index(shard)[j])
        if (offset != int(EMPTY) and not self.zstd and out.dtype == self.dtype and out.flags.c_contiguous):
            key = shard_key(self.name, shard)  # straight into out, no intermediate bytes
            self._read_range(key, offset, offset + rows * self.row_bytes, memoryview(out[:rows]).cast("B"))
            return
        out[:rows] = next(self.iter_chunks([(chunk, rows)]))[1]

    def _shape(self, rows: int) -> tuple[int, ...]:
        return (rows, self.width) if self.name == ACTS else (rows,)

    def _empty(self, rows: int) -> np.ndarray:
        """The rows of a chunk its shard does not store: zeros (acts), -1 (integer columns)."""
        return np.full(self._shape(rows), 0 if self.name == ACTS else -1, dtype=self.dtype)

    def _decode(self, raw: bytes | memoryview, rows: int) -> np.ndarray:
        """The first ``rows`` rows of one stored inner chunk (``raw``: its stored bytes), read-only,
        over ``raw`` itself unless the chunk is compressed."""
        if self.zstd:
            from numcodecs import Zstd

            raw = Zstd().decode(raw)
        return np.frombuffer(raw, dtype=self.dtype, count=rows * self.width).reshape(self._shape(rows))

    def iter_chunks(self, items: list[tuple[int, int]], max_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """``(i, rows)`` for each ``items[i] = (chunk, rows)``: the chunk's first ``rows`` rows as a
        read-only array over the fetched bytes (no copy), in the order they arrive.

        Object storage: the items must be chunks of **one shard**; chunks stored back to back in
        it are fetched with one ranged GET (up to ``max_bytes`` each) instead of one GET per chunk.
        A request costs a round trip and, on some servers, a pass over the object; a window that
        holds several chunks of a shard (small datasets, large windows) then costs a few requests,
        like a sequential read of the shard. Local files: one ``pread`` per chunk.
        """
        if self.local or len(items) < 2:
            for i, (chunk, rows) in enumerate(items):
                shard, j = divmod(chunk, self.cps)
                offset, nbytes = (int(v) for v in self.shard_index(shard)[j])
                if offset == int(EMPTY):
                    yield i, self._empty(rows)
                    continue
                need = nbytes if self.zstd else rows * self.row_bytes
                yield i, self._decode(self._read_range(shard_key(self.name, shard), offset, offset + need), rows)
            return
        shard = items[0][0] // self.cps
        assert all(c // self.cps == shard for c, _ in items), "iter_chunks takes chunks of one shard"
        key = shard_key(self.name, shard)
        whole = None
        if shard not in self._index and 2 * len(items) >= self.cps:
            size = self._object_size(shard)
            if size <= max_bytes:  # most of a small shard: one GET for the object, index included
                whole = memoryview(self._read_range(key, 0, size))
                self._cache_index(shard, whole[max(size - 16 * self.cps - 4, 0):], size)
        index = self.shard_index(shard)
        located = []
        for i, (chunk, rows) in enumerate(items):
            offset, nbytes = (int(v) for v in index[chunk % self.cps])
            if offset == int(EMPTY):
                yield i, self._empty(rows)  # no I/O
            else:
                located.append((offset, nbytes, nbytes if self.zstd else rows * self.row_bytes, rows, i))
        located.sort(key=lambda it: it[0])
        runs: list[list[tuple[int, int, int, int, int]]] = []
        for it in located:  # (offset, stored bytes, bytes needed, rows, item)
            if runs and runs[-1][-1][0] + runs[-1][-1][1] == it[0] and it[0] + it[2] - runs[-1][0][0] <= max_bytes:
                runs[-1].append(it)
            else:
                runs.append([it])
        for run in runs:
            start, stop = run[0][0], run[-1][0] + run[-1][2]
            data = whole[start:stop] if whole is not None else memoryview(self._read_range(key, start, stop))
            for offset, _, length, rows, i in run:
                yield i, self._decode(data[offset - start:offset - start + length], rows)


class Dataset:
    """A readable dataset: manifest, arrays, chunk geometry and split helpers."""

    def __init__(self, url: str, manifest: DatasetManifest, commits: dict[int, CommitRecord],
                 storage_options: dict | None = None, metas: dict[str, dict] | None = None) -> None:
        self.url = url
        self.manifest = manifest
        self.commits = commits
        self.storage_options = storage_options
        self._metas = metas or {}
        self._arrays: dict[str, zarr.Array] | None = None
        self._readers: dict[str, ChunkReader] = {}
        m = manifest
        if m.sealed:
            assert m.rows is not None
            self.num_rows = int(m.rows)
            n_shards = -(-self.num_rows // m.shard_rows)
            shard_rows = {s: min(m.shard_rows, self.num_rows - s * m.shard_rows) for s in range(n_shards)}
        else:
            shard_rows = {s: c.rows for s, c in commits.items()}
            self.num_rows = int(sum(shard_rows.values()))
            n_shards = max(shard_rows) + 1 if shard_rows else 0
        self.n_chunks = n_shards * m.chunks_per_shard
        sizes = np.zeros(self.n_chunks, dtype=np.int64)
        for s, r in shard_rows.items():
            j = np.arange(m.chunks_per_shard)
            sizes[s * m.chunks_per_shard + j] = np.clip(r - j * m.chunk_rows, 0, m.chunk_rows)
        if m.sealed:
            self.n_chunks = int(np.count_nonzero(sizes))  # drop the unused tail of the last shard
            sizes = sizes[:self.n_chunks]
        self.chunk_sizes = sizes

    # ---- arrays and reads --------------------------------------------------------------------
    @property
    def arrays(self) -> dict[str, zarr.Array]:
        """name -> read-only zarr array (for an unsealed dataset the shape is the capacity)."""
        if self._arrays is None:
            store = zarr_store(self.url, self.storage_options, read_only=True)
            self._arrays = {n: zarr.open_array(store=store, path=n, mode="r", zarr_format=3)
                            for n in array_names(self.manifest)}
        return self._arrays

    def reader(self, name: str) -> ChunkReader:
        """The byte-range chunk reader of row array ``name``."""
        if name not in row_columns(self.manifest):
            raise UserError(f"column {name!r} is not one of {list(row_columns(self.manifest))}; pick one of those.")
        if name not in self._readers:
            self._readers[name] = ChunkReader(self.url, name, self.manifest, self.commits,
                                              self.storage_options, self._metas.get(name))
        return self._readers[name]

    def column_dtype(self, name: str) -> np.dtype:
        """Stored dtype of a row array."""
        return np.dtype(column_dtype(self.manifest, name))

    def read_chunk(self, chunk: int, name: str = ACTS) -> np.ndarray:
        """All rows of inner chunk ``chunk`` of array ``name``."""
        rows = int(self.chunk_sizes[chunk])
        shape = (rows, self.manifest.d) if name == ACTS else (rows,)
        out = np.empty(shape, dtype=self.column_dtype(name))
        if rows:
            self.reader(name).read_into(chunk, rows, out)
        return out

    def read(self, start: int, stop: int, name: str = ACTS) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (through zarr)."""
        return np.asarray(self.arrays[name][start:stop])

    def labels(self) -> np.ndarray | None:
        """Class index per image (``labels[seq_id]``), or None for datasets without classes."""
        if self.manifest.class_names is None:
            return None
        return np.asarray(self.arrays[LABELS][: self.num_rows // self.manifest.context_length])

    def doc_ids(self) -> np.ndarray:
        """Source document per sequence (``doc_ids[seq_id]``): the stored ``doc_ids`` of labelled text,
        else each sequence (image or context) is its own document (``arange``)."""
        n = self.num_rows // self.manifest.context_length
        if not self.manifest.documents:
            return np.arange(n, dtype=np.int64)
        return np.asarray(self.arrays[DOC_IDS][:n])

    # ---- chunks and splits -------------------------------------------------------------------
    def chunk_row_range(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) held by inner chunk ``chunk``."""
        start = chunk * self.manifest.chunk_rows
        return start, start + int(self.chunk_sizes[chunk])

    def eval_mask(self) -> np.ndarray:
        """Per chunk: True where the chunk is in the eval split (``store.split.eval_chunk_mask``)."""
        sp = self.manifest.split
        return eval_chunk_mask(self.n_chunks, sp.fraction, sp.seed)

    def eval_chunks(self) -> np.ndarray:
        """Indices of the (available) eval chunks."""
        return self.split_chunks("eval")

    def split_chunks(self, split: str) -> np.ndarray:
        """Indices of the available chunks of ``split`` ∈ {"train", "eval", "all"}, ascending."""
        sp = self.manifest.split
        chunks = chunks_for_split(self.n_chunks, sp.fraction, sp.seed, split)
        return chunks[self.chunk_sizes[chunks] > 0]

    def split_row_ranges(self, split: str) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of ``split``, adjacent chunks merged, ascending."""
        ranges: list[tuple[int, int]] = []
        for c in self.split_chunks(split).tolist():
            start, stop = self.chunk_row_range(c)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return ranges

    def split_rows(self, split: str) -> int:
        """Number of rows in ``split``."""
        return int(self.chunk_sizes[self.split_chunks(split)].sum())

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Dataset({self.url!r}, rows={self.num_rows}, d={m.d}, dtype={m.dtype}, "
                f"sealed={m.sealed})")


def check_arrays(url: str, manifest: DatasetManifest, metas: dict[str, dict]) -> list[str]:
    """Sentences for every disagreement between the manifest and the stored array metadata."""
    problems = []
    m = manifest
    for name in array_names(m):
        meta = metas[name]
        shape = meta.get("shape", [])
        want_dtype = column_dtype(m, name)
        if meta.get("data_type") != want_dtype:
            problems.append(f"array {name!r} of {url} stores {meta.get('data_type')} but the manifest "
                            f"implies {want_dtype}; the dataset is inconsistent, re-harvest it.")
        if name == ACTS and (len(shape) != 2 or shape[1] != m.d):
            problems.append(f"array 'acts' of {url} has shape {shape} but the manifest says d={m.d}; "
                            "the dataset is inconsistent, re-harvest it.")
        if m.sealed and m.rows is not None:
            want = m.rows // m.context_length if name in SEQ_ARRAYS else m.rows
            if not shape or shape[0] != want:
                problems.append(f"array {name!r} of {url} has {shape[0] if shape else 0} rows but the "
                                f"manifest says {want}; the arrays have different lengths, re-seal or "
                                "re-harvest.")
    return problems


def open_dataset(url: str, allow_partial: bool = False, storage_options: dict | None = None) -> Dataset:
    """Open the dataset at ``url`` for reading (UserError for anything missing or inconsistent)."""
    manifest = read_manifest(url, storage_options)
    commits = read_commits(url, storage_options)
    if not manifest.sealed and not allow_partial:
        raise UserError(f"dataset {url} is not sealed ({len(commits)} shards committed so far); finish or "
                        "re-run the harvest to seal it, or open it with allow_partial=True.")
    metas = {name: read_array_meta(url, name, storage_options) for name in array_names(manifest)}
    problems = check_arrays(url, manifest, metas)
    if problems:
        raise UserError(problems[0])
    return Dataset(url, manifest, commits, storage_options, metas)
