"""A run directory on any fsspec URL, written so that nothing is reported complete when it isn't.

The directory's files, their names and their record types are the run format
(:mod:`trainer.run_format`, written down in ``docs/run-format.md``); this module writes the
checkpoint: weights, metrics, then the commit record of the training state.

Every file is written to a temporary key next to it and then moved into place (a rename on local
disks, a server-side copy on object stores), and a checkpoint writes ``trainer_state.pt`` last: a
crash at any point leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import io as io_module
from typing import Any

import torch

from store import io
from trainer import run_format
from trainer.run_format import STATE_FILE


class RunDir:
    """Atomic reads and writes of one run directory (through :mod:`store.io`)."""

    def __init__(self, url: str, storage_options: io.StorageOptions = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options

    def file_url(self, name: str) -> str:
        """URL of a file in the run directory."""
        return io.join_url(self.url, name)

    def exists(self, name: str) -> bool:
        return io.exists(self.file_url(name), self.storage_options)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically: temporary key, then move into place."""
        io.write_bytes(self.file_url(name), data, self.storage_options)

    def read_bytes(self, name: str) -> bytes | None:
        """Contents of ``name`` or None if it does not exist."""
        return io.read_bytes(self.file_url(name), self.storage_options)

    def write_json(self, name: str, obj: Any) -> None:
        io.write_json(self.file_url(name), obj, self.storage_options)

    def read_json(self, name: str) -> Any | None:
        return io.read_json(self.file_url(name), self.storage_options)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the metrics file (atomically) with ``rows``."""
        run_format.write_metrics(self.url, rows, self.storage_options)

    def read_metrics(self) -> list[dict[str, Any]]:
        return [line.model_dump(mode="json") for line in run_format.read_metrics(self.url, self.storage_options)]

    def save_state(self, state: dict[str, Any]) -> None:
        """Write ``trainer_state.pt`` (the checkpoint's commit point)."""
        buf = io_module.BytesIO()
        torch.save(state, buf)
        self.write_bytes(STATE_FILE, buf.getvalue())

    def load_state(self) -> dict[str, Any] | None:
        """The last committed checkpoint, or None if the run has none."""
        raw = self.read_bytes(STATE_FILE)
        if raw is None:
            return None
        return torch.load(io_module.BytesIO(raw), map_location="cpu", weights_only=False)

    def save_weights(self, sae: torch.nn.Module) -> None:
        """Write ``sae.safetensors`` atomically through the SAE's own ``save_weights``."""
        sae.save_weights(self.url, self.storage_options)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch (torch CPU/CUDA, numpy, python)."""
    import random

    import numpy as np

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
