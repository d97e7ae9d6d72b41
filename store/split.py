"""Chunk-level train/eval split.

Chunks hold whole sequences, so splitting by chunk never cuts a sequence in two.
The rule (``eval_chunk_mask``) is a seeded, stratified draw: the chunk axis is cut
into consecutive intervals of length 1/fraction and one point is drawn uniformly
in each, ``t_j = (j + u_j) / fraction`` with ``u_j ~ U[0, 1)`` from a generator
seeded by ``seed``; chunk ``floor(t_j)`` is an eval chunk. Properties:

* deterministic in ``(n_chunks, fraction, seed)``;
* prefix-stable: the mask of the first m chunks does not depend on how many chunks
  follow (a partial dataset agrees with the sealed one);
* the eval share is ``fraction`` up to about one chunk (two draws landing in the same
  chunk push the later one to the next chunk), spread evenly over the dataset
  (harvest order follows the corpus, so a contiguous eval block would be biased);
* at least one eval chunk when ``fraction > 0`` and there are ≥ 2 chunks.
"""

from __future__ import annotations

import math

import numpy as np


def eval_chunk_mask(n_chunks: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of length ``n_chunks``: True where the chunk belongs to the eval split."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"eval fraction must be in [0, 1], got {fraction}")
    mask = np.zeros(n_chunks, dtype=bool)
    if n_chunks == 0 or fraction == 0.0:
        return mask
    if fraction == 1.0:
        mask[:] = True
        return mask
    n_points = int(math.ceil(n_chunks * fraction)) + 1
    u = np.random.default_rng([int(seed), 0x5E7A1]).random(n_points)
    t = (np.arange(n_points) + u) / fraction  # t_j = (j + u_j) / fraction
    j = np.arange(n_points)
    # distinct chunks: idx_j = max(floor(t_j), idx_{j-1} + 1) (depends only on earlier points)
    idx = j + np.maximum.accumulate(np.floor(t).astype(np.int64) - j)
    mask[idx[idx < n_chunks]] = True
    if not mask.any() and n_chunks >= 2:
        mask[min(int(idx[0]), n_chunks - 1)] = True
    return mask


def chunks_for_split(n_chunks: int, fraction: float, seed: int, split: str) -> np.ndarray:
    """Chunk indices of ``split`` ∈ {"train", "eval", "all"} (ascending)."""
    if split == "all":
        return np.arange(n_chunks, dtype=np.int64)
    mask = eval_chunk_mask(n_chunks, fraction, seed)
    if split == "eval":
        return np.flatnonzero(mask).astype(np.int64)
    if split == "train":
        return np.flatnonzero(~mask).astype(np.int64)
    from store.errors import UserError

    raise UserError(f"split {split!r} is not one of 'train', 'eval', 'all'; pick one of those.")
