"""Ray sweeps: ``python -m trainer sweep SWEEP.yaml`` (DESIGN §6).

* The grid (dotted keys -> lists) over a base run config becomes one run per point, named from its
  grid values (``variant-relu_m-3072``) under ``<runs_root>/<sweep name>/``. Every point is validated
  (unknown key, unknown variant, m ≤ 0, dataset not sealed, a run directory made by another config)
  before any actor starts; a failure is one :class:`store.errors.UserError` sentence.
* One :class:`Feeder` actor per batch stream (dataset, batch_size, data_seed — one per dataset in a
  normal sweep) reads batch ``b`` with ``ActivationLoader.batch(b)`` (acts + positions, so each trainer
  applies its own row filter) once, ``ray.put``s it and hands every trainer the same ObjectRef. It
  holds a window of the ``feeder_window`` most recent batches: when it needs room it drops the oldest
  batch every live trainer is past; when no batch is droppable the leading trainer waits for the
  laggards (up to ``feeder_lag_timeout_s``, after which the oldest batch is dropped anyway). A trainer
  that restarted asks again for batches since its checkpoint: served from the window when still
  there, else re-read from the store (outside the window, so it never waits for room).
  ``Feeder.reads()`` reports the counts.
* One :class:`TrainerActor` per run (``num_cpus``/``num_gpus`` from ``ray``), restarted by Ray on
  failure (``max_restarts``; its ``train`` call is retried, ``max_task_retries``), which resumes from the
  run's last checkpoint (:class:`trainer.run.Run`).
* A finished run is scored by ``evaluator.actor.EvaluatorActor`` when that module is importable,
  else by the built-in fvu/l0 (:func:`trainer.run.write_builtin_eval`), which writes ``eval.json``.
* The sweep directory gets ``summary.json`` and ``summary.csv``: one row per run with its grid values,
  final training metrics and eval metrics.

Works in-process (no address: the job's cluster if ``RAY_ADDRESS`` is set, else a local instance)
and under ``ray job submit --working-dir . -- python -m trainer sweep X.yaml``.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from store.errors import UserError
from store.io import join_url
from store.loader import ActivationLoader
from trainer.checkpoint import EVAL_FILE, RunDir
from trainer.config import SweepConfig, TrainConfig, expand_sweep
from trainer.run import BATCH_COLUMNS, Run, RunPlan

SUMMARY_METRICS = ("step", "tokens", "tokens_trained", "loss", "fvu", "l0", "dead_frac")


class FeederCore:
    """The feeder's logic (a plain class so it can be used and tested in-process too)."""

    def __init__(self, dataset: str, batch_size: int, data_seed: int, total_batches: int,
                 trainers: list[str], window: int = 32, prefetch: int = 2, lag_timeout_s: float = 120.0,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.loader = ActivationLoader(dataset, batch_size, split="train", seed=data_seed,
                                       columns=BATCH_COLUMNS, storage_options=storage_options)
        self.total = total_batches
        self.window, self.prefetch, self.lag_timeout_s = window, prefetch, lag_timeout_s
        # next batch each *live* trainer needs. A trainer becomes live with its first request: one
        # that Ray has not scheduled yet (more runs than slots) must not pin the window, or the
        # running trainers would stall on it; when it starts late it re-reads what left the window.
        self.cursors: dict[str, int] = {}
        self.held: dict[int, Future] = {}  # b -> future of the batch's ObjectRef
        self.read_counts: Counter[int] = Counter()
        self.bytes_read = 0
        self.requests = 0
        self.forced_evictions = 0
        self.cond = threading.Condition()
        # one reader thread: batches are read in order (the loader reads each window's chunks in
        # parallel itself); concurrent batch() calls could fetch the same window twice
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="feeder")

    def _read(self, b: int) -> Any:
        """Read batch ``b`` from the store (counted) and put it in the object store."""
        batch = self.loader.batch(b)
        arrays = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else {"acts": batch.numpy()}
        with self.cond:
            self.read_counts[b] += 1
            self.bytes_read += sum(int(a.nbytes) for a in arrays.values())
        return ray.put(arrays) if ray.is_initialized() else arrays

    def _evict(self) -> None:
        """Drop the oldest read batches every live trainer is past until the window has room
        (caller holds the lock)."""
        low = min(self.cursors.values()) if self.cursors else self.total
        for b in sorted(b for b, fut in self.held.items() if b < low and fut.done()):
            if len(self.held) < self.window:
                return
            del self.held[b]

    def _make_room(self) -> None:
        """Wait (bounded) until the window has room; then force out the oldest batch (caller holds the lock)."""
        deadline = time.monotonic() + self.lag_timeout_s
        while True:
            self._evict()
            if len(self.held) < self.window:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                done = sorted(b for b, fut in self.held.items() if fut.done())
                if done:
                    del self.held[done[0]]
                    self.forced_evictions += 1
                    return
                left = 0.1
            self.cond.wait(timeout=min(left, 1.0))

    def get(self, b: int, trainer: str) -> Any:
        """The ObjectRef of batch ``b`` for ``trainer`` (read from the store only if not held)."""
        if not 0 <= b < self.total:
            raise IndexError(f"batch {b} outside 0..{self.total - 1}")
        with self.cond:
            self.requests += 1
            self.cursors[trainer] = b
            if b in self.held:
                fut = self.held[b]
            elif self.read_counts[b] > 0:  # re-read of a batch that left the window: not held again
                fut = self.pool.submit(self._read, b)
            else:
                self._make_room()
                fut = self.held[b] = self.pool.submit(self._read, b)
            for i in range(b + 1, min(b + 1 + self.prefetch, self.total)):
                if i not in self.held and len(self.held) < self.window:
                    self.held[i] = self.pool.submit(self._read, i)
        ref = fut.result()
        with self.cond:
            if trainer in self.cursors:
                self.cursors[trainer] = max(self.cursors[trainer], b + 1)
            self.cond.notify_all()
        return ref

    def done(self, trainer: str) -> None:
        """``trainer`` finished (or gave up): it no longer holds batches in the window."""
        with self.cond:
            self.cursors.pop(trainer, None)
            self.cond.notify_all()

    def reads(self) -> dict[str, Any]:
        """Read statistics: store reads, distinct batches, re-reads, requests, bytes, window state."""
        with self.cond:
            reads = sum(self.read_counts.values())
            return {"reads": reads, "unique": len(self.read_counts), "rereads": reads - len(self.read_counts),
                    "requests": self.requests, "bytes_read": self.bytes_read, "held": len(self.held),
                    "forced_evictions": self.forced_evictions, "max_reads_per_batch":
                    max(self.read_counts.values(), default=0)}


@ray.remote(num_cpus=0, max_concurrency=64)
class Feeder(FeederCore):
    """Ray actor around :class:`FeederCore` (threaded: trainers' ``get`` calls run concurrently).

    ``get`` returns an ObjectRef: ``ray.get(ray.get(feeder.get.remote(b, name)))`` is the batch dict.
    """


@ray.remote
class TrainerActor:
    """One run of a sweep; constructing it (again, after a crash) resumes from the run's checkpoint."""

    def __init__(self, cfg: dict[str, Any], feeder: Any) -> None:
        self.cfg = TrainConfig.model_validate(cfg)
        self.feeder = feeder

    def _batch(self, b: int) -> Any:
        return ray.get(ray.get(self.feeder.get.remote(b, self.cfg.name)))

    def train(self) -> dict[str, Any]:
        """Train the run to its budget; returns its URL and last metrics row."""
        run = Run(self.cfg, progress=False)
        url = run.fit(self._batch)
        self.feeder.done.remote(self.cfg.name)
        last = next((r for r in reversed(run.metrics) if "loss" in r), {})
        return {"run_url": url, "metrics": last, "pid": os.getpid()}



def evaluator_actor_class() -> Any | None:
    """``evaluator.actor.EvaluatorActor`` as a Ray actor class, or None when that package is missing."""
    try:
        module = importlib.import_module("evaluator.actor")
    except ImportError:
        return None
    cls = getattr(module, "EvaluatorActor", None)
    if cls is None:
        return None
    return cls if hasattr(cls, "remote") else ray.remote(cls)


def validate_sweep(sweep: SweepConfig, source: str) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Expand and check every run (config, SAE, dataset sealed, existing run dirs) before any actor starts."""
    runs = expand_sweep(sweep, source)
    for _, cfg in runs:
        RunPlan(cfg).check_existing()
    return runs


def stream_key(cfg: TrainConfig) -> tuple[str, int, int, str]:
    """Runs with the same key share one feeder (one batch stream)."""
    return (cfg.dataset, cfg.batch_size, cfg.data_seed, json.dumps(cfg.storage_options, sort_keys=True))


def connect(sweep: SweepConfig) -> None:
    """Join the configured cluster (or the job's, or start a local instance) unless already connected."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=sweep.ray.address, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster at ray.address = {sweep.ray.address!r} ({err}); "
                        "start it or fix the address.") from None


def run_sweep(sweep: SweepConfig, source: str = "sweep", progress: bool = True) -> dict[str, Any]:
    """Run every grid point to its budget, evaluate, write the summary; returns the summary dict."""
    runs = validate_sweep(sweep, source)
    connect(sweep)
    rc = sweep.ray
    streams: dict[tuple[str, int, int, str], list[TrainConfig]] = {}
    for _, cfg in runs:
        streams.setdefault(stream_key(cfg), []).append(cfg)
    feeders = {}
    for key, cfgs in streams.items():
        first = cfgs[0]
        feeders[key] = Feeder.options(max_restarts=-1, max_task_retries=-1).remote(
            first.dataset, first.batch_size, first.data_seed, max(c.total_steps for c in cfgs),
            [c.name for c in cfgs], rc.feeder_window, rc.feeder_prefetch, rc.feeder_lag_timeout_s,
            first.storage_options)
    pending: dict[Any, tuple[dict[str, Any], TrainConfig]] = {}
    actors: dict[str, Any] = {}
    for assignment, cfg in runs:
        actor = actors[cfg.name] = TrainerActor.options(num_cpus=rc.num_cpus_per_trainer, num_gpus=rc.num_gpus_per_trainer,
                                     max_restarts=rc.max_restarts, max_task_retries=rc.max_task_retries,
                                     ).remote(cfg.model_dump(mode="json"), feeders[stream_key(cfg)])
        pending[actor.train.remote()] = (assignment, cfg)
    evaluator_cls = evaluator_actor_class() if sweep.evaluate else None
    evaluator = None
    if evaluator_cls is not None:
        options = {"max_tokens": sweep.eval_max_tokens, "storage_options": runs[0][1].storage_options,
                   **sweep.evaluator_options}
        evaluator = evaluator_cls.options(num_cpus=rc.num_cpus_per_trainer, num_gpus=rc.num_gpus_per_trainer,
                                          ).remote(**options)
    rows: dict[str, dict[str, Any]] = {}
    evals: dict[Any, str] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), unit="run", desc=f"sweep {sweep.name}", disable=not progress)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        assignment, cfg = pending.pop(done[0])
        row: dict[str, Any] = {"name": cfg.name, **assignment}
        try:
            result = ray.get(done[0])
            row.update({"status": "finished", "run_url": result["run_url"]})
            row.update({k: result["metrics"].get(k) for k in SUMMARY_METRICS})
            if sweep.evaluate and evaluator is not None:
                evals[evaluator.evaluate.remote(result["run_url"])] = cfg.name
        except (ray.exceptions.RayError, UserError) as err:
            ray.get(feeders[stream_key(cfg)].done.remote(cfg.name))
            row.update({"status": "failed", "error": _one_line(err)})
        # free its CPU/GPU slot now: with more runs than slots the queued trainers (and the
        # evaluator) only start when finished ones are gone
        ray.kill(actors.pop(cfg.name))
        rows[cfg.name] = row
        bar.update(1)
    bar.close()
    for ref, name in evals.items():
        try:
            report = ray.get(ref)
            report = report.model_dump(mode="json") if hasattr(report, "model_dump") else dict(report)
            rows[name].update({f"eval_{k}": v for k, v in report.items() if _scalar(v)})
        except ray.exceptions.RayError as err:
            rows[name].update({"eval_error": _one_line(err)})
    reads = {json.dumps(list(key[:3])): ray.get(f.reads.remote()) for key, f in feeders.items()}
    ordered = [rows[cfg.name] for _, cfg in runs]
    summary = {"sweep": sweep.name, "grid": sweep.grid, "runs": ordered, "feeder_reads": reads}
    sweep_url = join_url(runs[0][1].runs_root, sweep.name)
    summary["summary_url"] = join_url(sweep_url, "summary.json")
    write_summary(sweep_url, summary, runs[0][1].storage_options)
    for actor in actors.values():
        ray.kill(actor)
    for feeder in feeders.values():
        ray.kill(feeder)
    if evaluator is not None:
        ray.kill(evaluator)
    failed = [r for r in ordered if r["status"] != "finished"]
    if failed:
        raise UserError(f"sweep {sweep.name}: {len(failed)} of {len(ordered)} runs failed (first: {failed[0]['name']}: "
                        f"{failed[0]['error']}); see {join_url(sweep_url, 'summary.json')}.")
    return summary


def write_summary(sweep_url: str, summary: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    """``summary.json`` (everything) and ``summary.csv`` (one row per run), written atomically."""
    out = RunDir(sweep_url, storage_options)
    out.write_json("summary.json", summary)
    rows = summary["runs"]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    out.write_bytes("summary.csv", buf.getvalue().encode())


def read_eval(run_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A run's ``eval.json`` (None when not evaluated yet)."""
    return RunDir(run_url, storage_options).read_json(EVAL_FILE)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        text = str(cause).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:300]
