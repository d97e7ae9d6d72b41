"""ActivationLoader: exactly-once, shuffling, determinism of batch(b), ranks, splits, S3."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from store_testdata import CHUNK_ROWS, D, build_dataset, shard_data

from store import ActivationLoader, UserError, open_dataset
from store.batch import Batch
from store.split import eval_chunk_mask

TOTAL = 9 * 64 + 40  # 10 shards, 39 chunks, last chunk has 8 rows


@pytest.fixture(scope="module")
def ds_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "ds")
    build_dataset(url, TOTAL)
    return url


def token_stream(loader, n_batches=None) -> np.ndarray:
    out = []
    for i, batch in enumerate(loader):
        out.append(batch.token_ids.numpy())
        if n_batches is not None and i + 1 >= n_batches:
            break
    return np.concatenate(out)


def split_tokens(url: str, split: str) -> np.ndarray:
    ds = open_dataset(url)
    return np.concatenate([np.arange(a, b) for a, b in ds.split_row_ranges(split)])


@pytest.mark.parametrize("split", ["train", "eval", "all"])
def test_every_row_exactly_once_per_epoch_and_shuffled(ds_url, split):
    loader = ActivationLoader(ds_url, batch_size=50, split=split, seed=7, window_chunks=4, epochs=2,
                              columns=("acts", "token_ids"))
    rows = loader.rows_per_epoch
    expect = split_tokens(ds_url, split)
    assert rows == expect.size
    tokens = token_stream(loader)
    assert tokens.size == 2 * rows
    assert len(loader) == -(-2 * rows // 50)
    for e in range(2):
        epoch = tokens[e * rows:(e + 1) * rows]
        assert np.array_equal(np.sort(epoch), expect)
    assert not np.array_equal(tokens[:rows], expect)  # shuffled
    assert not np.array_equal(tokens[:rows], tokens[rows:])  # a fresh order per epoch
    # rows from different chunks are interleaved inside a batch (row-level shuffle in the window)
    first = tokens[:50] // CHUNK_ROWS
    assert np.unique(first).size >= 3


def test_acts_match_the_stored_rows(ds_url):
    loader = ActivationLoader(ds_url, batch_size=64, split="all", seed=1, window_chunks=5, epochs=1,
                              columns=("acts", "token_ids", "seq_ids", "positions"))
    stored = np.concatenate([shard_data(s, min(64, TOTAL - 64 * s))["acts"] for s in range(10)])
    stored = torch.from_numpy(stored.astype(np.float16))
    for batch in loader:  # every column in its stored dtype: nothing is cast on the way
        assert isinstance(batch, Batch) and batch.rows == batch.acts.shape[0]
        assert (batch.acts.dtype, batch.token_ids.dtype, batch.seq_ids.dtype, batch.positions.dtype) == (
            torch.float16, torch.int32, torch.int64, torch.int16)
        tok = batch.token_ids.long()
        assert batch.acts.shape[1] == 16 and torch.equal(batch.acts, stored[tok])
        assert torch.equal(batch.seq_ids, tok // 8) and torch.equal(batch.positions.long(), tok % 8)


@pytest.fixture(scope="module")
def f32_url(tmp_path_factory):
    """float32 acts: batches that need no cast are lent as views of the window buffer."""
    url = str(tmp_path_factory.mktemp("loader32") / "ds")
    build_dataset(url, TOTAL, dtype="float32")
    return url


def stored_f32() -> torch.Tensor:
    return torch.from_numpy(np.concatenate([shard_data(s, min(64, TOTAL - 64 * s))["acts"] for s in range(10)]))


@pytest.mark.parametrize("use_mmap", [True, False])
def test_float32_batches_are_the_stored_rows(f32_url, use_mmap):
    stored = stored_f32()
    loader = ActivationLoader(f32_url, batch_size=48, split="all", seed=2, window_chunks=3, epochs=2,
                              columns=("acts", "token_ids"), use_mmap=use_mmap)
    for batch in loader:
        assert torch.equal(batch.acts, stored[batch.token_ids])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_kept_batch_is_never_overwritten(ds_url, f32_url, dtype):
    """Batches are views of window buffers that are reused (float32 and float16 alike): a batch (or a
    slice of it) the consumer keeps must hold its memory back from reuse, however far the stream goes on."""
    stored = stored_f32() if dtype == "float32" else stored_f32().half()
    loader = ActivationLoader(f32_url if dtype == "float32" else ds_url, batch_size=32, split="all", seed=4,
                              window_chunks=2, epochs=None, columns=("acts", "token_ids"), prefetch=1)
    kept, kept_slice = [], None
    for i, batch in enumerate(loader.iter_batches()):
        if i in (0, 5):
            kept.append((batch.acts, batch.token_ids))
        if i == 9:
            kept_slice = (batch.acts[3:7], batch.token_ids[3:7])  # the batch itself is dropped
        if i == 120:  # ~100 windows later: every free buffer has been reused many times
            break
    for acts, tok in kept + [kept_slice]:
        assert torch.equal(acts, stored[tok])


def test_a_consumer_that_keeps_every_batch_gets_the_whole_stream(f32_url):
    """No window buffer is ever freed, so the window two ahead is never read early (it waits for a
    recycled set): it is read when it becomes the next one, and the stream still ends, each batch the
    stored rows, each window in a buffer of its own."""
    stored = stored_f32()
    loader = ActivationLoader(f32_url, batch_size=16, split="all", seed=4, window_chunks=8, epochs=2,
                              columns=("acts", "token_ids"), prefetch=2)
    kept = list(loader.iter_batches())  # every window holds whole batches, lent as views of it
    assert len(kept) == len(loader)
    for batch in kept:
        assert torch.equal(batch.acts, stored[batch.token_ids])
    assert loader._buffers_made == 2 * loader.windows_per_epoch
    loader.close()


def test_modifying_a_batch_changes_no_other_batch(f32_url):
    loader = ActivationLoader(f32_url, batch_size=32, split="all", seed=4, window_chunks=4, epochs=1,
                              columns=("acts", "token_ids"))
    first = loader.batch(0)  # inside the first window (>= 56 rows): a view of its buffer
    first.acts.mul_(0)  # in place
    again = loader.batch(0)
    assert torch.equal(again.acts, stored_f32()[again.token_ids])
    assert again.acts.abs().sum() > 0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_window_buffers_are_reused(ds_url, f32_url, dtype, monkeypatch):
    """A consumer that drops its batches: the stream runs on a bounded set of window buffers, and
    nothing else is allocated per batch (float16 acts are handed out as float16, not cast)."""
    from store import buffer_reserve

    made = []
    aligned_empty = buffer_reserve.aligned_empty

    def counting_empty(shape, dtype):
        made.append(shape)
        return aligned_empty(shape, dtype)

    monkeypatch.setattr(buffer_reserve, "aligned_empty", counting_empty)
    monkeypatch.setattr(buffer_reserve, "RESERVE", buffer_reserve.BufferReserve())  # none left by other tests
    loader = ActivationLoader(f32_url if dtype == "float32" else ds_url, batch_size=16, split="all", seed=4,
                              window_chunks=8, epochs=5, prefetch=2)
    assert loader.windows_per_epoch * 5 == 25 and len(loader) > 150
    n = sum(1 for _ in loader)
    assert n == len(loader)
    set_bytes = loader.max_window_rows * D * np.dtype(dtype).itemsize  # the acts column, the only one
    windows = [shape for shape in made if shape[0] == set_bytes]  # one byte block per window buffer
    assert len(windows) == len(made)
    # (prefetch + 1) buffer sets of one column each: the window being handed out, the next one, and the
    # one after it, read into the passed window's set once the batches in the queue and in the consumer's
    # hand have let go of it (it was prefetch + 2 before a window two ahead waited for that)
    assert len(windows) == 3
    loader.close()


def test_local_reads_take_consecutive_chunks_up_to_task_bytes_per_task(ds_url, monkeypatch):
    """A local window is read in tasks of consecutive chunks, up to TASK_BYTES of a column each (a task per
    chunk cost the pool a hand-off per 8 KiB of a small column), and every chunk of the window once."""
    import store.loader as loader_module

    tasks: list[tuple[str, list[int]]] = []
    read_and_scatter = ActivationLoader._read_and_scatter

    def counting(self, column, items, buf, place):
        tasks.append((column, [chunk for chunk, _, _ in items]))
        return read_and_scatter(self, column, items, buf, place)

    monkeypatch.setattr(ActivationLoader, "_read_and_scatter", counting)
    monkeypatch.setattr(loader_module, "TASK_BYTES", 3 * CHUNK_ROWS * D * 2)  # three chunks of float16 acts
    loader = ActivationLoader(ds_url, batch_size=32, split="all", seed=0, window_chunks=8, epochs=1, prefetch=0,
                              columns=("acts", "token_ids"))
    stored = torch.from_numpy(np.concatenate([shard_data(s, min(64, TOTAL - 64 * s))["acts"] for s in range(10)]))
    for batch in loader:
        assert torch.equal(batch.acts, stored[batch.token_ids.long()].half())
    loader.close()
    windows = loader.windows_per_epoch
    acts = [chunks for column, chunks in tasks if column == "acts"]
    tokens = [chunks for column, chunks in tasks if column == "token_ids"]
    assert len(tokens) == windows  # 4 bytes a row: a window's chunks in one task
    assert max(len(c) for c in acts) == 3 and len(acts) == sum(-(-len(w) // 3) for w in tokens)  # 8 = 3 + 3 + 2
    assert sorted(c for chunks in acts for c in chunks) == sorted(c for chunks in tokens for c in chunks)
    assert len({c for chunks in acts for c in chunks}) == sum(len(c) for c in acts)  # each chunk read once


def test_a_reader_keeps_a_bounded_number_of_shard_files_open(f32_url, monkeypatch):
    """Shard files stay mapped for the next windows (each mapping holds a file descriptor), but at
    most MAPPED_SHARDS of them: a long stream over many shards must not run out of descriptors."""
    import store.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "MAPPED_SHARDS", 3)
    stored = stored_f32()
    before = len(os.listdir("/proc/self/fd"))
    loader = ActivationLoader(f32_url, batch_size=32, split="all", seed=5, window_chunks=2, epochs=2,
                              columns=("acts", "token_ids"))
    for batch in loader:  # 10 shards, each window from up to 2 of them
        assert torch.equal(batch.acts, stored[batch.token_ids])
    assert len(os.listdir("/proc/self/fd")) <= before + 3
    loader.close()


def test_last_batch_is_short_with_finite_epochs(ds_url):
    loader = ActivationLoader(ds_url, batch_size=100, split="all", epochs=1, columns="token_ids")
    sizes = [b.rows for b in loader]
    assert sizes == [100] * 6 + [16] and len(loader) == 7
    with pytest.raises(IndexError):
        loader.batch(7)


def test_batch_b_is_a_pure_function_and_streams_resume(ds_url):
    kw = dict(batch_size=37, split="train", seed=11, window_chunks=3, columns=("acts", "token_ids"))
    a = ActivationLoader(ds_url, prefetch=2, **kw)
    b = ActivationLoader(ds_url, prefetch=0, io_threads=1, use_mmap=False, **kw)  # buffered reads
    streamed = []
    for i, batch in enumerate(a):  # endless: crosses epoch boundaries
        streamed.append(batch)
        if i == 40:
            break
    for i in [40, 0, 17, 3, 29, 12]:
        assert torch.equal(b.batch(i).acts, streamed[i].acts)
        assert torch.equal(b.batch(i).token_ids, streamed[i].token_ids)
    resumed = b.iter_batches(start=25)
    for i in range(25, 32):
        assert torch.equal(next(resumed).token_ids, streamed[i].token_ids)
    resumed.close()
    a.close()
    b.close()


def test_batch_called_in_order_reads_the_next_windows_ahead(ds_url):
    """The sweep's feeder walks the stream with batch(b): the next window is read while it hands out this
    one (not at its first batch), and every batch, in order, after a jump and across window-buffer reuse,
    is still the streamed one."""
    kw = dict(batch_size=37, split="train", seed=11, window_chunks=3, columns=("acts", "token_ids"))
    streamed = []
    with ActivationLoader(ds_url, **kw) as a:
        for i, batch in enumerate(a):  # endless: crosses epoch boundaries
            streamed.append(batch.token_ids.clone())
            if i == 60:
                break
    loader = ActivationLoader(ds_url, prefetch=2, **kw)
    last_key = loader._pieces(0, 37)[-1][0]
    loader.batch(0)
    assert list(loader._ahead) == [loader._next_key(last_key)]
    for b in range(1, 45):  # in order: each window's first batch is taken from the window read ahead
        assert torch.equal(loader.batch(b).token_ids, streamed[b])
        assert len(loader._ahead) == 1
    ahead = list(loader._ahead)
    assert torch.equal(loader.batch(44).token_ids, streamed[44])  # the same batch again: no change
    assert torch.equal(loader.batch(7).token_ids, streamed[7])  # a jump: nothing read ahead for it
    assert list(loader._ahead) == ahead
    for b in range(8, 61):  # walking from there reads ahead for it; the other place's window goes
        assert torch.equal(loader.batch(b).token_ids, streamed[b])
        assert len(loader._ahead) <= loader.prefetch
    assert not set(ahead) & set(loader._ahead)
    # sets: two cached windows and the one read ahead (the other place's, and the jump: two more)
    assert loader._buffers_made <= 5
    loader.close()


def test_batch_walking_two_places_in_turn_reads_each_window_once(ds_url):
    """A feeder serving two cursor groups far apart calls batch(b) at two places in turn: each place's
    windows read ahead are kept for it, so read-ahead costs no window read more than reading on demand."""
    kw = dict(batch_size=32, split="all", seed=3, window_chunks=4, columns=("acts", "token_ids"))
    walk = [b for i in range(14) for b in (i, 30 + i)]  # each place in order, the other one between

    def fetches(prefetch: int) -> list:
        loader = ActivationLoader(ds_url, prefetch=prefetch, **kw)
        fetched, fetch = [], loader._fetch
        loader._fetch = lambda key: fetched.append(key) or fetch(key)
        got = [loader.batch(b).token_ids for b in walk]
        loader.close()
        return fetched, got

    on_demand, want = fetches(0)
    read_ahead, got = fetches(2)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    # at most the window read ahead past each place's last batch is extra
    assert len(read_ahead) <= len(on_demand) + 2
    assert len(read_ahead) - len(set(read_ahead)) <= len(on_demand) - len(set(on_demand))


def test_seed_changes_order_but_not_content(ds_url):
    kw = dict(batch_size=64, split="all", window_chunks=4, epochs=1, columns="token_ids")
    t1 = token_stream(ActivationLoader(ds_url, seed=1, **kw))
    t2 = token_stream(ActivationLoader(ds_url, seed=2, **kw))
    assert not np.array_equal(t1, t2)
    assert np.array_equal(np.sort(t1), np.sort(t2))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_split(ds_url, world):
    parts = []
    for rank in range(world):
        loader = ActivationLoader(ds_url, batch_size=32, split="train", seed=5, window_chunks=2, epochs=1,
                                  columns="token_ids", rank=rank, world=world)
        parts.append(np.concatenate([b.token_ids.numpy() for b in loader]))
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size
    assert np.array_equal(np.sort(joined), split_tokens(ds_url, "train"))


def test_train_and_eval_are_disjoint_whole_chunks(ds_url):
    ds = open_dataset(ds_url)
    train, ev = split_tokens(ds_url, "train"), split_tokens(ds_url, "eval")
    assert np.intersect1d(train, ev).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, ev])), np.arange(TOTAL))
    assert ds.eval_chunks().size == eval_chunk_mask(39, 0.25, 3).sum() >= 9
    seq_train, seq_eval = set((train // 8).tolist()), set((ev // 8).tolist())
    assert not seq_train & seq_eval  # no sequence straddles the split


@settings(max_examples=25, deadline=None)
@given(max_rows=st.integers(1, 2 * 616 + 50), epochs=st.sampled_from([None, 1, 2]), prefetch=st.integers(0, 2))
def test_max_rows_ends_the_stream_after_its_first_rows_and_reads_no_window_past_them(ds_url, max_rows, epochs,
                                                                                         prefetch):
    """The first max_rows rows of the same stream, in the same batches (the last one short), ending first
    when the epochs end; streamed or by batch(b), the windows read are exactly those that hold them."""
    kw = dict(batch_size=48, split="all", seed=5, window_chunks=4, columns=("acts", "token_ids"))
    full = ActivationLoader(ds_url, epochs=3, **kw)  # more rows than any case asks for
    everything = token_stream(full)
    rows = full.rows_per_epoch
    want = min(max_rows, rows * epochs) if epochs else max_rows
    needed = {key for key, _, _ in full._pieces(0, want)}  # windows that hold the stream's first `want` rows
    fetched: list = []
    for walk in ("stream", "batch"):
        fetched.clear()
        ld = ActivationLoader(ds_url, epochs=epochs, max_rows=max_rows, prefetch=prefetch, **kw)
        fetch = ld._fetch
        ld._fetch = lambda key, fetch=fetch: fetched.append(key) or fetch(key)
        assert ld.total_rows == want and len(ld) == -(-want // 48)
        got = token_stream(ld) if walk == "stream" else np.concatenate(
            [ld.batch(b).token_ids.numpy() for b in range(len(ld))])
        assert np.array_equal(got, everything[:want])
        assert set(fetched) == needed
        with pytest.raises(IndexError):
            ld.batch(len(ld))
        ld.close()


def test_bad_loader_settings(ds_url):
    with pytest.raises(UserError, match="max_rows=0"):
        ActivationLoader(ds_url, batch_size=8, max_rows=0)
    with pytest.raises(UserError, match="columns"):
        ActivationLoader(ds_url, batch_size=8, columns=("nope",))
    with pytest.raises(UserError, match="rank=2"):
        ActivationLoader(ds_url, batch_size=8, rank=2, world=2)
    with pytest.raises(UserError, match="split 'dev'"):
        ActivationLoader(ds_url, batch_size=8, split="dev")
    with pytest.raises(UserError, match="none for rank"):
        ActivationLoader(ds_url, batch_size=8, split="eval", rank=20, world=21)


def test_loader_on_s3_matches_local(s3_bucket, ds_url):
    url = f"{s3_bucket}/ds"
    build_dataset(url, TOTAL)
    kw = dict(batch_size=40, split="train", seed=2, window_chunks=3, epochs=1, columns=("acts", "token_ids"))
    remote = list(ActivationLoader(url, **kw))
    local = list(ActivationLoader(ds_url, **kw))
    assert len(remote) == len(local)
    for r, l_ in zip(remote, local):
        assert torch.equal(r.acts, l_.acts) and torch.equal(r.token_ids, l_.token_ids)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), m=st.integers(0, 400), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_eval_mask_is_deterministic_prefix_stable_and_sized(n, m, fraction, seed):
    a = eval_chunk_mask(n, fraction, seed)
    assert np.array_equal(a, eval_chunk_mask(n, fraction, seed))
    lo, hi = min(n, m), max(n, m)
    if lo >= 2 and eval_chunk_mask(lo, fraction, seed).sum() > 0 and lo * fraction >= 1:
        assert np.array_equal(eval_chunk_mask(hi, fraction, seed)[:lo], eval_chunk_mask(lo, fraction, seed))
    if n >= 2:
        assert a.any()
        assert a.sum() <= np.ceil(n * fraction) + 1
        if fraction <= 0.5:
            assert a.sum() >= np.floor(n * fraction) - 1


# Batch streams of the loader as it was before the gather/read changes of issue 17 (main at 9d9c38c):
# sha256 (first 16 hex digits) of every batch's token_ids (<i8) and acts (<f4) bytes, batches 0..60.
# A change to the reading or gathering code must leave every batch bit for bit the same.
GOLDEN_STREAMS = [
    (dict(batch_size=50, split="all", seed=7, window_chunks=4, epochs=2), "fef0957d2b9f249e"),
    (dict(batch_size=37, split="train", seed=11, window_chunks=3, epochs=None, prefetch=0), "4af3989e5ac377bc"),
    (dict(batch_size=64, split="all", seed=0, window_chunks=64, epochs=1), "42860969e30af355"),
    (dict(batch_size=29, split="train", seed=5, window_chunks=8, epochs=2, rank=1, world=2), "08a59c84dd9e1241"),
    (dict(batch_size=100, split="eval", seed=3, window_chunks=2, epochs=3), "054e829a8b9e95c1"),
]


def stream_digest(loader) -> str:
    h = hashlib.sha256()
    for i, batch in enumerate(loader):
        h.update(batch.token_ids.numpy().astype("<i8").tobytes())
        h.update(batch.acts.numpy().astype("<f4").tobytes())
        if i == 60:
            break
    loader.close()
    return h.hexdigest()[:16]


@pytest.mark.parametrize("task_chunks", [None, 2])  # None: TASK_BYTES (every window in one task per column)
@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("kw,digest", GOLDEN_STREAMS)
def test_batches_are_bit_identical_to_the_reference_stream(ds_url, kw, digest, use_mmap, task_chunks, monkeypatch):
    import store.loader as loader_module

    if task_chunks is not None:  # read tasks of two chunks of acts (token_ids: four)
        monkeypatch.setattr(loader_module, "TASK_BYTES", task_chunks * CHUNK_ROWS * D * 2)
    loader = ActivationLoader(ds_url, columns=("token_ids", "acts"), use_mmap=use_mmap, **kw)
    assert stream_digest(loader) == digest


def test_s3_batches_are_bit_identical_to_the_reference_stream(s3_bucket, ds_url):
    url = f"{s3_bucket}/ds"
    build_dataset(url, TOTAL)
    for kw, digest in GOLDEN_STREAMS:  # window_chunks=64 reads every shard in one coalesced range
        assert stream_digest(ActivationLoader(url, columns=("token_ids", "acts"), **kw)) == digest
    # coalesced ranged reads split at max_bytes, chunks asked for out of order, zstd and raw columns
    ds, local = open_dataset(url), open_dataset(ds_url)
    for name in ("acts", "token_ids"):
        reader = ds.reader(name)
        for chunks, max_bytes in [([2, 0, 1, 3], 2 * 16 * 16 * 2), ([7, 5, 4], 1 << 20), ([9, 8], 1)]:
            got = dict(reader.iter_chunks([(c, local.read_chunk(c, name).shape[0]) for c in chunks],
                                          max_bytes=max_bytes))
            assert sorted(got) == list(range(len(chunks)))
            for i, c in enumerate(chunks):
                assert np.array_equal(got[i], local.read_chunk(c, name))
