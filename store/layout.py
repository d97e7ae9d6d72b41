"""Where things live inside a dataset group, and the checks every opener shares.

A dataset is the Zarr v3 group ``<root>/<name>/``::

    zarr.json            group metadata; attribute "dynsae" = DatasetManifest
    acts/                (N, d) float16|float32, chunks (chunk_rows, d), shards (shard_rows, d), no compressor
    token_ids/           (N,) int32  (-1 where there is no token: vision)        zstd
    seq_ids/             (N,) int64                                              zstd
    positions/           (N,) int16                                              zstd
    labels/              (N / context_length,) int32, only when class_names is set; zstd;
                         one chunk per shard (labels[i] = class of rows [i·ctx, (i+1)·ctx))
    doc_ids/             (N / context_length,) int64, only when the manifest says ``documents``
                         (labelled text); zstd; one chunk per shard. doc_ids[i] = the source
                         document sequence i was cut from: a labelled document is never packed
                         with another one, and a long one spans several sequences that share
                         its id (the evaluator pools a document's rows by it; docs/metrics.md)
    commits/<shard>.json CommitRecord, written after the shard's objects are stored

Shard ``s`` of a row array is the object ``<array>/c/<s>/0`` (acts) or ``<array>/c/<s>``.

Final length: N is not known while harvesting and several writer processes may write
disjoint shards at once, so the arrays are created with a fixed *capacity* shape
(``shard_rows · 2**24`` rows; metadata only, nothing is allocated) and writers only ever
put whole shard objects — no writer touches shared metadata. ``seal`` (one process, after
all writers finished) checks that shards 0..n-1 are committed and rewrites the array
shapes to the true N, then marks the manifest sealed.
"""

from __future__ import annotations

import json
from typing import Any

from store.errors import UserError
from store.io import filesystem, join_url, protocol
from store.manifest import (  # the array names are part of the schema
    ACTS,
    DOC_IDS,
    LABELS,
    MANIFEST_KEY,
    POSITIONS,
    ROW_ARRAYS,
    SEQ_IDS,
    TOKEN_IDS,
    CommitRecord,
    DatasetManifest,
)

SEQ_ARRAYS = (LABELS, DOC_IDS)  # one value per sequence (``array[seq_id]``), not per row
INT_DTYPES = {TOKEN_IDS: "int32", SEQ_IDS: "int64", POSITIONS: "int16", LABELS: "int32", DOC_IDS: "int64"}
CAPACITY_SHARDS = 2**24
COMMITS_DIR = "commits"


def array_names(manifest: DatasetManifest) -> tuple[str, ...]:
    """Arrays present in a dataset with this manifest."""
    return (ROW_ARRAYS + ((LABELS,) if manifest.class_names is not None else ())
            + ((DOC_IDS,) if manifest.documents else ()) + extra_column_names(manifest))


def extra_column_names(manifest: DatasetManifest) -> tuple[str, ...]:
    """The manifest's extra per-row integer columns (``extra_columns``), in order."""
    return tuple(manifest.extra_columns or ())


def row_columns(manifest: DatasetManifest) -> tuple[str, ...]:
    """Every per-row array a reader may ask for: the standard ones and the extra columns."""
    return ROW_ARRAYS + extra_column_names(manifest)


def column_dtype(manifest: DatasetManifest, name: str) -> str:
    """Stored dtype of array ``name``: the manifest's for acts, else the integer column's."""
    if name == ACTS:
        return manifest.dtype
    return INT_DTYPES[name] if name in INT_DTYPES else (manifest.extra_columns or {})[name]


def shard_key(name: str, shard: int) -> str:
    """Object key (relative to the dataset) of shard ``shard`` of array ``name``."""
    return f"{name}/c/{shard}/0" if name == ACTS else f"{name}/c/{shard}"


def commit_key(shard: int) -> str:
    """Relative key of a shard's commit record."""
    return f"{COMMITS_DIR}/{shard}.json"


def capacity_rows(manifest: DatasetManifest) -> int:
    """Row capacity of the arrays while the dataset is unsealed."""
    return manifest.shard_rows * CAPACITY_SHARDS


def describe_access_error(url: str, err: BaseException) -> str:
    """One sentence for a failure to reach ``url`` (credentials, endpoint, permissions)."""
    name = type(err).__name__
    if "Credential" in name or "credential" in str(err).lower():
        return (f"no credentials to access {url}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(or storage_options) for that bucket.")
    if isinstance(err, PermissionError):
        return f"access to {url} was denied ({err}); check the credentials and the bucket policy."
    return f"cannot reach {url} ({name}: {err}); check the URL, endpoint and network."


def bucket_missing(url: str, fs: Any, path: str) -> bool:
    """True when ``url`` is on object storage and its bucket does not exist."""
    if protocol(url) not in ("s3", "s3a", "gs", "gcs"):
        return False
    bucket = path.split("/", 1)[0]
    try:
        return not fs.exists(bucket)
    except Exception:  # noqa: BLE001 - any failure here means we cannot tell; report the generic error
        return False


def read_group_attrs(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """Attributes of the Zarr group at ``url``, or None when there is no group there."""
    fs, path = filesystem(url, storage_options)
    key = join_url(path, "zarr.json")
    try:
        raw = fs.cat_file(key)
    except FileNotFoundError:
        if bucket_missing(url, fs, path):
            bucket = path.split("/", 1)[0]
            raise UserError(f"bucket {bucket!r} of {url} does not exist at this endpoint; "
                            "create it or fix the URL.") from None
        return None
    except Exception as err:  # noqa: BLE001 - network/credential errors become one sentence
        raise UserError(describe_access_error(url, err)) from None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UserError(f"{url}/zarr.json is not valid JSON; the dataset is corrupt, re-harvest it.") from None
    if meta.get("node_type") != "group":
        raise UserError(f"{url} is a Zarr {meta.get('node_type', 'node')}, not a dataset group; "
                        "point at the dataset directory.")
    return meta.get("attributes", {}) or {}


def read_manifest(url: str, storage_options: dict | None = None) -> DatasetManifest:
    """The validated manifest of the dataset at ``url`` (UserError if absent or invalid)."""
    attrs = read_group_attrs(url, storage_options)
    if attrs is None:
        raise UserError(f"no dataset at {url} (no zarr.json there); check the URL, "
                        "e.g. with `python -m store ls <root>`.")
    if MANIFEST_KEY not in attrs:
        raise UserError(f"{url} is a Zarr group without a {MANIFEST_KEY!r} manifest; "
                        "it was not written by the dynsae store.")
    from store.config import validate

    return validate(DatasetManifest, attrs[MANIFEST_KEY], source=f"manifest of {url}")


def committed_shards(url: str, storage_options: dict | None = None) -> set[int]:
    """Indices of shards that have a commit record (names only, one listing)."""
    fs, path = filesystem(url, storage_options)
    try:
        names = fs.ls(join_url(path, COMMITS_DIR), detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    out = set()
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        stem = base[:-5] if base.endswith(".json") else ""
        if stem.isdigit():
            out.add(int(stem))
    return out


def read_commits(url: str, storage_options: dict | None = None,
                 problems: list[str] | None = None) -> dict[int, CommitRecord]:
    """All valid commit records, by shard. Invalid ones raise, or are reported into ``problems``."""
    fs, path = filesystem(url, storage_options)
    shards = sorted(committed_shards(url, storage_options))
    paths = [join_url(path, commit_key(s)) for s in shards]
    raw = fs.cat(paths, on_error="return") if paths else {}
    out: dict[int, CommitRecord] = {}
    for shard, p in zip(shards, paths):
        data = raw.get(p)
        try:
            if isinstance(data, BaseException) or data is None:
                raise ValueError(f"unreadable ({data})")
            rec = CommitRecord.model_validate_json(data)
            if rec.shard != shard:
                raise ValueError(f"it names shard {rec.shard}")
        except ValueError as err:
            msg = (f"commit record {url}/{commit_key(shard)} is invalid ({str(err).splitlines()[0]}); "
                   "delete it and re-write that shard.")
            if problems is None:
                raise UserError(msg) from None
            problems.append(msg)
            continue
        out[shard] = rec
    return out
