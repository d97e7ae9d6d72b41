"""A run directory on any fsspec URL, written so that nothing is reported complete when it isn't.

The directory's files, their names and their record types are the run format
(:mod:`trainer.run_format`, written down in ``docs/run-format.md``); this module writes the
checkpoint: weights, metrics, then the commit record of the training state, which holds tensors and
plain values only (RNG states as uint8 tensors) and is read with ``torch.load(weights_only=True)``:
a file planted on a shared bucket cannot run code. While a run writes, its directory holds the lease
``lease.json`` (:mod:`store.lease`): a second run of the same directory waits for it.

Every file is written to a temporary key next to it and then moved into place (a rename on local
disks after an fsync, a server-side copy on object stores), and a checkpoint writes ``trainer_state.pt``
last: a crash at any point leaves the previous checkpoint intact and readable. A file that cannot be
read (truncated, corrupt, not ours) is one :class:`~store.errors.UserError` sentence naming it.
"""

from __future__ import annotations

import io as io_module
import pickle
from typing import Any

import numpy as np
import torch

from store import io
from store.errors import UserError
from trainer import run_format
from trainer.run_format import STATE_FILE

#: Format of the state file: 2 = tensors and plain values only (loads with ``weights_only=True``).
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
        """Rewrite the metrics file (atomically) with ``rows``."""
        run_format.write_metrics(self.url, rows, self.storage_options)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged rows; a damaged line is a UserError naming it (:func:`trainer.run_format.read_metrics`)."""
        return [line.model_dump(mode="json") for line in run_format.read_metrics(self.url, self.storage_options)]

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
