"""A run directory on any fsspec URL, written so that nothing is reported complete when it isn't.

Layout of ``<runs_root>/[<sweep>/]<name>/``:

* ``config.json``      the run config (``TrainConfig``) with ``sae`` resolved (``d`` included), the row
                       filter's description and the dataset's manifest hash. ``trainer.sae.load(run_dir)``
                       reads its ``"sae"`` key.
* ``sae.safetensors``  the weights as of the last checkpoint (written by ``SAE.save_weights``).
* ``trainer_state.pt`` the commit record of a checkpoint: model + optimizer state, step, tokens seen,
                       dead-concept counters, RNG states, data cursor (the loader batch index of the next
                       step), schedule, ``finished``. Resume reads weights from here, never from
                       ``sae.safetensors``, so the pair can never be out of step.
* ``metrics.jsonl``    one JSON row per logged step (rows past the checkpoint are dropped on resume).
* ``eval.json``        written by the evaluator (``dynsae sweep`` or ``dynsae eval``).

Every file is written to a temporary key next to it and then moved into place (a rename on local
disks, a server-side copy on object stores), and a checkpoint writes ``trainer_state.pt`` last: a
crash at any point leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import io as io_module
import json
from typing import Any

import torch

from store import io

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


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
        """Rewrite ``metrics.jsonl`` (atomically) with ``rows``."""
        self.write_bytes(METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        raw = self.read_bytes(METRICS_FILE)
        if not raw:
            return []
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]

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
