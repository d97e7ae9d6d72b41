"""The sweep's feeder (:mod:`trainer.feeder`): one store read per batch, cursor groups, the batch
record passed through unchanged in the stored dtype."""

from __future__ import annotations

import pytest
import torch
from trainer_testkit import make_store

from store.batch import Batch
from trainer.feeder import Feeder, FeederCore, feeder_batches


@pytest.mark.parametrize("n_trainers", [1, 4])
def test_feeder_reads_each_batch_once(ray_local, tiny_store, n_trainers):
    """N consumers, consumer i lagging i batches behind the first (within the 4-batch window), get the
    same ObjectRefs and the store is read once per batch; a consumer asking for a batch that has left
    the window (a restart) causes a counted re-read, with the same contents."""
    import ray

    total = 12
    names = [f"t{i}" for i in range(n_trainers)]
    feeder = Feeder.remote(tiny_store, 64, 0, total, names, 4, 1, 60.0)
    refs: dict[int, set] = {}
    for step in range(total + n_trainers - 1):
        for i, name in enumerate(names):
            if 0 <= step - i < total:
                inner = ray.get(feeder.get.remote(step - i, name))
                refs.setdefault(step - i, set()).add(inner.hex())
    for name in names:
        ray.get(feeder.done.remote(name))
    stats = ray.get(feeder.reads.remote())
    assert stats["reads"] == total and stats["unique"] == total and stats["rereads"] == 0
    assert all(len(r) == 1 for r in refs.values())  # one object per batch, shared
    from store.loader import ActivationLoader

    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    got = feeder_batches(feeder, "late", span=4)(3)  # the loader's Batch, unchanged
    assert isinstance(got, Batch) and got.token_ids is None and got.seq_ids is None
    assert torch.equal(got.acts, loader.batch(3).acts) and torch.equal(got.positions, loader.batch(3).positions)
    # batches 3..6 (one span) had left the window (and batch 7, read ahead when the window has free room)
    assert 4 <= ray.get(feeder.reads.remote())["rereads"] <= 5
    ray.kill(feeder)


def test_unscheduled_trainers_do_not_pin_the_window(tiny_store):
    """More runs than Ray slots: trainers that have not started yet must not hold the window, or the
    running ones would wait out the lag timeout on every batch. The first trainer streams through a
    2-batch window with no forced eviction; the late one re-reads what left the window."""
    total = 8
    feeder = FeederCore(tiny_store, 64, 0, total, ["early", "late"], window=2, prefetch=0, lag_timeout_s=0.2)
    for b in range(total):
        feeder.get(b, "early")
    assert feeder.reads()["lag_timeouts"] == 0
    assert feeder.reads()["reads"] == total
    feeder.get(0, "late")
    assert feeder.reads()["rereads"] == 1


def test_a_done_trainer_holds_nobody_back_even_with_a_request_in_flight(tiny_store):
    """A trainer whose process died mid-span: the driver calls done() while the feeder still serves the
    dead process's last get_span. Those late requests get their batches but must not make the trainer
    live again, or the other trainers of its group would wait out the lag timeout for it, batch after
    batch (seen in a sweep test under load: four 60 s timeouts)."""
    total = 16
    feeder = FeederCore(tiny_store, 64, 0, total, ["dead", "alive"], window=2, prefetch=0, lag_timeout_s=0.5)
    feeder.get(0, "dead")
    feeder.done("dead")
    feeder.get(1, "dead")  # the dead process's request, served after done()
    for b in range(total):
        feeder.get(b, "alive")
    assert feeder.reads()["lag_timeouts"] == 0 and "dead" not in feeder.cursors


def test_feeder_serves_far_apart_cursors_without_waiting(tiny_store):
    """A fresh feeder (a resumed sweep, or a restarted feeder) facing runs stopped at steps 3 and 60 with
    a 4-batch window: they are two cursor groups and neither waits for the other (a wait would end in a
    lag timeout); the laggard's batches 3..59 are read once, the leader's 60..63 at most twice (once per
    group: the laggard gets there long after they left the window)."""
    total = 64
    feeder = FeederCore(tiny_store, 64, 0, total, ["lag", "lead"], window=4, prefetch=2, lag_timeout_s=30.0)
    for i in range(total - 3):  # interleaved, as two trainers stepping side by side
        feeder.get(3 + i, "lag")
        if 60 + i < total:
            feeder.get(60 + i, "lead")
        elif 60 + i == total:
            feeder.done("lead")
    feeder.done("lag")
    stats = feeder.reads()
    assert stats["lag_timeouts"] == 0
    assert sorted(feeder.read_counts) == list(range(3, total))
    assert all(feeder.read_counts[b] == 1 for b in range(3, 60))
    assert all(feeder.read_counts[b] <= 2 for b in range(60, total)) and stats["rereads"] > 0
    assert stats["held"] <= 4


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feeder_passes_the_stored_dtype_through_ray(ray_local, tmp_path, dtype):
    """A float16 dataset's batches cross the feeder and Ray's object store as float16 (half the bytes of
    float32), equal to the loader's batch; the trainer casts them on its device."""
    import ray

    from store.loader import ActivationLoader

    store = make_store(str(tmp_path / dtype), shards=1, dtype=dtype)
    feeder = Feeder.remote(store, 64, 0, 2, ["t"], 4, 0, 60.0)
    got = feeder_batches(feeder, "t")(1)
    want = ActivationLoader(store, 64, seed=0, columns=("acts", "positions")).batch(1)
    assert got.acts.dtype == want.acts.dtype == getattr(torch, dtype)
    assert got.positions.dtype == torch.int16  # every column in its stored dtype
    assert torch.equal(got.acts, want.acts) and torch.equal(got.positions, want.positions)
    assert ray.get(feeder.reads.remote())["bytes_read"] == 64 * (16 * got.acts.element_size() + 2)
    assert torch.equal(got.acts_on("cpu"), want.acts.float())
    ray.kill(feeder)


def test_a_span_is_the_batches_one_by_one(tiny_store):
    """``get_span`` (what a trainer asks for, SPAN batches a call) reads each batch once, moves the
    trainer's cursor past the span, and stops at the stream's end."""
    import ray

    def value(x):
        return ray.get(x) if isinstance(x, ray.ObjectRef) else x

    feeder = FeederCore(tiny_store, 64, 0, 6, ["t"], window=8, prefetch=0)
    span = [value(x) for x in feeder.get_span(2, 3, "t")]
    assert [b.rows for b in span] == [64, 64, 64] and feeder.cursors["t"] == 5
    for i, got in enumerate(span, start=2):
        assert torch.equal(got.acts, feeder.loader.batch(i).acts)
    assert len(feeder.get_span(4, 4, "t")) == 2  # batches 4 and 5: the stream has 6
    assert feeder.reads()["reads"] == 4 and feeder.reads()["rereads"] == 0  # 2, 3, 4, 5 once each


def test_the_feeder_reads_and_serves_batches_without_importing_torch(tiny_store):
    """The feeder only moves batches (numpy arrays under the hood, ``store.batch``): a process that
    imports it and serves batches never imports torch (~3 s of CPU a process: one per sweep)."""
    import subprocess
    import sys

    code = ("import sys\nfrom trainer.feeder import FeederCore\n"
            f"feeder = FeederCore({tiny_store!r}, 64, 0, 4, ['t'], window=2, prefetch=1)\n"
            "batches = feeder.get_span(0, 4, 't')\n"
            "assert [b.rows for b in batches] == [64] * 4 and batches[0].arrays['acts'].dtype.name == 'float32'\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout[-500:]
