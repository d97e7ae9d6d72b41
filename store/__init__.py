"""dynsae activation store: Zarr v3 datasets on any fsspec URL (the format: ``docs/store-format.md``).

Public API::

    DatasetManifest, DatasetStats, EvalSplit      manifest schema (store.manifest)
    DatasetWriter                                  shard-owning, committed, resumable writer
    open_dataset, Dataset                          validated reading, split helpers
    ActivationLoader                               windowed block shuffle, batch(b) random access
    store.stats.StatsAccumulator, store.filters.RowFilter, store.split.eval_chunk_mask,
    store.io (join_url, filesystem, zarr_store), store.errors (UserError, run_cli)
"""

from store.dataset import Dataset, open_dataset
from store.errors import UserError
from store.manifest import (
    CommitRecord,
    DatasetManifest,
    DatasetStats,
    EvalSplit,
    HookInfo,
    ModelInfo,
    SourceInfo,
)
from store.stats import StatsAccumulator
from store.writer import DatasetWriter


def __getattr__(name: str):
    """Import the torch-using parts lazily (``python -m store ls`` stays fast)."""
    if name == "ActivationLoader":
        from store.loader import ActivationLoader

        return ActivationLoader
    if name == "RowFilter":
        from store.filters import RowFilter

        return RowFilter
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = [
    "ActivationLoader",
    "CommitRecord",
    "Dataset",
    "DatasetManifest",
    "DatasetStats",
    "DatasetWriter",
    "EvalSplit",
    "HookInfo",
    "ModelInfo",
    "RowFilter",
    "SourceInfo",
    "StatsAccumulator",
    "UserError",
    "open_dataset",
]
