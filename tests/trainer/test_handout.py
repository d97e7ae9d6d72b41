"""The feeder's hand-out board (:mod:`trainer.handout`): a trainer of the feeder's node asks for spans
through shared memory, gets exactly what a Ray call would give, and goes back to Ray calls whenever the
board cannot answer (no seat, an answer that is not shared memory, a failed request, a dead feeder)."""

from __future__ import annotations

import os
import threading
import time
import warnings

import pytest
import torch

from trainer.batch_slots import SlotRef
from trainer.handout import (
    ROWS,
    BoardClient,
    FeederGone,
    HandOutBoard,
    board_supported,
    decode_refs,
    encode_refs,
)

pytestmark = pytest.mark.skipif(not board_supported(), reason="the board needs Linux x86-64")

WINDOW_REF = SlotRef("dynsae-feeder-1-ab", 4242, (("acts", "<f2", (64, 16), (7, 3), 128),
                                                  ("positions", "<i2", (64,), (8, 4), 0)), None)
SLOT_REF = SlotRef("dynsae-feeder-1-ab", 4242, (("acts", "<f4", (2, 16), (9, 5), 64),), ((9, 5), 12))


def test_slot_refs_cross_the_board_as_json_unchanged():
    assert decode_refs(encode_refs([WINDOW_REF, SLOT_REF])) == [WINDOW_REF, SLOT_REF]
    assert encode_refs([]) == b"[]" and decode_refs(b"[]") == []


@pytest.mark.timeout(60)
def test_a_request_is_answered_by_serve_with_the_trainers_arguments():
    """Two trainers, each at its own seat, ask in turn and concurrently; each gets serve's answer to its
    own request (first batch, span, its name, keep_from)."""
    calls = []

    def serve(b, n, trainer, keep):
        calls.append((b, n, trainer, keep))
        return [SlotRef(trainer, b + i, (), None) for i in range(n)]

    board = HandOutBoard("test", serve)
    try:
        a, b = BoardClient(board.seat("a")), BoardClient(board.seat("b"))
        a.ask(0, 8, -8)
        assert a.answer() == [SlotRef("a", i, (), None) for i in range(8)]
        answers = {}

        def take(client, name, first):
            for k in range(20):
                client.ask(first + 8 * k, 8, first + 8 * k - 8)
                answers.setdefault(name, []).append(client.answer())

        threads = [threading.Thread(target=take, args=(a, "a", 8)), threading.Thread(target=take, args=(b, "b", 0))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [r[0].pid for r in answers["a"]] == [8 + 8 * k for k in range(20)]
        assert [r[0].pid for r in answers["b"]] == [8 * k for k in range(20)]
        assert all(r[0].owner == name for name in "ab" for r in answers[name])
        assert (72, 8, "a", 64) in calls and (152, 8, "b", 144) in calls
        assert board.stats() == {"board_seats": 2, "board_answers": 41, "board_sent_to_ray": 0}
    finally:
        board.close()


def test_what_the_board_cannot_carry_sends_the_trainer_to_a_ray_call():
    """An answer with an ObjectRef (a batch only in Ray's object store), one too long for a row, and a
    request the feeder failed to serve all come back as "ask by Ray call" (``None``)."""
    answers = iter([[WINDOW_REF, object()], [WINDOW_REF] * 200, IndexError("batch 99 outside 0..15")])

    def serve(b, n, trainer, keep):
        got = next(answers)
        if isinstance(got, Exception):
            raise got
        return got

    board = HandOutBoard("test", serve)
    try:
        client = BoardClient(board.seat("t"))
        for _ in range(3):
            client.ask(0, 8, -8)
            assert client.answer() is None
        assert board.stats()["board_sent_to_ray"] == 3 and board.stats()["board_answers"] == 0
    finally:
        board.close()


@pytest.mark.timeout(60)
def test_a_trainer_waiting_at_a_closed_board_is_sent_to_ray():
    """The feeder closes its board while a request waits for an answer: the trainer is told the board
    is gone (and asks by Ray call), not left waiting."""
    release = threading.Event()
    board = HandOutBoard("test", lambda *a: release.wait(30) and [])
    client = BoardClient(board.seat("t"))
    client.ask(0, 8, -8)
    board.close()
    with pytest.raises(FeederGone):
        client.answer()
    release.set()
    assert not client.alive()


def test_seats_run_out_after_ROWS_and_a_closed_board_seats_nobody():
    board = HandOutBoard("test", lambda *a: [])
    try:
        assert all(board.seat(f"t{i}") is not None for i in range(ROWS))
        assert board.seat("one-too-many") is None
    finally:
        board.close()
    assert HandOutBoard.no_stats()["board_seats"] == 0 and board.seat("late") is None


@pytest.mark.timeout(120)  # a trainer that never noticed the dead feeder would wait forever
def test_a_trainer_whose_feeder_dies_takes_its_batches_from_the_restarted_feeder(ray_local, tiny_store):
    """The feeder's process is killed while the trainer's next span is asked on its board: the trainer
    finds the board gone, asks the feeder Ray restarted by Ray call, sits at its new board, and every batch
    is still the loader's."""
    import ray

    from store.loader import ActivationLoader
    from trainer.feeder import Feeder, feeder_batches

    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    feeder = Feeder.options(max_restarts=-1, max_task_retries=-1).remote(tiny_store, 64, 0, 32, ["t"], 4, 1, 60.0)
    take = feeder_batches(feeder, "t")
    first_board = take.board
    assert first_board is not None
    for b in range(8):
        assert torch.equal(take(b).acts, loader.batch(b).acts)
    # the next span is asked on the board; its answer (if in before the kill) points into a window buffer
    # the trainer has mapped already, so it still reads; the span after it meets the dead board
    assert take.next[0] == 8 and take.board.pending
    old_pid = first_board.seat.pid
    ray.kill(feeder, no_restart=False)
    # ray.kill returns before the process ends: a feeder still alive would answer the next spans itself
    while first_board.alive():  # its board's file is closed (the test's timeout bounds this)
        time.sleep(0.01)
    for b in range(8, 32):
        assert torch.equal(take(b).acts, loader.batch(b).acts)
    assert take.board is not None and take.board is not first_board and take.board.seat.pid != old_pid
    stats = ray.get(feeder.reads.remote())
    assert stats["board_seats"] == 1 and stats["board_answers"] >= 1
    ray.kill(feeder)


@pytest.mark.timeout(120)
def test_a_trainer_whose_feeder_died_after_answering_asks_the_restarted_one(ray_local, tiny_store):
    """The feeder answers a span, then dies before the trainer has opened the memory the answer points
    into: the trainer asks the feeder Ray restarted and sits at its board (it does not give up on shared
    memory for good, as it must when its sandbox cannot open the files)."""
    import ray

    from store.loader import ActivationLoader
    from trainer.batch_slots import SlotReader
    from trainer.feeder import Feeder, feeder_batches

    loader = ActivationLoader(tiny_store, 64, seed=0, columns=("acts", "positions"))
    feeder = Feeder.options(max_restarts=-1, max_task_retries=-1).remote(tiny_store, 64, 0, 32, ["t"], 4, 1, 60.0)
    take = feeder_batches(feeder, "t")
    assert torch.equal(take(0).acts, loader.batch(0).acts)
    old_pid = take.board.seat.pid
    take.reader = SlotReader()  # batches 1..7 are answered; none of the files they lie in is open here
    ray.kill(feeder, no_restart=False)
    while os.path.exists(f"/proc/{old_pid}"):  # the old process is gone (the test's timeout bounds it)
        time.sleep(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot open the feeder's batch slots": that is for sandboxes
        for b in range(1, 24):
            assert torch.equal(take(b).acts, loader.batch(b).acts)
    assert take.board is not None and take.board.seat.pid != old_pid and take.node is not None
    ray.kill(feeder)
