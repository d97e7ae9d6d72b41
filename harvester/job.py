"""The harvest job: plan on the driver, compute and write shards in Ray tasks, seal.

Order of work (every check that can fail on bad input runs before any worker starts):

1. model: depth, width and tokenizer (text) or preprocessing and token count (images);
   the hook layer is resolved against the real block list;
2. sizes: rows per sequence (``context_length`` for text, tokens per image for ViTs),
   ``chunk_rows`` (a multiple of it), ``shard_rows`` (a multiple of ``chunk_rows``);
3. source: the first sequences are read (an empty corpus / folder fails here);
4. the dataset group is created (or re-opened for a resume) at
   ``<output>/<name>-<config hash>``; an output URL that cannot be written fails here;
5. Ray (:func:`store.cluster.ray_session`: ``ray_address``, else the job's cluster, else a local
   instance) runs one streaming task per range of shards; each task loads the model once per worker process, computes shard after shard and
   writes each finished shard from a background thread while it computes the next one;
6. the driver seals the dataset (statistics merged from the per-shard commit records).

Determinism: sequence ``s`` (a context or an image) is always the ``s``-th of the source;
shard ``k`` holds sequences ``[k·S, (k+1)·S)`` with ``S = shard_rows / rows_per_seq``, and the
forward batches are cut inside a shard starting at its first sequence. So 1 worker and N workers,
and a run resumed after a crash (committed shards are skipped), store the same bytes.

Labelled text (a source with a label option) is packed one document at a time
(:func:`harvester.packing.pack_documents`): each context stores its document's class in
``labels`` and the document's index in the source order in ``doc_ids`` (the manifest lists the
class names and says ``documents``).

Text is tokenized and packed on the driver (it must be, for a streaming source to be cut
deterministically); the driver keeps one range more in flight than there are workers so that
tokenizing overlaps compute. A fast tokenizer does ~1M tokens/s per core, so with many GPU
workers the driver can become the limit; raise ``batch_size`` / shard sizes or split the corpus.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harvester.config import HarvestConfig, config_hash, dataset_name
from harvester.models import ModelAdapter, ModelInfo, load_model, resolve_layer
from harvester.models import inspect_model as inspect_adapter
from harvester.packing import (
    TokenSpec,
    pack_contexts,
    pack_documents,
    tagged_token_stream,
    token_spec,
    token_stream,
)
from harvester.sources import (
    ImageItems,
    image_items,
    iter_documents,
    iter_labelled_documents,
    source_name,
    source_revision,
)
from store.cluster import Interrupted, RaySession, ray_session
from store.errors import UserError

DEFAULT_CHUNK_ROWS = 4096
DEFAULT_SHARD_ROWS = 65536
MAX_SHARDS_PER_TASK = 8


def harvester_version() -> str:
    from harvester import __version__

    return __version__


# -------------------------------------------------------------------------------- sizes

def chunk_and_shard_rows(rows_per_seq: int, chunk_rows: int | None, shard_rows: int | None) -> tuple[int, int]:
    """(chunk_rows, shard_rows): chunks hold whole sequences, shards whole chunks.

    Defaults: the largest multiple of ``rows_per_seq`` not above 4,096 (at least one sequence),
    and the largest multiple of that not above 65,536 (at least one chunk).
    """
    chunk_rows = multiple_of(chunk_rows, rows_per_seq, DEFAULT_CHUNK_ROWS, "chunk_rows",
                             f"the {rows_per_seq} rows per sequence (context_length or tokens per image)")
    shard_rows = multiple_of(shard_rows, chunk_rows, DEFAULT_SHARD_ROWS, "shard_rows", f"chunk_rows={chunk_rows}")
    return chunk_rows, shard_rows


def multiple_of(value: int | None, unit: int, default: int, key: str, unit_name: str) -> int:
    """``value`` checked to be a multiple of ``unit``; None -> the largest multiple ≤ ``default`` (≥ unit)."""
    if value is None:
        return max(1, default // unit) * unit
    if value % unit:
        lower = max(1, value // unit) * unit
        raise UserError(f"{key}={value} is not a multiple of {unit_name}; use e.g. {key}={lower}.")
    return value


# ------------------------------------------------------------------------------ planning

@dataclass
class Plan:
    """Everything a worker needs (picklable)."""

    cfg: HarvestConfig
    url: str
    layer: int  # resolved, >= 0
    d: int
    rows_per_seq: int
    seqs_per_shard: int
    total_seqs: int | None = None  # None: until the text source runs out
    class_names: list[str] | None = None
    documents: bool = False  # labelled text: per-sequence doc_ids are stored
    threads: int = 0  # torch threads per task (:func:`task_threads`); 0 = torch's default


@dataclass
class ShardWork:
    """One shard's input: token ids (n_seq, T) for text or image items for vision."""

    index: int
    seq_start: int
    tokens: np.ndarray | None = None
    items: list[Any] | None = None
    labels: np.ndarray | None = None
    doc_ids: np.ndarray | None = None

    @property
    def n_seqs(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.items or [])


@dataclass
class ShardDone:
    """What a task reports per shard."""

    index: int
    rows: int
    seqs: int
    compute_s: float
    started: float = 0.0  # time.time() when its compute began
    committed: float = 0.0  # time.time() when its commit record was written


@dataclass
class Inspected:
    """The driver's view of the model."""

    info: ModelInfo
    tokenizer: Any = None
    spec: TokenSpec | None = None


def inspect_model(cfg: HarvestConfig) -> Inspected:
    """Depth, width and tokenizer of the model, loading as little as its kind allows
    (HF models: config and tokenizer only, no weights; open_clip: the model itself, small)."""
    inspected = inspect_adapter(cfg.model)
    spec = None if inspected.tokenizer is None else token_spec(inspected.tokenizer, cfg.model.name)
    return Inspected(inspected.info, inspected.tokenizer, spec)


def text_shards(cfg: HarvestConfig, spec: TokenSpec, tokenizer: Any, seqs_per_shard: int,
                labelled: bool = False) -> Iterator[ShardWork]:
    """Shards of packed contexts in source order (the last one may be short); ``labelled``: one
    document per context, with its class and document id (the document's index in the source)."""
    max_contexts = None if cfg.max_tokens is None else cfg.max_tokens // cfg.context_length
    if labelled:
        tagged = ((text, (label, doc)) for doc, (text, label)
                  in enumerate(iter_labelled_documents(cfg.source, cfg.storage_options)))
        contexts: Iterator[Any] = pack_documents(tagged_token_stream(tagged, tokenizer, spec), cfg.context_length,
                                                 spec.bos_id, max_contexts)
    else:
        contexts = ((ctx, None, None) for ctx in pack_contexts(
            token_stream(iter_documents(cfg.source, cfg.storage_options), tokenizer, spec),
            cfg.context_length, spec.bos_id, max_contexts))
    for index in itertools.count():
        block = list(itertools.islice(contexts, seqs_per_shard))
        if not block:
            return
        tokens = np.stack([ctx for ctx, _, _ in block]).astype(np.int32)
        labels = np.asarray([lab for _, lab, _ in block], dtype=np.int32) if labelled else None
        docs = np.asarray([doc for _, _, doc in block], dtype=np.int64) if labelled else None
        yield ShardWork(index, index * seqs_per_shard, tokens=tokens, labels=labels, doc_ids=docs)
        if len(block) < seqs_per_shard:
            return


def image_shards(items: ImageItems, seqs_per_shard: int) -> Iterator[ShardWork]:
    """Shards of images in the seeded order."""
    for index, start in enumerate(range(0, len(items.items), seqs_per_shard)):
        stop = start + seqs_per_shard
        yield ShardWork(index, start, items=items.items[start:stop], labels=items.labels[start:stop])


# ------------------------------------------------------------------------------- workers

_ADAPTERS: dict[str, ModelAdapter] = {}


def worker_adapter(cfg: HarvestConfig) -> ModelAdapter:
    """The model for this worker process, loaded once and reused by later tasks."""
    key = cfg.model.model_dump_json() + str(cfg.device)
    if key not in _ADAPTERS:
        _ADAPTERS.clear()
        _ADAPTERS[key] = load_model(cfg.model, cfg.device)
    return _ADAPTERS[key]


def shard_inputs(plan: Plan, adapter: ModelAdapter, work: ShardWork, start: int, stop: int) -> Any:
    """Model inputs for sequences ``[start, stop)`` of the shard."""
    import torch

    if work.tokens is not None:
        return torch.from_numpy(work.tokens[start:stop].astype(np.int64))
    from harvester.images import pixel_batch
    from harvester.sources import load_images

    return pixel_batch(adapter.preprocess, load_images(plan.cfg.source, work.items[start:stop]))


def compute_shard(plan: Plan, adapter: ModelAdapter, work: ShardWork) -> dict[str, np.ndarray]:
    """Activations and index columns of one shard, in the stored dtype."""
    import torch

    T, n = plan.rows_per_seq, work.n_seqs
    acts = np.empty((n * T, plan.d), dtype=np.dtype(plan.cfg.dtype))
    out_dtype = getattr(torch, plan.cfg.dtype)
    for start in range(0, n, plan.cfg.batch_size):
        stop = min(n, start + plan.cfg.batch_size)
        x = adapter.capture(shard_inputs(plan, adapter, work, start, stop), plan.layer, plan.cfg.hook.site)
        if x.shape[1] != T or x.shape[2] != plan.d:
            raise RuntimeError(f"hook gave shape {tuple(x.shape)}, expected (*, {T}, {plan.d})")
        flat = x.reshape(-1, plan.d).to(out_dtype)
        if not bool(torch.isfinite(flat).all()):
            raise UserError(f"the activations of shard {work.index} (sequences {work.seq_start + start}.."
                            f"{work.seq_start + stop - 1}) hold NaN or Inf in {plan.cfg.dtype}; use dtype "
                            f"float32 or a model dtype that does not overflow.")
        acts[start * T:stop * T] = flat.cpu().numpy()
    seqs = work.seq_start + np.arange(n, dtype=np.int64)
    out = {"acts": acts, "seq_ids": np.repeat(seqs, T), "positions": np.tile(np.arange(T, dtype=np.int16), n)}
    if work.tokens is not None:
        out["token_ids"] = work.tokens.reshape(-1).astype(np.int32)
    if work.labels is not None:
        out["labels"] = np.asarray(work.labels, dtype=np.int32)
    if work.doc_ids is not None:
        out["doc_ids"] = np.asarray(work.doc_ids, dtype=np.int64)
    return out


class BackgroundWriter:
    """Writes shards from one background thread so the next shard's compute overlaps the write."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            index, columns = job
            try:
                self.writer.write_shard(index, **columns)
                self.done.put((time.time(), None))
            except BaseException as err:  # handed to the task thread, which re-raises it
                self.done.put((time.time(), err))

    def submit(self, index: int, columns: dict[str, np.ndarray]) -> None:
        self.jobs.put((index, columns))

    def wait_one(self) -> float:
        """Wait for the oldest submitted write; returns when (time.time()) it was committed."""
        when, err = self.done.get()
        if err is not None:
            raise err
        return when

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def run_shards(plan: Plan, works: list[ShardWork]) -> Iterator[ShardDone]:
    """Compute and write ``works`` in order, yielding each shard once it is committed."""
    import torch

    from store import DatasetWriter

    # the task's thread count, given back when it ends: Ray hands this worker process to other tasks
    # (a training task after it would otherwise spin this task's threads on its own CPUs)
    previous_threads = torch.get_num_threads()
    if plan.threads > 0:
        torch.set_num_threads(plan.threads)
    adapter = worker_adapter(plan.cfg)
    writer = DatasetWriter.open(plan.url, storage_options=plan.cfg.storage_options or None)
    background = BackgroundWriter(writer)
    pending: list[ShardDone] = []
    try:
        for work in works:
            started, t0 = time.time(), time.perf_counter()
            columns = compute_shard(plan, adapter, work)
            done = ShardDone(work.index, len(columns["acts"]), work.n_seqs, time.perf_counter() - t0, started)
            if pending:  # the previous shard's write overlapped this compute; report it now
                pending[0].committed = background.wait_one()
                yield pending.pop(0)
            background.submit(work.index, columns)
            pending.append(done)
        for done in pending:
            done.committed = background.wait_one()
            yield done
    finally:
        background.close()
        torch.set_num_threads(previous_threads)


def task_threads(cpus: int) -> int:
    """Torch threads of a harvest task: its CPUs, capped by ``OMP_NUM_THREADS`` when that is set in the
    driver's environment (as Ray does for its workers, the variable, when set, is respected)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return min(cpus, int(env)) if env.isdigit() and int(env) > 0 else cpus


# -------------------------------------------------------------------------------- driver

@dataclass
class HarvestResult:
    """What :func:`harvest` returns and prints."""

    url: str
    rows: int
    seconds: float
    unit: str
    sequences: int
    resumed_shards: int = 0
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def plan_job(cfg: HarvestConfig) -> tuple[Plan, Iterator[ShardWork], dict[str, Any]]:
    """Validate everything and return (plan, shard iterator, manifest fields) — no worker started yet."""
    inspected = inspect_model(cfg)
    info = inspected.info
    layer = resolve_layer(info.n_layers, cfg.hook.layer, repr(cfg.model.name))
    class_names = None
    if cfg.source.is_image:
        rows_per_seq = int(info.tokens_per_image or 0)
        max_images = cfg.max_images if cfg.max_images is not None else (
            None if cfg.max_tokens is None else cfg.max_tokens // rows_per_seq)
        if max_images == 0:
            raise UserError(f"max_tokens={cfg.max_tokens} is less than one image ({rows_per_seq} tokens); "
                            f"raise it or set max_images.")
        items = image_items(cfg.source, cfg.seed, max_images)
        class_names = items.class_names
    else:
        rows_per_seq = cfg.context_length
        class_names = cfg.source.document_classes(cfg.storage_options)
        if info.max_positions and cfg.context_length > info.max_positions:
            raise UserError(f"context_length={cfg.context_length} exceeds the {info.max_positions} positions of "
                            f"model {cfg.model.name!r}; lower context_length.")
        if cfg.max_tokens is not None and cfg.max_tokens < cfg.context_length:
            raise UserError(f"max_tokens={cfg.max_tokens} is less than one context of {cfg.context_length} "
                            f"tokens; raise max_tokens or lower context_length.")
    chunk_rows, shard_rows = chunk_and_shard_rows(rows_per_seq, cfg.chunk_rows, cfg.shard_rows)
    seqs_per_shard = shard_rows // rows_per_seq
    if cfg.source.is_image:
        shards: Iterator[ShardWork] = image_shards(items, seqs_per_shard)
    else:
        shards = text_shards(cfg, inspected.spec, inspected.tokenizer, seqs_per_shard, class_names is not None)
    first = next(shards, None)
    if first is None:
        whole = " in any one labelled document (they are never packed together)" if class_names else ""
        raise UserError(f"source {source_name(cfg.source)} ({cfg.source.kind}) holds fewer than "
                        f"{cfg.context_length} tokens of text{whole}; point source at a non-empty corpus.")
    shards = itertools.chain([first], shards)
    url = join_output(cfg)
    total_seqs = len(items.items) if cfg.source.is_image else (
        None if cfg.max_tokens is None else cfg.max_tokens // cfg.context_length)
    plan = Plan(cfg, url, layer, info.d, rows_per_seq, seqs_per_shard, total_seqs, class_names,
                documents=class_names is not None and not cfg.source.is_image)
    fields = {"chunk_rows": chunk_rows, "shard_rows": shard_rows}
    return plan, shards, fields


def join_output(cfg: HarvestConfig) -> str:
    from store.io import join_url

    return join_url(cfg.output, dataset_name(cfg))


def build_manifest(plan: Plan, fields: dict[str, Any]) -> Any:
    """The manifest the dataset is created with (rows and stats are filled in at seal)."""
    from store import DatasetManifest

    cfg = plan.cfg
    files = cfg.source.listed_files(cfg.storage_options)
    hook_name = f"blocks.{plan.layer}.{'input' if cfg.hook.site == 'resid_pre' else 'output'}"
    return DatasetManifest(
        d=plan.d, dtype=cfg.dtype, shard_rows=fields["shard_rows"], chunk_rows=fields["chunk_rows"],
        context_length=plan.rows_per_seq,
        model={"name": cfg.model.name, "kind": cfg.model.kind, "revision": cfg.model.revision,
               "gguf_file": cfg.model.gguf_file, "pretrained": cfg.model.pretrained},
        hook={"layer": cfg.hook.layer, "site": cfg.hook.site, "name": hook_name},
        source={"name": source_name(cfg.source), "kind": cfg.source.kind,
                "split": cfg.source.split_name(), "revision": source_revision(cfg.source), "files": files},
        class_names=plan.class_names, documents=plan.documents or None,
        split={"fraction": cfg.eval_fraction, "seed": cfg.seed},
        harvester_version=harvester_version(), config_hash=config_hash(plan.cfg),
    )


# ---------------------------------------------------------------------------- interrupts

class HarvestInterrupted(Interrupted):
    """SIGINT / SIGTERM stopped the harvest; ``str(err)`` says what is kept and how to resume."""


def task_ranges(works: Iterator[ShardWork], per_task: int) -> Iterator[list[ShardWork]]:
    """Consecutive groups of at most ``per_task`` shards."""
    while True:
        group = list(itertools.islice(works, per_task))
        if not group:
            return
        yield group


def harvest(cfg: HarvestConfig, progress: bool = True) -> HarvestResult:
    """Run (or resume, or find already done) the harvest described by ``cfg``; return the result.

    SIGINT / SIGTERM while shards are computed stop it cleanly (see :func:`run_job`)."""
    from store.lease import leased

    t_start = time.perf_counter()
    plan, shards, fields = plan_job(cfg)
    # one harvest writes a dataset at a time: a second one on the same URL waits for this lease, then
    # finds the dataset sealed (or resumes it, if the first one stopped)
    with leased(plan.url, "harvest", cfg.storage_options or None, take_over_stale=cfg.take_over_stale_lease):
        writer = open_or_create(plan, build_manifest(plan, fields))
        unit = "img" if cfg.source.is_image else "tok"
        if writer.manifest.sealed:  # finished by an earlier run: nothing to do
            rows = int(writer.manifest.rows or 0)
            return HarvestResult(plan.url, rows, 0.0, unit, rows // plan.rows_per_seq, skipped=True)
        committed = set(writer.committed())
        writer.remove_partial_writes()  # a killed harvest's leftovers: no other writer holds the lease
        with ray_session(cfg.ray_address, address_key="ray_address") as session:
            counts = run_job(session, cfg, plan, shards, writer, committed, progress)
        manifest = writer.seal()
    rows = int(manifest.rows)
    return HarvestResult(plan.url, rows, time.perf_counter() - t_start, unit, rows // plan.rows_per_seq,
                         resumed_shards=counts["resumed"],
                         extra={"new_rows": counts["new_rows"], "work_seconds": counts["work_seconds"],
                                "shards": counts["last"] + 1, "arrivals": counts["arrivals"]})


def run_job(session: RaySession, cfg: HarvestConfig, plan: Plan, shards: Iterator[ShardWork], writer: Any,
            committed: set[int], progress: bool) -> dict[str, Any]:
    """Dispatch the uncommitted shards to Ray and collect them; returns the counts. On SIGINT / SIGTERM:
    stop every task (and the Ray this harvest started), drop the uncommitted shards' objects, and raise
    :class:`HarvestInterrupted` saying how to resume."""
    from tqdm import tqdm

    ray = session.ray
    unit = "img" if cfg.source.is_image else "tok"
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.workers))
    # a task no node can take would wait forever (a GPU harvest on a machine without one): one sentence instead
    session.check_demands([("harvest task", {"CPU": cpus, "GPU": cfg.num_gpus_per_worker})],
                          "set num_gpus_per_worker=0 to harvest on this machine's CPUs, or ray_address to a cluster "
                          "with GPU nodes.")
    plan.threads = task_threads(cpus)
    # A GPU task gets a fresh process (max_calls=1): Ray gives each task its own CUDA_VISIBLE_DEVICES, which a
    # process that has started CUDA cannot change (Ray's own default, which it applies only to num_gpus given
    # in @ray.remote, not through .options); CPU tasks share worker processes (models and imports loaded once).
    remote = ray.remote(max_calls=1)(run_shards) if cfg.num_gpus_per_worker else ray.remote(run_shards)
    task = remote.options(**session.options(num_cpus=cpus, num_gpus=cfg.num_gpus_per_worker))
    total = None if plan.total_seqs is None else plan.total_seqs * plan.rows_per_seq
    scale = 1.0 / plan.rows_per_seq if cfg.source.is_image else 1.0  # images/s for vision
    bar = tqdm(total=None if total is None else total * scale, unit=unit, unit_scale=True, disable=not progress,
               desc=f"harvest {dataset_name(cfg)}", smoothing=0.1)
    counts: dict[str, Any] = {"resumed": 0, "new_rows": 0, "last": -1, "arrivals": []}
    dispatched: set[int] = set()

    def pending() -> Iterator[ShardWork]:
        for work in shards:
            counts["last"] = work.index
            if work.index in committed:
                counts["resumed"] += 1
                bar.update(work.n_seqs * plan.rows_per_seq * scale)
                continue
            dispatched.add(work.index)
            yield work

    ranges = task_ranges(pending(), MAX_SHARDS_PER_TASK)
    in_flight: list[Any] = []
    arrivals = counts["arrivals"]  # (compute start, commit time, rows) per new shard
    t_work = time.perf_counter()
    try:
        while True:
            # one range more than there are workers: the driver tokenizes the next range while the
            # workers compute, and a worker never waits for the driver between ranges
            while len(in_flight) <= cfg.workers and (group := next(ranges, None)) is not None:
                in_flight.append(session.track_task(task.remote(plan, group)))
            if not in_flight:
                break
            ready = session.wait_one(in_flight)
            try:
                done: ShardDone = ray.get(next(ready))
            except StopIteration:
                in_flight.remove(ready)
                session.forget_task(ready)
                continue
            counts["new_rows"] += done.rows
            arrivals.append((done.started, done.committed, done.rows))
            bar.update(done.rows * scale)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    except Interrupted as err:
        bar.close()
        session.close()  # every task stopped, and the Ray this harvest started: no shard write continues
        writer.discard_uncommitted(dispatched)
        kept = len(writer.committed())
        raise HarvestInterrupted(err.signum, f"harvest interrupted with {kept} shard(s) committed at {plan.url}; "
                                             "run the same command again to resume from them.") from None
    finally:
        bar.close()
    counts["work_seconds"] = time.perf_counter() - t_work
    return counts


def open_or_create(plan: Plan, manifest: Any) -> Any:
    """A writer for the dataset: new, unfinished (resume) or already sealed (nothing to do)."""
    from store import DatasetWriter

    return DatasetWriter.create(plan.url, manifest, overwrite=False,
                                storage_options=plan.cfg.storage_options or None)
