"""ARCHITECTURE.md's recipe "Add an SAE variant", followed to the letter: one new file in trainer/sae/,
nothing else edited, trained with `dynsae train`; and a field the variant does not use is refused by
`dynsae train` (exit 2, one error line naming it) and by trainer.sae.build (an exception naming it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from trainer_testkit import base_config

import trainer.sae as sae_zoo
from store.errors import UserError

# The recipe's example: a ReLU SAE whose codes are squared (a made-up variant), in a module of its own.
VARIANT_FILE = textwrap.dedent('''
    """``squared_relu``: f = ReLU(π)², x̂ = f W_dec + b_dec, loss MSE + λ Σ f (a test of the recipe)."""

    from __future__ import annotations

    from typing import Literal

    import torch
    from pydantic import Field

    from trainer.sae.base import Codes
    from trainer.sae.config import SAEConfig
    from trainer.sae.linear import LinearSAE


    class SquaredReluConfig(SAEConfig):
        variant: Literal["squared_relu"] = "squared_relu"
        l1: float = Field(default=1e-3, ge=0, description="L1 coefficient.")


    class SquaredReluSAE(LinearSAE):
        variant = "squared_relu"
        config_class = SquaredReluConfig
        unit_decoder = False

        def encode_normalized(self, xi):
            return Codes(m=self.config.m, dense=torch.relu(self.pre_acts(xi)) ** 2)

        def forward_normalized(self, xi):
            codes = self.encode_normalized(xi)
            return codes, self.decode_normalized(codes), {"l1": (self.config.l1, codes.dense.sum(-1).mean())}
''')


@pytest.fixture
def new_variant_file():
    """trainer/sae/squared_relu.py for the duration of the test (the one file the recipe adds)."""
    path = Path(sae_zoo.__file__).with_name("squared_relu.py")
    assert not path.exists()
    path.write_text(VARIANT_FILE)
    try:
        yield path
    finally:
        path.unlink()


def dynsae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dynsae", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_variant_is_one_file_trained_with_dynsae_train(new_variant_file, tiny_store, tmp_path):
    cfg = base_config(tiny_store, str(tmp_path / "runs"), sae={"variant": "squared_relu", "m": 24},
                      tokens=64 * 6)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = dynsae("train", str(config), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert (run_dir / "sae.safetensors").exists()
    record = yaml.safe_load((run_dir / "config.json").read_text())
    assert record["sae"]["variant"] == "squared_relu" and record["sae"]["l1"] == 1e-3

    refused = dynsae("train", str(config), "--no-progress", "--set", "sae.k=8", "--set", "name=other", cwd=tmp_path)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "sae.k is not a setting of variant 'squared_relu'" \
        in lines[0]


def test_build_refuses_a_field_the_variant_does_not_use():
    with pytest.raises(UserError, match=r"sae\.l1 is not a setting of variant 'topk'"):
        sae_zoo.build({"variant": "topk", "d": 8, "m": 16, "l1": 1e-3})
    with pytest.raises(UserError, match=r"sae\.target_l0: a sparsemax SAE chooses its support size per token"):
        sae_zoo.build({"variant": "sparsemax", "d": 8, "m": 16, "target_l0": 32})
