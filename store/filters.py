"""Row filter shared by the trainer and the evaluator (so both see the same rows).

Rows are dropped when their position is in ``exclude_positions`` (default ``[0]``: the
first token / the CLS token, whose activations are outliers) or, when
``max_norm_multiple`` is set, when ‖x‖₂ > max_norm_multiple · median‖x‖ (median from the
manifest statistics).
"""

from __future__ import annotations

import torch
from pydantic import Field

from store.config import StrictModel
from store.errors import UserError


class RowFilter(StrictModel):
    """Which rows to keep; ``keep_mask`` is applied identically by trainer and evaluator."""

    exclude_positions: list[int] = Field(default_factory=lambda: [0])
    max_norm_multiple: float | None = Field(default=None, gt=0)

    def keep_mask(self, acts: torch.Tensor, positions: torch.Tensor | None,
                  median_norm: float | None) -> torch.Tensor:
        """Bool mask (B,) of rows to keep."""
        keep = torch.ones(acts.shape[0], dtype=torch.bool, device=acts.device)
        if self.exclude_positions and positions is not None:
            excluded = torch.tensor(self.exclude_positions, dtype=torch.int64, device=acts.device)
            keep &= ~torch.isin(positions.to(device=acts.device, dtype=torch.int64), excluded)
        if self.max_norm_multiple is not None:
            if median_norm is None:
                raise UserError(
                    f"max_norm_multiple={self.max_norm_multiple} needs the dataset's median norm, but the "
                    "dataset has no statistics; re-seal it with stats or unset max_norm_multiple."
                )
            norms = torch.linalg.vector_norm(acts.float(), dim=-1)
            keep &= norms <= self.max_norm_multiple * float(median_norm)  # ‖x‖ ≤ c · median‖x‖
        return keep

    def describe(self) -> str:
        """One line describing the filter (recorded in run configs)."""
        parts = []
        if self.exclude_positions:
            parts.append(f"drop positions {sorted(self.exclude_positions)}")
        if self.max_norm_multiple is not None:
            parts.append(f"drop rows with norm > {self.max_norm_multiple:g} x median norm")
        return "; ".join(parts) if parts else "keep all rows"
