"""``bench/peers_bench.py --quick``: the peer step comparison runs end to end with the real sae-lens and
eai-sparsify and writes its JSON (a smoke run: tiny sizes, 2 rounds; the timings are not checked)."""

from __future__ import annotations

import json

import pytest

from bench.peers_bench import main


def test_quick_run_writes_every_step_and_the_goals(tmp_path) -> None:
    out = tmp_path / "peers.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    from importlib.metadata import version

    assert result["peers"] == {"sae-lens": version("sae-lens"), "eai-sparsify": version("eai-sparsify")}
    row = result["results"]["256"]
    assert set(row) == {"sparsify_topk", "saelens_topk", "saelens_batchtopk", "ours_topk", "ours_batchtopk",
                        "ours_sparsemax", "ours_relu", "ours_jumprelu", "ours_gated"}
    assert all(entry["seconds"] > 0 for entry in row.values())
    assert row["sparsify_topk"]["vs_sparsify_topk"] == 1.0 and row["ours_topk"]["vs_ours_topk"] == 1.0
    assert row["ours_topk"]["l0"] == row["ours_batchtopk"]["l0"] == 8  # K of the quick run, batch average
    for steered in ("ours_relu", "ours_gated", "ours_jumprelu"):  # timed at the TopK's L0 (settle_at_l0)
        assert row[steered]["l0"] == pytest.approx(8, rel=0.15), steered
    assert set(result["goals"]["256"]) >= {"topk_vs_sparsify_topk_goal_le_0.9", "batchtopk_vs_topk_goal_le_1.25",
                                           "steered_vs_topk_goal_le_1.5"}
