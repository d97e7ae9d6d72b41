"""The process's reserve of window buffers: a second loader reuses the first one's memory, and never memory
that a batch still points into or a read task still writes into."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from store_testdata import build_dataset, shard_data

from store import ActivationLoader, buffer_reserve
from store.buffer_reserve import BufferReserve

TOTAL = 9 * 64 + 40  # 10 shards of 64 rows, chunks of 16 rows


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """float32 acts: batches are views of the window buffers (no cast), so a reused buffer would show."""
    url = str(tmp_path_factory.mktemp("reserve") / "ds")
    build_dataset(url, TOTAL, dtype="float32")
    return url


@pytest.fixture
def reserve(monkeypatch):
    """An empty reserve of this process for the test's loaders (a loader gives its blocks back to the reserve
    it was made with, so earlier tests' loaders, whose last reads may end during this test, keep out)."""
    fresh = BufferReserve()
    monkeypatch.setattr(buffer_reserve, "RESERVE", fresh)
    return fresh


def stored() -> torch.Tensor:
    return torch.from_numpy(np.concatenate([shard_data(s, min(64, TOTAL - 64 * s))["acts"] for s in range(10)]))


def loader(url: str, seed: int = 0, **kw) -> ActivationLoader:
    return ActivationLoader(url, batch_size=32, split="all", seed=seed, window_chunks=4,
                            columns=("acts", "token_ids"), **kw)


def wait_for(condition, what: str) -> None:
    """Wait until ``condition()`` holds (a read task ends in another thread)."""
    done = threading.Event()
    for _ in range(3000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_loader_in_the_process_reuses_the_first_ones_window_buffers(url, reserve):
    """Walked with batch(b) and no read-ahead, each loader needs the same sets whatever the timing (a
    stream's need depends on how soon its consumer lets go of batches)."""
    first = loader(url, epochs=1, prefetch=0)
    tokens = [first.batch(b).token_ids.clone() for b in range(len(first))]
    first.close()
    made = first.buffer_bytes["new"]
    assert made > 0 and first.buffer_bytes["reused"] == 0
    assert reserve.held_bytes == made  # every set, the batches having been let go of

    second = loader(url, epochs=1, prefetch=0)
    again = [(batch.token_ids.clone(), batch.acts.clone()) for batch in map(second.batch, range(len(second)))]
    second.close()
    assert second.buffer_bytes == {"new": 0, "reused": made}  # no memory new to the process
    truth = stored()
    for tok, (tok2, acts) in zip(tokens, again, strict=True):
        assert torch.equal(tok, tok2)  # the same batches
        assert torch.equal(acts, truth[tok2])  # the stored rows, in reused memory


def test_a_batch_kept_from_a_closed_loader_is_never_overwritten_and_its_set_comes_back_when_freed(url, reserve):
    truth = stored()
    first = loader(url, epochs=None)
    stream = first.iter_batches()
    kept = next(stream)  # a view of window 0's buffer
    for _ in range(5):
        next(stream)
    stream.close()
    first.close()
    first._pool.shutdown(wait=True)  # its read tasks, and the hand-backs they trigger, have ended
    made = first.buffer_bytes["new"]
    assert 0 < reserve.held_bytes < made  # the kept batch's set is not in the reserve

    for seed in (1, 2):  # other loaders take every block the reserve has, and allocate the rest
        other = loader(url, seed=seed, epochs=2)
        for batch in other:
            assert torch.equal(batch.acts, truth[batch.token_ids])
        other.close()
    assert torch.equal(kept.acts, truth[kept.token_ids])  # never written by them

    del batch
    reserve.trim()  # takes in what the closed loaders gave back since (nothing is idle yet)
    held = reserve.held_bytes
    del kept  # its set's last lease: the closed loader gives the set at the next take or trim
    reserve.trim()
    assert reserve.held_bytes == held + made // first._buffers_made  # one set more
    nxt = loader(url, seed=3, epochs=1)
    assert sum(1 for _ in nxt) == len(nxt)
    nxt.close()
    assert nxt.buffer_bytes["new"] == 0


def test_a_window_whose_read_still_runs_when_its_loader_closes_is_given_back_only_when_the_read_ends(
        url, reserve, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    ld = loader(url, epochs=1, prefetch=1)
    slow = set(ld._window_span(0, 1)[0].tolist())  # window 1's chunks: read ahead by batch(0)
    read_and_scatter = ActivationLoader._read_and_scatter

    def held_up(self, column, items, buf, place):
        if any(chunk in slow for chunk, _, _ in items):
            entered.set()
            gate.wait()
        return read_and_scatter(self, column, items, buf, place)

    monkeypatch.setattr(ActivationLoader, "_read_and_scatter", held_up)
    try:
        batch = ld.batch(0)
        assert entered.wait(30)
        set_bytes = ld.buffer_bytes["new"] // 2  # two sets: window 0, window 1 read ahead
        del batch
        ld.close()
        assert reserve.held_bytes == set_bytes  # window 0's set only: window 1's is still being written
    finally:
        gate.set()
    wait_for(lambda: reserve.held_bytes == 2 * set_bytes, "window 1's set to be given back")


def test_a_loader_with_its_own_allocator_gives_nothing_to_the_reserve(url, reserve):
    made = []

    def allocate(shape, dtype):
        made.append(np.empty(shape, dtype))
        return made[-1]

    ld = loader(url, epochs=1, allocator=allocate)
    assert sum(1 for _ in ld) == len(ld)
    ld.close()
    assert made and reserve.held_bytes == 0 and reserve.given == 0


def test_the_reserve_holds_at_most_its_limit_and_frees_blocks_left_idle():
    now = [0.0]
    res = BufferReserve(limit_bytes=5 << 20, idle_s=60, clock=lambda: now[0])
    blocks = [np.empty(2 << 20, np.uint8) for _ in range(3)]
    for block in blocks:
        res.give(block)
        now[0] += 10
    assert res.held_bytes == 4 << 20  # the oldest went past the 5 MiB limit
    assert res.take(5 << 20) is None  # no block large enough
    assert res.take(512 << 10) is None  # a block over twice the request never serves it
    assert res.take(1 << 20) is blocks[1]  # 2 MiB serves 1–2 MiB; the oldest first among equals
    assert res.held_bytes == 2 << 20
    now[0] += 45  # blocks[2] was given 50 s ago
    res.trim()
    assert res.held_bytes == 2 << 20
    now[0] += 15
    res.trim()
    assert res.held_bytes == 0

    off = BufferReserve(limit_bytes=0)
    off.give(np.empty(1 << 20, np.uint8))
    assert off.held_bytes == 0


def test_release_frees_every_block(reserve):
    reserve.give(np.empty(1 << 20, np.uint8))
    buffer_reserve.release_window_buffers()
    assert reserve.held_bytes == 0


def test_a_loader_dropped_without_close_is_freed_at_once_with_its_buffers(url):
    """Nothing outside a loader holds it (a class-wide cache of its epoch orders did): dropping the last
    reference frees it and its window buffers, with no garbage collection pass."""
    import gc
    import weakref

    gc.disable()
    try:
        ld = loader(url, epochs=2)
        assert sum(1 for _ in ld) == len(ld)
        gone = weakref.ref(ld)
        del ld
        assert gone() is None
    finally:
        gc.enable()


def test_the_reserves_timer_frees_a_block_left_idle():
    res = BufferReserve(limit_bytes=1 << 30, idle_s=0.05)
    res.give(np.empty(1 << 20, np.uint8))
    wait_for(lambda: res.held_bytes == 0, "the idle block to be freed by the timer")
    res.give(np.empty(1 << 20, np.uint8))  # a later block re-arms it
    wait_for(lambda: res.held_bytes == 0, "the second idle block to be freed")
