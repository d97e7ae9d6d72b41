"""Store bench: ActivationLoader throughput vs a raw sequential read of the same bytes.

Run: ``.venv/bin/python -m bench.store_bench [--quick]`` (or ``bench/store_bench.py``).
Everything is timed side by side in this process:

* **local** (page cache): a float32 dataset (d = 512, chunk 4,096 rows, shard 65,536 rows,
  512 MiB) is written with :class:`store.DatasetWriter` (write MB/s vs ``ndarray.tofile`` of
  the same bytes + fsync), read once to warm the page cache, then read by
  (a) the baseline: a raw sequential ``readinto`` of every shard object in 16 MiB blocks, and
  (b) ``ActivationLoader(split="all", batch_size=4096)`` for several ``window_chunks`` ×
  ``prefetch`` settings (full shuffle: random chunk order, row-level permutation within each
  window, float32 torch batches): one loader streams 4 warm-up epochs, the first (cold: buffers
  allocated, files mapped) reported beside the ratio, then 3 timed epochs (steady: the ratio).
  The same for a float16 copy of the dataset (the harvester's default storage dtype) at the
  default settings.
* **s3** (moto server on 127.0.0.1, started here): a 128 MiB float32 dataset; baseline is
  s3fs ``cat_file`` of every shard object one after the other; loader as above.
* **first epoch in a fresh process** (float16 and float32): a dataset four default windows long
  (4 × 64 chunks of 4,096 rows, d = 256: 512 MiB float16, 1 GiB float32), page-cached. Each round
  starts a new Python process (``--first-epoch-child``) that imports the store, times the raw read
  of the dataset (median of three passes), then the first epoch of a new ``ActivationLoader`` at
  the defaults (from its construction to its last batch: window buffers allocated and first
  touched, shard files mapped; the scatter kernel is not loaded, a process starts loading it only after
  ``store.scatter.LOAD_AFTER_BYTES`` scattered): ratio = raw read / first epoch, the median over rounds.
  Then, :data:`SECOND_LOADER_PAUSE_S` later each, a second loader's first epoch with the first one's window
  buffers from the process's reserve (``store.buffer_reserve``) and one with new buffers (the reserve
  released), the order alternating by round: ``second_loader_ratio_reserve`` / ``_new``.
  The steady and S3 parts load the kernel first (``kernel_ready(None)``): a long-lived loader has it.

* **index check**: the loader checks each shard index's crc32c (``16·cps + 4`` bytes, once per shard
  per reader) before trusting it; reported as the crc time of every index against one raw epoch read.

Reported: rows/s, MB/s (acts bytes delivered) and the ratio to the baseline, measured in paired,
interleaved rounds (raw, every setting, raw, ...; each setting's ratio per round against the raw reads
around it) and reported as the median over rounds, so load from other jobs on a shared box hits both
sides alike. The default loader settings (window_chunks=64, prefetch=2) are among the rows. Results
go to bench/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import ActivationLoader, DatasetManifest, DatasetWriter, open_dataset  # noqa: E402
from store.io import filesystem, join_url  # noqa: E402
from store.scatter import kernel_ready  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "store.json"
D = 512
CHUNK = 4096


def manifest(shard_rows: int, dtype: str = "float32", d: int = D, chunk_rows: int = CHUNK) -> DatasetManifest:
    return DatasetManifest(d=d, dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows, context_length=128,
                           model={"name": "bench"}, hook={"layer": 0, "site": "resid_post"},
                           source={"name": "gaussian"}, split={"fraction": 0.0, "seed": 0})


def write_dataset(url: str, shards: int, shard_rows: int, storage_options=None, dtype: str = "float32",
                  d: int = D, chunk_rows: int = CHUNK) -> dict:
    """Write ``shards`` full shards; returns write timing."""
    w = DatasetWriter.create(url, manifest(shard_rows, dtype, d, chunk_rows), overwrite=True, storage_options=storage_options)
    data = np.random.default_rng(0).standard_normal((shard_rows, d), dtype=np.float32).astype(dtype)
    t0 = time.perf_counter()
    for s in range(shards):
        data[0, 0] = s
        w.write_shard(s, data)
    w.seal()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "MB_s": shards * data.nbytes / secs / 1e6, "data": data}


def raw_write_local(dirpath: str, data: np.ndarray, shards: int) -> float:
    """Baseline write: ``tofile`` + fsync of the same bytes; MB/s."""
    os.makedirs(dirpath, exist_ok=True)
    t0 = time.perf_counter()
    for s in range(shards):
        p = os.path.join(dirpath, f"{s}.bin")
        with open(p, "wb") as fh:
            data.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return shards * data.nbytes / (time.perf_counter() - t0) / 1e6


def shard_paths(url: str, storage_options=None) -> tuple[object, list[str], int]:
    """(filesystem, the acts shard objects, bytes of acts stored in them)."""
    ds = open_dataset(url, storage_options=storage_options)
    fs, path = filesystem(url, storage_options)
    paths = [join_url(path, c.objects["acts"].key) for _, c in sorted(ds.commits.items())]
    return fs, paths, ds.num_rows * ds.manifest.d * np.dtype(ds.manifest.dtype).itemsize


def raw_read_local(paths: list[str]) -> float:
    """Sequential readinto of every shard file in 16 MiB blocks; seconds."""
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
    return time.perf_counter() - t0


def raw_read_remote(fs, paths: list[str]) -> float:
    """One ``cat_file`` per shard object, one after the other; seconds."""
    t0 = time.perf_counter()
    for p in paths:
        fs.cat_file(p)
    return time.perf_counter() - t0


#: A loader streams WARM_EPOCHS epochs, the first of them reported as the cold epoch, then
#: TIMED_EPOCHS more whose mean time is the steady epoch. Warm: with one window per epoch (the
#: bench's dataset at window 64) the buffer pool fills only after (prefetch + 3) windows.
WARM_EPOCHS, TIMED_EPOCHS = 4, 3


def loader_read(url: str, window: int, prefetch: int, storage_options=None) -> tuple[float, float, int]:
    """One loader streaming the full shuffle; (seconds of the first epoch, mean seconds of the timed
    epochs, rows per epoch).

    The first epochs carry the loader's one-time costs (window buffers allocated and faulted in,
    shard files mapped, the scatter kernel loaded); a training run reads thousands of windows on one
    loader, so the timed epochs are its throughput."""
    loader = ActivationLoader(url, batch_size=4096, split="all", seed=0, window_chunks=window, epochs=None,
                              prefetch=prefetch, storage_options=storage_options)
    per_epoch = loader.rows_per_epoch
    rows, marks = 0, []
    t0 = time.perf_counter()
    for batch in loader:
        rows += batch.rows
        if rows % per_epoch == 0:
            marks.append(time.perf_counter())
            if len(marks) == WARM_EPOCHS + TIMED_EPOCHS:
                break
    loader.close()
    assert rows == per_epoch * len(marks), "the bench's epochs must end on batch boundaries"
    return marks[0] - t0, (marks[-1] - marks[WARM_EPOCHS - 1]) / TIMED_EPOCHS, per_epoch


#: The fresh-process first epoch: a dataset four default windows long (64 chunks a window).
FIRST_D, FIRST_WINDOWS, DEFAULT_WINDOW = 256, 4, 64


#: Seconds between one loader's end and the next loader in the same process (an eval pass comes after
#: training steps; this VM hands freed memory back to its host within seconds).
SECOND_LOADER_PAUSE_S = 3.0


def one_epoch(url: str) -> tuple[float, int, dict]:
    """(seconds, rows, buffer bytes new / reused) of the first epoch of a new loader at the default settings,
    from its construction to its last batch."""
    t0 = time.perf_counter()
    loader = ActivationLoader(url, batch_size=4096, split="all", seed=0, epochs=1)
    rows = sum(batch.rows for batch in loader)
    seconds = time.perf_counter() - t0
    loader.close()
    return seconds, rows, dict(loader.buffer_bytes)


def first_epoch_child(url: str, reserve_first: bool) -> int:
    """In a new process: the raw read of ``url``'s acts (median of 3), the first epoch of a new loader,
    then, a pause later each, a second loader's first epoch with the first one's window buffers from the
    process's reserve and one with new buffers (the reserve released; before the reserve, every loader's
    way), in the order ``reserve_first`` says; one JSON line on stdout."""
    from store.buffer_reserve import release_window_buffers

    _, paths, nbytes = shard_paths(url)
    raw = statistics.median(raw_read_local(paths) for _ in range(3))
    first, rows, _ = one_epoch(url)
    second: dict[str, float] = {}
    for way in (("reserve", "new") if reserve_first else ("new", "reserve")):
        if way == "new":
            release_window_buffers()
        time.sleep(SECOND_LOADER_PAUSE_S)
        second[way], _, used = one_epoch(url)
        assert (used["new"] == 0) == (way == "reserve"), used
    print(json.dumps({"raw_seconds": raw, "first_epoch_seconds": first, "rows": rows, "bytes": nbytes,
                      "second_loader_seconds_reserve": second["reserve"],
                      "second_loader_seconds_new": second["new"]}))
    return 0


def bench_first_epoch(url: str, rounds: int) -> dict:
    """``rounds`` fresh processes, each timing a raw read and a new loader's first epoch (see the module
    docstring); the ratio raw / first epoch per round and its median."""
    import subprocess

    runs = []
    for i in range(rounds):
        out = subprocess.run([sys.executable, "-m", "bench.store_bench", "--first-epoch-child", url]
                             + (["--reserve-second"] if i % 2 else []),
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [r["raw_seconds"] / r["first_epoch_seconds"] for r in runs]
    second = {way: [r["raw_seconds"] / r[f"second_loader_seconds_{way}"] for r in runs] for way in ("reserve", "new")}
    return {"rounds": rounds, "rows": runs[0]["rows"], "bytes": runs[0]["bytes"],
            "raw_seconds": statistics.median(r["raw_seconds"] for r in runs),
            "first_epoch_seconds": statistics.median(r["first_epoch_seconds"] for r in runs),
            "ratio": statistics.median(ratios), "ratio_rounds": ratios,
            "second_loader_pause_s": SECOND_LOADER_PAUSE_S,
            **{f"second_loader_ratio_{way}": statistics.median(rs) for way, rs in second.items()},
            **{f"second_loader_ratio_{way}_rounds": rs for way, rs in second.items()}, "runs": runs}


def bench_reads(name: str, url: str, raw: callable, nbytes: int, rows_total: int, settings: list[tuple[int, int]],
                rounds: int, storage_options=None) -> dict:
    """Paired, interleaved rounds (the box may be shared): raw, every loader setting, raw, every setting
    (reversed order), ... raw. A setting's ratio in a round is the mean of the two raw reads around it
    over its own steady epoch time (and, reported beside it, over its first epoch's); reported: the
    median of those per-round ratios (and the median times). Each raw read is the median of three
    back-to-back passes (a page-cache pass takes ~20-60 ms, so one descheduling would otherwise swing a
    round)."""

    def raw3() -> float:
        return statistics.median([raw() for _ in range(3)])

    raws = [raw3()]
    times: dict[tuple[int, int], list[tuple[float, float]]] = {s: [] for s in settings}
    for r in range(rounds):
        done = {}
        for s in (settings if r % 2 == 0 else settings[::-1]):
            cold, steady, rows = loader_read(url, s[0], s[1], storage_options)
            assert rows == rows_total
            done[s] = (cold, steady)
        raws.append(raw3())
        for s in settings:
            times[s].append(done[s])
    raw_s = statistics.median(raws)
    out = {"bytes": nbytes, "rows": rows_total, "rounds": rounds, "method": "paired interleaved rounds, median",
           "warm_epochs": WARM_EPOCHS, "timed_epochs": TIMED_EPOCHS,
           "baseline": {"seconds": raw_s, "MB_s": nbytes / raw_s / 1e6, "rows_s": rows_total / raw_s,
                        "seconds_all": raws}, "loader": []}
    for window, prefetch in settings:
        pairs = times[window, prefetch]
        around = [(raws[i] + raws[i + 1]) / 2 for i in range(rounds)]
        ratios = [a / steady for a, (_, steady) in zip(around, pairs)]
        cold_ratios = [a / cold for a, (cold, _) in zip(around, pairs)]
        secs = statistics.median(steady for _, steady in pairs)
        ratio = statistics.median(ratios)
        out["loader"].append({"window_chunks": window, "prefetch": prefetch, "seconds": secs,
                              "rows_s": rows_total / secs, "MB_s": nbytes / secs / 1e6, "ratio": ratio,
                              "ratio_rounds": ratios, "cold_seconds": statistics.median(c for c, _ in pairs),
                              "cold_ratio": statistics.median(cold_ratios), "cold_ratio_rounds": cold_ratios})
        print(f"{name:9s} W={window:3d} prefetch={prefetch}: {nbytes / secs / 1e6:8.0f} MB/s "
              f"({rows_total / secs:,.0f} rows/s) = {ratio:.2f} x raw ({nbytes / raw_s / 1e6:.0f} MB/s); "
              f"first epoch {statistics.median(cold_ratios):.2f} x; median of {rounds} paired rounds", flush=True)
    return out


def index_check_cost(paths: list[str], chunks_per_shard: int, raw_s: float, reps: int = 200) -> dict:
    """What the loader's shard-index check costs: crc32c of every shard's index (``16·cps`` bytes, once per
    shard per reader; the loader caches the checked index), timed over ``reps`` passes, against one raw
    sequential read of the same shards (the baseline's epoch)."""
    import google_crc32c

    n_index = 16 * chunks_per_shard + 4
    tails = []
    for p in paths:
        with open(p, "rb") as fh:
            fh.seek(-n_index, os.SEEK_END)
            tails.append(fh.read(n_index))
    t0 = time.perf_counter()
    for _ in range(reps):
        for tail in tails:
            assert google_crc32c.value(tail[:-4]) == int.from_bytes(tail[-4:], "little")
    crc_s = (time.perf_counter() - t0) / reps
    out = {"shards": len(paths), "index_bytes": n_index, "crc_seconds_per_reader": crc_s,
           "raw_epoch_seconds": raw_s, "ratio_to_raw_epoch": crc_s / raw_s}
    print(f"index crc32c: {crc_s * 1e6:.1f} us for {len(paths)} shard indexes once per reader = "
          f"{crc_s / raw_s:.2e} x one raw epoch read", flush=True)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer settings")
    ap.add_argument("--only", choices=["steady", "first-epoch", "s3"], nargs="+",
                    default=["steady", "first-epoch", "s3"], help="the parts to run (default: all)")
    ap.add_argument("--rounds", type=int, help="paired rounds (default: 15, quick: 3; first epoch: 9, quick: 3)")
    ap.add_argument("--defaults-only", action="store_true", help="local float32: only the default settings")
    ap.add_argument("--first-epoch-child", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--reserve-second", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.first_epoch_child:
        return first_epoch_child(args.first_epoch_child, reserve_first=not args.reserve_second)
    rounds = args.rounds or (3 if args.quick else 15)  # paired rounds, locally and on S3
    local_shards = 2 if args.quick else 4
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "loadavg_start": os.getloadavg()},
                     "d": D, "dtype": "float32", "chunk_rows": CHUNK}
    tmp = tempfile.mkdtemp(prefix="storebench", dir="/tmp")
    try:
        if {"steady", "s3"} & set(args.only):
            kernel_ready(None)  # steady state: a long-lived loader has scattered enough to load it
        if "steady" in args.only:
            settings = [(64, 2)] if args.defaults_only else [(8, 2), (64, 2)] if args.quick else [
                (8, 0), (8, 2), (32, 2), (64, 0), (64, 2)]
            results.update(steady_local(tmp, local_shards, rounds, settings))
        if "first-epoch" in args.only:
            # four default windows: 4 x 64 chunks (quick: chunks of 1,024 rows, full: 4,096)
            chunk = 1024 if args.quick else CHUNK
            for dtype in ("float16", "float32"):
                url = os.path.join(tmp, f"first-{dtype}")
                shard_rows = 16 * chunk
                write_dataset(url, FIRST_WINDOWS * DEFAULT_WINDOW * chunk // shard_rows, shard_rows, dtype=dtype,
                              d=FIRST_D, chunk_rows=chunk)
                _, paths, _ = shard_paths(url)
                raw_read_local(paths)  # into the page cache
                got = results[f"first_epoch_fresh_process_{dtype}"] = bench_first_epoch(url, args.rounds or (3 if args.quick else 9))
                print(f"first epoch, fresh process, {dtype} ({got['bytes'] / 2**20:.0f} MiB, {FIRST_WINDOWS} windows): "
                      f"{got['ratio']:.2f} x raw (median of {got['rounds']} rounds: "
                      f"{', '.join(f'{r:.2f}' for r in got['ratio_rounds'])}); a second loader in the process "
                      f"{SECOND_LOADER_PAUSE_S:.0f} s later: {got['second_loader_ratio_reserve']:.2f} x raw with the "
                      f"reserve's buffers, {got['second_loader_ratio_new']:.2f} x with new ones", flush=True)
                shutil.rmtree(url)
        if "s3" in args.only:
            results["s3_write"], results["s3_read"] = s3_reads(args.quick, rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() and set(args.only) != {"steady", "first-epoch", "s3"} else {}
    RESULTS.write_text(json.dumps({**old, **results}, indent=2))  # a partial run keeps the other parts' results
    print(f"wrote {RESULTS}")
    return 0


def steady_local(tmp: str, shards: int, rounds: int, settings: list[tuple[int, int]]) -> dict:
    """Local write timing, and the paired read bench of float32 files at every setting and of float16
    files (the harvester's default storage dtype; batches stay float16) at the defaults."""
    results = {}
    url = os.path.join(tmp, "local")
    wr = write_dataset(url, shards, 65536)
    raw_w = raw_write_local(os.path.join(tmp, "raw"), wr.pop("data"), shards)
    shutil.rmtree(os.path.join(tmp, "raw"))
    results["local_write"] = {**wr, "baseline_MB_s": raw_w, "ratio": wr["MB_s"] / raw_w}
    print(f"local write: {wr['MB_s']:.0f} MB/s vs raw {raw_w:.0f} MB/s = {wr['MB_s'] / raw_w:.2f} x", flush=True)
    _, paths, nbytes = shard_paths(url)
    raw_read_local(paths)  # warm the page cache
    results["local_read"] = bench_reads("local", url, lambda: raw_read_local(paths), nbytes, shards * 65536,
                                        settings, rounds)
    results["index_check"] = index_check_cost(paths, 65536 // CHUNK, results["local_read"]["baseline"]["seconds"])
    shutil.rmtree(url)
    url = os.path.join(tmp, "local16")
    write_dataset(url, shards, 65536, dtype="float16")
    _, paths, nbytes = shard_paths(url)
    raw_read_local(paths)
    results["local_read_float16"] = bench_reads("local f16", url, lambda: raw_read_local(paths), nbytes,
                                                shards * 65536, [(64, 2)], rounds)
    shutil.rmtree(url)
    return results


def s3_reads(quick: bool, rounds: int) -> tuple[dict, dict]:
    """Write timing and the read bench against a moto server on loopback (started here)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3url = "s3://bench/ds"
        s3_shards = 2 if quick else 4
        wr = write_dataset(s3url, s3_shards, 16384)
        data = wr.pop("data")
        fs, s3paths, nbytes = shard_paths(s3url)
        t0 = time.perf_counter()
        for s in range(s3_shards):
            fs.pipe_file(f"bench/raw/{s}.bin", data.tobytes())
        raw_w = s3_shards * data.nbytes / (time.perf_counter() - t0) / 1e6
        write = {**wr, "baseline_MB_s": raw_w, "ratio": wr["MB_s"] / raw_w}
        print(f"s3 write: {wr['MB_s']:.0f} MB/s vs raw put {raw_w:.0f} MB/s = {wr['MB_s'] / raw_w:.2f} x", flush=True)
        s3_settings = [(8, 2), (64, 2)] if quick else [(8, 0), (8, 2), (16, 2), (64, 0), (64, 2)]
        read = bench_reads("s3", s3url, lambda: raw_read_remote(fs, s3paths), nbytes, s3_shards * 16384,
                           s3_settings, rounds)
    finally:
        server.stop()
    return write, read


if __name__ == "__main__":
    sys.exit(main())
