"""ARCHITECTURE.md's recipe "Add an SAE variant", followed to the letter: one new file in trainer/sae/,
nothing else edited, and the variant goes through the whole pipeline — trained with `dynsae train`,
evaluated with `dynsae eval`, compared with the reference in `dynsae report` (a verdict line), exported
by `dynsae export` to SAELens (loaded by the real SAELens, same forward as ours) and refused by the
sparsify export in the one sentence its file gives; and a field the variant does not use is refused by
`dynsae train` (exit 2, one error line naming it) and by trainer.sae.build (an exception naming it)."""

from __future__ import annotations

import json
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

# The recipe's example: a ReLU SAE with a plain L1 penalty on its codes (a made-up variant), in a module
# of its own, with its SAELens conversion (SAELens's "standard" computes exactly this forward).
VARIANT_FILE = textwrap.dedent('''
    """``plain_l1``: f = ReLU(π), x̂ = f W_dec + b_dec, loss MSE + λ Σ_i f_i (a test of the recipe)."""

    from __future__ import annotations

    from typing import Literal

    import torch
    from pydantic import Field

    from trainer.sae.base import Codes
    from trainer.sae.config import SAEConfig
    from trainer.sae.interop import SaeLensForm
    from trainer.sae.linear import LinearSAE


    class PlainL1Config(SAEConfig):
        variant: Literal["plain_l1"] = "plain_l1"
        l1: float = Field(default=1e-3, ge=0, description="L1 coefficient.")


    class PlainL1SAE(LinearSAE):
        variant = "plain_l1"
        config_class = PlainL1Config
        title = "plain-L1 SAE"
        unit_decoder = False

        def encode_normalized(self, xi):
            return Codes(m=self.config.m, dense=torch.relu(self.pre_acts(xi)))

        def forward_normalized(self, xi):
            codes = self.encode_normalized(xi)
            return codes, self.decode_normalized(codes), {"l1": (self.config.l1, codes.dense.sum(-1).mean())}

        def to_saelens(self) -> SaeLensForm:
            return self.homogeneous_saelens("standard")[0]
''')

# One process (the fresh interpreter discovers the new file) runs the user's commands in turn; the SAELens
# folder is then loaded there and compared with our SAE on rows of the data's scale.
PIPELINE = textwrap.dedent('''
    import json, sys

    import torch
    from sae_lens import SAE

    from dynsae.cli import main
    from trainer.sae import load

    ref_cfg, new_cfg, sweep, out = sys.argv[1:5]
    codes = {}
    for name, args in [("train_ref", ["train", ref_cfg, "--no-progress"]),
                       ("train_new", ["train", new_cfg, "--no-progress"]),
                       ("eval", ["eval", f"{sweep}/ref", f"{sweep}/new", "--ce-contexts", "0"]),
                       ("report", ["report", sweep]),
                       ("saelens", ["export", f"{sweep}/new", f"{out}/saelens"]),
                       ("sparsify", ["export", f"{sweep}/new", f"{out}/sparsify", "--format", "sparsify"])]:
        codes[name] = main(args)
    ours = load(f"{sweep}/new").eval()
    theirs = SAE.load_from_disk(f"{out}/saelens")
    x = torch.randn(128, ours.config.d, generator=torch.Generator().manual_seed(0)) * 0.4  # ‖x‖ ≈ 1.6, as the data
    with torch.no_grad():
        ref = ours(x)[0]
        got = theirs(x)
    codes["max_rel_err"] = float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
    codes["saelens_class"] = type(theirs).__name__
    print("RESULT " + json.dumps(codes))
''')


@pytest.fixture
def new_variant_file():
    """trainer/sae/plain_l1.py for the duration of the test (the one file the recipe adds)."""
    path = Path(sae_zoo.__file__).with_name("plain_l1.py")
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


def test_a_variant_is_one_file_trained_evaluated_reported_and_exported(new_variant_file, tiny_store, tmp_path):
    pytest.importorskip("sae_lens")
    sweep = tmp_path / "sweep"
    configs = {}
    for name, sae in (("ref", {"variant": "sparsemax", "m": 24}), ("new", {"variant": "plain_l1", "m": 24})):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(base_config(tiny_store, str(sweep), name=name, sae=sae,
                                                            tokens=64 * 6)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(configs["ref"]), str(configs["new"]), str(sweep),
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    # trained with its own config
    assert {k: result[k] for k in ("train_ref", "train_new", "eval", "report", "saelens")} == dict.fromkeys(
        ("train_ref", "train_new", "eval", "report", "saelens"), 0)
    record = json.loads((sweep / "new" / "config.json").read_text())
    assert record["sae"]["variant"] == "plain_l1" and record["sae"]["l1"] == 1e-3
    assert json.loads((sweep / "new" / "eval.json").read_text())["l0"] > 0
    # in the report: compared with the reference at M = 24, one verdict line per metric
    report = (sweep / "report.md").read_text()
    matched = report.split("## Matched sparsity")[1].split("\n## ")[0]
    assert "### M = 24" in matched and "| plain_l1 |" in matched
    assert "- plain_l1, fvu: **not conclusive** — " in matched  # one seed each: the honest verdict
    assert "| plain_l1 | " in report.split("## Runs")[1]
    # exported: SAELens's "standard" computes our forward; sparsify refused with the file's reason
    assert result["saelens_class"] == "StandardSAE" and result["max_rel_err"] < 1e-4
    assert json.loads((tmp_path / "out" / "saelens" / "cfg.json").read_text())["architecture"] == "standard"
    assert result["sparsify"] == 2 and not (tmp_path / "out" / "sparsify").exists()
    refusal = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(refusal) == 1 and "cannot be exported to sparsify: sparsify holds TopK SAEs only" in refusal[0] \
        and "--format saelens" in refusal[0]

    refused = dynsae("train", str(configs["new"]), "--no-progress", "--set", "sae.k=8", "--set", "name=other",
                     cwd=tmp_path)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "sae.k is not a setting of variant 'plain_l1'" \
        in lines[0]


def test_build_refuses_a_field_the_variant_does_not_use():
    with pytest.raises(UserError, match=r"sae\.l1 is not a setting of variant 'topk'"):
        sae_zoo.build({"variant": "topk", "d": 8, "m": 16, "l1": 1e-3})
    with pytest.raises(UserError, match=r"sae\.target_l0: a sparsemax SAE chooses its support size per token"):
        sae_zoo.build({"variant": "sparsemax", "d": 8, "m": 16, "target_l0": 32})
