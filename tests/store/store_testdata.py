"""Deterministic test datasets for the store tests (also run as a child writer process).

As a script: ``python store_testdata.py URL SHARDS [--sleep S] [--total-rows N]`` opens the
dataset at URL and writes the listed shards (comma separated), printing ``committed <i>``
after each, sleeping S seconds between shards.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from store import DatasetManifest, DatasetWriter

D, SHARD_ROWS, CHUNK_ROWS, CTX = 16, 64, 16, 8


def make_manifest(**overrides) -> DatasetManifest:
    """A small text-like manifest (created time fixed so bytes are reproducible)."""
    base = dict(d=D, dtype="float16", shard_rows=SHARD_ROWS, chunk_rows=CHUNK_ROWS, context_length=CTX,
                model={"name": "tiny-gpt2", "kind": "hf_causal_lm"}, hook={"layer": 1, "site": "resid_post"},
                source={"name": "synthetic"}, created="2026-01-01T00:00:00+00:00",
                split={"fraction": 0.25, "seed": 3})
    base.update(overrides)
    return DatasetManifest(**base)


def shard_rows(shard: int, total_rows: int, shard_size: int = SHARD_ROWS) -> int:
    """Rows of shard ``shard`` in a dataset of ``total_rows`` rows."""
    return max(0, min(shard_size, total_rows - shard * shard_size))


def shard_data(shard: int, rows: int, d: int = D, shard_size: int = SHARD_ROWS) -> dict[str, np.ndarray]:
    """Deterministic columns of one shard; token_ids = global row index (identifies every row)."""
    rng = np.random.default_rng(1000 + shard)
    start = shard * shard_size
    return {"acts": rng.standard_normal((rows, d)).astype(np.float32) * 3.0,
            "token_ids": np.arange(start, start + rows, dtype=np.int64)}


def write_shards(writer: DatasetWriter, shards: list[int], total_rows: int, sleep: float = 0.0,
                 verbose: bool = False) -> None:
    """Write the given shards of a ``total_rows`` dataset with :func:`shard_data`."""
    m = writer.manifest
    for s in shards:
        cols = shard_data(s, shard_rows(s, total_rows, m.shard_rows), m.d, m.shard_rows)
        writer.write_shard(s, cols["acts"], token_ids=cols["token_ids"])
        if verbose:
            print(f"committed {s}", flush=True)
        if sleep:
            time.sleep(sleep)


def build_dataset(url: str, total_rows: int, storage_options: dict | None = None, seal: bool = True,
                  **manifest_overrides) -> DatasetWriter:
    """Create, fill and (optionally) seal a dataset of ``total_rows`` rows."""
    m = make_manifest(**manifest_overrides)
    writer = DatasetWriter.create(url, m, storage_options=storage_options)
    n = -(-total_rows // m.shard_rows)
    write_shards(writer, list(range(n)), total_rows)
    if seal:
        writer.seal(total_rows=total_rows)
    return writer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("shards")
    p.add_argument("--total-rows", type=int, required=True)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    writer = DatasetWriter.open(a.url)
    write_shards(writer, [int(s) for s in a.shards.split(",")], a.total_rows, a.sleep, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
