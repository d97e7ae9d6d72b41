"""Configs of one training run (:class:`TrainConfig`) and of a sweep (:class:`SweepConfig`).

Decisions written down here (beyond ``docs/sweep.md``):

* ``sae`` is the SAE zoo config (:class:`trainer.sae.SAEConfig`) *without* ``d``: ``d`` comes from the
  dataset manifest and is filled in by :func:`resolve_sae`; a ``d`` given by hand must agree with it.
* ``tokens`` is the budget in *rows drawn from the dataset*: the run takes
  ``ceil(tokens / batch_size)`` steps, batch ``b`` of step ``b`` being ``ActivationLoader.batch(b)``.
  Rows dropped by the row filter (``exclude_positions``, ``max_norm_multiple``) count against the
  budget but are not trained on; ``metrics.jsonl`` reports both (``tokens`` and ``tokens_trained``).
* ``seed`` seeds the SAE initialisation and the trainer's RNGs; ``data_seed`` seeds the loader's
  shuffle. They are separate so a seed sweep compares initialisations on one shared batch stream
  (which is what lets one feeder serve the whole sweep).
* ``dead_tokens``: a concept is dead when it has not fired for that many (trained) tokens. The
  default ``None`` means ``min(10_000_000, max(batch_size, tokens // 10))``: 10M as in the SAE
  literature for real runs, a tenth of the budget for small ones (a 1M-token test run would otherwise
  call every concept alive). It is also the SAE's own ``dead_tokens`` (AuxK) unless ``sae.dead_tokens``
  is set, and ``seed`` is the SAE's initialisation seed unless ``sae.seed`` is set.
* ``decay``: ``none`` keeps the lr flat after warm-up; ``linear`` / ``cosine`` take it to 0 over the
  last ``decay_fraction`` of the steps. The lr is a pure function of (step, total steps).
* ``tokens``, ``storage_options`` and ``device`` are the only fields that may differ when an existing
  run is resumed.
* A sweep's ``grid`` is one mapping (dotted key -> list of values: their product) or a list of such
  mappings (the union of their products), so one sweep can hold, say, the sparsemax family and the
  steered baselines side by side; ``sae.seed`` in a grid repeats a run with other initialisations.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from store.config import StrictModel, set_dotted, validate
from store.errors import UserError
from store.names import check_dir_name

#: Fields that may change between the run that made a run directory and a run that resumes it.
RESUMABLE_FIELDS = ("tokens", "storage_options", "device", "take_over_stale_lease")
#: Loader columns a training batch carries (positions so the row filter can drop BOS rows); here, not in
#: trainer.run, so the feeder, which reads them, never imports torch.
BATCH_COLUMNS = ("acts", "positions")

DEFAULT_DEAD_TOKENS = 10_000_000


class TrainConfig(StrictModel):
    """One SAE training run (``python -m trainer run CONFIG.yaml``)."""

    dataset: str = Field(description="URL of a sealed activation dataset (any fsspec URL).")
    runs_root: str = Field(description="URL under which run directories live.")
    name: str = Field(description="run name: the run directory is <runs_root>/[<sweep>/]<name>/.")
    sweep: str | None = Field(default=None, description="sweep name (set by the sweep), a directory level.")
    sae: dict[str, Any] = Field(description="SAE zoo config without d (variant, m, k, l1, activation, ...).")
    batch_size: int = Field(default=4096, gt=0)
    tokens: int = Field(gt=0, description="token budget: rows drawn from the dataset.")
    lr: float = Field(default=3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay: Literal["none", "linear", "cosine"] = "none"
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    seed: int = 0
    data_seed: int = 0
    checkpoint_every: int = Field(default=1000, gt=0, description="steps between checkpoints.")
    log_every: int = Field(default=50, gt=0, description="steps between logged metrics rows.")
    eval_every: int | None = Field(default=None, gt=0, description="steps between eval-split fvu/l0 rows.")
    eval_tokens: int = Field(default=65536, gt=0, description="eval-split rows scored at each eval_every.")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    exclude_positions: list[int] = Field(default_factory=lambda: [0])
    max_norm_multiple: float | None = Field(default=None, gt=0)
    dead_tokens: int | None = Field(default=None, gt=0)
    scale_activations: bool = Field(default=True, description=(
        "train on x/s with s = median‖x‖/√d from the dataset statistics (sae.input_scale), as SAELens does: "
        "L1/L0 coefficients and learning rates then mean the same on every model and layer."))
    storage_options: dict[str, Any] | None = None
    take_over_stale_lease: bool = Field(default=False, description=(
        "take over the run directory's lease (or, in a sweep's base, the sweep's) when its owner's heartbeat is "
        "stale: that writer is gone (store.lease)."))

    @field_validator("name", "sweep")
    @classmethod
    def _path_safe(cls, value: str | None) -> str | None:
        return check_dir_name(value)

    @field_validator("sae")
    @classmethod
    def _sae_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_sae(value)
        return value

    @property
    def total_steps(self) -> int:
        """Steps of the run: ceil(tokens / batch_size)."""
        return math.ceil(self.tokens / self.batch_size)

    @property
    def resolved_dead_tokens(self) -> int:
        """Tokens without firing after which a concept counts as dead (see module docstring)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return min(DEFAULT_DEAD_TOKENS, max(self.batch_size, self.tokens // 10))

    def resolved_device(self) -> str:
        """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def check_sae(sae: dict[str, Any], d: int = 1) -> Any:
    """Validate an SAE section against its variant's config (``d`` a stand-in when unknown); return it.

    Raises ``ValueError`` (which pydantic turns into a located message) naming the bad key.
    """
    m = sae.get("m")
    if "variant" in sae and m is None:
        raise ValueError("sae.m (number of concepts) is required")
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
        raise ValueError(f"sae.m must be a positive integer, got {m!r}")
    from trainer.sae.registry import validate_sae

    return validate_sae({**sae, "d": sae.get("d", d)})


def resolve_sae(cfg: TrainConfig, d: int, typical_norm: float | None = None) -> Any:
    """The run's full :class:`trainer.sae.SAEConfig` with ``d`` from the dataset manifest (and, with
    ``scale_activations``, ``input_scale`` = typical_norm/√d unless sae.input_scale is set; the trainer
    passes the dataset's *median* norm, which attention-sink rows with 50-80x the norm cannot skew)."""
    given = cfg.sae.get("d")
    if given is not None and given != d:
        raise UserError(f"run {cfg.name}: sae.d = {given} but dataset {cfg.dataset} has d = {d}; "
                        "remove sae.d (it is read from the dataset).")
    sae = {**cfg.sae, "d": d}
    sae.setdefault("seed", cfg.seed)  # the run's seed initialises the SAE unless sae.seed is set
    from trainer.sae.registry import variant_class

    try:
        fields = variant_class(sae.get("variant")).config_class.model_fields
    except ValueError as err:
        raise UserError(f"run {cfg.name}: {err}; fix the sae section.") from None
    if "dead_tokens" in fields:
        sae.setdefault("dead_tokens", cfg.resolved_dead_tokens)  # AuxK's notion of dead = the trainer's
    if cfg.scale_activations and typical_norm and "input_scale" not in sae:
        sae["input_scale"] = float(typical_norm) / math.sqrt(d)
    try:
        return check_sae(sae, d)
    except ValueError as err:
        raise UserError(f"run {cfg.name}: {err}; fix the sae section.") from None


class RayConfig(StrictModel):
    """Where and how the sweep's feeders, training tasks and evaluation tasks run."""

    address: str | None = Field(default=None, description="Ray address; None = the job's cluster or local.")
    num_cpus_per_trainer: float = Field(default=1.0, ge=0)
    num_gpus_per_trainer: float = Field(default=0.0, ge=0)
    trainer_resources: dict[str, float] = Field(default_factory=dict, description=(
        "custom Ray resources each training task (and each evaluation task) asks for, e.g. {worker: 1} to keep "
        "them on nodes started with --resources='{\"worker\": 8}'; passed to the tasks' resources=."))
    max_restarts: int = Field(default=3, ge=-1, description=(
        "times Ray retries a run whose process or node died (it resumes from its checkpoint); -1: always."))
    max_task_retries: int = Field(default=-1, ge=-1, description=(
        "read by nothing since each run is a Ray task retried up to max_restarts times; accepted so older "
        "configs still load."))
    feeder_window: int = Field(default=32, gt=0, description=(
        "batches the feeder holds in the object store per group of trainers whose cursors are close; "
        "a trainer leads the next one in its group by at most this many batches."))
    feeder_prefetch: int = Field(default=2, ge=0, description="batches the feeder reads ahead.")
    feeder_lag_timeout_s: float = Field(default=120.0, gt=0,
                                        description="how long a leading trainer waits for a laggard of its group.")
    feeder_num_cpus: float = Field(default=0.0, ge=0, description=(
        "CPUs each feeder reserves (its loader reads with up to 8 threads locally, 16 on object storage): 0 lets Ray pack trainers onto every "
        "core of the feeder's node; on a node it shares with its trainers, reserve a few so their steps do "
        "not starve the stream (bench/README.md, 'Feeder ceiling')."))
    feeder_resources: dict[str, float] = Field(default_factory=dict, description=(
        "custom Ray resources each feeder asks for, to place it: e.g. {gpu_node: 0.01} with the GPU nodes "
        "started with --resources='{\"gpu_node\": 1}' puts it beside its trainers, whose batches then come "
        "through shared memory instead of Ray's object store; passed to the actor's resources=."))


Grid = dict[str, list[Any]]


class SweepConfig(StrictModel):
    """A grid of runs over one base run config (``python -m trainer sweep SWEEP.yaml``)."""

    #: Where ``--storage-options`` lands (store.config.load_config).
    storage_option_keys: ClassVar[tuple[str, ...]] = ("base.storage_options",)

    name: str
    base: dict[str, Any]
    grid: Grid | list[Grid] = Field(default_factory=dict, description=(
        "dotted key -> list of values (their product), or a list of such mappings (the union of their products)."))
    ray: RayConfig = Field(default_factory=RayConfig)
    evaluate: bool = Field(default=True, description="hand finished runs to the evaluator the sweep is given.")
    eval_max_tokens: int | None = Field(default=None, gt=0, description="cap on eval-split tokens scored.")
    evaluator_options: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of the evaluator the sweep is given "
                                          "(dynsae sweep: ce_contexts, zeroshot, device, batch_size).")
    match_l0: str | None = Field(default=None, description=(
        "reference variant (e.g. sparsemax): its runs train first, then every run that takes a target and has "
        "none gets sae.target_l0 = the reference's mean held-out L0 at its M (trainer.matching)."))

    @field_validator("name")
    @classmethod
    def _name_safe(cls, value: str) -> str:
        return check_dir_name(value)  # type: ignore[return-value]

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_shape(cls, value: Any) -> Any:
        """One sentence for a malformed grid (pydantic's own union errors would be a page)."""
        problem = grid_problem(value)
        if problem:
            raise PydanticCustomError("grid", problem)
        return value

    def grids(self) -> list[Grid]:
        """The grid as a list of mappings (one mapping = a one-element union)."""
        return list(self.grid) if isinstance(self.grid, list) else [self.grid]


def grid_problem(value: Any) -> str | None:
    """What is wrong with a grid (a mapping of dotted keys to non-empty lists, or a non-empty list of
    non-empty such mappings), or None."""
    if isinstance(value, list) and not value:
        return "the grid is an empty list; give at least one mapping of dotted keys to lists of values"
    grids = value if isinstance(value, list) else [value]
    for i, grid in enumerate(grids):
        where = f"grid[{i}]" if isinstance(value, list) else "grid"
        if not isinstance(grid, dict):
            return f"{where} must be a mapping of dotted keys to lists of values, not {type(grid).__name__}"
        if isinstance(value, list) and not grid:
            return f"{where} is an empty mapping; give it keys or remove it"
        for key, values in grid.items():
            if not isinstance(values, list):
                return f"{where} key {key!r} must hold a list of values, not {values!r}"
            if not values:
                return f"{where} key {key!r} has an empty list of values"
    return None


def run_name(assignment: dict[str, Any]) -> str:
    """Directory name of one grid point, e.g. ``variant-relu_m-3072`` (full dotted keys if leaves clash)."""
    leaves = [key.split(".")[-1] for key in assignment]
    use_full = len(set(leaves)) != len(leaves)
    parts = []
    for key, value in assignment.items():
        label = key.replace(".", "-") if use_full else key.split(".")[-1]
        text = re.sub(r"[^A-Za-z0-9._+-]", "", str(value).replace(" ", ""))
        parts.append(f"{label}-{text}")
    return "_".join(parts) or "run"


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every assignment of the grid in order: the product of each mapping, the mappings one after another."""
    points: list[dict[str, Any]] = []
    for grid in sweep.grids():
        keys = list(grid)
        points += [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return points


def expand_sweep(sweep: SweepConfig, source: str = "sweep") -> list[tuple[dict[str, Any], TrainConfig]]:
    """Every grid point as (assignment, validated TrainConfig); any bad point is one UserError."""
    runs: list[tuple[dict[str, Any], TrainConfig]] = []
    names: dict[str, dict[str, Any]] = {}
    for assignment in grid_points(sweep):
        data = _deep_copy(sweep.base)
        for key, value in assignment.items():
            if key.startswith("base."):
                key = key[len("base."):]
            set_dotted(data, key.split("."), value)
        base_name = data.get("name")
        name = run_name(assignment)
        data["name"] = f"{base_name}_{name}" if base_name and assignment else (base_name or name)
        data["sweep"] = sweep.name
        where = f"{source} (grid point {_describe(assignment)})"
        cfg = validate(TrainConfig, data, source=where)
        if cfg.name in names:
            raise UserError(f"{source}: grid points {_describe(names[cfg.name])} and {_describe(assignment)} "
                            f"both get the run name {cfg.name!r}; make the grid values distinct.")
        names[cfg.name] = assignment
        runs.append((assignment, cfg))
    return runs


def _describe(assignment: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in assignment.items()) or "base"


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
