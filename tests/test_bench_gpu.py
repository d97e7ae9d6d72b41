"""``python -m bench gpu --device cpu --quick``: the prepared GPU check runs its whole code path on the CPU
(toy sizes) and writes its JSON; without a GPU the default run says so and exits 0; a check that cannot run
is recorded and the others still run."""

from __future__ import annotations

import json
import sys
from importlib import metadata

import torch

from bench.__main__ import main as bench_main


def test_gpu_check_runs_on_the_cpu(tmp_path, capsys) -> None:
    out, dists = tmp_path / "gpu.json", tmp_path / "dists.json"
    assert bench_main(["gpu", "--device", "cpu", "--quick", "--out", str(out), "--record-distributions", str(dists)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["check_seconds"]) == {"train_steps", "sparsemax", "peers", "loader"}
    import trainer.sae as sae_zoo

    assert set(result["train_steps"]) == set(sae_zoo.variants())
    for variant, row in result["train_steps"].items():  # the CPU against itself: fp32 exactly, bf16 within tolerance
        assert row["fp32"]["max_rel_diff"] == 0.0, variant
        assert row["bf16"]["ok"] and 0.0 < row["bf16"]["max_rel_diff"] <= row["bf16"]["rtol"], variant
    assert result["sparsemax"]["ok"] and result["sparsemax"]["mean_support"] > 1
    assert {"sparsify_topk", "ours_topk", "saelens_topk"} <= set(result["peers"]["steps"])
    assert result["loader"]["loader_rows_s"] > 0 and result["loader"]["to_device_rows_s"] > 0
    assert result["ok"] and "all correctness checks passed" in capsys.readouterr().out
    # what the run imported, with the versions installed here (the device kit carries those the GPU image lacks)
    imported = json.loads(dists.read_text())
    for name in ("torch", "zarr", "pydantic", "sae-lens", "eai-sparsify", "numcodecs"):
        assert imported[name] == metadata.version(name), name


def test_a_check_that_cannot_run_is_recorded_and_the_others_still_run(tmp_path, capsys, monkeypatch) -> None:
    """A lent machine whose image lacks a peer library: the peer check records why, the sparsemax check
    still runs and passes, the exit status says something failed, and the JSON holds both."""
    monkeypatch.setitem(sys.modules, "sparsify", None)  # as if not installed: ``import sparsify`` raises
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--device", "cpu", "--quick", "--only", "sparsemax", "peers", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["complete"] and result["checks"] == ["sparsemax", "peers"] and "train_steps" not in result
    assert result["sparsemax"]["ok"] and "sparsify" in result["peers"]["error"] and not result["ok"]
    printed = capsys.readouterr().out
    assert "peers: could not run: ModuleNotFoundError" in printed or "peers: could not run: ImportError" in printed
    assert "SOME CHECKS FAILED" in printed and "sparsemax 256x512" in printed


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        return  # a GPU is here: the default run is the real check, not this one
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--out", str(out)]) == 0
    assert "no GPU on this machine" in capsys.readouterr().out and not out.exists()
