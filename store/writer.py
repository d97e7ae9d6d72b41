"""Shard-owning, committed, resumable dataset writer.

Protocol (``docs/store-format.md``):

* ``DatasetWriter.create(url, manifest)`` makes the group and its arrays at capacity shape
  (see :mod:`store.layout`). If a dataset with the same identity (manifest minus
  rows/stats/created/sealed) already exists there, it is opened instead, so a re-started
  harvest resumes; a different manifest is an error unless ``overwrite=True``, and so is a location that
  holds anything but a dataset (a partial copy, someone's files): it is never overwritten. Writers of
  one dataset take its lease first (:mod:`store.lease`), so only one harvest writes it at a time.
  Create once (one process), then any number of processes may ``DatasetWriter.open(url)``.
* ``write_shard(i, acts, ...)`` writes shard ``i`` of every array, each in one piece, after
  deleting any stale uncommitted objects of that shard; then it writes
  ``commits/<i>.json`` (rows, row/seq range, per-object size + sha256 of the exact bytes
  stored, and the shard's mergeable statistics). A shard without a commit record does not
  exist for readers, so a writer killed at any point loses at most the shard in flight.
  Different processes must write different shards; a committed shard is rewritten only
  with ``overwrite=True``.
* ``discard_uncommitted(shards)`` (once every writer has stopped, e.g. after Ctrl-C) deletes
  what the uncommitted ones left: torn objects, zarr's ``<object>.<uuid>.partial`` temp files
  of a local write cut short, unrenamed commit records. Every shard is then whole or absent.
  ``remove_partial_writes()`` (before a resume, e.g. after SIGKILL) deletes every such temp file.
* ``seal()`` (one process, after all writers are done) checks shards 0..n-1 are committed
  and all but the last are full, sets the arrays' final length, merges the per-shard
  statistics and marks the manifest sealed.

Defaults when columns are omitted: ``token_ids`` = −1 (no token, e.g. vision),
``seq_ids`` = global row // context_length, ``positions`` = global row % context_length.
Labels are per sequence (an image, or a context of labelled text): ``labels[i]`` is the class
of rows [i·ctx, (i+1)·ctx), and ``doc_ids[i]`` (labelled text, ``manifest.documents``) the
source document those rows come from; a shard with labels or doc_ids must therefore have
``seq_ids == row // context_length`` so that ``labels[seq_id]`` is that row's class. Local files are fsynced before the commit record
is written; commit records are written atomically (temp file + rename, or one S3 PUT).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import os
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from store.errors import UserError
from store.io import filesystem, is_local, join_url, list_dir, local_path, remove, zarr_store
from store.layout import (
    ACTS,
    CAPACITY_SHARDS,
    COMMITS_DIR,
    DOC_IDS,
    INT_DTYPES,
    LABELS,
    POSITIONS,
    SEQ_ARRAYS,
    SEQ_IDS,
    TOKEN_IDS,
    array_names,
    capacity_rows,
    column_dtype,
    commit_key,
    committed_shards,
    extra_column_names,
    read_commits,
    read_group_attrs,
    read_manifest,
    shard_key,
)
from store.lease import LEASE_FILE
from store.manifest import MANIFEST_KEY, CommitRecord, DatasetManifest, DatasetStats, ObjectDigest
from store.stats import StatsAccumulator, as_numpy


class HashingStore(WrapperStore):
    """Store wrapper that remembers size and sha256 of every object it writes."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.digests: dict[str, tuple[int, str]] = {}

    async def set(self, key: str, value: Any) -> None:  # type: ignore[override]
        data = value.to_bytes()
        self.digests[key] = (len(data), hashlib.sha256(data).hexdigest())
        await self._store.set(key, value)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def create_arrays(group: zarr.Group, manifest: DatasetManifest) -> None:
    """Create every array of the layout at capacity shape."""
    cap = capacity_rows(manifest)
    m = manifest
    common = {"config": {"write_empty_chunks": True}, "overwrite": True}
    group.create_array(ACTS, shape=(cap, m.d), dtype=m.dtype, chunks=(m.chunk_rows, m.d),
                       shards=(m.shard_rows, m.d), compressors=None, fill_value=0, **common)
    for name in (TOKEN_IDS, SEQ_IDS, POSITIONS, *extra_column_names(m)):
        group.create_array(name, shape=(cap,), dtype=column_dtype(m, name), chunks=(m.chunk_rows,),
                           shards=(m.shard_rows,), compressors=ZstdCodec(level=3), fill_value=-1, **common)
    per_shard = m.shard_rows // m.context_length
    for name in array_names(m):
        if name in SEQ_ARRAYS:
            group.create_array(name, shape=(cap // m.context_length,), dtype=INT_DTYPES[name],
                               chunks=(per_shard,), compressors=ZstdCodec(level=3), fill_value=-1, **common)


def write_manifest(url: str, manifest: DatasetManifest, storage_options: dict | None) -> None:
    """Store the manifest in the group attributes."""
    group = zarr.open_group(zarr_store(url, storage_options), mode="r+", zarr_format=3)
    group.update_attributes({MANIFEST_KEY: manifest.dump()})


def resize_arrays(url: str, manifest: DatasetManifest, rows: int, storage_options: dict | None) -> None:
    """Set every array's length (metadata only; no chunk is touched or deleted)."""
    store = zarr_store(url, storage_options)
    for name in array_names(manifest):
        arr = zarr.open_array(store=store, path=name, mode="r+", zarr_format=3)
        n = rows // manifest.context_length if name in SEQ_ARRAYS else rows
        shape = (n, manifest.d) if name == ACTS else (n,)
        if tuple(arr.shape) != shape:
            sync(arr._async_array.resize(shape, delete_outside_chunks=False))


def _as_int(values: Any, name: str, rows: int, dtype: str, where: str) -> np.ndarray:
    arr = as_numpy(values)
    if arr.shape != (rows,):
        raise UserError(f"{where}: {name} has shape {tuple(arr.shape)}, expected ({rows},); "
                        "pass one value per row.")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise UserError(f"{where}: {name} has values outside the {dtype} range; check them.")
    return arr.astype(dtype, copy=False)


class DatasetWriter:
    """Writes whole shards of one dataset; see the module docstring for the protocol."""

    def __init__(self, url: str, manifest: DatasetManifest, storage_options: dict | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.manifest = manifest
        self._fs, self._path = filesystem(url, storage_options)
        self._hstore = HashingStore(zarr_store(url, storage_options))
        self._arrays: dict[str, zarr.Array] = {}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, manifest: DatasetManifest, overwrite: bool = False,
               storage_options: dict | None = None) -> DatasetWriter:
        """Create the dataset (or resume it if the same manifest is already there)."""
        manifest = DatasetManifest.model_validate(manifest.model_dump())
        attrs = read_group_attrs(url, storage_options)
        if attrs is not None and not overwrite:
            if MANIFEST_KEY not in attrs:
                raise UserError(f"{url} already holds a Zarr group that is not a dynsae dataset; "
                                "pick another URL or pass overwrite=True.")
            existing = read_manifest(url, storage_options)
            if existing.identity() != manifest.identity():
                diff = sorted(k for k, v in manifest.identity().items() if existing.identity().get(k) != v)
                raise UserError(f"a different dataset already exists at {url} (differs in {', '.join(diff)}); "
                                "use another name or pass overwrite=True to replace it.")
            return cls.open(url, storage_options=storage_options)
        fs, path = filesystem(url, storage_options)
        if attrs is not None:
            fs.rm(path, recursive=True)
        elif not overwrite:
            held = [e for e in list_dir(url, storage_options) if e != LEASE_FILE]
            if held:
                raise UserError(f"{url} already holds {len(held)} entr{'y' if len(held) == 1 else 'ies'} "
                                f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) but no dataset (no "
                                "zarr.json); nothing there is overwritten: pick another URL or move them away.")
        manifest.rows, manifest.stats, manifest.sealed = None, None, False
        if manifest.created is None:
            manifest.created = _now()
        try:
            group = zarr.create_group(zarr_store(url, storage_options), zarr_format=3, overwrite=overwrite,
                                      attributes={MANIFEST_KEY: manifest.dump()})
            create_arrays(group, manifest)
        except (PermissionError, OSError) as err:
            raise UserError(f"cannot create a dataset at {url} ({err}); check the path/bucket and "
                            "permissions.") from None
        return cls(url, manifest, storage_options)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> DatasetWriter:
        """Open an existing dataset to write more shards (resume) or to seal it."""
        manifest = read_manifest(url, storage_options)
        if not manifest.sealed:
            resize_arrays(url, manifest, capacity_rows(manifest), storage_options)  # undo an interrupted seal
        return cls(url, manifest, storage_options)

    # ---- writing ---------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # write_empty_chunks is a runtime setting: every shard is one object with every chunk stored
            arr = zarr.open_array(store=self._hstore, path=name, mode="r+", zarr_format=3)
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def committed(self) -> set[int]:
        """Indices of committed shards."""
        return committed_shards(self.url, self.storage_options)

    def _prepare(self, index: int, acts: Any, token_ids: Any, seq_ids: Any, positions: Any,
                 labels: Any, doc_ids: Any = None, extra: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Validate and convert one shard's columns; returns name -> array to store."""
        m = self.manifest
        where = f"shard {index} of {self.url}"
        x = as_numpy(acts)
        if x.ndim != 2 or x.shape[1] != m.d:
            raise UserError(f"{where}: acts have shape {tuple(x.shape)} but the manifest says d={m.d}; "
                            "pass (rows, d) activations of the hooked layer.")
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"{where}: acts have dtype {x.dtype}, expected floating point values.")
        rows = x.shape[0]
        if not 0 < rows <= m.shard_rows:
            raise UserError(f"{where}: {rows} rows given; a shard holds 1..{m.shard_rows} rows.")
        if rows % m.context_length:
            raise UserError(f"{where}: {rows} rows is not a whole number of sequences of "
                            f"context_length={m.context_length}; pass whole sequences.")
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.astype(m.dtype, copy=False)
        if not np.isfinite(x).all():
            raise UserError(f"{where}: acts contain NaN or Inf (in {m.dtype}); fix the model/hook "
                            "or store float32.")
        start = index * m.shard_rows
        rows_global = np.arange(start, start + rows, dtype=np.int64)
        out = {ACTS: np.ascontiguousarray(x)}
        out[TOKEN_IDS] = (np.full(rows, -1, np.int32) if token_ids is None
                          else _as_int(token_ids, TOKEN_IDS, rows, "int32", where))
        out[SEQ_IDS] = (rows_global // m.context_length if seq_ids is None
                        else _as_int(seq_ids, SEQ_IDS, rows, "int64", where))
        out[POSITIONS] = ((rows_global % m.context_length).astype(np.int16) if positions is None
                          else _as_int(positions, POSITIONS, rows, "int16", where))
        if m.class_names is None:
            if labels is not None:
                raise UserError(f"{where}: labels given but the manifest has no class_names; "
                                "set class_names in the manifest.")
        else:
            if labels is None:
                raise UserError(f"{where}: the manifest has class_names, so labels (one per image) "
                                "are required.")
            lab = _as_int(labels, LABELS, rows // m.context_length, "int32", where)
            if lab.size and (lab.min() < 0 or lab.max() >= len(m.class_names)):
                raise UserError(f"{where}: labels must lie in 0..{len(m.class_names) - 1} "
                                f"(len(class_names)); got {lab.min()}..{lab.max()}.")
            if not np.array_equal(out[SEQ_IDS], rows_global // m.context_length):
                raise UserError(f"{where}: with labels, seq_ids must be the global image index "
                                "(row // context_length) so that labels[seq_id] is the row's class.")
            out[LABELS] = lab
        if bool(m.documents) != (doc_ids is not None):
            raise UserError(f"{where}: doc_ids (one source document id per sequence) must be given exactly "
                            f"when the manifest says documents; it says documents={bool(m.documents)}.")
        if doc_ids is not None:
            out[DOC_IDS] = _as_int(doc_ids, DOC_IDS, rows // m.context_length, "int64", where)
            if not np.array_equal(out[SEQ_IDS], rows_global // m.context_length):
                raise UserError(f"{where}: with doc_ids, seq_ids must be the global sequence index "
                                "(row // context_length) so that doc_ids[seq_id] is the row's document.")
        want, given = set(extra_column_names(m)), set(extra or {})
        if want != given:
            raise UserError(f"{where}: extra columns {sorted(given)} given but the manifest declares "
                            f"{sorted(want)}; pass exactly the manifest's extra_columns.")
        for name in extra_column_names(m):
            out[name] = _as_int(extra[name], name, rows, column_dtype(m, name), where)
        return out

    def _delete_shard_objects(self, index: int) -> None:
        for name in array_names(self.manifest):
            p = join_url(self._path, shard_key(name, index))
            try:
                self._fs.rm_file(p)
            except FileNotFoundError:
                pass

    def _remove_partial_files(self, index: int | None = None) -> None:
        """Delete the ``<object>.<uuid>.partial`` files zarr's LocalStore leaves when a process is
        killed mid-write: shard ``index``'s, or (None) every one in the dataset, in one walk. Not on
        the write path (a glob per shard write would list every shard's object each time)."""
        if not is_local(self.url):
            return  # an object store PUT is atomic: nothing partial is ever visible
        root = local_path(self.url)
        if index is None:
            strays = [os.path.join(folder, f) for folder, _, files in os.walk(root)
                      for f in files if f.endswith(".partial")]
        else:
            strays = []
            for name in array_names(self.manifest):
                folder, base = os.path.split(os.path.join(root, shard_key(name, index)))
                strays += glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(base)}.*.partial"))
        for stray in strays:
            with contextlib.suppress(FileNotFoundError):
                os.remove(stray)

    def remove_partial_writes(self) -> None:
        """Before resuming (no writer of this dataset running): delete every partial file a killed
        writer left; uncommitted objects are replaced when their shard is written again."""
        self._remove_partial_files()

    def discard_uncommitted(self, shards: set[int]) -> None:
        """Delete every trace of each shard in ``shards`` that has no commit record (its objects,
        a killed write's partial files, a commit record not yet renamed into place), so that a
        shard is committed (whole) or absent. Call it only once no process can write any more."""
        for index in sorted(shards - self.committed()):
            self._delete_shard_objects(index)
            self._remove_partial_files(index)
        commits = join_url(self.url, COMMITS_DIR)
        for entry in list_dir(commits, self.storage_options):
            if ".tmp-" in entry:  # a commit record a killed writer had not renamed into place yet
                remove(join_url(commits, entry), self.storage_options)

    def _fsync(self, key: str) -> None:
        if is_local(self.url):
            fd = os.open(os.path.join(local_path(self.url), key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_commit(self, record: CommitRecord) -> None:
        data = record.model_dump_json(indent=1).encode()
        if is_local(self.url):
            final = os.path.join(local_path(self.url), commit_key(record.shard))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        else:
            self._fs.pipe_file(join_url(self._path, commit_key(record.shard)), data)

    def write_shard(self, index: int, acts: Any, token_ids: Any = None, seq_ids: Any = None,
                    positions: Any = None, labels: Any = None, doc_ids: Any = None, overwrite: bool = False,
                    extra: dict[str, Any] | None = None) -> CommitRecord:
        """Write shard ``index`` (all arrays, each in one piece), then its commit record. ``labels`` and
        ``doc_ids``: one value per sequence (see the module docstring); ``extra``: one value per row for
        each of the manifest's ``extra_columns``."""
        m = self.manifest
        if m.sealed:
            raise UserError(f"{self.url} is sealed; write to a new dataset (or re-create it with overwrite).")
        if index < 0 or index >= CAPACITY_SHARDS:
            raise UserError(f"shard index {index} is out of range 0..{CAPACITY_SHARDS - 1}.")
        cols = self._prepare(index, acts, token_ids, seq_ids, positions, labels, doc_ids, extra)
        ckey = join_url(self._path, commit_key(index))
        if self._fs.exists(ckey):
            if not overwrite:
                raise UserError(f"shard {index} of {self.url} is already committed; skip it "
                                "(see committed()) or pass overwrite=True.")
            self._fs.rm_file(ckey)
        self._delete_shard_objects(index)
        rows = cols[ACTS].shape[0]
        start = index * m.shard_rows
        objects: dict[str, ObjectDigest] = {}
        for name, values in cols.items():
            key = shard_key(name, index)
            self._hstore.digests.pop(key, None)
            if name in SEQ_ARRAYS:
                per_shard = m.shard_rows // m.context_length
                self._array(name)[index * per_shard: index * per_shard + values.shape[0]] = values
            else:
                self._array(name)[start:start + rows] = values
            if key not in self._hstore.digests:
                raise RuntimeError(f"zarr did not write {key} as one object; the layout is broken")
            self._fsync(key)
            nbytes, digest = self._hstore.digests.pop(key)
            objects[name] = ObjectDigest(key=key, nbytes=nbytes, sha256=digest)
        seq = cols[SEQ_IDS]
        record = CommitRecord(shard=index, row_start=start, rows=rows, seq_min=int(seq.min()),
                              seq_max=int(seq.max()), objects=objects,
                              stats=StatsAccumulator(m.d).update(cols[ACTS]).state())
        self._write_commit(record)
        return record

    # ---- sealing ---------------------------------------------------------------------------
    def seal(self, stats: DatasetStats | None = None, total_rows: int | None = None) -> DatasetManifest:
        """Check completeness, set the final length and statistics, mark the dataset sealed."""
        m = self.manifest
        commits = read_commits(self.url, self.storage_options)
        if not commits:
            raise UserError(f"{self.url} has no committed shards; write shards before sealing.")
        n = max(commits) + 1
        missing = [i for i in range(n) if i not in commits]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise UserError(f"cannot seal {self.url}: shards {shown} of 0..{n - 1} are not committed; "
                            "re-run the harvest to write them.")
        short = [i for i in range(n - 1) if commits[i].rows != m.shard_rows]
        if short:
            raise UserError(f"cannot seal {self.url}: shard {short[0]} has {commits[short[0]].rows} rows "
                            f"but only the last shard may hold fewer than {m.shard_rows}.")
        rows = sum(c.rows for c in commits.values())
        if total_rows is not None and total_rows != rows:
            raise UserError(f"cannot seal {self.url}: the committed shards hold {rows} rows, not the "
                            f"expected total_rows={total_rows}; some shards are missing or stale.")
        if stats is None:
            acc = StatsAccumulator(m.d)
            for i in range(n):
                acc.merge(StatsAccumulator.from_state(commits[i].stats))
            stats = acc.result()
        resize_arrays(self.url, m, rows, self.storage_options)
        sealed = m.model_copy(update={"rows": rows, "stats": stats, "sealed": True})
        write_manifest(self.url, sealed, self.storage_options)
        self.manifest = sealed
        return sealed


__all__ = ["DatasetWriter", "HashingStore", "COMMITS_DIR"]
