"""``verify``: every problem of a stored dataset as one sentence.

Checks: the manifest validates; the dataset is sealed; shards 0..n-1 (n from the sealed row
count) each have a valid commit record naming the shard's own objects (a record pointing at another
shard's objects would vouch for bytes it does not describe) and all those objects; no stray uncommitted shard
objects; the sha256 of every stored shard object matches its commit record; all arrays
have the length the manifest says; no NaN/Inf in a sample of chunks of ``acts``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from store.dataset import Dataset, check_arrays, read_array_meta
from store.errors import UserError
from store.io import filesystem, join_url
from store.layout import ACTS, array_names, committed_shards, read_commits, read_manifest, shard_key


def _shard_objects(fs, path: str, name: str) -> set[int]:
    """Shard indices that have a stored object for array ``name``."""
    try:
        entries = fs.ls(join_url(path, name, "c"), detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    return {int(e.rstrip("/").rsplit("/", 1)[-1]) for e in entries
            if e.rstrip("/").rsplit("/", 1)[-1].isdigit()}


def verify_dataset(url: str, storage_options: dict | None = None, sample_chunks: int = 32,
                   seed: int = 0) -> list[str]:
    """All problems found in the dataset at ``url`` (empty list: the dataset is sound)."""
    try:
        manifest = read_manifest(url, storage_options)
    except UserError as err:
        return [str(err)]
    problems: list[str] = []
    fs, path = filesystem(url, storage_options)
    commits = read_commits(url, storage_options, problems=problems)
    names = array_names(manifest)
    if not manifest.sealed:
        problems.append(f"dataset {url} is not sealed ({len(committed_shards(url, storage_options))} shards "
                        "committed); finish the harvest so it can be sealed.")
        n_shards = max(commits) + 1 if commits else 0
    else:
        n_shards = -(-int(manifest.rows or 0) // manifest.shard_rows)
    for s in range(n_shards):
        if s not in commits:
            problems.append(f"shard {s} of {url} has no commit record; re-run the harvest to write it.")
    stored = {name: _shard_objects(fs, path, name) for name in names}
    for name in names:
        stray = sorted(stored[name] - set(commits))
        if stray:
            problems.append(f"array {name!r} of {url} has uncommitted shard objects {stray[:10]}; "
                            "re-run the harvest (it rewrites them) or delete them.")
    damaged: set[int] = set()
    for s in sorted(commits):
        rec = commits[s]
        if manifest.sealed and s >= n_shards:
            problems.append(f"shard {s} of {url} is committed but lies beyond the sealed {manifest.rows} rows; "
                            "re-seal the dataset.")
        for name in names:
            digest = rec.objects.get(name)
            if digest is None:
                damaged.add(s)
                problems.append(f"commit record of shard {s} of {url} lists no {name!r} object; "
                                "rewrite that shard.")
                continue
            if digest.key != shard_key(name, s):
                damaged.add(s)
                problems.append(f"commit record of shard {s} of {url} names object {digest.key!r} for {name!r}, "
                                f"not the shard's own {shard_key(name, s)!r}; it is corrupt, rewrite that shard.")
                continue
            try:
                data = fs.cat_file(join_url(path, digest.key))
            except FileNotFoundError:
                damaged.add(s)
                problems.append(f"object {digest.key} of {url} (shard {s}) is missing; rewrite that shard.")
                continue
            if len(data) != digest.nbytes or hashlib.sha256(data).hexdigest() != digest.sha256:
                damaged.add(s)
                problems.append(f"object {digest.key} of {url} (shard {s}) does not match its checksum; "
                                "it is corrupt, rewrite that shard.")
    try:
        metas = {name: read_array_meta(url, name, storage_options) for name in names}
        problems.extend(check_arrays(url, manifest, metas))
    except UserError as err:
        problems.append(str(err))
        return problems
    intact = {s: r for s, r in commits.items() if s not in damaged}
    problems.extend(_check_finite(url, manifest, intact, storage_options, metas, sample_chunks, seed))
    return problems


def _check_finite(url, manifest, commits, storage_options, metas, sample_chunks: int, seed: int) -> list[str]:
    """NaN/Inf check of ``acts`` in a seeded sample of intact chunks."""
    ds = Dataset(url, manifest.model_copy(update={"sealed": False}), commits, storage_options, metas)
    chunks = np.flatnonzero(ds.chunk_sizes > 0)
    if chunks.size > sample_chunks:
        chunks = np.sort(np.random.default_rng(seed).choice(chunks, sample_chunks, replace=False))
    bad = []
    for c in chunks.tolist():
        try:
            x = ds.read_chunk(c, ACTS)
        except Exception as err:  # noqa: BLE001 - corrupt data is a finding, not a crash
            return [f"chunk {c} of 'acts' in {url} cannot be read ({type(err).__name__}); it is corrupt."]
        if not np.isfinite(x).all():
            bad.append(c)
    if bad:
        return [f"'acts' of {url} holds NaN/Inf in chunks {bad[:10]} (of {chunks.size} sampled); "
                "re-harvest those shards."]
    return []
