"""The sweep's feeder (:mod:`trainer.feeder`): one store read per batch, cursor groups, the batch
record passed through unchanged in the stored dtype."""

from __future__ import annotations

import pytest
import torch
from trainer_testkit import make_store

from store.batch import Batch
from trainer.feeder import SPAN, Feeder, FeederCore, feeder_batches


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
    late = feeder_batches(feeder, "late", span=4)
    got = late(3)  # the loader's Batch, unchanged
    assert isinstance(got, Batch) and got.token_ids is None and got.seq_ids is None
    assert torch.equal(got.acts, loader.batch(3).acts) and torch.equal(got.positions, loader.batch(3).positions)
    # the next span, asked for ahead on the feeder's hand-out board (the driver is on the feeder's node)
    assert late.next[0] == 7 and late.board is not None and len(late.board.answer()) == 4
    # batches 3..6 had left the window, and 7..10 but one the window may still hold (plus 11, read ahead
    # when the window has room)
    assert 7 <= ray.get(feeder.reads.remote())["rereads"] <= 9
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


def test_trainers_of_the_feeders_node_read_shared_memory_and_others_get_object_refs(ray_local, tiny_store,
                                                                                   monkeypatch):
    """A trainer on the feeder's node reads its batches zero-copy from the feeder's shared memory (the
    loader's window buffers, reused over a stream ten epochs long); a trainer on another node gets
    ObjectRefs; one that cannot open the shared memory (a sandbox without /proc access) says so once and
    takes ObjectRefs. Every batch is the loader's."""
    import ray

    from store.loader import ActivationLoader
    from trainer.batch_slots import SlotReader, SlotRef

    total = 160  # 10 epochs of the 16-batch store, one window each
    feeder = Feeder.remote(tiny_store, 64, 0, total, ["t"], 4, 1, 60.0)
    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    node = ray.get_runtime_context().get_node_id()
    first = ray.get(feeder.get_span.remote(0, 2, "t", node))
    assert all(isinstance(h, SlotRef) and h.check is None for h in first)  # in a window buffer: no copy
    take = feeder_batches(feeder, "t")
    for b in range(total):
        got = take(b)
        assert torch.equal(got.acts, loader.batch(b).acts) and torch.equal(got.positions, loader.batch(b).positions)
    stats = ray.get(feeder.reads.remote())
    assert stats["max_reads_per_batch"] == 1 and stats["slots"] == 0  # no batch straddles a window here
    # every span asked at the feeder's hand-out board, none by Ray call (trainer.handout); the last answer is
    # the empty span past the stream's end
    assert stats["board_seats"] == 1 and stats["board_answers"] == total // SPAN + 1
    assert stats["board_sent_to_ray"] == 0
    # (acts, positions) per window buffer set: 10 windows read into fewer sets, reused
    assert 0 < stats["window_buffers"] <= stats["window_buffers_made"] < 2 * 10

    far = ray.get(feeder.get_span.remote(150, 2, "far", "another-node"))
    assert all(isinstance(h, ray.ObjectRef) for h in far)
    assert torch.equal(ray.get(far[1]).acts, loader.batch(151).acts)
    ray.get([feeder.done.remote(name) for name in ("t", "far")])  # nobody waits for them now

    def forbidden(self, ref):
        raise PermissionError(f"[Errno 13] Permission denied: '{ref.path(ref.columns[0][3])}'")

    monkeypatch.setattr(SlotReader, "batch", forbidden)
    boxed = feeder_batches(feeder, "boxed")
    with pytest.warns(RuntimeWarning, match="cannot open the feeder's batch slots"):
        assert torch.equal(boxed(154).acts, loader.batch(154).acts)
    assert torch.equal(boxed(155).acts, loader.batch(155).acts)  # ObjectRefs from now on, no second warning
    ray.kill(feeder)


def test_a_feeder_is_placed_with_the_cpus_and_resources_the_sweep_asks_for(ray_local, tiny_store):
    """``ray.feeder_num_cpus`` and ``ray.feeder_resources`` reach Ray as the feeder actor's demand: it holds
    exactly those CPUs (so Ray packs no trainer onto them) and that share of the custom resource, here the
    resource naming this node (``node:<address>``, which every Ray node offers: how a user pins a feeder
    to a node), and it serves batches as before. By default a feeder holds nothing."""
    import ray

    from store.cluster import RaySession
    from trainer.config import RayConfig
    from trainer.sweep import feeder_placement

    node = next(k for k in ray.cluster_resources() if k.startswith("node:") and "internal" not in k)
    session = RaySession(ray)

    def assigned(rc: RayConfig) -> dict[str, float]:
        feeder = Feeder.options(**feeder_placement(rc, session)).remote(tiny_store, 64, 0, 16, ["t"], 4, 1, 60.0)
        try:
            assert ray.get(feeder.get_span.remote(0, 2, "t", None))  # placed, and it serves
            return ray.get(feeder.__ray_call__.remote(lambda _: ray.get_runtime_context().get_assigned_resources()))
        finally:
            ray.kill(feeder)

    assert assigned(RayConfig(feeder_num_cpus=1, feeder_resources={node: 0.01})) == {"CPU": 1.0, node: 0.01}
    assert assigned(RayConfig()) == {}


def test_shared_memory_a_trainer_still_holds_is_not_rewritten(ray_local, tmp_path):
    """A trainer holding batches 0 and 10 while another streams 48 batches on through a 4-batch window,
    over a store of 512-row windows cut into 48-row batches (batches 10, 21 and 42 straddle two windows
    and are copied into batch slots): the feeder reuses window buffers and slots all along, but never
    the ones the slow trainer may still read."""
    import ray

    from store.loader import ActivationLoader

    store = make_store(str(tmp_path / "narrow"), shards=8, chunk_rows=8)  # 256 chunks: 4 windows of 64
    total = 48
    feeder = Feeder.remote(store, 48, 0, total, ["slow", "fast"], 4, 1, 0.2)
    loader = ActivationLoader(store, 48, seed=0, columns=("acts", "positions"))
    slow = feeder_batches(feeder, "slow")
    held = {b: slow(b) for b in (0, 10)}  # batch 10 (rows 480..527) straddles the first two windows
    fast = feeder_batches(feeder, "fast")
    for b in range(total):
        assert torch.equal(fast(b).acts, loader.batch(b).acts)
    stats = ray.get(feeder.reads.remote())
    assert 0 < stats["slots"] < stats["reads"]  # the straddling batches (10, 21, 42 and re-reads) copied
    assert stats["window_buffers"] > 0  # the others went out zero-copy (their reuse: the test above)
    for b, batch in held.items():
        assert torch.equal(batch.acts, loader.batch(b).acts)
    ray.kill(feeder)


def test_a_trainer_at_the_board_takes_its_batches_in_its_own_thread(ray_local, tiny_store):
    """At the feeder's board the next span is already asked for, so the trainer's prefetcher calls the
    source in the trainer's own thread (no hand-off); asking by Ray call, it still reads ahead in its
    thread. The batches are the loader's either way."""
    import threading

    import ray

    from store.loader import ActivationLoader
    from trainer.run import Prefetcher

    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    feeder = Feeder.remote(tiny_store, 64, 0, 12, ["board", "ray"], 4, 1, 60.0)
    here = threading.get_ident()
    for name, board in (("board", True), ("ray", False)):
        source, threads = feeder_batches(feeder, name, board=board), []

        def spy(b, source=source, threads=threads):
            threads.append(threading.get_ident())
            return source(b)

        spy.asks_ahead = source.asks_ahead
        fetch = Prefetcher(spy, 0, 12)
        try:
            assert all(torch.equal(fetch.get(b).acts, loader.batch(b).acts) for b in range(12))
        finally:
            fetch.close()
        assert source.asks_ahead is board
        assert (set(threads) == {here}) if board else (here not in threads)
    ray.kill(feeder)
