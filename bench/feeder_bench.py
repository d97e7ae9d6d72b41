"""Feeder: N trainers fed by one feeder actor vs N trainers with their own loaders, and the feeder's ceiling.

Setup: a synthetic local store (float32), N ∈ {1, 4, 8} consumer actors on a local Ray instance,
each consuming the same T batches and doing a fixed amount of "training" work per batch
(an (B, d) @ (d, M) matmul + ReLU). Two modes, timed side by side in the same run:

* ``shared``: one :class:`trainer.feeder.FeederCore` actor reads each batch once with
  ``ActivationLoader.batch(b)``, ``ray.put``s it, every consumer gets the ObjectRef;
* ``independent`` (the baseline): each consumer has its own ``ActivationLoader`` and streams it
  (``iter_batches``).

The consumers fetch batches exactly as ``trainer.run.Run.fit`` does (a sweep trainer: the feeder
through ``trainer.run.Prefetcher``, two batches ahead; a run with its own loader: ``iter_batches``).

Each N runs ``--rounds`` paired rounds (both modes, the order alternating); reported per N: the
median wall of each mode and ``wall_ratio_feeder_over_independent``, the median over rounds of feeder
wall / independent wall (≤ 1.0: sharing one read per batch costs no wall time).

Bytes read from the store are counted in the processes that read (the feeder, or each consumer) by a
counter around the loader's window fetch (``ActivationLoader._fetch``: rows of the window × stored
bytes per row of the columns read), installed by this bench only. ``/proc/<pid>/io`` would be the
natural probe, but local chunks are memory-mapped and this sandbox does not account reads made by
worker threads. Wall time is the consuming phase only (actors are started and
warmed up before the clock starts). Results: ``bench/results/feeder.json``.

**Ceiling** (``--parts ceiling``): how fast one feeder can stream. N = 1, 4, 8 *takers* (Ray actors
that do nothing but take batches, as a sweep's trainer takes them: :func:`trainer.feeder.feeder_batches`
through the :class:`trainer.run.Prefetcher`; their imports done before the clock, and the feeder's
scatter kernel loaded, as the loader alone's is in the bench's process) each take the same
``EPOCHS`` = 12 epochs of batches (B = 4,096, d = 768, acts + positions; 384 batches) of a float16 and of a float32 dataset from
one fresh feeder, against **one loader alone** (``iter_batches`` of the same batches and columns in
the bench's process, no Ray), in paired rounds (loader, feeder, loader, ...; each round's feeder rate
against the mean of the loader runs around it). The rate is the *steady* one, past the first
``WARM`` = 128 batches (4 epochs, 8 feeder windows) of each side: a sweep's feeder lives for its thousands
of batches, so its process start-up (the first touch of every window-buffer set and batch slot it makes,
which on this VM costs more than reading the same bytes) is reported apart (``*_startup_s``), not
averaged into the steady rate. (Until 2026-12-07 16:50 UTC: 4 epochs, ``WARM`` = 32; the feeder's loader
then made its last buffer set inside the timed part once it read windows ahead.) Reported
per dtype and N: rows/s and GB/s (stored bytes) per taker (the slowest one) and for all takers, the
ratio feeder rate / loader rate (median of rounds; goal ≥ 0.8 at N = 8), the feeder's store reads per
batch (1), its batch slots, and the bytes of a batch through the feeder (half for float16). The takers
ask at the feeder's hand-out board (:mod:`trainer.handout`), as a sweep's trainers on the feeder's node
do; each round also runs the same takers asking by Ray calls (``feeder_batches(..., board=False)``, how
every trainer asked before the board, and how a trainer on another node asks), reported as
``ratio_by_ray_calls_over_loader`` and ``board_over_ray_calls`` (Ray-call steady time / board steady
time, median of rounds: > 1 means the board is faster).

**Paced** (``--parts paced``): the ceiling's takers, data and stream, but each taker takes a step of
``--step-ms`` (default 3.2 ms: the H100 step bench/README predicts for M = 24,576, B = 4,096) after each
batch that uses none of this box's CPU (a sleep: a GPU trainer's host waits on its device), fed by one
feeder at its board; the baseline is the same takers' same steps with no batch to take, in the same trial.
``paced_ratio`` = steps alone / fed (steady part, slowest taker, median of rounds): 1.0 means the feeder
never kept a GPU-speed trainer waiting. Unlike the ceiling, this leaves the box's two cores to the feeder
and the hand-out, as a GPU node's cores would be.

Run: ``.venv/bin/python bench/feeder_bench.py [--rows 65536 --d 256 --batch 1024] [--parts sharing ceiling paced]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from store.scatter import kernel_ready
from trainer.feeder import FeederCore, feeder_batches

RESULTS = Path(__file__).resolve().parent / "results" / "feeder.json"
#: the ceiling's and the paced part's stream: EPOCHS epochs of the dataset; the first WARM batches (4 epochs,
#: 8 feeder windows: a fresh process's start-up, the first touch of every window-buffer set it makes) are
#: timed apart from the steady rate
EPOCHS, WARM = 12, 128


_BYTES = [0]


def install_read_counter() -> None:
    """Count the stored bytes of every window the store's loader fetches in this process."""
    from store.loader import ActivationLoader

    original = ActivationLoader._fetch
    if getattr(original, "counted", False):
        return

    def counted(self: Any, key: Any) -> Any:
        win = original(self, key)
        ds = self.dataset
        row_bytes = sum(ds.column_dtype(c).itemsize * (ds.manifest.d if c == "acts" else 1) for c in self.columns)
        _BYTES[0] += int(self._window_span(*key)[1].sum()) * row_bytes  # the window's rows
        return win

    counted.counted = True  # type: ignore[attr-defined]
    ActivationLoader._fetch = counted


def rchar() -> int:
    """Store bytes read by this process so far."""
    return _BYTES[0]


@ray.remote(num_cpus=0, max_concurrency=64)
class BenchFeeder(FeederCore):
    """The sweep's feeder plus an I/O probe of its own process."""

    def __init__(self, *args: Any) -> None:
        install_read_counter()
        super().__init__(*args)

    def io(self) -> int:
        return rchar()

    def warm(self) -> bool:
        """Load this process's scatter kernel and wait for it (as the loader alone's is loaded, in the
        bench's process, when its clock starts)."""
        return kernel_ready(None)


@ray.remote(num_cpus=0.2)
class Consumer:
    """A stand-in trainer: fetches batch b (from the feeder or its own loader) and does fixed work."""

    def __init__(self, name: str, store: str, batch_size: int, m: int, batches: int, feeder: Any = None) -> None:
        from store.loader import ActivationLoader

        install_read_counter()
        torch.set_num_threads(1)
        torch.manual_seed(0)  # same work matrix in every consumer, so checksums must agree
        self.name, self.feeder = name, feeder
        # finite epochs, just enough for the batches consumed (same batches as the endless stream): the
        # stream ends there, so the bytes column counts only windows its batches use, as the feeder's
        # (an endless stream's read-ahead would also fetch windows of epochs this consumer never reaches)
        self.loader = None
        if feeder is None:
            rows = ActivationLoader(store, batch_size, seed=0).rows_per_epoch
            self.loader = ActivationLoader(store, batch_size, seed=0, columns=("acts", "positions"),
                                           epochs=math.ceil(batches * batch_size / rows))
        self.w = None
        self.m = m

    def io(self) -> int:
        return rchar()

    def run(self, batches: int) -> float:
        """Consume batches 0..batches-1 the way ``trainer.run.Run.fit`` does: from the feeder through
        its :class:`trainer.run.Prefetcher` (as a sweep's training task), or from the own loader's
        ``iter_batches`` (as a run with its own loader)."""
        from trainer.run import Prefetcher

        fetch = None
        if self.feeder is not None:
            fetch = Prefetcher(feeder_batches(self.feeder, self.name), 0, batches)
            stream = (fetch.get(b) for b in range(batches))
        else:
            stream = self.loader.iter_batches(start=0)
        checksum = 0.0
        try:
            for _ in range(batches):
                batch = next(stream)
                acts = batch.acts_on("cpu")
                if self.w is None:
                    self.w = torch.randn(acts.shape[1], self.m) / acts.shape[1] ** 0.5
                checksum += float(torch.relu(acts @ self.w).sum())
        finally:
            stream.close()
            if fetch is not None:
                fetch.close()
        return checksum


@ray.remote(num_cpus=0)
class Taker:
    """A consumer that does nothing but take batches, as a sweep's trainer takes them (the feeder through
    :class:`trainer.run.Prefetcher`, two batches ahead): the feeder's ceiling."""

    def __init__(self, name: str, feeder: Any, board: bool = True) -> None:
        self.name, self.feeder, self.board = name, feeder, board

    def ready(self) -> bool:
        """Warm up before the clock: import what taking batches needs (``trainer.run`` imports torch, ~3 s;
        timed, the takers' staggered imports would also let the first one run windows ahead of the rest)."""
        import trainer.run  # noqa: F401

        return True

    def run(self, batches: int, warm: int, step_s: float = 0.0) -> tuple[int, int, float, float]:
        """(rows, bytes) of batches 0..batches-1, seconds to take the first ``warm`` batches (the feeder's
        start-up) and seconds from there to the last batch (the steady rate). ``step_s`` > 0: a step of that
        long after each batch that takes none of this box's CPU (a sleep: a GPU step's stand-in)."""
        from trainer.run import Prefetcher

        fetch = Prefetcher(feeder_batches(self.feeder, self.name, board=self.board), 0, batches)
        rows = nbytes = 0
        t0 = t_warm = time.perf_counter()
        try:
            for b in range(batches):
                if b == warm:
                    t_warm = time.perf_counter()
                batch = fetch.get(b)
                rows, nbytes = rows + batch.rows, nbytes + batch.nbytes
                gpu_step(step_s)
        finally:
            fetch.close()
        end = time.perf_counter()
        return rows, nbytes, t_warm - t0, end - t_warm

    def steps_alone(self, batches: int, warm: int, step_s: float) -> float:
        """Seconds of ``batches − warm`` steps of ``step_s`` with no batch to take: the floor of a paced run."""
        t0 = time.perf_counter()
        for _ in range(batches - warm):
            gpu_step(step_s)
        return time.perf_counter() - t0


def gpu_step(step_s: float) -> None:
    """A training step that takes ``step_s`` seconds and none of this box's CPU: a GPU step's stand-in (the
    host waits on the device); nothing when ``step_s`` is 0."""
    if step_s > 0:
        time.sleep(step_s)


def loader_alone(store: str, batch_size: int, batches: int, warm: int) -> tuple[float, float]:
    """One loader (the feeder's settings and columns, in this process, no Ray) streaming batches
    0..batches-1, the rate a feeder could at best pass on: (seconds for the first ``warm`` batches,
    seconds from there to the last)."""
    from store.loader import ActivationLoader
    from trainer.config import BATCH_COLUMNS

    rows = ActivationLoader(store, batch_size, seed=0).rows_per_epoch
    loader = ActivationLoader(store, batch_size, seed=0, columns=BATCH_COLUMNS,
                              epochs=math.ceil(batches * batch_size / rows))
    t0 = t_warm = time.perf_counter()
    for b, _ in enumerate(loader):
        if b + 1 == warm:
            t_warm = time.perf_counter()
        if b + 1 == batches:
            break
    end = time.perf_counter()
    loader.close()
    return t_warm - t0, end - t_warm


def ceiling_trial(store: str, n: int, batches: int, batch_size: int, warm: int, board: bool = True,
                  step_s: float = 0.0) -> dict[str, Any]:
    """One fresh feeder serving ``n`` takers (asking at its hand-out board, or by Ray calls when ``board``
    is false; each taking a step of ``step_s`` after each batch, see :func:`gpu_step`): the slowest taker's
    start-up (first ``warm`` batches) and steady seconds (the rest), rows and bytes taken, store reads, and
    (``step_s`` > 0) the slowest taker's steady seconds for the same steps with no batch to take."""
    names = [f"t{i}" for i in range(n)]
    feeder = BenchFeeder.remote(store, batch_size, 0, batches, names, 16, 2, 60.0)
    takers = [Taker.remote(name, feeder, board) for name in names]
    assert all(ray.get([t.ready.remote() for t in takers] + [feeder.warm.remote()]))
    alone = max(ray.get([t.steps_alone.remote(batches, warm, step_s) for t in takers])) if step_s > 0 else 0.0
    t0 = time.perf_counter()
    taken = ray.get([t.run.remote(batches, warm, step_s) for t in takers])
    wall = time.perf_counter() - t0
    stats = ray.get(feeder.reads.remote())
    for actor in takers + [feeder]:
        ray.kill(actor)
    return {"wall_s": wall, "startup_s": max(t[2] for t in taken), "steady_s": max(t[3] for t in taken),
            "steps_alone_s": alone, "rows_per_taker": taken[0][0], "bytes_per_taker": taken[0][1],
            "feeder_reads": stats["reads"], "feeder_bytes_read": stats["bytes_read"], "slots": stats["slots"],
            "board_answers": stats["board_answers"]}


def ceiling(tmp: str, rows: int, d: int, batch_size: int, ns: list[int], rounds: int) -> list[dict[str, Any]]:
    """Per stored dtype and N: the steady rate (rows/s and GB/s of stored bytes) at which one feeder
    serves N takers, against one loader alone on the same data, past the first ``WARM`` batches of
    each (a fresh process's start-up, reported apart), in paired rounds (loader, feeder, loader, ...:
    each round's ratio against the mean of the loader runs around it; medians reported)."""
    out = []
    for dtype in ("float16", "float32"):
        store = make_bench_store(os.path.join(tmp, f"ceiling-{dtype}"), rows, d, dtype)
        batches = EPOCHS * rows // batch_size
        steady_rows = (batches - WARM) * batch_size
        row_bytes = d * np.dtype(dtype).itemsize + 2  # acts + int16 positions, as stored
        loader_alone(store, batch_size, batches, WARM)  # page cache
        assert kernel_ready(None)  # the scatter kernel: the loader alone streams at its steady rate
        for n in ns:
            alone = [loader_alone(store, batch_size, batches, WARM)]
            trials, ratios, by_ray, ray_ratios = [], [], [], []
            for _ in range(rounds):
                trials.append(ceiling_trial(store, n, batches, batch_size, WARM))
                alone.append(loader_alone(store, batch_size, batches, WARM))
                ratios.append(((alone[-1][1] + alone[-2][1]) / 2) / trials[-1]["steady_s"])
                by_ray.append(ceiling_trial(store, n, batches, batch_size, WARM, board=False))
                alone.append(loader_alone(store, batch_size, batches, WARM))
                ray_ratios.append(((alone[-1][1] + alone[-2][1]) / 2) / by_ray[-1]["steady_s"])
            steady = statistics.median(t["steady_s"] for t in trials)
            loader_s = statistics.median(a[1] for a in alone)
            row = {"dtype": dtype, "n_takers": n, "batches": batches, "warm_batches": WARM, "batch_size": batch_size,
                   "d": d, "rounds": rounds, "loader_steady_s": loader_s, "loader_rows_s": steady_rows / loader_s,
                   "loader_GB_s": steady_rows * row_bytes / loader_s / 1e9, "feeder_steady_s": steady,
                   "feeder_rows_s_per_taker": steady_rows / steady,
                   "feeder_GB_s_per_taker": steady_rows * row_bytes / steady / 1e9,
                   "feeder_GB_s_all_takers": n * steady_rows * row_bytes / steady / 1e9,
                   "ratio_feeder_over_loader": statistics.median(ratios), "ratio_rounds": ratios,
                   "ratio_by_ray_calls_over_loader": statistics.median(ray_ratios), "ray_ratio_rounds": ray_ratios,
                   "board_over_ray_calls": statistics.median(b["steady_s"] / t["steady_s"]
                                                             for t, b in zip(trials, by_ray, strict=True)),
                   "loader_startup_s": statistics.median(a[0] for a in alone),
                   "feeder_startup_s": statistics.median(t["startup_s"] for t in trials),
                   "feeder_wall_s": statistics.median(t["wall_s"] for t in trials),
                   "feeder_slots": max(t["slots"] for t in trials),
                   "feeder_reads": trials[-1]["feeder_reads"], "reads_per_batch": trials[-1]["feeder_reads"] / batches,
                   "board_answers": trials[-1]["board_answers"], "board_answers_by_ray_calls": by_ray[-1]["board_answers"],
                   "bytes_per_batch_through_feeder": trials[-1]["bytes_per_taker"] / batches}
            assert all(t["rows_per_taker"] == batches * batch_size for t in trials + by_ray)
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("ratio_rounds")}), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    return out


def paced(tmp: str, rows: int, d: int, batch_size: int, ns: list[int], rounds: int, step_s: float) -> list[dict[str, Any]]:
    """Per stored dtype and N: N takers that take a step of ``step_s`` after each batch that uses none of this
    box's CPU (:func:`gpu_step`: GPU trainers' stand-ins), fed by one feeder (at its board), against the
    same steps with no batch to take (baseline, in the same trial): ``paced_ratio`` = steps alone / fed,
    steady part, slowest taker, median of rounds (1.0: the feeder never keeps a GPU trainer waiting)."""
    out = []
    for dtype in ("float16", "float32"):
        store = make_bench_store(os.path.join(tmp, f"paced-{dtype}"), rows, d, dtype)
        batches = EPOCHS * rows // batch_size
        steady_rows = (batches - WARM) * batch_size
        loader_alone(store, batch_size, batches, WARM)  # page cache
        for n in ns:
            trials = [ceiling_trial(store, n, batches, batch_size, WARM, step_s=step_s) for _ in range(rounds)]
            ratios = [t["steps_alone_s"] / t["steady_s"] for t in trials]
            steady = statistics.median(t["steady_s"] for t in trials)
            row = {"dtype": dtype, "n_takers": n, "step_ms": 1e3 * step_s, "batches": batches, "warm_batches": WARM,
                   "batch_size": batch_size, "d": d, "rounds": rounds,
                   "step_rows_s": batch_size / step_s, "fed_rows_s_per_taker": steady_rows / steady,
                   "steps_alone_s": statistics.median(t["steps_alone_s"] for t in trials), "fed_steady_s": steady,
                   "paced_ratio": statistics.median(ratios), "paced_ratio_rounds": ratios,
                   "reads_per_batch": trials[-1]["feeder_reads"] / batches}
            assert all(t["rows_per_taker"] == batches * batch_size for t in trials)
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("ratio_rounds")}), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    return out


def make_bench_store(url: str, rows: int, d: int, dtype: str = "float32") -> str:
    """A store of ``rows`` random rows in ``dtype`` (the bench's own synthetic data)."""
    from store.manifest import DatasetManifest, HookInfo, ModelInfo, SourceInfo
    from store.stats import StatsAccumulator
    from store.writer import DatasetWriter

    shard_rows = 8192
    manifest = DatasetManifest(d=d, dtype=dtype, shard_rows=shard_rows, chunk_rows=1024, context_length=128,
                               model=ModelInfo(name="synthetic"), hook=HookInfo(layer=0, site="resid_post"),
                               source=SourceInfo(name="synthetic"))
    writer = DatasetWriter.create(url, manifest)
    rng = np.random.default_rng(0)
    stats = StatsAccumulator(d)
    for s in range(rows // shard_rows):
        acts = rng.normal(size=(shard_rows, d)).astype(dtype)
        idx = np.arange(s * shard_rows, (s + 1) * shard_rows)
        writer.write_shard(s, acts, token_ids=(idx % 1000).astype(np.int32), seq_ids=(idx // 128).astype(np.int64),
                           positions=(idx % 128).astype(np.int16))
        stats.update(acts.astype(np.float32))
    writer.seal(stats=stats.result())
    return url


def trial(store: str, n: int, batches: int, batch_size: int, m: int, shared: bool) -> dict[str, Any]:
    """One mode at one N: bytes read by the reading processes and wall time of the consuming phase."""
    names = [f"c{i}" for i in range(n)]
    feeder = BenchFeeder.remote(store, batch_size, 0, batches, names, 16, 2, 60.0) if shared else None
    consumers = [Consumer.remote(name, store, batch_size, m, batches, feeder) for name in names]
    ray.get([c.io.remote() for c in consumers])
    readers = [feeder] if shared else consumers
    before = ray.get([r.io.remote() for r in readers])
    t0 = time.perf_counter()
    sums = ray.get([c.run.remote(batches) for c in consumers])
    wall = time.perf_counter() - t0
    after = ray.get([r.io.remote() for r in readers])
    out = {"bytes_read": int(sum(a - b for a, b in zip(after, before))), "wall_s": wall}
    if shared:
        stats = ray.get(feeder.reads.remote())
        out.update(feeder_reads=stats["reads"], feeder_rereads=stats["rereads"])
        assert len(set(round(s, 3) for s in sums)) == 1, "consumers saw different batches"
    for actor in consumers + ([feeder] if shared else []):
        ray.kill(actor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per N (median reported)")
    parser.add_argument("--parts", nargs="+", choices=["sharing", "ceiling", "paced"],
                        default=["sharing", "ceiling", "paced"])
    parser.add_argument("--ceiling-rows", type=int, default=131072)
    parser.add_argument("--ceiling-d", type=int, default=768)
    parser.add_argument("--ceiling-batch", type=int, default=4096)
    parser.add_argument("--ceiling-rounds", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=3.2,
                        help="the paced takers' step (default: an H100's sparse step at M = 24,576, B = 4,096)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="fbench", dir="/tmp")
    store = make_bench_store(os.path.join(tmp, "store"), args.rows, args.d)
    from store.loader import ActivationLoader

    batches = len(ActivationLoader(store, args.batch, seed=0))
    payload = batches * args.batch * (args.d * 4 + 8)  # acts float32 + positions int64 per row (logical)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(tmp, "ray"), log_to_driver=False,
             _node_ip_address="127.0.0.1")
    results, ceilings, paced_rows = [], [], []
    try:
        for n in args.ns if "sharing" in args.parts else []:
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):  # paired rounds, the order alternating (the box may be shared)
                modes = (False, True) if r % 2 == 0 else (True, False)
                got = {shared: trial(store, n, batches, args.batch, args.m, shared=shared) for shared in modes}
                rounds.append({"shared": got[True], "independent": got[False],
                               "wall_ratio_feeder_over_independent":
                                   got[True]["wall_s"] / got[False]["wall_s"]})
            shared_bytes = {x["shared"]["bytes_read"] for x in rounds}
            indep_bytes = {x["independent"]["bytes_read"] for x in rounds}
            assert len(shared_bytes) == 1 and len(indep_bytes) == 1, "bytes read changed between rounds"
            row = {"n_trainers": n, "batches": batches, "logical_batch_bytes": payload, "rounds": args.rounds,
                   "shared": {"bytes_read": shared_bytes.pop(),
                              "wall_s": statistics.median(x["shared"]["wall_s"] for x in rounds),
                              "feeder_reads": rounds[-1]["shared"]["feeder_reads"],
                              "feeder_rereads": max(x["shared"]["feeder_rereads"] for x in rounds)},
                   "independent": {"bytes_read": indep_bytes.pop(),
                                   "wall_s": statistics.median(x["independent"]["wall_s"] for x in rounds)},
                   "wall_ratio_feeder_over_independent":
                       statistics.median(x["wall_ratio_feeder_over_independent"] for x in rounds),
                   "wall_ratio_rounds": [x["wall_ratio_feeder_over_independent"] for x in rounds]}
            row["bytes_ratio_independent_over_shared"] = (row["independent"]["bytes_read"]
                                                          / max(row["shared"]["bytes_read"], 1))
            results.append(row)
            print(json.dumps(row), flush=True)
        if "ceiling" in args.parts:
            ceilings = ceiling(tmp, args.ceiling_rows, args.ceiling_d, args.ceiling_batch, args.ns, args.ceiling_rounds)
        if "paced" in args.parts:
            paced_rows = paced(tmp, args.ceiling_rows, args.ceiling_d, args.ceiling_batch, args.ns,
                               args.ceiling_rounds, args.step_ms / 1e3)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = results if "sharing" in args.parts else old.get("results", [])  # a partial run keeps the rest
    ceilings = ceilings if "ceiling" in args.parts else old.get("ceiling", [])
    paced_rows = paced_rows if "paced" in args.parts else old.get("paced", [])
    RESULTS.write_text(json.dumps({"bench": "feeder", "baseline": "independent loaders (one per trainer)",
                                   "ratio": "wall_ratio_feeder_over_independent: feeder wall / independent "
                                            "wall, median of paired rounds (<= 1.0: the feeder is not slower)",
                                   "rows": args.rows, "d": args.d, "batch_size": args.batch, "m": args.m,
                                   "torch_threads": 1, "cpus": 2, "results": results,
                                   "ceiling_baseline": "one ActivationLoader alone (iter_batches, the feeder's "
                                                       "columns), no Ray, paired rounds",
                                   "ceiling": ceilings,
                                   "paced_baseline": "the same takers' steps with no batch to take, same trial",
                                   "paced": paced_rows, "loadavg": os.getloadavg()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
