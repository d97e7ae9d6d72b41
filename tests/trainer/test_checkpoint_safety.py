"""A run directory read back from a shared bucket: nothing in it can run code, and every damaged file is one
``error:`` sentence naming it (exit 2) that leaves the run's ``config.json`` as it was."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testkit import base_config

from store.errors import UserError, run_cli
from trainer.__main__ import main
from trainer.checkpoint import RunDir, rng_state, set_rng_state
from trainer.config import TrainConfig
from trainer.run import train


class Planted:
    """What an attacker would put in a pickle: unpickling it creates ``path`` (a stand-in for os.system)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.fixture
def finished_run(tiny_store, tmp_path):
    """(config file, run directory) of a short finished run."""
    cfg = base_config(tiny_store, str(tmp_path / "runs"), tokens=64 * 5)
    url = train(TrainConfig.model_validate(cfg), progress=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**cfg, "tokens": 64 * 10}))  # a resume that extends the budget
    return str(path), Path(url)


def resume_error(config: str, capsys) -> str:
    """Run ``python -m trainer run CONFIG`` in-process; assert exit 2 and one line; return that line."""
    assert run_cli(main, ["run", config, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_checkpoint_holds_only_tensors_and_plain_values(finished_run):
    _, run_dir = finished_run
    state = torch.load(run_dir / "trainer_state.pt", weights_only=True)  # no pickle of any object
    assert state["step"] == 5 and state["rng"]["numpy"]["keys"].dtype == torch.uint8


def test_rng_state_round_trips():
    import random

    import numpy as np

    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2] and np.random.randn() == expected[3]


def test_planted_pickle_is_refused_and_never_runs(finished_run, tmp_path, capsys):
    config, run_dir = finished_run
    marker = tmp_path / "pwned"
    (run_dir / "trainer_state.pt").write_bytes(_saved({"version": 2, "payload": Planted(str(marker))}).getvalue())
    probe = tmp_path / "probe"  # the plant is real: an unrestricted load of the same kind of file runs it
    torch.load(_saved({"payload": Planted(str(probe))}), weights_only=False)
    assert probe.exists()
    err = resume_error(config, capsys)
    assert "trainer_state.pt" in err and "refuses to load" in err
    assert not marker.exists()


def test_truncated_state_is_one_sentence_and_config_is_kept(finished_run, capsys):
    config, run_dir = finished_run
    before = (run_dir / "config.json").read_bytes()
    state = run_dir / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    err = resume_error(config, capsys)
    assert str(state) in err and "truncated or corrupt" in err
    assert (run_dir / "config.json").read_bytes() == before  # tokens 320 -> 640 was not written


def test_corrupt_metrics_line_is_one_sentence(finished_run, capsys):
    config, run_dir = finished_run
    before = (run_dir / "config.json").read_bytes()
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 4, "loss', *lines[1:]]) + "\n")
    err = resume_error(config, capsys)
    assert "line 2 of" in err and str(metrics) in err
    assert (run_dir / "config.json").read_bytes() == before


def test_corrupt_weights_are_one_sentence(finished_run):
    _, run_dir = finished_run
    weights = run_dir / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")  # a header length past the end of the file
    weights.write_bytes(bytes(data))
    from trainer.sae import load

    with pytest.raises(UserError, match="sae.safetensors is not a valid safetensors file"):
        load(str(run_dir))
    weights.write_bytes(bytes(data[:20]))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(str(run_dir))


def test_state_of_another_shape_is_one_sentence(finished_run, capsys):
    config, run_dir = finished_run
    cfg = yaml.safe_load(Path(config).read_text())
    state = torch.load(run_dir / "trainer_state.pt", weights_only=True)
    state["model"] = {k: v.reshape(-1)[:1] for k, v in state["model"].items()}
    torch.save(state, run_dir / "trainer_state.pt")
    err = resume_error(config, capsys)
    assert "does not fit this run's SAE" in err
    assert json.loads((run_dir / "config.json").read_text())["tokens"] != cfg["tokens"]


def test_run_dir_metrics_reader(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.write_metrics([{"step": 1, "tokens": 8}, {"step": 2, "tokens": 16}])
    assert rd.read_metrics() == [{"step": 1, "tokens": 8}, {"step": 2, "tokens": 16}]
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "tokens": 8}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2 of"):
        rd.read_metrics()
