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
* ``eval.json``        written by the evaluator (or the sweep's built-in fallback).

Every file is written to a temporary key next to it and then moved into place (a rename on local
disks, a server-side copy on object stores), and a checkpoint writes ``trainer_state.pt`` last: a
crash at any point leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from typing import Any

import torch

from store.urls import filesystem, join_url

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
FAULT_MARKER = "fault_injected"


class RunDir:
    """Atomic reads and writes of one run directory."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url, storage_options)
        self.path = self.path.rstrip("/")

    def key(self, name: str) -> str:
        """Filesystem path of a file in the run directory."""
        return f"{self.path}/{name}"

    def file_url(self, name: str) -> str:
        """URL of a file in the run directory."""
        return join_url(self.url, name)

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.key(name)))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically: temporary key, then move into place."""
        self.fs.makedirs(self.path, exist_ok=True)
        tmp = self.key(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, self.key(name))

    def read_bytes(self, name: str) -> bytes | None:
        """Contents of ``name`` or None if it does not exist."""
        try:
            with self.fs.open(self.key(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, name: str) -> Any | None:
        raw = self.read_bytes(name)
        return None if raw is None else json.loads(raw)

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
        buf = io.BytesIO()
        torch.save(state, buf)
        self.write_bytes(STATE_FILE, buf.getvalue())

    def load_state(self) -> dict[str, Any] | None:
        """The last committed checkpoint, or None if the run has none."""
        raw = self.read_bytes(STATE_FILE)
        if raw is None:
            return None
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)

    def save_weights(self, sae: torch.nn.Module) -> None:
        """Write ``sae.safetensors`` atomically through the SAE's own ``save_weights``."""
        with tempfile.TemporaryDirectory(prefix="dynsae-w") as tmp:
            sae.save_weights(tmp)
            with open(os.path.join(tmp, WEIGHTS_FILE), "rb") as fh:
                self.write_bytes(WEIGHTS_FILE, fh.read())


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
