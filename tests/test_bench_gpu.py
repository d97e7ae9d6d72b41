"""``python -m bench gpu --device cpu --quick``: the prepared GPU check runs its whole code path on the CPU
(toy sizes) and writes its JSON; without a GPU the default run says so and exits 0."""

from __future__ import annotations

import json

import torch

from bench.__main__ import main as bench_main


def test_gpu_check_runs_on_the_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    import trainer.sae as sae_zoo

    assert set(result["train_steps"]) == set(sae_zoo.variants())
    for variant, row in result["train_steps"].items():  # the CPU against itself: fp32 exactly, bf16 within tolerance
        assert row["fp32"]["max_rel_diff"] == 0.0, variant
        assert row["bf16"]["ok"] and 0.0 < row["bf16"]["max_rel_diff"] <= row["bf16"]["rtol"], variant
    assert result["sparsemax"]["ok"] and result["sparsemax"]["mean_support"] > 1
    assert {"sparsify_topk", "ours_topk", "saelens_topk"} <= set(result["peers"]["steps"])
    assert result["loader"]["loader_rows_s"] > 0 and result["loader"]["to_device_rows_s"] > 0
    assert result["ok"] and "all correctness checks passed" in capsys.readouterr().out


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        return  # a GPU is here: the default run is the real check, not this one
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--out", str(out)]) == 0
    assert "no GPU on this machine" in capsys.readouterr().out and not out.exists()
