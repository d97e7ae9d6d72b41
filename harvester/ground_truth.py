"""``ground_truth.safetensors``: the known dictionary of a synthetic dataset and which of its features
each eval row holds (written by :mod:`harvester.synth`, read by the evaluator's ground-truth metrics,
definitions in ``docs/metrics.md``).

The file lies at the dataset root (``<dataset>/ground_truth.safetensors``), so anything holding the
dataset URL finds it. Tensors:

* ``features`` (n, d) float32 — the true features F_i, unit rows;
* ``support_rows`` (R,) int64 — the global row index (= the row's ``seq_id``: every synthetic row is
  its own sequence) of each eval row, ascending;
* ``support_indptr`` (R + 1,) int64 and ``support_indices`` (nnz,) int32 — the supports S_t of those
  rows in CSR form: row ``support_rows[r]`` holds features ``support_indices[indptr[r]:indptr[r+1]]``.

Only eval rows are listed (what the metrics read; a tenth of the size of every row's support). The
per-row count |S_t| of *every* row is the dataset's ``true_l0`` column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from store import io
from store.errors import UserError

FILE = "ground_truth.safetensors"
FORMAT = "dynsae-ground-truth-1"


@dataclass
class GroundTruth:
    """The true features and the eval rows' supports (module docstring)."""

    features: np.ndarray  # (n, d) float32, unit rows
    support_rows: np.ndarray  # (R,) int64, ascending
    support_indptr: np.ndarray  # (R + 1,) int64
    support_indices: np.ndarray  # (nnz,) int32

    @property
    def n(self) -> int:
        """Number of true features."""
        return int(self.features.shape[0])

    def true_l0(self) -> np.ndarray:
        """|S_t| of each listed row (R,)."""
        return np.diff(self.support_indptr)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``support_rows`` of the global row indices ``rows`` (UserError if one is not listed)."""
        pos = np.searchsorted(self.support_rows, rows)
        pos = np.minimum(pos, max(len(self.support_rows) - 1, 0))
        if len(self.support_rows) == 0 or not np.array_equal(self.support_rows[pos], rows):
            raise UserError("the eval rows read are not the rows listed in the dataset's ground_truth.safetensors; "
                            "the dataset and its ground truth disagree, regenerate it with `dynsae synth`.")
        return pos

    def presence(self, rows: np.ndarray) -> torch.Tensor:
        """(B, n) bool: feature i is present in row ``rows[b]``."""
        pos = self.lookup(rows)
        starts, stops = self.support_indptr[pos], self.support_indptr[pos + 1]
        counts = stops - starts
        flat = np.concatenate([self.support_indices[a:b] for a, b in zip(starts, stops)]) if len(pos) else \
            np.zeros(0, np.int32)
        out = torch.zeros(len(pos), self.n, dtype=torch.bool)
        out[torch.from_numpy(np.repeat(np.arange(len(pos)), counts)), torch.from_numpy(flat.astype(np.int64))] = True
        return out


def url_of(dataset_url: str) -> str:
    """``<dataset>/ground_truth.safetensors``."""
    return io.join_url(dataset_url, FILE)


def save(dataset_url: str, truth: GroundTruth, storage_options: io.StorageOptions = None) -> None:
    """Write the truth next to the dataset's arrays (atomically)."""
    io.save_safetensors(url_of(dataset_url), {
        "features": torch.from_numpy(np.ascontiguousarray(truth.features, dtype=np.float32)),
        "support_rows": torch.from_numpy(np.ascontiguousarray(truth.support_rows, dtype=np.int64)),
        "support_indptr": torch.from_numpy(np.ascontiguousarray(truth.support_indptr, dtype=np.int64)),
        "support_indices": torch.from_numpy(np.ascontiguousarray(truth.support_indices, dtype=np.int32)),
    }, storage_options, metadata={"format": FORMAT})


def load(dataset_url: str, d: int, storage_options: io.StorageOptions = None) -> GroundTruth | None:
    """The truth of the dataset at ``dataset_url`` (None when it has none); a file that is not a
    readable, consistent ground truth of dimension ``d`` is one UserError naming it."""
    path = url_of(dataset_url)
    if not io.exists(path, storage_options):
        return None
    try:
        state = io.load_safetensors(path, storage_options) or {}
    except Exception as err:  # noqa: BLE001 - any parse failure is the same sentence
        raise UserError(f"{path} is not a readable safetensors file ({type(err).__name__}); regenerate the dataset "
                        "with `dynsae synth` or delete the file.") from None
    names = ("features", "support_rows", "support_indptr", "support_indices")
    missing = [k for k in names if k not in state]
    if missing:
        raise UserError(f"{path} lacks the tensor(s) {missing}; it is not a dynsae ground truth, regenerate the "
                        "dataset with `dynsae synth`.")
    f = state["features"]
    if f.dim() != 2 or f.shape[1] != d or f.shape[0] == 0:
        raise UserError(f"{path} holds features of shape {tuple(f.shape)} but the dataset has d = {d}; the file "
                        "belongs to another dataset, regenerate it with `dynsae synth`.")
    truth = GroundTruth(f.float().numpy(), state["support_rows"].numpy().astype(np.int64),
                        state["support_indptr"].numpy().astype(np.int64),
                        state["support_indices"].numpy().astype(np.int32))
    ptr = truth.support_indptr
    ok = (ptr.ndim == 1 and len(ptr) == len(truth.support_rows) + 1 and (len(ptr) == 0 or ptr[0] == 0)
          and bool(np.all(np.diff(ptr) >= 0)) and ptr[-1] == len(truth.support_indices)
          and (truth.support_indices.size == 0 or (truth.support_indices.min() >= 0
                                                   and truth.support_indices.max() < truth.n))
          and bool(np.all(np.diff(truth.support_rows) > 0)))
    if not ok:
        raise UserError(f"{path} has an inconsistent support (indptr, rows or feature indices out of range); "
                        "regenerate the dataset with `dynsae synth`.")
    return truth
