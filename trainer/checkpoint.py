"""A run directory on any fsspec URL, written so that nothing is reported complete when it isn't.

Layout of ``<runs_root>/[<sweep>/]<name>/``:

* ``config.json``      the run config (``TrainConfig``) with ``sae`` resolved (``d`` included), the row
                       filter's description and the dataset's manifest hash. ``trainer.sae.load(run_dir)``
                       reads its ``"sae"`` key.
* ``sae.safetensors``  the weights as of the last checkpoint (written by ``SAE.save_weights``).
* ``trainer_state.pt`` the commit record of a checkpoint: model + optimizer state, step, tokens seen,
                       dead-concept counters, RNG states, data cursor (the loader batch index of the next
                       step), schedule, ``finished``. Resume reads weights from here, never from
                       ``sae.safetensors``, so the pair can never be out of step. It holds tensors and
                       plain values only (RNG states as uint8 tensors) and is read with
                       ``torch.load(weights_only=True)``: a file planted on a shared bucket cannot run code.
* ``metrics.jsonl``    one JSON row per logged step (rows past the checkpoint are dropped on resume).
* ``eval.json``        written by the evaluator (``dynsae sweep`` or ``dynsae eval``).

Every file is written to a temporary key next to it and then moved into place (a rename on local
disks after an fsync, a server-side copy on object stores), and a checkpoint writes ``trainer_state.pt``
last: a crash at any point leaves the previous checkpoint intact and readable. A file that cannot be
read (truncated, corrupt, not ours) is one :class:`~store.errors.UserError` sentence naming it.
"""

from __future__ import annotations

import io as io_module
import json
import pickle
from typing import Any

import numpy as np
import torch

from store import io
from store.errors import UserError

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
#: Format of ``trainer_state.pt``: 2 = tensors and plain values only (loads with ``weights_only=True``).
STATE_VERSION = 2
STATE_KEYS = ("version", "step", "tokens", "tokens_trained", "data_cursor", "model", "optimizer",
              "since_fired", "rng")


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
        """The rows of ``metrics.jsonl``; a line that is not a JSON object is a UserError naming it."""
        raw = self.read_bytes(METRICS_FILE)
        if not raw:
            return []
        rows = []
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise UserError(f"line {number} of {self.file_url(METRICS_FILE)} is not a JSON object; the file "
                                "is corrupt — delete that line (or the file) and resume.")
            rows.append(row)
        return rows

    def save_state(self, state: dict[str, Any]) -> None:
        """Write ``trainer_state.pt`` (the checkpoint's commit point)."""
        buf = io_module.BytesIO()
        torch.save(state, buf)
        self.write_bytes(STATE_FILE, buf.getvalue())

    def load_state(self) -> dict[str, Any] | None:
        """The last committed checkpoint, or None if the run has none. Only tensors and plain values are
        accepted (``weights_only=True``): a file holding anything else is refused unread."""
        raw = self.read_bytes(STATE_FILE)
        if raw is None:
            return None
        url = self.file_url(STATE_FILE)
        try:
            state = torch.load(io_module.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{url} holds Python objects other than tensors and plain values, which dynsae never "
                            "writes and refuses to load (they could run code); delete the file or the run "
                            "directory to start over.") from None
        except Exception as err:  # noqa: BLE001 - a damaged file of any kind is one sentence
            raise UserError(f"{url} cannot be read ({type(err).__name__}); it is truncated or corrupt — restore it "
                            "or delete the run directory to start over.") from None
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else None
            raise UserError(f"{url} is not a version-{STATE_VERSION} dynsae checkpoint (version {found!r}"
                            f"{', lacks ' + ', '.join(missing) if missing else ''}); delete the run directory to "
                            "start over.")
        return state

    def save_weights(self, sae: torch.nn.Module) -> None:
        """Write ``sae.safetensors`` atomically through the SAE's own ``save_weights``."""
        sae.save_weights(self.url, self.storage_options)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch (torch CPU/CUDA, numpy, python), as tensors and plain values
    (the numpy and python Mersenne Twister keys as uint8 tensors) so the checkpoint needs no pickle."""
    import random

    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": _bytes_tensor(np.asarray(keys, dtype="<u4")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": _bytes_tensor(np.asarray(internal, dtype="<u4")),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _bytes_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(values.tobytes(), dtype=np.uint8).copy())


def _uint32s(t: torch.Tensor) -> np.ndarray:
    return np.frombuffer(t.numpy().tobytes(), dtype="<u4")


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import random

    py, npy = state["python"], state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", _uint32s(npy["keys"]).astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    random.setstate((py["version"], tuple(int(v) for v in _uint32s(py["internal"])), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
