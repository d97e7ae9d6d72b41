"""The run directory format: every file name of a run and a sweep directory, and typed read/write of each.

This module is the contract between the trainer (which writes a run), the evaluator (which writes
``eval.json`` and reads everything), the report, export and foreign-SAE loading. Nothing else names
these files. The format is written down in ``docs/run-format.md``; change both together and bump
:data:`FORMAT_VERSION` when a file changes shape, keeping a reader for the older shape.

A run directory ``<runs_root>/[<sweep>/]<name>/``:

* ``config.json`` — :class:`RunConfig`: the run's training settings, the resolved ``sae`` section,
  the row ``filter`` the trainer applied (the evaluator applies the same one), the dataset's manifest
  hash. A directory written by ``SAE.save`` holds the SAE config itself here (no ``sae`` key).
* ``sae.safetensors`` — the weights as of the last checkpoint.
* ``trainer_state.pt`` — the checkpoint's commit record (written last; see :mod:`trainer.checkpoint`).
* ``metrics.jsonl`` — one :class:`MetricsLine` per logged step.
* ``eval.json`` — :class:`EvalRecord` (the evaluator's ``EvalReport`` derives from it and declares
  the metric fields).

A sweep directory ``<runs_root>/<sweep>/`` holds its runs plus ``summary.json`` (:class:`SweepSummary`),
``summary.csv`` (one row per run) and the report's ``report.md``.

Versioning: ``config.json``, ``eval.json`` and ``summary.json`` carry ``format_version``. A file
without it was written before the format was versioned and reads as version 0 (its row filter is
rebuilt from the top-level ``exclude_positions`` / ``max_norm_multiple`` keys, as the trainer of
that time applied it). A file from a newer version is refused in one sentence.
"""

from __future__ import annotations

import csv
import io as _pyio
import json
import math
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ConfigDict, Field, ValidationError, model_validator

from store import io
from store.config import StrictModel
from store.errors import UserError
from store.filters import RowFilter
from store.lease import LEASE_FILE

#: Version of the run directory format written by this code (see the module docstring).
FORMAT_VERSION = 1

# ---- file names (the only place they are spelled) -------------------------------------------------
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"
REPORT_FILE = "report.md"
#: The writer's lease while a run or sweep writes its directory (spelled in store.lease: datasets take it too).
RUN_LEASE_FILE = LEASE_FILE

#: Folders of other libraries that ``dynsae eval``/``concepts`` read and ``dynsae export`` writes.
FOREIGN_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = WEIGHTS_FILE  # sparsify's weights file has the same name as ours

#: Defaults of the trainer's row filter (what a run that wrote no filter applied).
DEFAULT_EXCLUDE_POSITIONS = (0,)


class OpenRecord(StrictModel):
    """A record whose readers need some keys typed and keep the rest as written (``model_extra``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())


# ---- config.json ---------------------------------------------------------------------------------


class RowFilterRecord(StrictModel):
    """The row filter of a run: rows at ``exclude_positions`` and rows with ‖x‖ > ``max_norm_multiple`` ×
    the dataset's median norm are dropped (:class:`store.filters.RowFilter`)."""

    exclude_positions: list[int]
    max_norm_multiple: float | None
    median_norm: float | None = Field(None, description="The dataset's median ‖x‖ the norm filter used "
                                                         "(None without a norm filter).")
    description: str = ""

    @model_validator(mode="after")
    def _describe(self) -> RowFilterRecord:
        if not self.description:
            object.__setattr__(self, "description", self.row_filter().describe())
        return self

    @classmethod
    def of(cls, row_filter: RowFilter, median_norm: float | None) -> RowFilterRecord:
        return cls(exclude_positions=list(row_filter.exclude_positions), max_norm_multiple=row_filter.max_norm_multiple,
                   median_norm=median_norm, description=row_filter.describe())

    def row_filter(self) -> RowFilter:
        return RowFilter(exclude_positions=list(self.exclude_positions), max_norm_multiple=self.max_norm_multiple)


#: Keys of ``config.json`` the trainer adds to the run's training settings.
RECORD_KEYS = ("format_version", "filter", "dataset_manifest_hash", "total_steps", "dead_tokens_resolved")


class RunConfig(OpenRecord):
    """``config.json`` of a trainer run. The keys every reader uses are typed here; the rest are the
    training settings (``trainer.config.TrainConfig``'s fields, validated by it when the trainer writes
    the file) and ride along in ``model_extra``."""

    format_version: int = FORMAT_VERSION
    name: str | None = None
    dataset: str | None = None
    sae: dict[str, Any]
    filter: RowFilterRecord = Field(description="The row filter the trainer applied; the evaluator applies it too.")
    dataset_manifest_hash: str | None = None
    total_steps: int | None = None
    dead_tokens_resolved: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A config without a ``filter`` block (version 0): the filter from the top-level
        ``exclude_positions`` / ``max_norm_multiple`` keys, the trainer's defaults where absent."""
        if isinstance(data, dict) and "filter" not in data:
            data = {**data, "filter": {"exclude_positions": list(data.get("exclude_positions", DEFAULT_EXCLUDE_POSITIONS)),
                                       "max_norm_multiple": data.get("max_norm_multiple")}}
        return data

    def settings(self) -> dict[str, Any]:
        """The training settings alone (what ``TrainConfig`` validates): the record without the keys the
        trainer adds (:data:`RECORD_KEYS`)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RECORD_KEYS}

    def with_dataset(self, dataset_url: str | None) -> RunConfig:
        """This config evaluated on another dataset (``--dataset``), or itself."""
        return self if not dataset_url else self.model_copy(update={"dataset": dataset_url})


def _versioned(data: dict[str, Any], url: str) -> dict[str, Any]:
    """The file's contents with its ``format_version`` (0 when it has none); a newer one is refused."""
    version = data.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{url} has run format version {version}, newer than this dynsae reads "
                        f"({FORMAT_VERSION}); upgrade dynsae to read it.")
    return {**data, "format_version": version}


M = TypeVar("M", bound=StrictModel)


def _read(url: str, model: type[M], storage_options: io.StorageOptions, what: str) -> M | None:
    data = io.read_json_object(url, storage_options, what=what)
    return None if data is None else _validate(data, url, model, what)


def _validate(data: dict[str, Any], url: str, model: type[M], what: str) -> M:
    try:
        return model.model_validate(_versioned(data, url))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise UserError(f"{url} is not {what}: {loc or 'the file'}: {first.get('msg')}; "
                        "point at a directory written by dynsae.") from None


def config_url(run_url: str) -> str:
    return io.join_url(run_url, CONFIG_FILE)


def read_config_json(run_url: str, storage_options: io.StorageOptions = None) -> dict[str, Any] | None:
    """The raw ``config.json`` (a run config or a bare SAE config), or None when absent."""
    return io.read_json_object(config_url(run_url), storage_options, what="an SAE or run config")


def read_run_config(run_url: str, storage_options: io.StorageOptions = None) -> RunConfig | None:
    """The run's ``config.json`` as a :class:`RunConfig`; None when absent or when it is a bare SAE
    config (written by ``SAE.save``, no ``sae`` key)."""
    data = read_config_json(run_url, storage_options)
    if data is None or "sae" not in data:
        return None
    return _validate(data, config_url(run_url), RunConfig, "a trainer run config")


def write_run_config(run_url: str, config: RunConfig, storage_options: io.StorageOptions = None) -> None:
    io.write_json(config_url(run_url), config.model_dump(mode="json"), storage_options)


def read_sae_config(run_url: str, storage_options: io.StorageOptions = None) -> dict[str, Any] | None:
    """The SAE config of a run directory (its ``sae`` section) or of a directory written by ``SAE.save``."""
    data = read_config_json(run_url, storage_options)
    if data is None:
        return None
    return data["sae"] if "sae" in data else data


def write_sae_config(url: str, sae_config: dict[str, Any], storage_options: io.StorageOptions = None) -> None:
    """``config.json`` of a directory holding an SAE on its own (``SAE.save``)."""
    io.write_json(config_url(url), sae_config, storage_options)


def weights_url(run_url: str) -> str:
    return io.join_url(run_url, WEIGHTS_FILE)


# ---- metrics.jsonl -------------------------------------------------------------------------------


class MetricsLine(OpenRecord):
    """One line of ``metrics.jsonl``: the step and tokens it was logged at, then the logged values
    (loss terms named by the variant, training metrics, ``eval_*`` on eval steps)."""

    step: int
    tokens: int


def write_metrics(run_url: str, rows: list[dict[str, Any]], storage_options: io.StorageOptions = None) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) with ``rows``, each a :class:`MetricsLine`."""
    lines = (json.dumps(MetricsLine.model_validate(r).model_dump(mode="json"), sort_keys=True) + "\n" for r in rows)
    io.write_bytes(io.join_url(run_url, METRICS_FILE), "".join(lines).encode(), storage_options)


def read_metrics(run_url: str, storage_options: io.StorageOptions = None) -> list[MetricsLine]:
    """The lines of ``metrics.jsonl``; a line that is not a metrics object is a UserError naming it."""
    url = io.join_url(run_url, METRICS_FILE)
    raw = io.read_bytes(url, storage_options)
    if not raw:
        return []
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(MetricsLine.model_validate_json(line))
        except ValidationError:
            raise UserError(f"line {number} of {url} is not a JSON object with step and tokens; the file is "
                            "corrupt — delete that line (or the file) and resume.") from None
    return rows


# ---- eval.json -----------------------------------------------------------------------------------


class TokenCounts(StrictModel):
    """Eval-split rows read, kept by the row filter, dropped by it; CE tokens scored."""

    eval_rows: int
    kept: int
    dropped: int
    ce_tokens: int = 0


class EvalRecord(OpenRecord):
    """``eval.json`` as every reader sees it: what was evaluated, on what, with which filter. The metric
    fields are declared by ``evaluator.evaluate.EvalReport`` (which derives from this class and is
    strict); here they ride along in ``model_extra`` and are read with :meth:`metric`, so eval.json
    files from any version of the metric set read."""

    format_version: int = FORMAT_VERSION
    metrics_version: str | None = None
    run_url: str | None = None
    dataset_url: str | None = None
    dataset_manifest_hash: str | None = None
    model: str | None = None
    hook_layer: int | None = None
    hook_site: str | None = None
    variant: str | None = None
    m: int | None = None
    d: int | None = None
    input_norm: str | None = None
    filter: RowFilterRecord | None = None
    tokens: TokenCounts | None = None

    def value(self, key: str) -> Any:
        """Any field of the file by name (declared or not); None when absent."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key)

    def metric(self, key: str) -> float | None:
        """A finite scalar metric by name (None when absent, not computed or not finite)."""
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) else None


def eval_url(run_url: str) -> str:
    return io.join_url(run_url, EVAL_FILE)


def write_eval(url: str, record: EvalRecord, storage_options: io.StorageOptions = None) -> None:
    """Write an eval record to ``url`` (``<run>/eval.json`` from :func:`eval_url`, or ``--out``)."""
    io.write_json(url, record.model_dump(mode="json"), storage_options)


def read_eval(run_url: str, storage_options: io.StorageOptions = None) -> EvalRecord | None:
    """``<run>/eval.json``, or None when the run was not evaluated."""
    return _read(eval_url(run_url), EvalRecord, storage_options, "an eval report")


# ---- a run read back -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One run as read back from its directory: its config and its eval report (None: not evaluated).
    The report, the matched-sparsity comparison and the sweep's matching all read runs as this."""

    name: str
    url: str
    config: RunConfig
    eval: EvalRecord | None = None

    @property
    def sae(self) -> dict[str, Any]:
        return self.config.sae

    @property
    def variant(self) -> str:
        return str(self.sae.get("variant", "?"))

    @property
    def m(self) -> int:
        return int(self.sae.get("m", 0))

    @property
    def input_norm(self) -> str:
        return str(self.sae.get("input_norm", "none"))

    @property
    def seed(self) -> int | None:
        """The SAE's initialisation seed."""
        seed = self.sae.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def target_l0(self) -> float | None:
        """The run's L0 target (absent on runs older than the field)."""
        value = self.sae.get("target_l0")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def config_key(self) -> str:
        """The SAE config without its seed (canonical JSON): runs with the same key differ only in the seed."""
        return json.dumps({k: v for k, v in self.sae.items() if k != "seed"}, sort_keys=True, default=str)

    def metric(self, key: str) -> float | None:
        """A scalar from eval.json (None when missing or not evaluated)."""
        return None if self.eval is None else self.eval.metric(key)

    @property
    def l0(self) -> float | None:
        return self.metric("l0")

    @classmethod
    def of(cls, name: str, config: dict[str, Any], ev: dict[str, Any] | None = None, url: str = "") -> RunRecord:
        """A record from the two files' contents (e.g. in tests)."""
        return cls(name, url, RunConfig.model_validate(config),
                   None if ev is None else EvalRecord.model_validate(ev))


def read_run(run_url: str, name: str | None = None, storage_options: io.StorageOptions = None) -> RunRecord | None:
    """The run at ``run_url`` (config.json + eval.json), or None when it holds no run config."""
    config = read_run_config(run_url, storage_options)
    if config is None:
        return None
    name = name or config.name or run_url.rstrip("/").rsplit("/", 1)[-1]
    return RunRecord(name, run_url, config, read_eval(run_url, storage_options))


# ---- the sweep directory -----------------------------------------------------------------------------


class SummaryRow(OpenRecord):
    """One run's row of the sweep summary: name and status, then its grid values, the SAE's seed and
    target l0, its last training metrics and its scalar eval metrics (``eval_*``) or error."""

    name: str
    status: str


class SweepSummary(StrictModel):
    """``summary.json`` of a sweep (``summary.csv`` holds its rows)."""

    format_version: int = FORMAT_VERSION
    sweep: str
    grid: Any = None
    runs: list[SummaryRow]
    feeder_reads: dict[str, Any] = Field(default_factory=dict)
    summary_url: str | None = None


def summary_url(sweep_url: str) -> str:
    return io.join_url(sweep_url, SUMMARY_FILE)


def write_summary(sweep_url: str, summary: SweepSummary, storage_options: io.StorageOptions = None) -> None:
    """``summary.json`` (everything) and ``summary.csv`` (one row per run), written atomically."""
    io.write_json(summary_url(sweep_url), summary.model_dump(mode="json"), storage_options)
    rows = [r.model_dump(mode="json") for r in summary.runs]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = _pyio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    io.write_bytes(io.join_url(sweep_url, SUMMARY_CSV), buf.getvalue().encode(), storage_options)


def read_summary(sweep_url: str, storage_options: io.StorageOptions = None) -> SweepSummary | None:
    return _read(summary_url(sweep_url), SweepSummary, storage_options, "a sweep summary")


def read_sweep(sweep_url: str, storage_options: io.StorageOptions = None) -> list[RunRecord]:
    """The sweep's runs, in ``summary.json`` order when there is one, else every sub-directory holding a
    run config, sorted by name ([] when there are none)."""
    summary = read_summary(sweep_url, storage_options)
    if summary is not None:
        entries = [(row.name, (row.model_extra or {}).get("run_url") or io.join_url(sweep_url, row.name))
                   for row in summary.runs]
    else:
        entries = [(name, io.join_url(sweep_url, name)) for name in io.list_dir(sweep_url, storage_options)
                   if io.exists(io.join_url(sweep_url, name, CONFIG_FILE), storage_options)]
    runs = [read_run(url, name, storage_options) for name, url in entries]
    return [r for r in runs if r is not None]


def report_url(sweep_url: str) -> str:
    return io.join_url(sweep_url, REPORT_FILE)


# ---- folders of other libraries --------------------------------------------------------------------


def folder_kind(url: str, storage_options: io.StorageOptions = None) -> str | None:
    """``"run"`` (ours: config.json), ``"saelens"``, ``"sparsify"`` or None from the files present."""
    if io.exists(io.join_url(url, FOREIGN_CONFIG), storage_options):
        if io.exists(io.join_url(url, SAELENS_WEIGHTS), storage_options):
            return "saelens"
        if io.exists(io.join_url(url, SPARSIFY_WEIGHTS), storage_options):
            return "sparsify"
    if io.exists(config_url(url), storage_options):
        return "run"
    return None


def neither_error(url: str) -> UserError:
    """The sentence for a folder that is none of the SAE folders we read."""
    return UserError(f"{url} has no {CONFIG_FILE} + {WEIGHTS_FILE} (a dynsae run), no {FOREIGN_CONFIG} + "
                     f"{SAELENS_WEIGHTS} (a SAELens folder) and no {FOREIGN_CONFIG} + {SPARSIFY_WEIGHTS} (a sparsify "
                     "folder); point at one of those.")
