"""`trainer run`: run directory contents, row filters, exact resume after a real crash, extension,
config mismatch, lr schedule, object-store runs root, CLI errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testkit import CONTEXT, base_config

from store.errors import UserError, run_cli
from trainer.__main__ import main
from trainer.config import TrainConfig
from trainer.run import lr_at, train

REPO = Path(__file__).resolve().parents[2]


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "sae.safetensors"))


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: str, b: str, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=tol, rtol=0), key


def epoch_rows(store: str) -> int:
    """Train-split rows per epoch (a whole number of 64-row batches in the tiny store)."""
    from store.loader import ActivationLoader

    rows = ActivationLoader(store, 64).rows_per_epoch
    assert rows % 64 == 0
    return rows


def test_run_dir_contents_and_bos_filter(tiny_store, tmp_path):
    # one epoch: every train row exactly once, so exactly 1/8 of them are BOS rows
    tokens = epoch_rows(tiny_store)
    steps = tokens // 64
    cfg = TrainConfig.model_validate(base_config(tiny_store, str(tmp_path), tokens=tokens))
    from evaluator.training import TrainingEvaluation

    url = train(cfg, progress=False, evaluation=TrainingEvaluation())
    assert url == str(tmp_path / "r")
    record = json.loads(Path(url, "config.json").read_text())
    assert record["sae"]["d"] == 16 and record["sae"]["m"] == 32 and record["sae"]["variant"] == "relu"
    assert record["filter"]["exclude_positions"] == [0] and "drop positions [0]" in record["filter"]["description"]
    # scale_activations: the SAE works on x/s with s = median‖x‖/√d of the dataset
    from store import open_dataset

    median = open_dataset(tiny_store).manifest.stats.median_norm
    assert record["sae"]["input_scale"] == pytest.approx(median / 4.0)  # √16
    state = torch.load(Path(url, "trainer_state.pt"), weights_only=True)
    assert state["step"] == steps and state["data_cursor"] == steps and state["finished"]
    assert state["tokens"] == tokens
    # every 8th row is a BOS row (position 0): 7/8 of the rows are trained on
    assert state["tokens_trained"] == tokens * (CONTEXT - 1) // CONTEXT
    rows = metrics(url)
    assert [r["step"] for r in rows] == sorted(set(range(2, steps + 1, 2)) | {steps})  # and the last step
    for key in ("loss", "mse", "fvu", "l0", "support_q0.5", "train_dead_frac", "tokens_per_s", "lr"):
        assert key in rows[-1], key
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # it learns
    # the saved weights load through the zoo's loader from the run directory and match the state
    from trainer.sae import load

    sae = load(url)
    for key, value in sae.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    x = torch.randn(5, 16)
    assert sae(x)[0].shape == (5, 16)


def test_max_norm_filter_drops_outlier_rows(tiny_store, tmp_path):
    # BOS rows carry 30x the norm: with positions kept but max_norm_multiple = 5, exactly they go
    tokens = epoch_rows(tiny_store)
    cfg = TrainConfig.model_validate(base_config(tiny_store, str(tmp_path), exclude_positions=[],
                                                 max_norm_multiple=5.0, tokens=tokens, log_every=100))
    url = train(cfg, progress=False)
    state = torch.load(Path(url, "trainer_state.pt"), weights_only=True)
    assert state["tokens_trained"] == tokens * (CONTEXT - 1) // CONTEXT
    record = json.loads(Path(url, "config.json").read_text())
    assert record["filter"]["max_norm_multiple"] == 5.0 and record["filter"]["median_norm"] > 0


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


#: A training process with the test's fault hook (trainer_testkit.DieAt): it dies at step 12.
DIE_AT_12 = ("import sys, yaml; from trainer_testkit import DieAt; from trainer.config import TrainConfig; "
             "from trainer.run import train; cfg = TrainConfig.model_validate(yaml.safe_load(open(sys.argv[1]))); "
             "train(cfg, progress=False, on_step=DieAt({'*': 12}))")


def test_crash_and_rerun_equals_straight_run(tiny_store, tmp_path):
    """The process really dies (os._exit, from the test's on_step hook) at step 12; re-running the run
    (`python -m trainer run`) resumes at the step-10 checkpoint and ends with the weights and metrics
    of an uninterrupted run."""
    straight = TrainConfig.model_validate(base_config(tiny_store, str(tmp_path / "a"), decay="cosine",
                                                      sae={"variant": "topk", "k": 4}))
    url_a = train(straight, progress=False)

    cfg_path = write_yaml(tmp_path / "run.yaml", base_config(tiny_store, str(tmp_path / "b"), decay="cosine",
                                                             sae={"variant": "topk", "k": 4}))
    cmd = [sys.executable, "-m", "trainer", "run", cfg_path, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    first = subprocess.run([sys.executable, "-c", DIE_AT_12, cfg_path], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 17, first.stderr
    assert Path(tmp_path / "b" / "r" / "fault_injected").read_text().split()[0] == "12"
    url_b = str(tmp_path / "b" / "r")
    state = torch.load(Path(url_b, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 10 and not state["finished"]
    assert not list(Path(url_b).glob(".*tmp*"))  # no half-written files left behind
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().endswith(url_b)
    assert_same_weights(url_a, url_b)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(url_a)]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(url_b)]


def test_extend_budget_and_config_mismatch(tiny_store, tmp_path):
    cfg = base_config(tiny_store, str(tmp_path), tokens=64 * 10)
    url = train(TrainConfig.model_validate(cfg), progress=False)
    # the same command again is a no-op on a finished run
    before = weights(url)
    train(TrainConfig.model_validate(cfg), progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(url).items())
    # a larger budget continues it; with a flat lr that equals a straight run of the larger budget
    train(TrainConfig.model_validate({**cfg, "tokens": 64 * 16}), progress=False)
    assert torch.load(Path(url, "trainer_state.pt"), weights_only=True)["step"] == 16
    straight = train(TrainConfig.model_validate({**cfg, "tokens": 64 * 16, "runs_root": str(tmp_path / "s")}),
                     progress=False)
    assert_same_weights(url, straight)
    with pytest.raises(UserError, match=r"different config \(lr: 0\.001 there, 0\.002 now\)"):
        train(TrainConfig.model_validate({**cfg, "lr": 2e-3}), progress=False)


def test_lr_schedule_hand_computed():
    cfg = TrainConfig.model_validate({"dataset": "x", "runs_root": "y", "name": "n", "tokens": 1000,
                                      "batch_size": 100, "sae": {"variant": "relu", "m": 8}, "lr": 1.0,
                                      "warmup_steps": 2, "decay": "linear", "decay_fraction": 0.5})
    # 10 steps; warm-up 1/2, 2/2; decay over the last 5 steps: 1 - u, u = 1/5 .. 5/5
    assert [lr_at(cfg, s, 10) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    cos = cfg.model_copy(update={"decay": "cosine", "warmup_steps": 0})
    assert lr_at(cos, 5, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))
    assert lr_at(cos, 9, 10) == pytest.approx(0.0, abs=1e-12)


def test_runs_root_on_s3(tiny_store, s3_bucket):
    cfg = TrainConfig.model_validate(base_config(tiny_store, f"{s3_bucket}/runs", tokens=64 * 6,
                                                 sae={"variant": "sparsemax"}))
    url = train(cfg, progress=False)
    assert url == f"{s3_bucket}/runs/r"
    from store.io import filesystem

    fs, path = filesystem(url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path))
    assert names == ["config.json", "metrics.jsonl", "sae.safetensors", "trainer_state.pt"]
    from trainer.sae import load

    assert load(url).config.d == 16


def test_cli_errors_are_one_sentence(tiny_store, tmp_path, capsys):
    bad = write_yaml(tmp_path / "bad.yaml", {**base_config(tiny_store, str(tmp_path)), "lr_typo": 1})
    assert run_cli(main, ["run", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'lr_typo'" in err
    bad = write_yaml(tmp_path / "bad2.yaml", base_config(tiny_store, str(tmp_path), sae={"variant": "nope"}))
    assert run_cli(main, ["run", bad]) == 2
    assert "unknown SAE variant 'nope'" in capsys.readouterr().err
    good = write_yaml(tmp_path / "good.yaml", base_config(str(tmp_path / "missing"), str(tmp_path)))
    assert run_cli(main, ["run", good]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_eval_split_rows_use_the_evaluators_metrics(tiny_store, tmp_path, monkeypatch):
    """eval_every rows come from the evaluation handed in (the evaluator's one eval pass); they agree with
    evaluator.metrics computed independently over the same filtered eval rows — the last pass too, whose
    loader read into the window buffers an earlier pass left to the process's reserve. Without an
    evaluation, eval_every is one clear error."""
    from evaluator.metrics import fvu, l0
    from evaluator.training import TrainingEvaluation
    from store import buffer_reserve
    from store.errors import UserError
    from store.loader import ActivationLoader
    from trainer.run import Run
    from trainer.sae import load

    reserve = buffer_reserve.BufferReserve()
    monkeypatch.setattr(buffer_reserve, "RESERVE", reserve)
    cfg = TrainConfig.model_validate(base_config(tiny_store, str(tmp_path), tokens=64 * 6, eval_every=3))
    with pytest.raises(UserError, match="eval_every needs the evaluator's metrics"):
        Run(cfg, progress=False)
    url = train(cfg, progress=False, evaluation=TrainingEvaluation())
    assert [r["step"] for r in metrics(url) if "eval_fvu" in r] == [3, 6]
    assert reserve.taken > 0  # the second pass's loader took the first one's buffers
    row = [r for r in metrics(url) if "eval_fvu" in r][-1]  # at the last step: the saved weights
    loader = ActivationLoader(tiny_store, 64, split="eval", epochs=1, columns=("acts", "positions"))
    x = torch.cat([b.acts[b.positions != 0] for b in loader])
    sae = load(url).eval()
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes, x)
    assert row["eval_tokens"] == x.shape[0] == loader.rows_per_epoch * (CONTEXT - 1) // CONTEXT
    assert row["eval_fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-9)
    assert row["eval_l0"] == pytest.approx(l0(codes), rel=1e-9)


def test_float16_dataset_trains_as_when_the_loader_cast_to_float32(tmp_path):
    """A float16 dataset's batches reach the step in float16 and are cast there, once: the run ends with
    exactly the weights of the old path, where the loader cast every batch to float32 on the CPU
    (float16 → float32 is exact, so the two paths see the same numbers)."""
    from trainer_testkit import make_store

    from store.batch import Batch
    from store.loader import ActivationLoader
    from trainer.config import BATCH_COLUMNS

    store = make_store(str(tmp_path / "f16"), shards=2, dtype="float16")
    cfg = base_config(store, str(tmp_path / "runs"), tokens=64 * 8)
    loader = ActivationLoader(store, 64, seed=0, columns=BATCH_COLUMNS)
    assert loader.batch(0).acts.dtype == torch.float16

    def cast_in_loader(b: int) -> Batch:
        batch = loader.batch(b)
        return Batch(acts=batch.acts.float(), positions=batch.positions.long())

    stored = train(TrainConfig.model_validate(cfg), progress=False)
    cast = train(TrainConfig.model_validate({**cfg, "name": "cast"}), progress=False, batches=cast_in_loader)
    assert_same_weights(stored, cast, tol=0.0)
