"""Ray sweeps: :func:`run_sweep` (``python -m trainer sweep SWEEP.yaml`` trains; ``dynsae sweep`` also
evaluates) (``docs/sweep.md``).

* The grid (dotted keys -> lists, or a list of such mappings: the union of their products) over a base
  run config becomes one run per point, named from its grid values (``variant-relu_m-3072``) under
  ``<runs_root>/<sweep name>/``. Every point is validated (unknown key, unknown variant, m ≤ 0, dataset
  not sealed, a run directory made by another config, two points with one name) before any actor or
  task starts; a failure is one :class:`store.errors.UserError` sentence.
* One feeder actor per batch stream (dataset, batch_size, data_seed — one per dataset in a normal
  sweep): each batch read once from the store and shared by every trainer of the stream through Ray's
  object store (:mod:`trainer.feeder`).
* One Ray *task* per run, :func:`train_run` (``num_cpus``/``num_gpus``/custom ``trainer_resources`` from
  ``ray``), retried by Ray when its process or node dies (up to ``max_restarts`` times; -1: always); a
  retry resumes from the run's last checkpoint (:class:`trainer.run.Run`). Tasks, not one actor per
  run: Ray hands a finished task's worker process to the next run, so a sweep of many runs imports
  torch once per slot instead of once per run (~3 s of CPU a run on the 2-core box). On GPUs every
  run gets a fresh process (Ray gives each task its own ``CUDA_VISIBLE_DEVICES``, which a process
  cannot change once CUDA is up). ``max_task_retries`` is read by nothing since; it is still accepted.
* Evaluation is handed in: ``run_sweep(..., evaluator=F)`` with ``F(run_url, **options)`` a plain
  function that scores a finished run (writes its ``eval.json``) and returns the report as a dict. Each
  finished run gets one Ray task of ``F`` (:func:`evaluation_task`), placed like a training task and
  called with the keyword arguments ``max_tokens``, ``storage_options`` and the config's
  ``evaluator_options``. As for training, the CPU tasks share warm worker processes (across runs and
  across sweeps of one Ray job, so whatever ``F`` keeps in its process, such as a loaded model, serves
  the next run) and every GPU task gets a fresh process. ``dynsae sweep`` hands in the project's
  evaluator (:func:`evaluator.task.evaluate_run_task`); ``python -m trainer sweep`` hands in none and
  only trains.
* The sweep directory gets ``summary.json`` and ``summary.csv``: one row per run with its grid values,
  init ``seed``, ``target_l0``, final training metrics and eval metrics.
* Ray, signals and clean-up are :mod:`store.cluster`'s (as for the harvest): the driver only ever waits in
  short ``ray.wait`` slices, so SIGINT/SIGTERM is seen within a second and raises
  :class:`store.cluster.Interrupted`; whatever ends the sweep, its actors are killed, its training and
  evaluation tasks still running are cancelled and a local Ray it started is shut down. Checkpoints are
  atomic, so every run resumes exactly.
* ``run_sweep(..., on_step=F)`` hands ``F`` to every trainer, which calls it after each step (see
  :meth:`trainer.run.Run.fit`); the tests kill trainers with it to prove that a restart resumes exactly.

Works in-process (no address: the job's cluster if ``RAY_ADDRESS`` is set, else a local instance)
and under ``ray job submit --working-dir . -- python -m dynsae sweep X.yaml``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from store.cluster import RaySession, ray_session
from store.errors import UserError
from store.io import join_url
from store.lease import leased
from trainer.config import RayConfig, SweepConfig, TrainConfig, expand_sweep
from trainer.feeder import Feeder, feeder_batches
from trainer.matching import reference_l0, split_phases, with_targets
from trainer.run import TRAIN_DEAD_FRAC, Run, RunEvaluation, RunPlan, StepHook
from trainer.run_format import SweepSummary, summary_url, write_summary

SUMMARY_METRICS = ("step", "tokens", "tokens_trained", "loss", "fvu", "l0", TRAIN_DEAD_FRAC)

#: ``evaluate(run_url, **options) -> report dict``, run as one Ray task per finished run; see the module
#: docstring.
Evaluator = Callable[..., dict[str, Any]]
StreamKey = tuple[str, int, int, str]


def train_run(cfg: dict[str, Any], feeder: Any, evaluation: RunEvaluation | None = None,
              on_step: StepHook | None = None) -> dict[str, Any]:
    """Train one run of a sweep to its budget from ``feeder``'s batches (a retry, after its process died,
    resumes from the checkpoint); returns its URL, last metrics row and the pid that finished it."""
    config = TrainConfig.model_validate(cfg)
    run = Run(config, progress=False, evaluation=evaluation)
    url = run.fit(feeder_batches(feeder, config.name), on_step=on_step)
    feeder.done.remote(config.name)
    last = next((r for r in reversed(run.metrics) if "loss" in r), {})
    return {"run_url": url, "metrics": last, "pid": os.getpid()}


#: :func:`train_run` as a Ray task: on CPUs the worker processes go from one run to the next; with GPUs
#: each run gets a new process (``max_calls=1``; see the module docstring).
train_on_cpu = ray.remote(train_run)
train_on_gpu = ray.remote(max_calls=1)(train_run)


@functools.cache
def evaluation_task(evaluate: Evaluator, on_gpu: bool) -> Any:
    """``evaluate`` as a Ray task (one per function and kind, made once per process): on CPUs the worker
    processes, and what ``evaluate`` keeps in them, go from one evaluation to the next; with GPUs each
    evaluation gets a new process (``max_calls=1``, as :data:`train_on_gpu`)."""
    return ray.remote(max_calls=1)(evaluate) if on_gpu else ray.remote(evaluate)


@dataclass(frozen=True)
class EvaluatorTask:
    """The evaluator handed to the sweep, placed like a training task, and the keyword arguments of
    every call."""

    task: Any  # evaluation_task(...).options(**placement)
    options: dict[str, Any]

    def submit(self, run_url: str, session: RaySession) -> Any:
        """Start evaluating ``run_url``; returns its ObjectRef, tracked by ``session`` (so cancelled if the
        sweep ends before it does)."""
        return session.track_task(self.task.remote(run_url, **self.options))


@dataclass
class SweepActors:
    """The sweep's feeder actors, by stream, and its evaluator; the session kills every actor and cancels
    every training and evaluation task still running when the sweep ends, however it ends."""

    session: RaySession
    feeders: dict[StreamKey, Any] = field(default_factory=dict)
    evaluator: EvaluatorTask | None = None


def validate_sweep(sweep: SweepConfig, source: str) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Expand and check every run (config, SAE, dataset sealed, existing run dirs) before anything starts on
    Ray (with ``match_l0``, the matched phase's run directories are checked once their targets are known)."""
    runs = expand_sweep(sweep, source)
    matched = {cfg.name for _, cfg in split_phases(runs, sweep.match_l0)[1]} if sweep.match_l0 else set()
    for _, cfg in runs:
        plan = RunPlan(cfg)
        if cfg.name not in matched:
            plan.check_existing()
    return runs


def stream_key(cfg: TrainConfig) -> StreamKey:
    """Runs with the same key share one feeder (one batch stream)."""
    return (cfg.dataset, cfg.batch_size, cfg.data_seed, json.dumps(cfg.storage_options, sort_keys=True))


def placement(rc: RayConfig, session: RaySession) -> dict[str, Any]:
    """Options that place a training task (and an evaluation task): CPUs, GPUs, custom resources, and the
    session's runtime environment."""
    return session.options(num_cpus=rc.num_cpus_per_trainer, num_gpus=rc.num_gpus_per_trainer,
                           resources=dict(rc.trainer_resources) or None)


def feeder_placement(rc: RayConfig, session: RaySession) -> dict[str, Any]:
    """Options that place a feeder actor: the CPUs it reserves and the custom resources that pick its node
    (``ray.feeder_num_cpus``, ``ray.feeder_resources``), restarted by Ray whenever it dies, and the session's
    runtime environment."""
    return session.options(num_cpus=rc.feeder_num_cpus, resources=dict(rc.feeder_resources) or None,
                           max_restarts=-1, max_task_retries=-1)


def check_placement(runs: list[tuple[dict[str, Any], TrainConfig]], rc: RayConfig, session: RaySession) -> None:
    """The sweep's feeders (one per batch stream) and a training task (and an evaluation task, placed
    alike) can be placed on this Ray (:meth:`RaySession.check_demands`): on a local instance a sweep that
    could never start is one sentence, not a wait forever."""
    feeders = len({stream_key(cfg) for _, cfg in runs})
    feeder = {"CPU": rc.feeder_num_cpus, **rc.feeder_resources}
    trainer = {"CPU": rc.num_cpus_per_trainer, "GPU": rc.num_gpus_per_trainer, **rc.trainer_resources}
    demands = [("feeder", feeder)] * feeders + [("training task", trainer)]
    session.check_demands(demands, "lower ray.feeder_num_cpus, ray.num_cpus_per_trainer or ray.num_gpus_per_trainer, "
                                   "drop what ray.feeder_resources / ray.trainer_resources name that no node has, "
                                   "or set ray.address to a cluster with such nodes.")


def start_feeders(runs: list[tuple[dict[str, Any], TrainConfig]], rc: RayConfig, actors: SweepActors) -> None:
    """One feeder per batch stream, restarted by Ray whenever it dies (it holds no state a restart needs)."""
    streams: dict[StreamKey, list[TrainConfig]] = {}
    for _, cfg in runs:
        streams.setdefault(stream_key(cfg), []).append(cfg)
    session = actors.session
    for key, cfgs in streams.items():
        first = cfgs[0]
        actors.feeders[key] = session.track(Feeder.options(**feeder_placement(rc, session)).remote(
            first.dataset, first.batch_size, first.data_seed, max(c.total_steps for c in cfgs),
            [c.name for c in cfgs], rc.feeder_window, rc.feeder_prefetch, rc.feeder_lag_timeout_s,
            first.storage_options))


def launch_trainers(runs: list[tuple[dict[str, Any], TrainConfig]], rc: RayConfig, actors: SweepActors,
                    evaluation: RunEvaluation | None = None,
                    on_step: StepHook | None = None) -> dict[Any, tuple[dict[str, Any], TrainConfig]]:
    """One :func:`train_run` task per run; returns {task ObjectRef: (assignment, config)}."""
    task = train_on_gpu if rc.num_gpus_per_trainer > 0 else train_on_cpu
    pending = {}
    for assignment, cfg in runs:
        ref = actors.session.track_task(task.options(**placement(rc, actors.session), max_retries=rc.max_restarts)
                                        .remote(cfg.model_dump(mode="json"), actors.feeders[stream_key(cfg)],
                                                evaluation, on_step))
        pending[ref] = (assignment, cfg)
    return pending


def start_evaluator(evaluate: Evaluator | None, sweep: SweepConfig,
                    runs: list[tuple[dict[str, Any], TrainConfig]], session: RaySession) -> EvaluatorTask | None:
    """The evaluator as a placed Ray task with its options (None when none is handed in or ``evaluate``
    is off); nothing runs until :meth:`EvaluatorTask.submit`."""
    if evaluate is None or not sweep.evaluate:
        return None
    options = {"max_tokens": sweep.eval_max_tokens, "storage_options": runs[0][1].storage_options,
               **sweep.evaluator_options}
    task = evaluation_task(evaluate, sweep.ray.num_gpus_per_trainer > 0)
    return EvaluatorTask(task.options(**placement(sweep.ray, session)), options)


def run_row(assignment: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The summary row's identity: name, grid values, the SAE's init seed and its target l0 (if any)."""
    return {"name": cfg.name, **assignment, "seed": cfg.sae.get("seed", cfg.seed),
            "target_l0": cfg.sae.get("target_l0")}


def wait_for_runs(pending: dict[Any, tuple[dict[str, Any], TrainConfig]], actors: SweepActors,
                  bar: Any) -> tuple[dict[str, dict[str, Any]], dict[Any, str]]:
    """Collect every run's result as it finishes (handing it to the evaluator, if any); returns the
    summary rows by run name and {evaluation ObjectRef: run name}."""
    rows: dict[str, dict[str, Any]] = {}
    evals: dict[Any, str] = {}
    while pending:
        ref = actors.session.wait_one(list(pending))
        assignment, cfg = pending.pop(ref)
        row = run_row(assignment, cfg)
        try:
            result = ray.get(ref)
            row.update({"status": "finished", "run_url": result["run_url"]})
            row.update({k: result["metrics"].get(k) for k in SUMMARY_METRICS})
            if actors.evaluator is not None:
                evals[actors.evaluator.submit(result["run_url"], actors.session)] = cfg.name
        except (ray.exceptions.RayError, UserError) as err:
            actors.feeders[stream_key(cfg)].done.remote(cfg.name)
            row.update({"status": "failed", "error": _one_line(err)})
        actors.session.forget_task(ref)
        rows[cfg.name] = row
        bar.update(1)
    return rows, evals


def collect_evals(rows: dict[str, dict[str, Any]], evals: dict[Any, str], session: RaySession) -> None:
    """Add each run's scalar eval metrics (``eval_*``) or its evaluation error to its row (waiting for each
    evaluation task; one that has ended is no longer the session's to cancel)."""
    for ref, name in evals.items():
        try:
            report = session.get(ref)
            report = report.model_dump(mode="json") if hasattr(report, "model_dump") else dict(report)
            rows[name].update({f"eval_{k}": v for k, v in report.items() if _scalar(v)})
        except ray.exceptions.RayError as err:
            rows[name].update({"eval_error": _one_line(err)})
        session.forget_task(ref)


def run_sweep(sweep: SweepConfig, source: str = "sweep", progress: bool = True,
              evaluator: Evaluator | None = None, evaluation: RunEvaluation | None = None,
              on_step: StepHook | None = None) -> dict[str, Any]:
    """Run every grid point to its budget, evaluate each finished run with ``evaluator`` (if given),
    write the summary; returns the summary dict. ``evaluation`` is handed to every run (its training
    metrics, :class:`trainer.run.RunEvaluation`), ``on_step`` to every trainer (:meth:`trainer.run.Run.fit`).
    Raises :class:`store.cluster.Interrupted` on SIGINT/SIGTERM."""
    runs = validate_sweep(sweep, source)
    first = runs[0][1]
    # one sweep writes a sweep directory at a time: a second one waits, then finds the runs finished
    with leased(join_url(first.runs_root, sweep.name), "sweep", first.storage_options,
                take_over_stale=first.take_over_stale_lease, take_over_key="base.take_over_stale_lease"):
        # however the sweep ends (a signal included), none of its actors or tasks outlives it
        with ray_session(sweep.ray.address, address_key="ray.address") as session:
            summary = train_and_evaluate(sweep, runs, evaluator, SweepActors(session), progress, evaluation,
                                         on_step)
    failed = [r for r in summary["runs"] if r["status"] != "finished"]
    if failed:
        raise UserError(f"sweep {sweep.name}: {len(failed)} of {len(summary['runs'])} runs failed "
                        f"(first: {failed[0]['name']}: {failed[0]['error']}); see {summary['summary_url']}.")
    return summary


def train_and_evaluate(sweep: SweepConfig, runs: list[tuple[dict[str, Any], TrainConfig]],
                       evaluator: Evaluator | None, actors: SweepActors, progress: bool,
                       evaluation: RunEvaluation | None = None, on_step: StepHook | None = None) -> dict[str, Any]:
    """The sweep's phases: feeders, then per phase the trainers, the wait for every run (each handed to
    the evaluator as it finishes) and the evaluations; the summary. One phase, or with ``match_l0`` two
    (:mod:`trainer.matching`): the second phase's runs get their target from the first phase's held-out
    L0 and are served by the same feeders (one store read per batch while the window holds the run).
    The feeders and the evaluator are recorded in ``actors``."""
    check_placement(runs, sweep.ray, actors.session)
    start_feeders(runs, sweep.ray, actors)
    actors.evaluator = start_evaluator(evaluator, sweep, runs, actors.session)
    phases = [runs]
    if sweep.match_l0 is not None:
        if actors.evaluator is None:
            raise UserError(f"sweep {sweep.name}: match_l0 needs the held-out L0 of its {sweep.match_l0} runs; run it "
                            "with `dynsae sweep` (which evaluates) and evaluate: true.")
        phases = list(split_phases(runs, sweep.match_l0))
    from tqdm.auto import tqdm

    rows: dict[str, dict[str, Any]] = {}
    trained: dict[str, tuple[dict[str, Any], TrainConfig]] = {}
    with tqdm(total=len(runs), unit="run", desc=f"sweep {sweep.name}", disable=not progress) as bar:
        for i, phase in enumerate(phases):
            if i == 1:  # matched phase: the reference family's held-out L0 becomes the target
                l0_of = {name: row.get("eval_l0") for name, row in rows.items()}
                why = {name: str(row.get("eval_error") or row.get("error")) for name, row in rows.items()
                       if row.get("eval_error") or row.get("error")}
                phase = with_targets(phase, reference_l0(phases[0], sweep.match_l0, l0_of, why), sweep.match_l0)
                for _, cfg in phase:
                    RunPlan(cfg).check_existing()
            trained.update({cfg.name: (assignment, cfg) for assignment, cfg in phase})
            pending = launch_trainers(phase, sweep.ray, actors, evaluation, on_step)
            phase_rows, evals = wait_for_runs(pending, actors, bar)
            collect_evals(phase_rows, evals, actors.session)
            rows.update(phase_rows)
    reads = {json.dumps(list(key[:3])): actors.session.get(f.reads.remote()) for key, f in actors.feeders.items()}
    return summarize(sweep, [trained[cfg.name] for _, cfg in runs], rows, reads)


def summarize(sweep: SweepConfig, runs: list[tuple[dict[str, Any], TrainConfig]], rows: dict[str, dict[str, Any]],
              reads: dict[str, Any]) -> dict[str, Any]:
    """The summary (rows in grid order), written to the sweep directory (:func:`trainer.run_format.write_summary`)."""
    first = runs[0][1]
    sweep_url = join_url(first.runs_root, sweep.name)
    summary = SweepSummary(sweep=sweep.name, grid=sweep.grid, runs=[rows[cfg.name] for _, cfg in runs],
                           feeder_reads=reads, summary_url=summary_url(sweep_url))
    write_summary(sweep_url, summary, first.storage_options)
    return summary.model_dump(mode="json")


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        text = str(cause).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:300]
