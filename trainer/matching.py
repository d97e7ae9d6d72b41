"""Matched sparsity inside one sweep (``match_l0: <reference variant>``, ``docs/sweep.md``).

The Sparsemax SAE has no L0 knob (its support is chosen per token), so the baselines are matched to
it: the sweep trains in two phases.

1. Every run that cannot take a target (a variant whose file says ``has_l0_knob = False``: the
   reference and the rest of the sparsemax family) and every run given an explicit
   ``sae.target_l0`` trains and is evaluated first.
2. Every other run whose variant takes ``target_l0`` gets ``sae.target_l0`` = the mean held-out L0
   (eval.json's ``l0``) of the reference variant's runs at the same dictionary size M — the mean
   over their seeds — and trains after them (steered baselines reach it by their λ controller,
   TopK/BatchTopK take k = round(target)).

A re-run of the sweep re-evaluates nothing that is finished: the targets come from the phase-1
runs' eval.json files, so they are the same and every run directory resumes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from store.errors import UserError
from trainer.config import TrainConfig


def takes_target(cfg: TrainConfig) -> bool:
    """Whether the run's variant has an L0 knob (``has_l0_knob`` in its file: a ``target_l0`` setting)."""
    from trainer.sae.registry import family

    return family(str(cfg.sae.get("variant"))).has_l0_knob


def split_phases(runs: list[tuple[dict[str, Any], TrainConfig]], reference: str
                 ) -> tuple[list[tuple[dict[str, Any], TrainConfig]], list[tuple[dict[str, Any], TrainConfig]]]:
    """(first phase, matched phase): runs to steer are those that take a target and have none."""
    if not any(cfg.sae.get("variant") == reference for _, cfg in runs):
        raise UserError(f"match_l0 = {reference!r} but no run of the sweep is of variant {reference!r}; add it to "
                        "the grid or remove match_l0.")
    first, matched = [], []
    for item in runs:
        cfg = item[1]
        (matched if takes_target(cfg) and cfg.sae.get("target_l0") is None else first).append(item)
    return first, matched


def reference_l0(runs: list[tuple[dict[str, Any], TrainConfig]], reference: str,
                 l0_of: dict[str, float | None], why: dict[str, str] | None = None) -> dict[int, float]:
    """M -> mean held-out L0 of the reference variant's runs at that M (``l0_of``: run name -> l0;
    ``why``: run name -> the training or evaluation error of a run that has none, for the message)."""
    by_m: dict[int, list[float]] = defaultdict(list)
    for _, cfg in runs:
        if cfg.sae.get("variant") == reference:
            value = l0_of.get(cfg.name)
            if value is None:
                cause = (why or {}).get(cfg.name)
                raise UserError(f"match_l0: reference run {cfg.name} has no held-out l0 ("
                                + (f"its training or evaluation failed: {cause}" if cause else
                                   "it failed or was not evaluated") + "); fix it and re-run the sweep.")
            by_m[int(cfg.sae["m"])].append(float(value))
    return {m: sum(values) / len(values) for m, values in by_m.items()}


def with_targets(runs: list[tuple[dict[str, Any], TrainConfig]], targets: dict[int, float], reference: str
                 ) -> list[tuple[dict[str, Any], TrainConfig]]:
    """The matched-phase runs with ``sae.target_l0`` set to the reference L0 at their M."""
    out = []
    for assignment, cfg in runs:
        m = int(cfg.sae["m"])
        if m not in targets:
            raise UserError(f"match_l0: run {cfg.name} has M = {m} but no {reference} run has that M; add one to "
                            "the grid or give the run an explicit sae.target_l0.")
        data = cfg.model_dump(mode="json")
        data["sae"] = {**data["sae"], "target_l0": round(targets[m], 3)}
        out.append((assignment, TrainConfig.model_validate(data)))
    return out
