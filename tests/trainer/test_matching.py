"""match_l0: which runs train first, which are steered, and to what target (hand-written expectations)."""

from __future__ import annotations

import pytest

from store.errors import UserError
from trainer.config import TrainConfig
from trainer.matching import reference_l0, split_phases, with_targets


def run(name: str, **sae) -> tuple[dict, TrainConfig]:
    cfg = TrainConfig(dataset="unused", runs_root="unused", name=name, sae=sae, tokens=64)
    return {}, cfg


RUNS = [run("sm0", variant="sparsemax", m=64, seed=0), run("sm1", variant="sparsemax", m=64, seed=1),
        run("sm-big", variant="sparsemax", m=128), run("mlp", variant="mlp_sparsemax", m=64),
        run("relu", variant="relu", m=64), run("topk", variant="topk", m=64),
        run("gated-fixed", variant="gated", m=64, target_l0=10.0), run("relu-big", variant="relu", m=128)]


def test_phases_targets_and_errors():
    first, matched = split_phases(RUNS, "sparsemax")
    assert [c.name for _, c in first] == ["sm0", "sm1", "sm-big", "mlp", "gated-fixed"]
    assert [c.name for _, c in matched] == ["relu", "topk", "relu-big"]
    targets = reference_l0(first, "sparsemax", {"sm0": 30.0, "sm1": 34.0, "sm-big": 50.2, "mlp": 3.0})
    assert targets == {64: 32.0, 128: 50.2}
    steered = {c.name: c.sae for _, c in with_targets(matched, targets, "sparsemax")}
    assert steered["relu"]["target_l0"] == 32.0 and steered["relu-big"]["target_l0"] == 50.2
    assert steered["topk"]["target_l0"] == 32.0
    with pytest.raises(UserError, match="reference run sm1 has no held-out l0"):
        reference_l0(first, "sparsemax", {"sm0": 30.0, "sm1": None, "sm-big": 50.2})
    with pytest.raises(UserError, match="no run of the sweep is of variant 'topk'"):
        split_phases([r for r in RUNS if r[1].name != "topk"], "topk")
    with pytest.raises(UserError, match="M = 128 but no sparsemax run has that M"):
        with_targets(matched, {64: 32.0}, "sparsemax")
