"""Reading a run and its dataset for the concept browser: run config, SAE, row blocks, row gathers.

Decisions:

* The stream reads the split's rows **in store order** (contiguous row ranges of the split,
  whole chunks, hence whole sequences/images), not through the shuffling
  :class:`store.ActivationLoader`, because the browser must know each row's global index to
  fetch its context later. The eval chunks are spread evenly over the dataset
  (:mod:`store.split`), so the first N eval rows are a fair sample.
* Row filters are the run's own (the ``filter`` its run config records), applied exactly as the
  trainer applies them (:class:`store.filters.RowFilter`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from store.errors import UserError

READ_ROWS = 16384  # rows per store read (rounded to whole sequences)


@dataclass
class RunInfo:
    """A trained run: where it lives, its config, its SAE and its dataset."""

    url: str
    config: Any  # trainer.run_format.RunConfig
    sae: Any
    dataset: Any
    row_filter: Any
    median_norm: float | None

    @property
    def manifest(self) -> Any:
        return self.dataset.manifest

    @property
    def is_vision(self) -> bool:
        """Vision datasets come from open_clip models (or carry class labels per image; labelled text
        carries them per document and says so with ``documents``)."""
        man = self.manifest
        return man.model.kind == "open_clip" or (man.class_names is not None and not man.documents)

    @property
    def m(self) -> int:
        return int(self.sae.config.m)


def open_run(run_url: str, dataset_url: str | None = None, device: str = "cpu",
             storage_options: dict[str, Any] | None = None) -> RunInfo:
    """Load a run's config, SAE (eval mode, on ``device``) and dataset, plus its row filter."""
    from evaluator.foreign import open_sae
    from store import open_dataset

    config, sae = open_sae(run_url, dataset_url, storage_options)  # a run, or a SAELens/sparsify folder
    url = config.dataset
    sae = sae.eval().to(device)
    dataset = open_dataset(url, storage_options=storage_options)
    if int(dataset.manifest.d) != int(sae.config.d):
        raise UserError(f"dataset {url} has d={dataset.manifest.d} but the SAE of run {run_url} expects "
                        f"d={sae.config.d}; pass the dataset the run was trained on.")
    row_filter = config.filter.row_filter()
    stats = dataset.manifest.stats
    return RunInfo(run_url, config, sae, dataset, row_filter, stats.median_norm if stats else None)


def split_ranges(dataset: Any, split: str) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges of ``split`` in store order."""
    return [(int(a), int(b)) for a, b in dataset.split_row_ranges(split)]


def plan_blocks(ranges: list[tuple[int, int]], max_rows: int, unit_rows: int,
                block_rows: int = READ_ROWS) -> list[tuple[int, int]]:
    """Cut the ranges into read blocks of ≤ block_rows (multiples of ``unit_rows``), ``max_rows`` in all.

    ``max_rows`` is rounded down to whole units (images for vision) but never below one unit.
    """
    block_rows = max(unit_rows, block_rows // unit_rows * unit_rows)
    left = max(unit_rows, max_rows // unit_rows * unit_rows) if unit_rows > 1 else max_rows
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        pos = start
        while pos < stop and left > 0:
            take = min(block_rows, stop - pos, left)
            out.append((pos, pos + take))
            pos += take
            left -= take
        if left <= 0:
            break
    return out


def read_block(dataset: Any, start: int, stop: int, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns of rows [start, stop) as numpy arrays."""
    return {name: dataset.read(start, stop, name) for name in columns}


def iter_blocks(dataset: Any, blocks: list[tuple[int, int]], columns: tuple[str, ...]
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(start row, columns) for each block, the next block read in a background thread meanwhile."""
    if not blocks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read_block, dataset, *blocks[0], columns)
        for i, (start, _stop) in enumerate(blocks):
            data = future.result()
            if i + 1 < len(blocks):
                future = pool.submit(read_block, dataset, *blocks[i + 1], columns)
            yield start, data


def read_rows(dataset: Any, rows: np.ndarray, column: str) -> np.ndarray:
    """Values of ``column`` at the sorted unique global ``rows`` (reads each touched chunk once)."""
    if rows.size == 0:
        width = (int(dataset.manifest.d),) if column == "acts" else ()
        return np.zeros((0, *width), dtype=dataset.column_dtype(column))
    # read contiguous spans [lo, hi] that cover the rows, merging gaps shorter than a chunk
    chunk = int(dataset.manifest.chunk_rows)
    breaks = np.flatnonzero(np.diff(rows) > chunk) + 1
    parts = []
    for span in np.split(rows, breaks):
        lo, hi = int(span[0]), int(span[-1]) + 1
        block = dataset.read(lo, hi, column)
        parts.append(block[span - lo])
    return np.concatenate(parts, axis=0)


def keep_mask(run: RunInfo, acts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The run's row filter on a block (True = the row is used)."""
    return run.row_filter.keep_mask(acts, positions, run.median_norm)


@torch.no_grad()
def encode_dense(sae: Any, acts: torch.Tensor, max_elems: int = 1 << 25) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, dense codes (b, M) float32 on CPU) for ``acts`` in pieces of ≤ ``max_elems`` code entries."""
    m = int(sae.config.m)
    step = max(1, max_elems // max(m, 1))
    device = next(sae.parameters()).device
    for lo in range(0, acts.shape[0], step):
        x = acts[lo:lo + step].to(device=device, dtype=torch.float32)
        yield lo, sae.encode(x).to_dense().detach().float().cpu()


def encode_rows(sae: Any, acts: torch.Tensor, max_elems: int = 1 << 25) -> torch.Tensor:
    """Dense codes (B, M) of all rows (for small inputs: compare view, tests)."""
    parts = [codes for _lo, codes in encode_dense(sae, acts, max_elems)]
    return torch.cat(parts) if parts else torch.zeros(0, int(sae.config.m))
