"""Score one trainer run on its dataset's held-out ``eval`` split and write ``<run>/eval.json``.

What is measured (definitions in :mod:`evaluator.metrics`, ``docs/metrics.md``):

* Reconstruction (fvu, nmse_uncentered, explained_variance) on the rows the run's row filter
  keeps (``exclude_positions``, ``max_norm_multiple`` — the same :class:`store.filters.RowFilter`
  the trainer used) — these are the headline numbers — and on *all* eval rows
  (``*_unfiltered``), so the effect of the filter is visible.
* Sparsity on the kept rows: l0, the support-size histogram and quantiles, dead/dense
  fractions, correlation of the support size with ‖x‖ and with the position; and the TopK K
  suggested by the support distribution.
* Downstream CE when the dataset's model is an HF causal LM that loads
  (:func:`harvester.models.load_model` from the manifest's model fields): ``ce_contexts``
  eval contexts (rows grouped by ``seq_id``, positions 0..T−1), the SAE spliced at the
  dataset's hook at every position except 0 and the run's excluded positions; rows the
  norm filter would drop pass through unmodified. Otherwise skipped with the reason
  recorded in ``ce_skipped``.
* Zero-shot concept classification (vision) when a :class:`~evaluator.zeroshot.ZeroShotConfig`
  is given and the dataset's model is open_clip.
* Ground truth (``gt_mcc``, ``gt_recovered``, ``gt_f1``, ``gt_l0_spearman``, ``docs/metrics.md``) when
  the dataset has a ``ground_truth.safetensors`` (``dynsae synth``): the SAE's unit decoder directions
  (``decoder_directions()``) matched to the true features, and per kept eval row the latents that
  fire against the features present (looked up by the row's ``seq_id``). Otherwise skipped with
  the reason in ``gt_skipped``; CE and zero-shot are skipped on a synthetic dataset (no model).
* Sparse probing whenever the dataset has labels (labelled text, or images with classes):
  the codes and the raw activations of the kept eval rows are mean-pooled per document (a
  labelled text document: the sequences sharing its ``doc_ids`` entry; an image: its rows), and
  :func:`evaluator.metrics.probe_metrics` gives ``probe_top{n}``, ``probe_raw_top{n}`` and
  ``probe_raw_all`` (docs/metrics.md). Otherwise skipped with the reason in ``probe_skipped``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from evaluator.ce import splice_ce
from evaluator.metrics import (
    METRICS_VERSION,
    RECOVERED_COSINE,
    DocumentMeans,
    GroundTruthAccumulator,
    ReconstructionAccumulator,
    SparsityAccumulator,
    feature_matching,
    probe_metrics,
    suggest_topk,
)
from store.errors import UserError
from store.filters import RowFilter
from trainer.run_format import (
    FORMAT_VERSION,
    EvalRecord,
    RowFilterRecord,
    TokenCounts,
    eval_url,
    write_eval,
)

DEFAULT_CE_CONTEXTS = 64
SYNTHETIC_NO_MODEL = "synthetic dataset (dynsae synth): there is no model to splice the SAE into"


class EvalReport(EvalRecord):
    """Everything an evaluation writes (the run format's eval record, :class:`trainer.run_format.EvalRecord`),
    with every metric field declared here: the one place a metric joins ``eval.json``. Scalars at the top
    level (the sweep summary picks them up as ``eval_*``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    format_version: int = FORMAT_VERSION
    metrics_version: str = METRICS_VERSION
    evaluator: str = "evaluator"
    package_version: str | None
    git_commit: str | None
    created: str
    run_url: str
    dataset_url: str
    dataset_manifest_hash: str
    model: str | None
    hook_layer: int
    hook_site: str
    variant: str
    m: int
    d: int
    input_norm: str
    device: str
    filter: RowFilterRecord
    tokens: TokenCounts
    # headline metrics (kept rows)
    fvu: float | None
    nmse_uncentered: float | None
    explained_variance: float | None
    l0: float | None
    dead_frac: float
    dense_frac: float
    support_median: float | None
    support_norm_corr: float | None
    support_position_corr: float | None
    # the same reconstruction metrics over every eval row, filtered ones included
    fvu_unfiltered: float | None
    nmse_uncentered_unfiltered: float | None
    explained_variance_unfiltered: float | None
    # downstream CE (None with ce_skipped set when not computed)
    ce_clean: float | None = None
    ce_sae: float | None = None
    ce_zero: float | None = None
    ce_degradation: float | None = None
    ce_recovered: float | None = None
    kl: float | None = None
    ce_skipped: str | None = None
    # details
    reconstruction: dict[str, dict[str, Any]] = Field(description="'kept' and 'all' rows.")
    sparsity: dict[str, Any] = Field(description="l0, histogram, quantiles, dead/dense, correlations.")
    suggested_topk: dict[str, Any]
    ce: dict[str, Any] | None = None
    zeroshot: dict[str, Any] | None = None
    zeroshot_skipped: str | None = None
    # ground truth (synthetic datasets; None with gt_skipped set otherwise)
    gt_mcc: float | None = None
    gt_recovered: float | None = None
    gt_f1: float | None = None
    gt_l0_spearman: float | None = None
    gt_skipped: str | None = None
    ground_truth: dict[str, Any] | None = None
    # sparse probing (None with probe_skipped set when the dataset has no labels)
    probe_top1: float | None = None
    probe_top5: float | None = None
    probe_top10: float | None = None
    probe_top50: float | None = None
    probe_raw_top1: float | None = None
    probe_raw_top5: float | None = None
    probe_raw_top10: float | None = None
    probe_raw_top50: float | None = None
    probe_raw_all: float | None = None
    probe_skipped: str | None = None
    probe: dict[str, Any] | None = Field(default=None, description="documents, split, classes, majority baseline.")


# ---- small helpers ---------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def package_version() -> str | None:
    """Installed version of the ``dynsae`` distribution."""
    try:
        return importlib.metadata.version("dynsae")
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the checkout this package runs from (suffix ``-dirty`` with local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def codes_rows(codes: Any, mask: Tensor) -> Any:
    """The rows of a ``Codes`` object selected by a bool mask (B,)."""
    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[mask]

    return type(codes)(m=codes.m, idx=pick(codes.idx), val=pick(codes.val), dense=pick(codes.dense),
                       norms=pick(codes.norms))


# ---- the eval-split pass ---------------------------------------------------------------------


@dataclass
class ProbeDocuments:
    """The eval split's documents of a labelled dataset: the document of each sequence, the sorted
    documents with eval rows and their classes."""

    doc_of_seq: Tensor  # (n_sequences,) int64
    documents: np.ndarray  # sorted unique document ids of the eval sequences
    labels: np.ndarray  # class of each of ``documents``


def probe_documents(dataset: Any) -> ProbeDocuments | None:
    """The eval documents of ``dataset`` (None when it has no labels): labelled text groups the
    sequences by ``doc_ids``, any other labelled dataset (images) makes each sequence a document."""
    labels = dataset.labels()
    if labels is None:
        return None
    doc_of_seq = dataset.doc_ids()
    ctx = dataset.manifest.context_length
    seqs = np.concatenate([np.arange(start // ctx, stop // ctx) for start, stop in dataset.split_row_ranges("eval")]
                          or [np.zeros(0, dtype=np.int64)])
    documents, first = np.unique(doc_of_seq[seqs], return_index=True)
    return ProbeDocuments(torch.from_numpy(doc_of_seq.astype(np.int64)), documents, labels[seqs[first]])


DENSE_SLICE = 1024  # rows of codes made dense at a time for pooling


class EvalAccumulators:
    """Reconstruction over kept and over all rows, sparsity over kept rows, (with a ground truth and
    its feature matching) the ground-truth counts over kept rows, and (labelled datasets) the
    per-document means of the kept rows' codes and activations for sparse probing."""

    def __init__(self, m: int, truth: Any = None, assignment: Tensor | None = None, d: int | None = None,
                 probe: ProbeDocuments | None = None) -> None:
        self.kept = ReconstructionAccumulator()
        self.all = ReconstructionAccumulator()
        self.sparsity = SparsityAccumulator(m)
        self.truth = truth
        self.gt = None if truth is None else GroundTruthAccumulator(assignment, m)
        self.probe = probe
        self.probe_codes = None if probe is None else DocumentMeans(probe.documents, m)
        self.probe_raw = None if probe is None or d is None else DocumentMeans(probe.documents, d)

    def update(self, x: Tensor, x_hat: Tensor, codes: Any, keep: Tensor, positions: Tensor | None,
               seq_ids: Tensor | None = None) -> None:
        """One batch: rows ``x``, reconstructions, their codes, the filter's keep mask (and the rows'
        seq_ids when there is a ground truth or document labels)."""
        self.all.update(x, x_hat)
        self.kept.update(x[keep], x_hat[keep])
        kept_codes = codes_rows(codes, keep)
        self.sparsity.update(kept_codes.support_sizes(), kept_codes.fire_counts(),
                             torch.linalg.vector_norm(x[keep].float(), dim=-1),
                             None if positions is None else positions[keep])
        if self.gt is not None:
            rows = seq_ids[keep].cpu().numpy()  # a synthetic row's seq_id is its global row index
            self.gt.update(kept_codes, self.truth.presence(rows))
        if self.probe is not None and seq_ids is not None:
            self.pool(x, codes, keep, seq_ids)

    def pool(self, x: Tensor, codes: Any, keep: Tensor, seq_ids: Tensor) -> None:
        """Add the kept rows' dense codes and activations to their documents' means."""
        assert self.probe is not None and self.probe_codes is not None
        docs = self.probe.doc_of_seq[seq_ids.to("cpu", torch.int64)]
        keep_cpu = keep.to("cpu")
        for start in range(0, x.shape[0], DENSE_SLICE):
            part = torch.zeros_like(keep_cpu)
            part[start:start + DENSE_SLICE] = keep_cpu[start:start + DENSE_SLICE]
            if not bool(part.any()):
                continue
            self.probe_codes.update(codes_rows(codes, part.to(keep.device)).to_dense().detach(), docs[part])
            if self.probe_raw is not None:
                self.probe_raw.update(x[part.to(x.device)], docs[part])

    def probe_result(self) -> dict[str, Any]:
        """:func:`evaluator.metrics.probe_metrics` of the pooled documents (``probe_skipped`` when the
        dataset has no labels)."""
        if self.probe is None or self.probe_codes is None or self.probe_raw is None:
            return {"probe_skipped": "the dataset has no labels (harvest labelled text with source.label_from, "
                                     "label_field or label_by)"}
        docs, codes = self.probe_codes.result()
        _, raw = self.probe_raw.result()
        labels = self.probe.labels[np.searchsorted(self.probe.documents, docs)]
        return probe_metrics(codes, raw, labels)


def score_eval_split(sae: torch.nn.Module, dataset_url: str, row_filter: RowFilter, median_norm: float | None, *,
                     max_tokens: int | None, batch_size: int, device: str,
                     storage_options: dict[str, Any] | None = None, progress: bool = True,
                     truth: Any = None, assignment: Tensor | None = None,
                     probe: ProbeDocuments | None = None) -> EvalAccumulators:
    """Stream the eval split through the SAE (no grad) into :class:`EvalAccumulators` (with
    ground-truth counts when ``truth`` and its feature ``assignment`` are given, and the
    per-document pools of sparse probing when ``probe`` gives the eval documents). ``max_tokens`` rows
    are the first rows of the split's seed-0 stream, and the loader reads only the windows that hold them
    (``max_rows``), not the windows after them that a stream reads ahead."""
    from store import ActivationLoader

    columns = ("acts", "positions") + (("seq_ids",) if truth is not None or probe is not None else ())
    loader = ActivationLoader(dataset_url, batch_size, split="eval", seed=0, epochs=1, max_rows=max_tokens,
                              columns=columns, storage_options=storage_options)
    acc = EvalAccumulators(sae.config.m, truth, assignment, sae.config.d, probe)
    total = loader.total_rows
    if total == 0:
        raise UserError(f"dataset {dataset_url} has no rows in its eval split; harvest with a non-zero "
                        "eval fraction (split.fraction) to evaluate on it.")
    bar = tqdm(total=total, desc="eval", unit="tok", unit_scale=True, disable=not progress)
    with loader, torch.no_grad():
        for batch in loader:
            x, positions = batch.acts_on(device), batch.positions.to(device)  # the one cast, on the device
            seq_ids = batch.seq_ids
            keep = row_filter.keep_mask(x, positions, median_norm)
            codes = sae.encode(x)
            x_hat = sae.decode(codes, x)
            acc.update(x, x_hat, codes, keep, positions, None if seq_ids is None else seq_ids.to(device))
            bar.update(x.shape[0])
    bar.close()
    return acc


# ---- CE ----------------------------------------------------------------------------------------


def eval_contexts(dataset: Any, n_contexts: int) -> Tensor:
    """(n, T) token ids of the first ``n_contexts`` complete eval sequences (rows grouped by seq_id,
    positions 0..T−1, T = the manifest's context_length)."""
    import numpy as np

    t = dataset.manifest.context_length
    arrays = dataset.arrays
    if "token_ids" not in arrays:
        raise UserError(f"dataset {dataset.url} has no token_ids array; CE needs a text dataset.")
    out: list[np.ndarray] = []
    for start, stop in dataset.split_row_ranges("eval"):
        ids = np.asarray(arrays["token_ids"][start:stop]).astype(np.int64)
        seq = np.asarray(arrays["seq_ids"][start:stop])
        pos = np.asarray(arrays["positions"][start:stop]).astype(np.int64)
        for s in np.unique(seq):
            rows = seq == s
            if rows.sum() != t:
                continue
            order = np.argsort(pos[rows], kind="stable")
            if not np.array_equal(pos[rows][order], np.arange(t)):
                continue
            out.append(ids[rows][order])
            if len(out) >= n_contexts:
                return torch.from_numpy(np.stack(out))
    if not out:
        raise UserError(f"dataset {dataset.url} has no complete eval sequence of {t} tokens to compute CE on.")
    return torch.from_numpy(np.stack(out))


def sae_reconstruct(sae: torch.nn.Module, row_filter: RowFilter, median_norm: float | None):
    """rows -> x̂ for splicing; rows the norm filter drops pass through unmodified."""
    norm_only = RowFilter(exclude_positions=[], max_norm_multiple=row_filter.max_norm_multiple)

    def reconstruct(rows: Tensor) -> Tensor:
        dev = next(sae.parameters()).device
        x = rows.to(dev)
        x_hat = sae.decode(sae.encode(x), x).float()
        keep = norm_only.keep_mask(x, None, median_norm)
        return torch.where(keep[:, None], x_hat, x.float()).to(rows.device)

    return reconstruct


def load_dataset_model(model_info: Any, device: str, cache: dict[str, Any] | None = None) -> Any:
    """The dataset's model as a harvester ``ModelAdapter`` (:func:`harvester.models.load_model` from the
    manifest's model fields), cached by those fields and the device."""
    from harvester.config import ModelConfig
    from harvester.models import load_model

    fields = {k: v for k, v in model_info.model_dump().items() if v is not None and k in ModelConfig.model_fields}
    key = json.dumps({**fields, "device": device}, sort_keys=True)
    if cache is not None and key in cache:
        return cache[key]
    adapter = load_model(ModelConfig(**fields), device)
    if cache is not None:
        cache[key] = adapter
    return adapter


def ce_section(dataset: Any, sae: torch.nn.Module, row_filter: RowFilter, median_norm: float | None,
               ce_contexts: int, device: str, batch_size: int, model_cache: dict[str, Any] | None,
               progress: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(CE result, None) or (None, the reason it was skipped)."""
    info = dataset.manifest.model
    if ce_contexts <= 0:
        return None, "ce_contexts = 0"
    if dataset.manifest.generator is not None:
        return None, SYNTHETIC_NO_MODEL
    if info.kind != "hf_causal_lm":
        return None, f"model {info.name!r} is of kind {info.kind!r}, not an HF causal LM"
    if "token_ids" not in dataset.arrays:
        return None, f"dataset {dataset.url} stores no token_ids"
    try:
        model = load_dataset_model(info, device, model_cache).model
    except Exception as err:  # any load failure is recorded, not fatal
        return None, f"cannot load model {info.name!r}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    ids = eval_contexts(dataset, ce_contexts)
    skip = sorted({0, *row_filter.exclude_positions})
    res = splice_ce(model, ids, dataset.manifest.hook.layer, dataset.manifest.hook.site,
                    sae_reconstruct(sae, row_filter, median_norm), batch_size=batch_size,
                    skip_positions=skip, progress=progress)
    res["norm_filter_passthrough"] = row_filter.max_norm_multiple
    return res, None


# ---- the whole evaluation ----------------------------------------------------------------------


def evaluate_run(run_url: str, *, max_tokens: int | None = None, ce_contexts: int = DEFAULT_CE_CONTEXTS,
                 device: str = "cpu", batch_size: int = 4096, ce_batch_size: int = 8,
                 zeroshot: Any | None = None, storage_options: dict[str, Any] | None = None,
                 model_cache: dict[str, Any] | None = None, write: bool = True,
                 progress: bool = True, dataset_url: str | None = None, out: str | None = None) -> EvalReport:
    """Evaluate the run at ``run_url`` on its dataset's eval split; writes ``<run_url>/eval.json``.

    ``max_tokens`` caps the eval rows read (None: the whole split); ``ce_contexts`` eval contexts
    are used for CE (0 skips it); ``zeroshot`` (a :class:`evaluator.zeroshot.ZeroShotConfig`) adds
    zero-shot concept classification for open_clip datasets; ``model_cache`` keeps loaded models
    between calls (:mod:`evaluator.task` passes its process's). ``run_url`` may also be a SAELens or sparsify
    folder (:mod:`evaluator.foreign`, then ``dataset_url`` is required); ``dataset_url`` overrides a
    run's dataset, ``out`` the eval.json URL.
    """
    from evaluator.foreign import open_sae
    from store import open_dataset

    cfg, sae = open_sae(run_url, dataset_url, storage_options)
    dataset_url = cfg.dataset
    dataset = open_dataset(dataset_url, storage_options=storage_options)
    manifest = dataset.manifest
    sae = sae.to(device).eval()
    if sae.config.d != manifest.d:
        raise UserError(f"run {run_url} has an SAE of d = {sae.config.d} but its dataset {dataset_url} has "
                        f"d = {manifest.d}; the run config points at the wrong dataset.")
    row_filter = cfg.filter.row_filter()  # the filter the trainer wrote and applied
    median_norm = manifest.stats.median_norm if manifest.stats is not None else None
    truth, gt_skipped = ground_truth_of(dataset_url, manifest.d, storage_options)
    matching = None if truth is None else feature_matching(torch.from_numpy(truth.features), sae.decoder_directions())
    acc = score_eval_split(sae, dataset_url, row_filter, median_norm, max_tokens=max_tokens,
                           batch_size=batch_size, device=device, storage_options=storage_options,
                           progress=progress, truth=truth,
                           assignment=None if matching is None else matching["assignment"],
                           probe=probe_documents(dataset))
    kept, everything, sparsity = acc.kept.result(), acc.all.result(), acc.sparsity.result()
    gt = ground_truth_section(matching, acc.gt)
    probe = acc.probe_result()
    ce, ce_skipped = ce_section(dataset, sae, row_filter, median_norm, ce_contexts, device, ce_batch_size,
                                model_cache, progress)
    zs, zs_skipped = zeroshot_section(manifest, sae, row_filter, zeroshot, device, model_cache)
    ce = ce or {}
    report = EvalReport.model_validate(_clean({
        "package_version": package_version(),
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_url": run_url,
        "dataset_url": dataset_url,
        "dataset_manifest_hash": manifest.manifest_hash(),
        "model": manifest.model.name,
        "hook_layer": manifest.hook.layer,
        "hook_site": manifest.hook.site,
        "variant": sae.config.variant,
        "m": sae.config.m,
        "d": sae.config.d,
        "input_norm": "unit (always: cross-attention family)" if getattr(sae, "always_unit_norm", False)
        else sae.config.input_norm,
        "device": device,
        "filter": RowFilterRecord.of(row_filter, median_norm).model_dump(),
        "tokens": {"eval_rows": everything["rows"], "kept": kept["rows"],
                   "dropped": everything["rows"] - kept["rows"], "ce_tokens": ce.get("tokens", 0)},
        "fvu": kept["fvu"], "nmse_uncentered": kept["nmse_uncentered"],
        "explained_variance": kept["explained_variance"],
        "fvu_unfiltered": everything["fvu"], "nmse_uncentered_unfiltered": everything["nmse_uncentered"],
        "explained_variance_unfiltered": everything["explained_variance"],
        "l0": sparsity["l0"], "dead_frac": sparsity["dead_frac"], "dense_frac": sparsity["dense_frac"],
        "support_median": sparsity["support_median"], "support_norm_corr": sparsity["support_norm_corr"],
        "support_position_corr": sparsity["support_position_corr"],
        **{k: ce.get(k) for k in ("ce_clean", "ce_sae", "ce_zero", "ce_degradation", "ce_recovered", "kl")},
        "ce_skipped": ce_skipped,
        "reconstruction": {"kept": kept, "all": everything},
        "sparsity": sparsity,
        "suggested_topk": suggest_topk(sparsity),
        "ce": ce or None,
        "zeroshot": zs,
        "zeroshot_skipped": zs_skipped,
        **{k: gt.get(k) for k in ("gt_mcc", "gt_recovered", "gt_f1", "gt_l0_spearman")},
        "gt_skipped": gt_skipped,
        "ground_truth": {k: v for k, v in gt.items() if not k.startswith("gt_")} or None,
        **probe,
    }))
    if write:
        write_eval(out or eval_url(run_url), report, storage_options)
    return report


def ground_truth_of(dataset_url: str, d: int, storage_options: dict[str, Any] | None) -> tuple[Any, str | None]:
    """(the dataset's ground truth, None) or (None, the reason the gt_* metrics are skipped)."""
    from harvester import ground_truth

    truth = ground_truth.load(dataset_url, d, storage_options)
    if truth is None:
        return None, f"dataset {dataset_url} has no {ground_truth.FILE} (only `dynsae synth` datasets have a known dictionary)"
    return truth, None


def ground_truth_section(matching: dict[str, Any] | None, gt: GroundTruthAccumulator | None) -> dict[str, Any]:
    """The gt_* metrics and their details ({} without a ground truth)."""
    if matching is None or gt is None:
        return {}
    counts = gt.result()
    best = matching["best_cosine"]
    return {"gt_mcc": matching["gt_mcc"], "gt_recovered": matching["gt_recovered"], "gt_f1": counts["gt_f1"],
            "gt_l0_spearman": counts["gt_l0_spearman"], "features": int(best.numel()),
            "matched": int((matching["assignment"] >= 0).sum()), "recovered_cosine": RECOVERED_COSINE,
            "best_cosine_quantiles": {str(q): float(best.quantile(q)) for q in (0.1, 0.5, 0.9)},
            "f1_defined": counts["f1_defined"], "rows": counts["rows"], "true_l0_mean": counts["true_l0_mean"]}


def zeroshot_section(manifest: Any, sae: torch.nn.Module, row_filter: RowFilter, config: Any, device: str,
                     model_cache: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """Zero-shot results for open_clip datasets when a config is given; else (None, reason)."""
    if manifest.generator is not None:
        return None, SYNTHETIC_NO_MODEL
    if config is None or not config.datasets:
        return None, "no zero-shot datasets configured"
    if manifest.model.kind != "open_clip":
        return None, f"model {manifest.model.name!r} is not an open_clip model"
    from evaluator.zeroshot import zeroshot_eval

    model, preprocess, tokenizer = load_clip(manifest.model, device, model_cache)
    res = zeroshot_eval(model, preprocess, tokenizer, sae, manifest.hook.layer, manifest.hook.site, config,
                        skip_positions=row_filter.exclude_positions)
    return res, None


def load_clip(model_info: Any, device: str, cache: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """(model, preprocess, tokenizer) of the open_clip model named in a manifest (cached)."""
    import open_clip

    from harvester.models import open_clip_name

    adapter = load_dataset_model(model_info, device, cache)
    return adapter.model, adapter.preprocess, open_clip.get_tokenizer(open_clip_name(model_info))
