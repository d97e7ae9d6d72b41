"""evaluate_run on a real store dataset with a really trained tiny SAE; eval.json; the Ray task; CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ev_helpers import CTX, LAYER, make_run, write_text_dataset

from evaluator.__main__ import main
from evaluator.evaluate import EvalReport, evaluate_run
from evaluator.metrics import METRICS_VERSION
from store import open_dataset
from store.errors import UserError, run_cli


def _eval_rows(dataset_url):
    ds = open_dataset(dataset_url)
    parts = [(ds.read(a, b), ds.read(a, b, "positions"), ds.read(a, b, "token_ids"), ds.read(a, b, "seq_ids"))
             for a, b in ds.split_row_ranges("eval")]
    return [torch.from_numpy(np.concatenate([p[i] for p in parts]).astype(t))
            for i, t in enumerate(("float32", "int64", "int64", "int64"))]


def _direct(sae, x):
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes, x).double()
    x = x.double()
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return fvu, float(codes.support_sizes().double().mean()), codes


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory, text_dataset, trained_relu):
    return make_run(str(tmp_path_factory.mktemp("runs") / "relu"), text_dataset, trained_relu)


def test_evaluate_run_matches_direct_computation(relu_run, text_dataset, trained_relu, tiny_gpt2):
    report = evaluate_run(relu_run, ce_contexts=5, batch_size=100, progress=False)
    x, pos, ids, seqs = _eval_rows(text_dataset)
    keep = pos != 0
    fvu_kept, l0_kept, codes = _direct(trained_relu, x[keep])
    fvu_all, _, _ = _direct(trained_relu, x)
    assert report.fvu == pytest.approx(fvu_kept, rel=1e-6)
    assert report.fvu_unfiltered == pytest.approx(fvu_all, rel=1e-6)
    assert report.explained_variance == pytest.approx(1 - fvu_kept, rel=1e-6)
    assert report.l0 == pytest.approx(l0_kept, rel=1e-9)
    assert report.tokens.eval_rows == x.shape[0] and report.tokens.kept == int(keep.sum())
    assert report.dead_frac == pytest.approx(float((codes.fire_counts() == 0).double().mean()))
    assert sum(report.sparsity["support_histogram"]) == int(keep.sum())
    assert 0 < report.fvu < 1  # the SAE was really trained
    # CE: the tiny GPT-2 loaded from the manifest's model folder; clean CE recomputed by hand
    assert report.ce_skipped is None
    order = torch.argsort(seqs * CTX + pos, stable=True)
    contexts = ids[order].reshape(-1, CTX)[:5]
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=contexts).logits[:, 1:-1]
    clean = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), contexts[:, 2:].reshape(-1))
    assert report.ce_clean == pytest.approx(float(clean), abs=1e-5)
    assert report.tokens.ce_tokens == 5 * (CTX - 2)
    assert report.ce_degradation == pytest.approx(report.ce_sae - report.ce_clean)
    assert report.ce_recovered == pytest.approx(
        (report.ce_zero - report.ce_sae) / (report.ce_zero - report.ce_clean))
    assert report.kl > 0
    assert report.ce["layer"] == LAYER and report.ce["skip_positions"] == [0]


def test_eval_json_fields(relu_run, text_dataset):
    evaluate_run(relu_run, ce_contexts=0, batch_size=256, progress=False)
    data = json.loads((Path(relu_run) / "eval.json").read_text())
    report = EvalReport.model_validate(data)
    assert report.metrics_version == METRICS_VERSION
    assert report.dataset_url == text_dataset
    assert report.dataset_manifest_hash == open_dataset(text_dataset).manifest.manifest_hash()
    assert report.package_version and report.git_commit and len(report.git_commit) >= 40
    assert report.filter.description == "drop positions [0]" and report.filter.exclude_positions == [0]
    assert report.input_norm == "none" and report.variant == "relu" and report.m == 32 and report.d == 64
    assert report.ce_skipped == "ce_contexts = 0" and report.ce_clean is None
    assert report.suggested_topk["k"] == max(1, round(report.l0))
    assert report.zeroshot is None and report.zeroshot_skipped
    assert report.probe_top1 is None and "no labels" in report.probe_skipped  # unlabelled text
    assert report.gt_mcc is None and report.gt_f1 is None and "no ground_truth.safetensors" in report.gt_skipped


def test_max_tokens_and_norm_filter(tmp_path, text_dataset, trained_relu):
    run = make_run(str(tmp_path / "filtered"), text_dataset, trained_relu, max_norm_multiple=1.05)
    report = evaluate_run(run, ce_contexts=2, max_tokens=150, batch_size=64, progress=False)
    assert report.tokens.eval_rows == 150
    median = open_dataset(text_dataset).manifest.stats.median_norm
    assert report.filter.median_norm == pytest.approx(median)
    assert "norm > 1.05 x median" in report.filter.description
    assert report.tokens.dropped > 0 and report.tokens.kept + report.tokens.dropped == 150
    assert report.fvu != report.fvu_unfiltered
    assert report.ce["norm_filter_passthrough"] == 1.05


def test_the_filter_the_trainer_wrote_is_the_one_applied(tmp_path, text_dataset, trained_relu):
    """The run config's ``filter`` block decides which rows are scored, not the top-level settings."""
    run = make_run(str(tmp_path / "written"), text_dataset, trained_relu)
    path = Path(run) / "config.json"
    record = json.loads(path.read_text())
    record["filter"] = {"exclude_positions": [0, 1, 2], "max_norm_multiple": None, "median_norm": None,
                        "description": "drop positions [0, 1, 2]"}
    path.write_text(json.dumps(record))  # top-level exclude_positions still says [0]
    report = evaluate_run(run, ce_contexts=0, batch_size=64, progress=False)
    assert report.filter.exclude_positions == [0, 1, 2]
    positions = _eval_rows(text_dataset)[1].numpy()
    assert report.tokens.eval_rows == len(positions)
    assert report.tokens.dropped == int(np.isin(positions, [0, 1, 2]).sum()) > 0


def test_ce_skipped_when_model_cannot_load(tmp_path, tiny_gpt2, trained_relu):
    url = write_text_dataset(str(tmp_path / "ds"), tiny_gpt2, str(tmp_path / "no-such-model"))
    run = make_run(str(tmp_path / "run"), url, trained_relu)
    report = evaluate_run(run, ce_contexts=4, progress=False)
    assert report.ce_clean is None and "cannot load model" in report.ce_skipped
    assert not math.isnan(report.fvu)


def test_bad_run_url_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        evaluate_run(str(tmp_path / "nothing"), progress=False)
    assert run_cli(main, ["run", str(tmp_path / "nothing")]) == 2


def test_cli_run_json(relu_run, capsys):
    assert main(["run", relu_run, "--json", "--ce-contexts", "0", "--max-tokens", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"]["eval_rows"] == 64 and out["run_url"] == relu_run


def test_evaluation_task_reuses_its_process_model_cache(ray_local, relu_run):
    """Two evaluations of one run in one Ray worker process give equal reports, and the second takes the
    language model the first loaded from the process's cache: the one entry is still the same object, and a
    third evaluation after that cached model's weights were scaled sees the change in its CE (and only
    there). The task as the sweep starts it (trainer.sweep.evaluation_task) writes and returns the same report."""
    import ray

    from evaluator.task import evaluate_run_task
    from trainer.sweep import evaluation_task

    def evaluate_in_one_process(run_url: str) -> dict:
        """Run as one Ray task (a nested function: pickled by value, the worker imports no test module): evaluate
        ``run_url`` twice with evaluator.task.evaluate_run_task from a cold cache, then a third time after
        scaling the cached language model's weights; returns the reports and what the cache held."""
        import os

        import torch

        from evaluator import task

        options = {"ce_contexts": 3, "batch_size": 128, "device": "cpu"}
        task.MODEL_CACHE.clear()  # cold, whatever this worker evaluated before
        first = task.evaluate_run_task(run_url, **options)
        loaded = dict(task.MODEL_CACHE)
        second = task.evaluate_run_task(run_url, **options)
        kept = sorted(k for k, adapter in loaded.items() if task.MODEL_CACHE.get(k) is adapter)
        with torch.no_grad():
            for adapter in loaded.values():
                for weight in adapter.model.parameters():
                    weight.mul_(1.5)
        third = task.evaluate_run_task(run_url, **options)
        task.MODEL_CACHE.clear()  # the altered model serves no later evaluation
        return {"pid": os.getpid(), "first": first, "second": second, "third": third, "loaded": sorted(loaded),
                "kept": kept, "after": sorted(task.MODEL_CACHE)}

    out = ray_local.get(ray.remote(evaluate_in_one_process).remote(relu_run))
    first, second, third = out["first"], out["second"], out["third"]
    assert out["pid"] != os.getpid()  # a worker process, not this one
    assert first["ce_skipped"] is None and first["ce_clean"] is not None
    volatile = {"created"}
    assert {k: v for k, v in first.items() if k not in volatile} == \
        {k: v for k, v in second.items() if k not in volatile}
    assert len(out["loaded"]) == 1 and out["kept"] == out["loaded"] and out["after"] == []
    assert third["ce_clean"] != first["ce_clean"] and third["ce_sae"] != first["ce_sae"]
    assert third["fvu"] == first["fvu"] and third["l0"] == first["l0"]  # the SAE on stored rows: no model

    (Path(relu_run) / "eval.json").unlink()  # written again by the task below (with the unaltered model)
    report = ray_local.get(evaluation_task(evaluate_run_task, False).remote(relu_run, ce_contexts=3, batch_size=128,
                                                                             device="cpu"))
    assert {k: report[k] for k in ("fvu", "l0", "ce_clean", "ce_sae")} == \
        {k: first[k] for k in ("fvu", "l0", "ce_clean", "ce_sae")}
    assert json.loads((Path(relu_run) / "eval.json").read_text()) == report


def test_run_written_by_the_trainer(tmp_path, text_dataset):
    """A run directory made by trainer.run.train evaluates; fvu/l0 agree with the run's own eval-split rows
    (the evaluation handed to the trainer: the same one eval pass)."""
    from evaluator.training import TrainingEvaluation
    from trainer.config import TrainConfig
    from trainer.run import Run, train

    cfg = TrainConfig(dataset=text_dataset, runs_root=str(tmp_path), name="sm", sweep="s",
                      sae={"variant": "sparsemax", "m": 24}, batch_size=64, tokens=64 * 20, lr=3e-3,
                      device="cpu", checkpoint_every=1000)
    url = train(cfg, progress=False)
    builtin = Run(cfg, progress=False, evaluation=TrainingEvaluation()).evaluate()
    report = evaluate_run(url, ce_contexts=2, progress=False)
    assert report.fvu == pytest.approx(builtin["fvu"], rel=1e-6)
    assert report.tokens.kept == builtin["tokens"]
    assert report.variant == "sparsemax" and report.input_norm.startswith("unit")
    assert json.loads((Path(url) / "eval.json").read_text())["evaluator"] == "evaluator"


def test_cli_routes_concepts_and_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["concepts", "--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out.lower()
    assert run_cli(main, ["run", "x", "--max-tokens", "0"]) == 2
    assert "--max-tokens 0 must be positive" in capsys.readouterr().err
