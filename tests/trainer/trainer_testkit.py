"""Helpers of the trainer tests: tiny synthetic stores written with the real store writer, small configs."""

from __future__ import annotations

import numpy as np

D = 16
CONTEXT = 8


def make_store(url: str, *, shards: int = 4, shard_rows: int = 256, chunk_rows: int = 64, d: int = D,
               seed: int = 0, sealed: bool = True, dtype: str = "float32") -> str:
    """A sealed store of ``shards × shard_rows`` rows: sparse codes over a fixed basis + noise, each row
    rescaled to a norm in [1, 2]; BOS rows (position 0) have norm 30 (attention-sink-like outliers), so
    ``max_norm_multiple = 5`` drops exactly the BOS rows. ``dtype``: the stored acts dtype (the rows are
    the same; float16 rounds them)."""
    from store.manifest import DatasetManifest, HookInfo, ModelInfo, SourceInfo
    from store.stats import StatsAccumulator
    from store.writer import DatasetWriter

    manifest = DatasetManifest(d=d, dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows,
                               context_length=CONTEXT, model=ModelInfo(name="synthetic"),
                               hook=HookInfo(layer=0, site="resid_post"), source=SourceInfo(name="synthetic"))
    writer = DatasetWriter.create(url, manifest)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4 * d, d)).astype(np.float32)
    stats = StatsAccumulator(d)
    for s in range(shards):
        codes = rng.exponential(size=(shard_rows, 4 * d)) * (rng.random((shard_rows, 4 * d)) < 0.1)
        acts = (codes @ basis + 0.05 * rng.normal(size=(shard_rows, d))).astype(np.float32)
        rows = np.arange(s * shard_rows, (s + 1) * shard_rows)
        positions = (rows % CONTEXT).astype(np.int16)
        norms = np.linalg.norm(acts, axis=1, keepdims=True)
        acts = (acts / norms * np.where(positions[:, None] == 0, 30.0, rng.uniform(1, 2, (shard_rows, 1))))
        acts = acts.astype(np.float32)
        writer.write_shard(s, acts.astype(dtype), token_ids=(rows % 97).astype(np.int32), seq_ids=(rows // CONTEXT).astype(np.int64),
                           positions=positions)
        stats.update(acts)
    if sealed:
        writer.seal(stats=stats.result())
    return url


def base_config(store: str, runs_root: str, **over) -> dict:
    """A run config small enough to train in a second or two."""
    cfg = {"dataset": store, "runs_root": runs_root, "name": "r", "sae": {"variant": "relu", "m": 32},
           "batch_size": 64, "tokens": 64 * 24, "lr": 1e-3, "warmup_steps": 3, "checkpoint_every": 5,
           "log_every": 2, "device": "cpu"}
    for key, value in over.items():
        if key == "sae":
            cfg["sae"] = {**cfg["sae"], **value}
        else:
            cfg[key] = value
    return cfg


def checkpoint_step(run_dir) -> int:
    """The step of a run's last committed checkpoint (0 if none); the checkpoint must load whole."""
    from pathlib import Path

    import torch

    state = Path(run_dir) / "trainer_state.pt"
    return int(torch.load(state, weights_only=True)["step"]) if state.exists() else 0


def wait_until(condition, seconds: float, what: str, interval: float = 0.1):
    """Poll ``condition()`` until it returns something truthy (returned) or ``seconds`` pass (AssertionError)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {seconds:g} s")
        time.sleep(interval)


def process_ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie waiting to be reaped). Race-free: a process that
    ends between the two looks (``pid_exists``, then its status) raised NoSuchProcess there before."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids_using(path: str) -> list[int]:
    """Processes (other than this one) whose command line mentions ``path`` (a Ray temp dir: its raylet,
    GCS, dashboard, workers...)."""
    import os
    from pathlib import Path

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if path in cmd:
                out.append(int(entry.name))
    return out


def no_pids_using(path: str, seconds: float = 60) -> None:
    """Wait until no process uses ``path`` (exiting processes take a moment to go), then return."""
    wait_until(lambda: not pids_using(path), seconds, f"processes still using {path}: {pids_using(path)}")


def kill_pids_using(path: str) -> None:
    """SIGKILL every process still using ``path`` (the clean-up of a test that failed half-way)."""
    import os
    import signal

    for pid in pids_using(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def straight_config(run_dir, runs_root):
    """A run's config as an uninterrupted, stand-alone run (a TrainConfig) under another root."""
    from trainer.config import TrainConfig
    from trainer.run_format import read_run_config

    record = read_run_config(str(run_dir)).settings()
    record.update(runs_root=str(runs_root), sweep=None)
    return TrainConfig.model_validate(record)


def assert_same_weights(run_a, run_b, atol: float = 1e-5) -> None:
    """The two runs' ``sae.safetensors`` agree within ``atol``."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    a, b = load_file(Path(run_a) / "sae.safetensors"), load_file(Path(run_b) / "sae.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (str(run_a), key)


#: The file a :class:`DieAt` hook writes in a run directory before it kills the process ("STEP PID").
FAULT_MARKER = "fault_injected"


class DieAt:
    """A test-only fault, handed to ``Run.fit`` / ``run_sweep`` as ``on_step``: the process training run
    ``name`` dies for real (``os._exit(17)``) once it has completed step ``steps[name]`` (``steps["*"]``:
    any run), after that step's checkpoint if it writes one. A ``fault_injected`` marker in the run
    directory makes it happen once per run directory, so a restarted process trains on."""

    def __init__(self, steps: dict[str, int]) -> None:
        import sys

        from ray import cloudpickle

        self.steps = dict(steps)
        # Ray's workers cannot import this tests-only module: the hook travels by value
        cloudpickle.register_pickle_by_value(sys.modules[type(self).__module__])

    def __call__(self, run) -> None:
        import os

        at = self.steps.get(run.cfg.name, self.steps.get("*"))
        if at is None or run.step != at or run.dir.exists(FAULT_MARKER):
            return
        run.dir.write_bytes(FAULT_MARKER, f"{at} {os.getpid()}\n".encode())
        os._exit(17)
