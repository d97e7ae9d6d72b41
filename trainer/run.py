"""One SAE training run: ``python -m trainer run CONFIG.yaml`` / :func:`train`.

The loop (``docs/sweep.md``): step ``b`` trains on ``ActivationLoader.batch(b)`` (acts + positions) after the
row filter (``store.filters.RowFilter``: ``exclude_positions``, ``max_norm_multiple`` × the dataset's
median norm), with Adam (lr warm-up, optional decay), ``sae.post_step()`` after each optimizer step,
and dead-concept counters in tokens since last fired. Checkpoints every ``checkpoint_every`` steps and
at the end (see :mod:`trainer.checkpoint` for the directory layout and atomicity).

Exact resume: a checkpoint holds everything the next step depends on (weights, Adam moments, step,
counters, RNG states, the data cursor = next batch index; the lr is a pure function of the step), and
batch ``b`` is a pure function of (dataset, data_seed, b), so re-running the same command continues
from the last checkpoint and ends with the weights an uninterrupted run ends with. Re-running with a
larger ``tokens`` extends a finished run (the lr schedule is then that of the new budget).

The same :class:`Run` is driven by the sweep's training tasks, which take batches from the feeder
instead of a loader of their own (``Run.fit(batches=...)``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from store.batch import Batch
from store.dataset import open_dataset
from store.errors import UserError
from store.filters import RowFilter
from store.io import join_url
from store.lease import leased
from store.loader import ActivationLoader
from trainer.checkpoint import STATE_VERSION, RunDir, rng_state, set_rng_state
from trainer.config import BATCH_COLUMNS, RESUMABLE_FIELDS, TrainConfig, resolve_sae
from trainer.optim import Adam
from trainer.run_format import (
    STATE_FILE,
    RowFilterRecord,
    RunConfig,
    read_config_json,
    write_run_config,
)

#: Training's dead-concept count: the fraction of concepts not fired for the last ``dead_tokens``
#: training tokens. Not the evaluator's ``dead_frac`` (never fired on the eval rows).
TRAIN_DEAD_FRAC = "train_dead_frac"

#: Batch ``b`` of the run's stream, from wherever it comes (the sweep's feeder: :mod:`trainer.feeder`).
BatchSource = Callable[[int], Batch]
#: Called with the run after each step (and after that step's checkpoint, if it writes one).
StepHook = Callable[["Run"], None]


def run_url(cfg: TrainConfig) -> str:
    """``<runs_root>/[<sweep>/]<name>``."""
    parts = [cfg.sweep, cfg.name] if cfg.sweep else [cfg.name]
    return join_url(cfg.runs_root, *parts)


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``.

    warm-up: lr·(step+1)/W for step < W; decay over the last D = ceil(f·total) steps, with
    u = (step − (total − D) + 1)/D ∈ (0, 1]: linear lr·(1 − u), cosine lr·½(1 + cos πu).
    """
    factor = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    if cfg.decay != "none":
        span = max(1, math.ceil(cfg.decay_fraction * total))
        start = total - span
        if step >= start:
            u = (step - start + 1) / span
            decay = 1.0 - u if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * u))
            factor = min(factor, decay)
    return cfg.lr * factor


class RunEvaluation(Protocol):
    """Metrics handed to a run by whoever composes it (``dynsae train`` / ``dynsae sweep`` hand in
    :class:`evaluator.training.TrainingEvaluation`): the trainer holds no metric definition of its own.
    Without one a run logs its loss terms only, and ``eval_every`` is refused."""

    def batch_metrics(self, x: Tensor, x_hat: Tensor, codes: Any) -> dict[str, float]:
        """Metrics of one training batch (fvu, l0, support-size quantiles)."""

    def eval_split(self, sae: torch.nn.Module, plan: RunPlan, device: torch.device,
                   max_tokens: int | None) -> dict[str, Any]:
        """Scalar metrics of ``sae`` on (at most ``max_tokens`` rows of) the run's eval split."""


class Prefetcher:
    """Reads ``source(b)`` for b = start .. stop-1 in a background thread, ``depth`` batches ahead.

    A source whose ``asks_ahead`` attribute is true already has the next batches on their way while the
    caller works (a feeder's trainer at its hand-out board: :class:`trainer.feeder.FeederBatches` asks
    for the next span as it takes this one, and taking a batch is then ~20 µs): it is called directly, in
    the caller's thread, since a hand-off to a thread would only cost CPU (at N = 8 trainers on two
    cores, 0.60× the loader alone's rate called directly against 0.50× through the thread, median of 6
    paired rounds, bench/README). Decided once, when the prefetcher is made."""

    def __init__(self, source: BatchSource, start: int, stop: int, depth: int = 2) -> None:
        self.source, self.next, self.stop, self.depth = source, start, stop, max(1, depth)
        direct = bool(getattr(source, "asks_ahead", False))
        self.pool = None if direct else ThreadPoolExecutor(1, thread_name_prefix="dynsae-prefetch")
        self.pending: dict[int, Future] = {}

    def get(self, b: int) -> Any:
        if self.pool is None:
            return self.source(b)
        for i in range(b, min(b + self.depth + 1, self.stop)):
            if i not in self.pending:
                self.pending[i] = self.pool.submit(self.source, i)
        return self.pending.pop(b).result()

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class RunPlan:
    """Everything about a run that is known before any weight exists: URL, dataset, resolved SAE config,
    row filter, and the ``config.json`` record. Cheap; the sweep builds one per run to validate up front."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.url = run_url(cfg)
        self.dir = RunDir(self.url, cfg.storage_options)
        self.dataset = open_dataset(cfg.dataset, storage_options=cfg.storage_options)
        manifest = self.dataset.manifest
        if not getattr(manifest, "sealed", True):
            raise UserError(f"dataset {cfg.dataset} is not sealed (its harvest has not finished); "
                            "finish the harvest or point dataset at a sealed one.")
        stats = manifest.stats
        self.sae_cfg = resolve_sae(cfg, manifest.d, stats.median_norm if stats is not None else None)
        self.row_filter = RowFilter(exclude_positions=cfg.exclude_positions,
                                    max_norm_multiple=cfg.max_norm_multiple)
        self.median_norm: float | None = None
        if cfg.max_norm_multiple is not None:
            if manifest.stats is None:
                raise UserError(f"dataset {cfg.dataset} has no norm statistics, so max_norm_multiple cannot "
                                "be applied; re-seal it with stats or drop max_norm_multiple.")
            self.median_norm = float(manifest.stats.median_norm)
        self.manifest_hash = manifest.manifest_hash()
        self.total_steps = cfg.total_steps
        self.dead_tokens = cfg.resolved_dead_tokens

    def config_record(self) -> RunConfig:
        """The run's config record: the run config with the resolved sae, the row filter it applies and
        the dataset hash."""
        record = self.cfg.model_dump(mode="json")
        record["sae"] = self.sae_cfg.model_dump(mode="json")
        if record.get("storage_options"):  # may hold credentials: keep the keys, never the values
            record["storage_options"] = {k: "<redacted>" for k in record["storage_options"]}
        record["filter"] = RowFilterRecord.of(self.row_filter, self.median_norm)
        record["dataset_manifest_hash"] = self.manifest_hash
        record["total_steps"] = self.total_steps
        record["dead_tokens_resolved"] = self.dead_tokens
        return RunConfig(**record)

    def check_existing(self) -> None:
        """Refuse a run directory made by a different config (only tokens and the like may differ)."""
        new = self.config_record().model_dump(mode="json")
        old = read_config_json(self.url, self.cfg.storage_options)
        if old is None:
            return
        ignore = set(RESUMABLE_FIELDS) | {"total_steps", "dead_tokens_resolved", "format_version"}
        if self.cfg.dead_tokens is None:  # derived from tokens, and so is the SAE's dead_tokens
            old = {**old, "sae": {**old.get("sae", {}), "dead_tokens": None}}
            new = {**new, "sae": {**new["sae"], "dead_tokens": None}}
        diffs = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
        if diffs:
            key = diffs[0]
            raise UserError(
                f"run directory {self.url} was made by a different config ({key}: {old.get(key)!r} there, "
                f"{new.get(key)!r} now); use another name or runs_root, or restore the old value.")


class Run(RunPlan):
    """A training run bound to its run directory; creating it resumes from the last checkpoint."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, evaluation: RunEvaluation | None = None) -> None:
        super().__init__(cfg)
        if cfg.eval_every is not None and evaluation is None:
            raise UserError(f"run {cfg.name}: eval_every needs the evaluator's metrics; run it with `dynsae train` "
                            "(or `dynsae sweep`), or remove eval_every.")
        self.progress = progress
        self.evaluation = evaluation
        self.device = torch.device(cfg.resolved_device())

        from trainer.sae import build

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.sae = build(self.sae_cfg).to(self.device)
        self.opt = Adam(self.sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.step = 0
        self.tokens = 0
        self.tokens_trained = 0
        self.since_fired = torch.zeros(self.sae_cfg.m, dtype=torch.int64, device=self.device)
        self.metrics: list[dict[str, Any]] = []
        self.finished = False
        self._t0 = time.perf_counter()
        self._tokens_at_t0 = 0
        # one writer per run directory: a second run of it waits for this lease (given back by fit)
        self.lease = leased(self.url, "run", cfg.storage_options, take_over_stale=cfg.take_over_stale_lease)
        try:
            self.check_existing()
            self._resume()
            write_run_config(self.url, self.config_record(), cfg.storage_options)  # only once the resume succeeded
        except BaseException:
            self.lease.release()
            raise

    def _resume(self) -> None:
        state = self.dir.load_state()
        if state is None:
            self.dir.write_metrics([])
            return
        try:
            self.sae.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.since_fired = state["since_fired"].to(self.device)
            set_rng_state(state["rng"])
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.tokens_trained = int(state["tokens_trained"])
            consistent = int(state["data_cursor"]) == self.step
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise UserError(f"checkpoint {self.dir.file_url(STATE_FILE)} does not fit this run's SAE and optimiser "
                            f"({type(err).__name__}); it is corrupt or from another config — delete the run "
                            "directory to start over.") from None
        if not consistent:
            raise UserError(f"checkpoint {self.dir.file_url(STATE_FILE)} is inconsistent "
                            "(data cursor != step); delete the run directory to start over.")
        self.metrics = [row for row in self.dir.read_metrics() if row.get("step", 0) <= self.step]
        self.finished = self.step >= self.total_steps
        self._tokens_at_t0 = self.tokens

    def checkpoint(self) -> None:
        """Weights, metrics, then the state record (the commit point), each written atomically."""
        self.lease.check()  # never commit over the work of a writer that took this directory over
        self.dir.save_weights(self.sae)
        self.dir.write_metrics(self.metrics)
        self.dir.save_state({
            "version": STATE_VERSION,
            "step": self.step,
            "tokens": self.tokens,
            "tokens_trained": self.tokens_trained,
            "data_cursor": self.step,
            "model": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "since_fired": self.since_fired.cpu(),
            "rng": rng_state(),
            "scheduler": {"kind": self.cfg.decay, "warmup_steps": self.cfg.warmup_steps,
                          "decay_fraction": self.cfg.decay_fraction, "total_steps": self.total_steps},
            "finished": self.step >= self.total_steps,
        })

    # ----------------------------------------------------------------- training
    def train_step(self, batch: Batch) -> dict[str, Any] | None:
        """One optimizer step on batch ``self.step``; returns the metrics row if this step logs one.

        The batch comes in the dataset's dtype; its acts are cast to float32 once, on the run's device
        (after the copy there, so a float16 dataset moves half the bytes to a GPU)."""
        acts = batch.acts_on(self.device)
        positions = None if batch.positions is None else batch.positions.to(self.device)
        keep = self.row_filter.keep_mask(acts, positions, self.median_norm)
        x = acts[keep]
        n = int(x.shape[0])
        lr = lr_at(self.cfg, self.step, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        row = None
        if n > 0:
            autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                        if self.cfg.dtype == "bfloat16" else nullcontext())
            with autocast:
                x_hat, codes, losses = self.sae(x)
            self.opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.opt.step()
            self.sae.post_step()
            fired = codes.fire_counts() > 0
            self.since_fired += n  # tokens since last fired, then reset where it fired
            self.since_fired[fired] = 0
        self.step += 1
        self.tokens += int(acts.shape[0])
        self.tokens_trained += n
        if n > 0 and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
            row = self._metrics_row(x, x_hat.float(), codes, losses, lr)
            self.metrics.append(row)
        return row

    def _metrics_row(self, x: Tensor, x_hat: Tensor, codes: Any, losses: dict[str, Tensor],
                     lr: float) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "tokens_trained": self.tokens_trained,
                               "lr": lr, TRAIN_DEAD_FRAC: float((self.since_fired >= self.dead_tokens).double().mean()),
                               "tokens_per_s": (self.tokens - self._tokens_at_t0) / elapsed}
        row.update({k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1})
        if self.evaluation is not None:
            row.update(self.evaluation.batch_metrics(x, x_hat, codes))
        return row

    def evaluate(self, max_tokens: int | None = None) -> dict[str, Any]:
        """The handed-in evaluation's scalar metrics on the run's eval split."""
        if self.evaluation is None:
            raise UserError(f"run {self.cfg.name} was given no evaluation; use `dynsae train` / `dynsae sweep`.")
        return self.evaluation.eval_split(self.sae, self, self.device, max_tokens)

    def fit(self, batches: BatchSource | None = None, on_step: StepHook | None = None) -> str:
        """Train to the budget from wherever the run stands; returns the run URL. ``on_step(self)`` runs
        after every step, once the step's checkpoint (if it writes one) is committed: a caller's own
        progress report, or a test's fault injection (a process that dies there resumes from it). The run
        directory's lease is given back when it returns."""
        try:
            return self._fit(batches, on_step)
        finally:
            self.lease.release()

    def _fit(self, batches: BatchSource | None, on_step: StepHook | None) -> str:
        if self.step >= self.total_steps:
            if not self.finished or self.dir.load_state() is None:
                self.checkpoint()
            self.finished = True
            return self.url
        loader = fetch = None
        if batches is None:  # our own loader: its sequential iterator prefetches whole windows
            loader = ActivationLoader(self.cfg.dataset, self.cfg.batch_size, split="train", seed=self.cfg.data_seed,
                                      columns=BATCH_COLUMNS, storage_options=self.cfg.storage_options)
            stream = loader.iter_batches(start=self.step)
        else:
            fetch = Prefetcher(batches, self.step, self.total_steps)
            stream = (fetch.get(b) for b in range(self.step, self.total_steps))
        bar = self._progress_bar()
        self._t0, self._tokens_at_t0 = time.perf_counter(), self.tokens
        try:
            while self.step < self.total_steps:
                row = self.train_step(next(stream))
                bar.update(self.cfg.batch_size)
                if row is not None:
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "fvu", "l0") if k in row}, refresh=False)
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                    ev = self.evaluate(self.cfg.eval_tokens)
                    self.metrics.append({"step": self.step, "tokens": self.tokens,
                                         **{f"eval_{k}": v for k, v in ev.items() if not isinstance(v, dict)}})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self.checkpoint()
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
            if fetch is not None:
                fetch.close()
            if loader is not None:
                loader.close()
        self.finished = True
        return self.url

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps * self.cfg.batch_size, initial=self.step * self.cfg.batch_size,
                    unit="tok", unit_scale=True, desc=self.cfg.name, disable=not self.progress,
                    dynamic_ncols=True, mininterval=1.0)


def train(cfg: TrainConfig, *, progress: bool = True, batches: BatchSource | None = None,
          evaluation: RunEvaluation | None = None, on_step: StepHook | None = None) -> str:
    """Run (or resume, or extend) one training run to its token budget; returns the run URL."""
    return Run(cfg, progress=progress, evaluation=evaluation).fit(batches, on_step)
