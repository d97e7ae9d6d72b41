"""Synthetic activations with a known dictionary: ``dynsae synth CONFIG [--set k=v]``.

The model (``docs/metrics.md``, ground truth): true features F (n × d, unit rows) and, per row t, a
support S_t of k_t = |S_t| features, magnitudes c_ti > 0 and noise ε_t:

    x_t = Σ_{i∈S_t} c_ti F_i + ε_t

* **Features.** Seeded Gaussian directions, normalised. With ``group_size`` g > 1 they come in groups
  of g that share a group direction: F_i = normalise(√ρ G_{group(i)} + √(1−ρ) R_i), so two features
  of a group have cosine ≈ ρ = ``group_cosine`` (correlated / hierarchical geometry: a parent
  direction and its children); g = 1 gives independent directions.
* **Per-row K.** k_t varies from row to row — the situation in which a per-token K should beat a
  fixed one: with probability ``simple_fraction`` a *simple* row, k_t uniform in ``simple_l0``
  (default 1–4), else a *complex* row, k_t uniform in ``complex_l0`` (default 20–60).
* **Which features.** S_t is k_t distinct features drawn without replacement with probabilities
  p_i ∝ (i + 1)^(−``frequency_exponent``) (a power law: feature 0 fires most), by the exponential
  race: keys e_i / p_i with e_i ~ Exp(1), the k_t smallest win.
* **Magnitudes.** c_ti = ``magnitude_mean`` · exp(σ z − σ²/2), z ~ N(0, 1), σ = ``magnitude_sigma``
  (log-normal with mean ``magnitude_mean``).
* **Noise.** ε_t ~ N(0, (``noise``²/d) I): ‖ε_t‖ ≈ ``noise``.

Stored like a harvest (a sealed dataset in the normal store format, any fsspec URL) at
``<output>/<name>-<8 hex of the config hash>``: every row is its own sequence (``seq_ids`` = the
global row index, ``positions`` = 1 so the default row filter ``exclude_positions: [0]`` keeps every
row, ``context_length`` = 1), a per-row int16 column ``true_l0`` = k_t, the generator config in the
manifest (``generator``), and ``ground_truth.safetensors`` (:mod:`harvester.ground_truth`) at the root,
written before the dataset is sealed. Deterministic: row block b (4,096 rows) is drawn from a
generator seeded by (seed, b), the features from (seed, "features"); the same config gives the same
bytes whatever the shard size, and a run interrupted before sealing resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse
from pydantic import Field, ValidationInfo, field_validator

from harvester import ground_truth
from store.config import StrictModel

BLOCK_ROWS = 4096
TRUE_L0 = "true_l0"
_FEATURE_TAG, _ROW_TAG = 0xFEA7, 0x5EED


class SynthConfig(StrictModel):
    """The generator config (module docstring); unknown keys are errors."""

    output: str = "data"
    name: str | None = None
    d: int = Field(64, ge=2, description="activation dimension")
    features: int = Field(256, ge=1, description="number of true features n")
    rows: int = Field(65536, ge=1, description="rows to generate")
    seed: int = 0
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    group_size: int = Field(1, ge=1, description="features per correlated group (1: independent)")
    group_cosine: float = Field(0.0, ge=0.0, lt=1.0, description="cosine between two features of a group")
    frequency_exponent: float = Field(1.0, ge=0.0, description="firing probability p_i ∝ (i+1)^-exponent")
    magnitude_mean: float = Field(1.0, gt=0.0)
    magnitude_sigma: float = Field(0.5, ge=0.0, description="log-normal spread of the magnitudes")
    noise: float = Field(0.05, ge=0.0, description="expected noise norm ‖ε‖")
    simple_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of simple rows")
    simple_l0: tuple[int, int] = Field((1, 4), description="k_t range (inclusive) of simple rows")
    complex_l0: tuple[int, int] = Field((20, 60), description="k_t range (inclusive) of complex rows")
    dtype: Literal["float16", "float32"] = "float32"
    chunk_rows: int = Field(4096, ge=1)
    shard_rows: int = Field(65536, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("simple_l0", "complex_l0")
    @classmethod
    def _l0_range(cls, value: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        lo, hi = value
        if not 1 <= lo <= hi:
            raise ValueError(f"the range [{lo}, {hi}] must satisfy 1 ≤ low ≤ high")
        share = info.data.get("simple_fraction", 0.5)
        used = share > 0 if info.field_name == "simple_l0" else share < 1
        n = info.data.get("features")
        if used and n is not None and hi > n:
            raise ValueError(f"it reaches {hi} active features but there are only features = {n}; lower it or "
                             "raise features")
        return value

    @field_validator("shard_rows")
    @classmethod
    def _whole_chunks(cls, value: int, info: ValidationInfo) -> int:
        chunk = info.data.get("chunk_rows")
        if chunk and value % chunk:
            raise ValueError(f"it must be a multiple of chunk_rows = {chunk}")
        return value


#: Keys that only say where to write (not what): left out of the config hash.
WHERE_KEYS = ("output", "name", "storage_options")


def data_key(cfg: SynthConfig) -> dict[str, Any]:
    """The part of the config that determines the stored bytes (recorded in the manifest)."""
    dumped = cfg.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if k not in WHERE_KEYS}


def config_hash(cfg: SynthConfig) -> str:
    """sha256 (hex) of the canonical JSON of :func:`data_key`."""
    return hashlib.sha256(json.dumps(data_key(cfg), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_url(cfg: SynthConfig) -> str:
    """``<output>/<name or synth-d<d>-n<features>>-<8 hex of the config hash>``."""
    from store.io import join_url

    return join_url(cfg.output, f"{cfg.name or f'synth-d{cfg.d}-n{cfg.features}'}-{config_hash(cfg)[:8]}")


# ---------------------------------------------------------------------------------- the model


def true_features(cfg: SynthConfig) -> np.ndarray:
    """F (n, d) float32 with unit rows (module docstring: features)."""
    rng = np.random.default_rng([cfg.seed, _FEATURE_TAG])
    own = rng.standard_normal((cfg.features, cfg.d))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    if cfg.group_size > 1 and cfg.group_cosine > 0:
        groups = rng.standard_normal((-(-cfg.features // cfg.group_size), cfg.d))
        groups /= np.linalg.norm(groups, axis=1, keepdims=True)
        parent = groups[np.arange(cfg.features) // cfg.group_size]
        own = math.sqrt(cfg.group_cosine) * parent + math.sqrt(1 - cfg.group_cosine) * own  # √ρ G + √(1−ρ) R
    return (own / np.linalg.norm(own, axis=1, keepdims=True)).astype(np.float32)


def firing_probabilities(cfg: SynthConfig) -> np.ndarray:
    """p_i ∝ (i + 1)^(−exponent), summing to 1."""
    p = np.arange(1, cfg.features + 1, dtype=np.float64) ** -cfg.frequency_exponent
    return p / p.sum()


@dataclass
class Block:
    """Rows of one generation block: x (B, d) float32, k_t (B,), supports in CSR (indptr, indices)."""

    acts: np.ndarray
    true_l0: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray


def draw_block(cfg: SynthConfig, features: np.ndarray, p: np.ndarray, block: int) -> Block:
    """Block ``block`` of rows [block·4096, min((block+1)·4096, rows)), from a generator seeded by (seed, block)."""
    rows = min(BLOCK_ROWS, cfg.rows - block * BLOCK_ROWS)
    rng = np.random.default_rng([cfg.seed, _ROW_TAG, block])
    simple = rng.random(rows) < cfg.simple_fraction
    k = np.where(simple, rng.integers(cfg.simple_l0[0], cfg.simple_l0[1] + 1, rows),
                 rng.integers(cfg.complex_l0[0], cfg.complex_l0[1] + 1, rows))
    k_max = int(k.max())
    keys = rng.exponential(size=(rows, cfg.features)) / p  # exponential race: the k_t smallest e_i/p_i win
    top = np.argpartition(keys, k_max - 1, axis=1)[:, :k_max] if k_max < cfg.features else \
        np.broadcast_to(np.arange(cfg.features), (rows, cfg.features))
    order = np.argsort(np.take_along_axis(keys, top, axis=1), axis=1)
    chosen = np.take_along_axis(top, order, axis=1)  # (rows, k_max) by increasing key
    keep = np.arange(k_max)[None, :] < k[:, None]  # row-major: the first k_t of each row
    sigma = cfg.magnitude_sigma
    mags = cfg.magnitude_mean * np.exp(sigma * rng.standard_normal((rows, k_max)) - sigma**2 / 2)
    indptr = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    codes = scipy.sparse.csr_matrix((mags[keep], chosen[keep], indptr), shape=(rows, cfg.features))
    acts = np.asarray(codes @ features, dtype=np.float64)  # Σ_{i∈S_t} c_ti F_i
    acts += rng.standard_normal((rows, cfg.d)) * (cfg.noise / math.sqrt(cfg.d))  # + ε_t
    indices = np.sort(np.where(keep, chosen, cfg.features), axis=1)[keep]  # each row's features, ascending
    return Block(acts.astype(np.float32), k.astype(np.int16), indptr, indices.astype(np.int32))


# ---------------------------------------------------------------------------------- writing


@dataclass
class SynthResult:
    """What ``dynsae synth`` reports."""

    url: str
    rows: int
    seconds: float
    skipped: bool = False

    @property
    def throughput(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def build_manifest(cfg: SynthConfig) -> Any:
    """The dataset's manifest (rows and stats are filled in at seal)."""
    from harvester.job import harvester_version
    from store import DatasetManifest

    return DatasetManifest(
        d=cfg.d, dtype=cfg.dtype, shard_rows=cfg.shard_rows, chunk_rows=cfg.chunk_rows, context_length=1,
        model={"name": "synthetic", "kind": "synthetic"},
        hook={"layer": 0, "site": "resid_pre", "name": "synthetic"},
        source={"name": "synthetic", "kind": "synthetic"},
        split={"fraction": cfg.eval_fraction, "seed": cfg.seed},
        extra_columns={TRUE_L0: "int16"}, generator=data_key(cfg),
        harvester_version=harvester_version(), config_hash=config_hash(cfg),
    )


def eval_row_mask(cfg: SynthConfig) -> np.ndarray:
    """(rows,) bool: the rows of the dataset's eval split (its chunk rule, :mod:`store.split`)."""
    from store.split import eval_chunk_mask

    n_chunks = -(-cfg.rows // cfg.chunk_rows)
    return np.repeat(eval_chunk_mask(n_chunks, cfg.eval_fraction, cfg.seed), cfg.chunk_rows)[: cfg.rows]


def synthesize(cfg: SynthConfig, progress: bool = True) -> SynthResult:
    """Generate (or resume, or find already sealed) the dataset described by ``cfg``."""
    from tqdm.auto import tqdm

    from store import DatasetWriter

    t0 = time.perf_counter()
    url = dataset_url(cfg)
    so = cfg.storage_options or None
    writer = DatasetWriter.create(url, build_manifest(cfg), overwrite=False, storage_options=so)
    if writer.manifest.sealed:
        return SynthResult(url, int(writer.manifest.rows or 0), time.perf_counter() - t0, skipped=True)
    committed = writer.committed()
    writer.remove_partial_writes()
    features, p = true_features(cfg), firing_probabilities(cfg)
    is_eval = eval_row_mask(cfg)
    eval_rows: list[np.ndarray] = []  # eval rows' global indices, k_t and supports, block by block
    eval_l0: list[np.ndarray] = []
    eval_idx: list[np.ndarray] = []
    acts_buf = np.zeros((0, cfg.d), np.float32)
    l0_buf = np.zeros(0, np.int16)
    shard = 0
    bar = tqdm(total=cfg.rows, unit="row", unit_scale=True, desc=f"synth {url.rsplit('/', 1)[-1]}",
               disable=not progress, smoothing=0.1)
    n_blocks = -(-cfg.rows // BLOCK_ROWS)
    for b in range(n_blocks):
        blk = draw_block(cfg, features, p, b)
        start = b * BLOCK_ROWS
        sel = np.flatnonzero(is_eval[start:start + len(blk.true_l0)])
        if sel.size:
            eval_rows.append(start + sel)
            eval_l0.append(blk.true_l0[sel].astype(np.int64))
            eval_idx.append(np.concatenate([blk.indices[blk.indptr[i]:blk.indptr[i + 1]] for i in sel]))
        acts_buf, l0_buf = np.concatenate([acts_buf, blk.acts]), np.concatenate([l0_buf, blk.true_l0])
        while len(l0_buf) >= cfg.shard_rows or (b == n_blocks - 1 and len(l0_buf)):
            n = min(cfg.shard_rows, len(l0_buf))
            if shard not in committed:
                first = shard * cfg.shard_rows
                writer.write_shard(shard, acts_buf[:n], seq_ids=np.arange(first, first + n),
                                   positions=np.ones(n, np.int16), extra={TRUE_L0: l0_buf[:n]})
            acts_buf, l0_buf = acts_buf[n:], l0_buf[n:]
            shard += 1
        bar.update(len(blk.true_l0))
    bar.close()
    support_l0 = np.concatenate(eval_l0) if eval_l0 else np.zeros(0, np.int64)
    ground_truth.save(url, ground_truth.GroundTruth(
        features=features,
        support_rows=np.concatenate(eval_rows) if eval_rows else np.zeros(0, np.int64),
        support_indptr=np.concatenate([[0], np.cumsum(support_l0)]).astype(np.int64),
        support_indices=np.concatenate(eval_idx) if eval_idx else np.zeros(0, np.int32)), so)
    writer.seal(total_rows=cfg.rows)
    return SynthResult(url, cfg.rows, time.perf_counter() - t0)

