"""The dataset manifest (Zarr group attribute ``"dynsae"``) and the per-shard commit record.

Both are strict pydantic models (unknown keys are errors). The manifest is what a
reader trusts: geometry (``d``, ``dtype``, ``shard_rows``, ``chunk_rows``,
``context_length``), provenance (model, hook, source, harvester version, config
hash), the eval split rule, the running statistics and ``sealed``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from store.config import StrictModel

SCHEMA_VERSION = 1
MANIFEST_KEY = "dynsae"
#: Manifest keys left out of the stored JSON when unset (see DatasetManifest.dump).
OPTIONAL_KEYS: tuple[str, ...] = ("documents", "extra_columns", "generator")
#: The arrays of a dataset (``docs/store-format.md``): one per stored row, and per-sequence labels / doc ids.
ACTS = "acts"
TOKEN_IDS = "token_ids"
SEQ_IDS = "seq_ids"
POSITIONS = "positions"
LABELS = "labels"
DOC_IDS = "doc_ids"
ROW_ARRAYS = (ACTS, TOKEN_IDS, SEQ_IDS, POSITIONS)
QUANTILE_KEYS: tuple[str, ...] = ("0.001", "0.01", "0.1", "0.5", "0.9", "0.99", "0.999", "1.0")


def canonical_json(data: object) -> str:
    """Canonical JSON text: sorted keys, no spaces (stable input for hashes)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


class ModelInfo(StrictModel):
    """Which model produced the activations."""

    name: str
    kind: str | None = None  # a harvester model kind (harvester/models/<kind>.py)
    revision: str | None = None
    gguf_file: str | None = None
    pretrained: str | None = None


class HookInfo(StrictModel):
    """Where in the model the activations were taken (resid_pre at L = input of block L)."""

    layer: int
    site: Literal["resid_pre", "resid_post"]
    name: str | None = None


class SourceInfo(StrictModel):
    """The text corpus or image set the activations come from."""

    name: str
    kind: str | None = None
    split: str | None = None
    revision: str | None = None
    files: list[str] | None = None


class EvalSplit(StrictModel):
    """Chunk-level held-out split: chunk i is eval iff ``eval_chunk_mask(n_chunks, fraction, seed)[i]``."""

    fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    seed: int = 0


class DatasetStats(StrictModel):
    """Running statistics of the stored activations (float64 accumulation)."""

    rows: int = Field(ge=0)
    mean: list[float]
    mean_norm: float
    norm_quantiles: dict[str, float]

    @field_validator("norm_quantiles")
    @classmethod
    def _quantile_keys(cls, value: dict[str, float]) -> dict[str, float]:
        missing = [k for k in QUANTILE_KEYS if k not in value]
        if missing:
            raise ValueError(f"norm_quantiles lacks keys {missing}; expected {list(QUANTILE_KEYS)}")
        return value

    @property
    def median_norm(self) -> float:
        """Median row norm ‖x‖₂ (the ``"0.5"`` quantile)."""
        return float(self.norm_quantiles["0.5"])


class DatasetManifest(StrictModel):
    """Everything a reader needs to trust a dataset; stored in the group attributes under ``"dynsae"``."""

    schema_version: int = SCHEMA_VERSION
    d: int = Field(gt=0)
    dtype: Literal["float16", "float32"]
    shard_rows: int = Field(gt=0)
    chunk_rows: int = Field(gt=0)
    context_length: int = Field(gt=0)
    model: ModelInfo
    hook: HookInfo
    source: SourceInfo
    class_names: list[str] | None = None
    #: True when a ``doc_ids`` array (one source document id per sequence) is stored: labelled text,
    #: where documents are never packed together (see :mod:`store.layout`); None (left out) otherwise.
    documents: bool | None = None
    extra_columns: dict[str, Literal["int16", "int32", "int64"]] | None = Field(default=None, description=(
        "per-row integer arrays beyond the standard ones, name -> dtype (e.g. a synthetic dataset's true_l0)"))
    generator: dict[str, Any] | None = Field(default=None, description=(
        "the config of the generator that made a synthetic dataset (None for harvested activations)"))
    rows: int | None = Field(default=None, ge=0)
    split: EvalSplit = Field(default_factory=EvalSplit)
    stats: DatasetStats | None = None
    harvester_version: str | None = None
    config_hash: str | None = None
    created: str | None = None
    sealed: bool = False

    @field_validator("extra_columns")
    @classmethod
    def _extra_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if name in (*ROW_ARRAYS, LABELS, DOC_IDS) or not name.isidentifier():
                raise ValueError(f"extra column {name!r} must be a new identifier, not one of the standard arrays")
        return value

    @model_validator(mode="after")
    def _geometry(self) -> DatasetManifest:
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"chunk_rows={self.chunk_rows} must divide shard_rows={self.shard_rows}")
        if self.chunk_rows % self.context_length:
            raise ValueError(
                f"chunk_rows={self.chunk_rows} must be a multiple of context_length={self.context_length} "
                "so that chunks hold whole sequences"
            )
        return self

    @property
    def chunks_per_shard(self) -> int:
        """Inner chunks per shard."""
        return self.shard_rows // self.chunk_rows

    def dump(self) -> dict:
        """The manifest as JSON data; the optional fields added after schema 1 (documents, extra_columns, generator)
        only when set, so a harvested dataset's manifest (and hash) is what it was before they existed."""
        data = self.model_dump(mode="json")
        for key in OPTIONAL_KEYS:
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def manifest_hash(self) -> str:
        """sha256 of the canonical JSON of the whole manifest (:meth:`dump`)."""
        return hashlib.sha256(canonical_json(self.dump()).encode()).hexdigest()

    def identity(self) -> dict:
        """The fields that define *what* is stored (everything the writer does not fill in)."""
        data = self.dump()
        for key in ("rows", "stats", "created", "sealed"):
            data.pop(key, None)
        return data


class ObjectDigest(StrictModel):
    """One stored object (a shard of one array): its key under the dataset, size and sha256."""

    key: str
    nbytes: int = Field(ge=0)
    sha256: str


class StatsState(StrictModel):
    """Mergeable state of :class:`store.stats.StatsAccumulator` (kept in commit records)."""

    rows: int = 0
    sum: list[float] = Field(default_factory=list)
    norm_sum: float = 0.0
    norm_min: float | None = None
    norm_max: float | None = None
    hist: dict[str, int] = Field(default_factory=dict)


class CommitRecord(StrictModel):
    """``commits/<shard>.json``: written only after every object of the shard is stored."""

    shard: int = Field(ge=0)
    row_start: int = Field(ge=0)
    rows: int = Field(gt=0)
    seq_min: int
    seq_max: int
    objects: dict[str, ObjectDigest]
    stats: StatsState
