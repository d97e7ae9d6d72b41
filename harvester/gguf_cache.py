"""GGUF weights converted once per file: the dequantized model and its tokenizer, saved as a Hugging Face
folder (``model.safetensors`` + ``tokenizer.json``), are what every later load reads.

Reading a GGUF file means dequantizing every tensor and rebuilding the tokenizer from the GGUF vocabulary:
~40 s of CPU for SmolLM2-135M (tokenizer ~13 s, weights ~29 s), paid by the driver's ``inspect``, by
every harvest worker and by every evaluator that loads the model. The converted folder loads in under a
second and gives the same tokens and bit-identical weights (float32, as dequantized).

Parsing the GGUF file is most of that cost, and transformers parses it three times (tokenizer, config,
weights) through ``gguf.GGUFReader``, whose every field slice goes through ``numpy.memmap``'s Python
``__getitem__``; it also rebuilds gguf's tensor-name map once per module. :func:`fast_gguf_parsing`
(used by the conversion) parses each file once per block, on a plain ``ndarray`` view of the same mapping,
and builds each name map once: the same fields and tensors (checked against the stock reader by
``tests/harvester/test_gguf_cache.py``), ~11 s of CPU for SmolLM2-135M instead of ~39 s.

The folder lives under ``$DYNSAE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dynsae``, else
``~/.cache/dynsae``) at ``gguf/<stem>-<key>``, the key hashing the GGUF file's absolute path, size and
modification time, the model class and the transformers version (a changed file or converter makes a new folder). It is
written under a temporary name and renamed into place whole; concurrent processes converting the same
file wait on one lock file, so the conversion runs once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "DYNSAE_CACHE_DIR"


def cache_root() -> Path:
    """``$DYNSAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynsae``, else ``~/.cache/dynsae``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynsae"


def converted_folder(folder: str, gguf_file: str, auto_class: Any) -> Path:
    """Where the conversion of ``folder/gguf_file`` by ``auto_class`` lives (it may not exist yet)."""
    import transformers

    path = (Path(folder) / gguf_file).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{auto_class.__name__}|"
                         f"{transformers.__version__}".encode())
    return cache_root() / "gguf" / f"{path.stem}-{key.hexdigest()[:16]}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.cache
def plain_reader_class() -> type:
    """``gguf.GGUFReader`` reading through a plain ``ndarray`` view of its memory map (see the module doc)."""
    from gguf.gguf_reader import GGUFReader

    class PlainArrayGGUFReader(GGUFReader):
        """The stock reader, but ``self.data`` (set once, by the stock ``__init__``, to the file's
        ``numpy.memmap``) is kept as a plain ``ndarray`` view of the same mapping: slicing it skips
        ``memmap.__getitem__``/``__array_finalize__``, which cost ~60% of a stock parse."""

        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain_data = mapped.view(np.ndarray)

    return PlainArrayGGUFReader


@contextlib.contextmanager
def fast_gguf_parsing() -> Iterator[None]:
    """Within the block, transformers' GGUF loads (``from_pretrained(..., gguf_file=...)``) parse each file
    once, with :func:`plain_reader_class`, and build each tensor-name map once; the stock functions are put
    back on exit. Both are looked up on the ``gguf`` module at call time by transformers (a transformers
    that bound them at import would just parse as before). Another thread's GGUF load meanwhile gets the
    same fields and tensors, so the swap is safe for it too."""
    import gguf

    stock_reader, stock_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    reader_class = plain_reader_class()

    @functools.cache
    def parsed(path: str, mode: str) -> Any:
        return reader_class(path, mode)

    def reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        return parsed(str(Path(path).resolve()), mode)

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(stock_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = stock_reader, stock_name_map
        parsed.cache_clear()


def _convert(folder: str, gguf_file: str, auto_class: Any, out: Path) -> None:
    """Dequantize ``folder/gguf_file`` (float32) with its tokenizer and save both as a HF folder at ``out``."""
    import torch
    from transformers import AutoTokenizer

    with fast_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = auto_class.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # the weights are plain float32 tensors now; only the GGUF marker stops save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_as_folder(folder: str, gguf_file: str, auto_class: Any) -> str:
    """The HF folder converted from ``folder/gguf_file`` (converting it first if no process has yet)."""
    out = converted_folder(folder, gguf_file, auto_class)
    if not out.is_dir():
        with file_lock(out.with_name(out.name + ".lock")):
            if not out.is_dir():  # another process may have converted it while this one waited
                _convert(folder, gguf_file, auto_class, out)
    return str(out)
