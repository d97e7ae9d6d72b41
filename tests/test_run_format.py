"""The run directory contract (trainer/run_format.py, docs/run-format.md): one module names the files,
older directories still read, newer ones are refused, and each record round-trips through its file."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest

from store.errors import UserError
from trainer import run_format as rf

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "trainer" / "run_format.py"
#: Every file name the contract owns (run directory, sweep directory).
RUN_FILES = (rf.CONFIG_FILE, rf.WEIGHTS_FILE, rf.STATE_FILE, rf.METRICS_FILE, rf.EVAL_FILE,
             rf.SUMMARY_FILE, rf.SUMMARY_CSV, rf.REPORT_FILE)
#: The packages that read or write run directories (the harvester's "config.json" is a model's own file).
READERS = ("trainer", "evaluator", "dynsae")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def file_name_literals(source: str) -> list[tuple[int, str]]:
    """(line, file name) of each code string (not a docstring) of ``source`` that spells a run-format file."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    return [(node.lineno, name) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            for name in RUN_FILES if name in node.value]


def test_no_module_but_the_contract_names_a_run_file():
    hits = [f"{path.relative_to(ROOT)}:{line}: {name}" for pkg in READERS
            for path in sorted((ROOT / pkg).rglob("*.py")) if path != CONTRACT
            for line, name in file_name_literals(path.read_text())]
    assert not hits, "run-format file names spelled outside trainer/run_format.py: " + "; ".join(hits)


def test_the_checker_sees_literals_outside_docstrings():
    source = '"""Writes eval.json (a docstring: allowed)."""\nNAME = "eval.json"\nmsg = f"no {NAME} in config.json"\n'
    assert sorted(file_name_literals(source)) == [(2, "eval.json"), (3, "config.json")]


def test_a_version_0_run_directory_reads(tmp_path):
    """A run written before format_version (and before the filter block): the filter the trainer of that
    time applied comes from the top-level keys."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "name": "old", "dataset": "/data/x", "lr": 3e-4, "exclude_positions": [0, 1], "max_norm_multiple": 4.0,
        "sae": {"variant": "relu", "m": 8, "seed": 2}}))
    (run / "eval.json").write_text(json.dumps({"variant": "relu", "m": 8, "l0": 3.5, "fvu": 0.25,
                                               "sparsity": {"l0": 3.5}, "fvu_unfiltered": float("nan")}
                                              ).replace("NaN", "null"))
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 64, "loss": 0.5}\n')
    record = rf.read_run(str(run))
    assert record is not None and record.name == "old"
    assert record.config.format_version == 0
    assert record.config.filter.exclude_positions == [0, 1] and record.config.filter.max_norm_multiple == 4.0
    assert record.config.filter.row_filter().describe() == record.config.filter.description
    assert record.config.settings()["lr"] == 3e-4  # training settings ride along
    assert record.eval is not None and record.eval.format_version == 0
    assert record.l0 == 3.5 and record.metric("fvu") == 0.25 and record.metric("fvu_unfiltered") is None
    assert record.eval.value("sparsity") == {"l0": 3.5} and record.metric("sparsity") is None
    assert record.seed == 2 and record.target_l0 is None and record.m == 8 and record.variant == "relu"
    assert [m.model_dump() for m in rf.read_metrics(str(run))] == [{"step": 1, "tokens": 64, "loss": 0.5}]


def test_a_newer_format_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": rf.FORMAT_VERSION + 1,
                                                      "sae": {"variant": "relu", "m": 8}}))
    with pytest.raises(UserError, match=f"run format version {rf.FORMAT_VERSION + 1}, newer than"):
        rf.read_run_config(str(tmp_path))


def test_a_bare_sae_directory_is_no_run(tmp_path):
    rf.write_sae_config(str(tmp_path), {"variant": "relu", "m": 8, "d": 4})
    assert rf.read_run_config(str(tmp_path)) is None
    assert rf.read_sae_config(str(tmp_path)) == {"variant": "relu", "m": 8, "d": 4}
    assert rf.folder_kind(str(tmp_path)) == "run"


def test_records_round_trip(tmp_path):
    cfg = rf.RunConfig(name="r", dataset="/d", sae={"variant": "topk", "m": 16, "seed": 1, "target_l0": 4.0},
                       filter={"exclude_positions": [0], "max_norm_multiple": None}, lr=1e-3)
    rf.write_run_config(str(tmp_path), cfg)
    back = rf.read_run_config(str(tmp_path))
    assert back == cfg and back.format_version == rf.FORMAT_VERSION and back.filter.description == "drop positions [0]"
    rf.write_metrics(str(tmp_path), [{"step": 2, "tokens": 10, "fvu": 0.5}])
    assert rf.read_metrics(str(tmp_path))[0].model_extra == {"fvu": 0.5}
    with pytest.raises(ValueError):
        rf.write_metrics(str(tmp_path), [{"fvu": 0.5}])  # a metrics line without its step
    rf.write_eval(rf.eval_url(str(tmp_path)), rf.EvalRecord(variant="topk", m=16, l0=4.1, fvu=0.2))
    run = rf.read_run(str(tmp_path))
    assert run.l0 == pytest.approx(4.1) and run.target_l0 == 4.0 and run.config_key == json.dumps(
        {"m": 16, "target_l0": 4.0, "variant": "topk"}, sort_keys=True)


def test_sweep_summary_round_trips_and_lists_runs(tmp_path):
    for name in ("b", "a"):
        rf.write_run_config(str(tmp_path / name), rf.RunConfig(name=name, sae={"variant": "relu", "m": 8},
                                                               filter={"exclude_positions": [], "max_norm_multiple": None}))
    assert [r.name for r in rf.read_sweep(str(tmp_path))] == ["a", "b"]  # no summary: sorted directories
    summary = rf.SweepSummary(sweep="s", grid={"sae.m": [8]}, runs=[
        {"name": "b", "status": "finished", "sae.m": 8, "run_url": str(tmp_path / "b")},
        {"name": "a", "status": "failed", "error": "boom"}])
    rf.write_summary(str(tmp_path), summary)
    assert rf.read_summary(str(tmp_path)) == summary
    assert [r.name for r in rf.read_sweep(str(tmp_path))] == ["b", "a"]  # summary order
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["b", "a"] and rows[1]["error"] == "boom" and rows[0]["sae.m"] == "8"
    with pytest.raises(ValueError):
        rf.SweepSummary(sweep="s", runs=[{"name": "x"}])  # a row must say whether the run finished
