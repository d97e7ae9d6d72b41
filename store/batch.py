"""The one batch type of the data path: :class:`Batch`, what the loader yields and the trainer takes.

A batch holds the requested row columns of B rows, each in the dtype the dataset stores
(acts float16 or float32, token_ids int32, seq_ids int64, positions int16, a dataset's extra
integer columns such as a synthetic dataset's ``true_l0`` in ``extra``); a column not requested
is ``None`` (or absent from ``extra``). Nothing on the way casts: the
loader hands out the stored bytes, the feeder puts the same record into Ray's object store, and
whoever computes casts once where it computes (:meth:`Batch.acts_on`: on a GPU after the copy,
at half the bytes for a float16 dataset; on the CPU inside the step).

Through Ray (the sweep's feeder) a batch travels as numpy arrays, so its columns are read
zero-copy out of the object store on the trainer's side: such a batch's tensors are read-only
views of shared memory, and its consumers never write into a batch (cast or index it, which
copies).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """B rows of the requested columns, in the dataset's stored dtypes (``None``: not requested)."""

    acts: Tensor | None = None  # (B, d) float16 | float32
    token_ids: Tensor | None = None  # (B,) int32
    seq_ids: Tensor | None = None  # (B,) int64
    positions: Tensor | None = None  # (B,) int16
    extra: dict[str, Tensor] = field(default_factory=dict)  # the dataset's extra columns, by name

    @classmethod
    def of(cls, columns: dict[str, Tensor]) -> Batch:
        """The batch of ``columns`` by name (standard columns to their fields, the rest to ``extra``)."""
        named = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in columns.items() if k in named},
                   extra={k: v for k, v in columns.items() if k not in named})

    @property
    def columns(self) -> dict[str, Tensor]:
        """The present columns by name (field order, then the extra columns)."""
        standard = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in standard.items() if v is not None}, **self.extra}

    @property
    def rows(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the columns as they travel (the stored dtypes)."""
        return sum(t.element_size() * t.numel() for t in self.columns.values())

    def head(self, n: int) -> Batch:
        """The first ``n`` rows (views)."""
        return Batch.of({name: t[:n] for name, t in self.columns.items()})

    def acts_on(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The activations on ``device`` as ``dtype``: copied at the stored width, then cast there
        (the one cast of the data path; a new tensor unless already that dtype on that device)."""
        if self.acts is None:
            raise ValueError("this batch carries no acts column; load it with columns including 'acts'")
        return self.acts.to(device, non_blocking=True).to(dtype)

    def __reduce__(self) -> tuple:
        """Pickled (Ray's object store) as numpy arrays: protocol-5 buffers, read zero-copy."""
        return _from_numpy, ({name: t.numpy() for name, t in self.columns.items()},)


def _from_numpy(arrays: dict[str, np.ndarray]) -> Batch:
    """A :class:`Batch` over ``arrays`` without a copy (read-only arrays from the object store too)."""
    with warnings.catch_warnings():  # the object store's arrays are read-only; a batch is never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return Batch.of({name: torch.from_numpy(a) for name, a in arrays.items()})
