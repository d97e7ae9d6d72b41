"""The one batch type of the data path: :class:`Batch`, what the loader yields and the trainer takes.

A batch holds the requested row columns of B rows, each in the dtype the dataset stores
(acts float16 or float32, token_ids int32, seq_ids int64, positions int16, a dataset's extra
integer columns such as a synthetic dataset's ``true_l0`` in ``extra``); a column not requested
is ``None`` (or absent from ``extra``). Nothing on the way casts: the
loader hands out the stored bytes, the feeder puts the same record into Ray's object store, and
whoever computes casts once where it computes (:meth:`Batch.acts_on`: on a GPU after the copy,
at half the bytes for a float16 dataset; on the CPU inside the step).

A batch *holds* numpy arrays and hands its columns out as torch tensors (``batch.acts``,
``batch.columns``: zero-copy views, made when asked for; ``batch.arrays``: the arrays). So the
processes that only move batches — the loader's threads, the sweep's feeder actor — never import
torch (~3 s of CPU per process), and only a process that computes pays for it.

Through Ray (the sweep's feeder) a batch travels as its numpy arrays, so its columns are read
zero-copy out of the object store on the trainer's side: such a batch's tensors are read-only
views of shared memory, and its consumers never write into a batch (cast or index it, which
copies).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: the standard columns, in field order (any other column is an ``extra`` one)
STANDARD_COLUMNS = ("acts", "token_ids", "seq_ids", "positions")


class Batch:
    """B rows of the requested columns, in the dataset's stored dtypes (``None``: not requested).

    ``acts`` (B, d) float16 | float32, ``token_ids`` (B,) int32, ``seq_ids`` (B,) int64, ``positions``
    (B,) int16, ``extra``: the dataset's extra columns by name. Columns may be given as numpy arrays
    or CPU tensors (kept as numpy views of the same memory)."""

    __slots__ = ("_arrays",)

    def __init__(self, acts: Any = None, token_ids: Any = None, seq_ids: Any = None, positions: Any = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        standard = {"acts": acts, "token_ids": token_ids, "seq_ids": seq_ids, "positions": positions}
        arrays = {name: _as_array(col) for name, col in standard.items() if col is not None}
        arrays.update({name: _as_array(col) for name, col in (extra or {}).items()})
        self._arrays: Mapping[str, np.ndarray] = MappingProxyType(arrays)

    @classmethod
    def of(cls, columns: Mapping[str, Any]) -> Batch:
        """The batch of ``columns`` by name (standard columns to their fields, the rest to ``extra``)."""
        return cls(**{k: v for k, v in columns.items() if k in STANDARD_COLUMNS},
                   extra={k: v for k, v in columns.items() if k not in STANDARD_COLUMNS})

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """The present columns as numpy arrays, by name (standard order, then the extra columns)."""
        return self._arrays

    @property
    def columns(self) -> dict[str, Tensor]:
        """The present columns as tensors by name (standard order, then the extra columns)."""
        return {name: _tensor(a) for name, a in self._arrays.items()}

    @property
    def acts(self) -> Tensor | None:
        return self._column("acts")

    @property
    def token_ids(self) -> Tensor | None:
        return self._column("token_ids")

    @property
    def seq_ids(self) -> Tensor | None:
        return self._column("seq_ids")

    @property
    def positions(self) -> Tensor | None:
        return self._column("positions")

    @property
    def extra(self) -> dict[str, Tensor]:
        """The dataset's extra columns as tensors, by name."""
        return {name: _tensor(a) for name, a in self._arrays.items() if name not in STANDARD_COLUMNS}

    @property
    def rows(self) -> int:
        return int(next(iter(self._arrays.values())).shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the columns as they travel (the stored dtypes)."""
        return sum(a.nbytes for a in self._arrays.values())

    def head(self, n: int) -> Batch:
        """The first ``n`` rows (views)."""
        return Batch.of({name: a[:n] for name, a in self._arrays.items()})

    def acts_on(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        """The activations on ``device`` as ``dtype`` (float32 unless given): copied at the stored width,
        then cast there (the one cast of the data path; a new tensor unless already that dtype on that
        device)."""
        import torch

        acts = self.acts
        if acts is None:
            raise ValueError("this batch carries no acts column; load it with columns including 'acts'")
        return acts.to(device, non_blocking=True).to(torch.float32 if dtype is None else dtype)

    def _column(self, name: str) -> Tensor | None:
        array = self._arrays.get(name)
        return None if array is None else _tensor(array)

    def __reduce__(self) -> tuple:
        """Pickled (Ray's object store) as numpy arrays: protocol-5 buffers, read zero-copy."""
        return Batch.of, (dict(self._arrays),)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(a.shape)} {a.dtype}" for k, a in self._arrays.items())
        return f"Batch({shapes})"


def _as_array(column: Any) -> np.ndarray:
    """A column as a numpy array over the same memory (a CPU tensor's ``numpy()`` view)."""
    return column if isinstance(column, np.ndarray) else column.numpy()


def _tensor(array: np.ndarray) -> Tensor:
    """A tensor view of ``array`` (no copy; a read-only array from the object store too)."""
    import torch

    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # the object store's arrays are read-only; a batch is never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
