"""The feeder's shared memory (:mod:`trainer.batch_slots`): a batch in a window buffer is handed out
where it lies, a copied one in a slot; another process reads either zero-copy through
``/proc/<pid>/fd``; slots are reused, a reference to a rewritten slot is refused, and a window
buffer's file goes with its array."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from store.batch import Batch
from trainer.batch_slots import BatchSlots, SlotReader, slot_bytes, slots_supported

pytestmark = pytest.mark.skipif(not slots_supported(), reason="batch slots need memfd_create and /proc (Linux)")


def make_batch(rows: int, d: int, seed: int, dtype: str = "float16") -> Batch:
    rng = np.random.default_rng(seed)
    return Batch(acts=rng.normal(size=(rows, d)).astype(dtype),
                 positions=rng.integers(0, 128, rows).astype(np.int16),
                 extra={"true_l0": rng.integers(0, 9, rows).astype(np.int32)})


def assert_same(got: Batch, want: Batch) -> None:
    assert list(got.arrays) == list(want.arrays)
    for name, array in want.arrays.items():
        assert got.arrays[name].dtype == array.dtype and np.array_equal(got.arrays[name], array)


def test_a_slot_holds_every_column_in_its_stored_dtype_at_aligned_offsets():
    batch = make_batch(5, 3, seed=0)
    slots = BatchSlots()
    index = slots.take(slot_bytes(batch), free=[])
    ref = slots.write(index, batch)
    # header 64 B; acts 5×3×2 = 30 B → 64; positions 5×2 = 10 B → 64; true_l0 5×4 = 20 B → 64
    assert [(name, offset) for name, _, _, _, offset in ref.columns] == [("acts", 64), ("positions", 128),
                                                                         ("true_l0", 192)]
    assert slot_bytes(batch) == 256
    got = SlotReader().batch(ref)
    assert_same(got, batch)
    assert not got.arrays["acts"].flags.writeable  # a trainer never writes into a batch
    slots.close()


def test_another_process_reads_the_slot_zero_copy():
    """What a trainer does: open the feeder's slot through /proc/<pid>/fd and read the batch."""
    batch = make_batch(64, 16, seed=1, dtype="float32")
    slots = BatchSlots()
    ref = slots.write(slots.take(slot_bytes(batch), free=[]), batch)
    code = ("import pickle, sys\nfrom trainer.batch_slots import SlotReader\n"
            "got = SlotReader().batch(pickle.loads(sys.stdin.buffer.read()))\n"
            "sys.stdout.buffer.write(pickle.dumps({k: a.copy() for k, a in got.arrays.items()}))\n")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(ref), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert_same(Batch.of(pickle.loads(done.stdout)), batch)
    slots.close()


def test_slots_are_reused_and_a_rewritten_slot_refuses_its_old_reference():
    slots = BatchSlots()
    first, second = make_batch(32, 8, seed=2), make_batch(32, 8, seed=3)
    a = slots.take(slot_bytes(first), free=[])
    old = slots.write(a, first)
    assert slots.take(slot_bytes(second), free=[a]) == a  # free and big enough: reused
    new = slots.write(a, second)
    assert new.check[1] == old.check[1] + 1 and len(slots.slots) == 1
    reader = SlotReader()
    assert_same(reader.batch(new), second)
    with pytest.raises(RuntimeError, match="reused a slot a trainer still held"):
        reader.batch(old)
    bigger = make_batch(64, 8, seed=4)
    b = slots.take(slot_bytes(bigger), free=[a])  # the free slot is too small: a new one
    assert b != a and len(slots.slots) == 2
    assert_same(reader.batch(slots.write(b, bigger)), bigger)
    slots.close()


def test_a_batch_in_a_window_buffer_is_handed_out_where_it_lies_and_its_file_goes_with_it():
    import gc

    slots = BatchSlots()
    acts = slots.allocate((100, 8), np.float16)  # what the loader's allocator makes
    positions = slots.allocate((100,), np.int16)
    acts[:] = np.arange(800, dtype=np.float16).reshape(100, 8)
    positions[:] = np.arange(100, dtype=np.int16)
    batch = Batch(acts=acts[40:72], positions=positions[40:72])  # a batch: a slice of the window
    ref = slots.refer(batch)
    assert ref is not None and ref.check is None  # no copy, no slot
    assert [(name, offset) for name, _, _, _, offset in ref.columns] == [("acts", 40 * 8 * 2), ("positions", 80)]
    assert_same(SlotReader().batch(ref), batch)
    assert slots.refer(make_batch(4, 8, seed=5)) is None  # memory of its own: the feeder copies it
    assert len(slots.regions) == 2 and slots.regions_made == 2
    del acts, positions, batch
    gc.collect()
    assert slots.regions == {}  # the loader let go of its buffers: their files are closed
