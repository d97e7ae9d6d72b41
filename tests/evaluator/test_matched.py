"""Matched-sparsity comparisons from hand-made config.json / eval.json files (no training), checked
against values computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluator import matched
from evaluator.report import discover_runs, write_report
from trainer.run_format import RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (name, sae fields, l0, fvu, ce_degradation, dead_frac)
RUNS = [
    # M = 64 reference: L0 30/32/34 -> 32 ± 2, fvu 0.12 ± 0.02, ce 0.06 ± 0.01, dead 0.1 ± 0.1
    ("sm-s0", {"variant": "sparsemax", "m": 64, "seed": 0}, 30.0, 0.10, 0.05, 0.0),
    ("sm-s1", {"variant": "sparsemax", "m": 64, "seed": 1}, 32.0, 0.12, 0.06, 0.1),
    ("sm-s2", {"variant": "sparsemax", "m": 64, "seed": 2}, 34.0, 0.14, 0.07, 0.2),
    # relu: two seeds inside the window [24, 40] (matched), one run far outside it (ignored)
    ("relu-t32-s0", {"variant": "relu", "m": 64, "seed": 0, "target_l0": 32}, 30.0, 0.20, 0.055, 0.3),
    ("relu-t32-s1", {"variant": "relu", "m": 64, "seed": 1, "target_l0": 32}, 36.0, 0.22, 0.075, 0.3),
    ("relu-t64-s0", {"variant": "relu", "m": 64, "seed": 0, "target_l0": 64}, 60.0, 0.90, 0.9, 0.9),
    # topk: targets 16 and 128 bracket L = 32 with nothing in the window (interpolated)
    ("topk-k16-s0", {"variant": "topk", "m": 64, "seed": 0, "target_l0": 16}, 16.0, 0.05, 0.02, 0.0),
    ("topk-k16-s1", {"variant": "topk", "m": 64, "seed": 1, "target_l0": 16}, 16.0, 0.07, 0.04, 0.0),
    ("topk-k128-s0", {"variant": "topk", "m": 64, "seed": 0, "target_l0": 128}, 128.0, 0.02, 0.08, 0.5),
    ("topk-k128-s1", {"variant": "topk", "m": 64, "seed": 1, "target_l0": 128}, 128.0, 0.04, 0.10, 0.5),
    # gated: only above the window (unmatched; nearest = the L0 100/110 point)
    ("gated-a-s0", {"variant": "gated", "m": 64, "seed": 0, "l1": 1e-4}, 100.0, 0.01, 0.01, 0.0),
    ("gated-a-s1", {"variant": "gated", "m": 64, "seed": 1, "l1": 1e-4}, 110.0, 0.01, 0.01, 0.0),
    ("gated-b-s0", {"variant": "gated", "m": 64, "seed": 0, "l1": 1e-5}, 300.0, 0.001, 0.001, 0.0),
    # jumprelu: one seed in the window (matched, not conclusive)
    ("jump-s0", {"variant": "jumprelu", "m": 64, "seed": 0, "target_l0": 32}, 33.0, 0.5, 0.5, 0.5),
    # relu with unit-norm input: its own family, matched
    ("relu-unit-s0", {"variant": "relu", "m": 64, "seed": 0, "input_norm": "unit"}, 31.0, 0.119, 0.06, 0.1),
    ("relu-unit-s1", {"variant": "relu", "m": 64, "seed": 1, "input_norm": "unit"}, 33.0, 0.121, 0.06, 0.1),
    # M = 128: one sparsemax seed, two relu seeds in the window
    ("sm128-s0", {"variant": "sparsemax", "m": 128, "seed": 0}, 20.0, 0.08, 0.04, 0.0),
    ("relu128-s0", {"variant": "relu", "m": 128, "seed": 0}, 21.0, 0.20, 0.10, 0.0),
    ("relu128-s1", {"variant": "relu", "m": 128, "seed": 1}, 19.0, 0.22, 0.12, 0.0),
    # M = 256: no sparsemax run
    ("relu256-s0", {"variant": "relu", "m": 256, "seed": 0}, 21.0, 0.20, 0.10, 0.0),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "matched"
    for name, sae, l0, fvu, ce, dead in RUNS:
        run = root / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"name": name, "sae": sae}))
        (run / "eval.json").write_text(json.dumps({"variant": sae["variant"], "m": sae["m"], "l0": l0, "fvu": fvu,
                                                   "ce_degradation": ce, "dead_frac": dead}))
    old = root / "old-relu-no-target"  # a run older than target_l0 and without eval.json
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"sae": {"variant": "relu", "m": 64, "seed": 3}}))
    return root


@pytest.fixture(scope="module")
def sizes(sweep) -> dict[int, matched.SizeComparison]:
    points = discover_runs(str(sweep))
    return {s.m: s for s in matched.compare(points)}


def _family(size: matched.SizeComparison, family: str) -> matched.FamilyComparison:
    return next(fc for fc in size.families if fc.match.family == family)


def test_reference_is_sparsemax_mean_std_over_seeds(sizes):
    ref = sizes[64].reference
    assert ref is not None and ref.seeds == 3
    assert ref.l0.mean == pytest.approx(32.0) and ref.l0.std == pytest.approx(2.0)
    assert ref.metrics["fvu"].mean == pytest.approx(0.12) and ref.metrics["fvu"].std == pytest.approx(0.02)
    assert ref.metrics["ce_degradation"].std == pytest.approx(0.01)
    # every other family present at M, in discovery order (run names, sorted, without summary.json)
    assert [fc.match.family for fc in sizes[64].families] == ["gated", "jumprelu", "relu", "relu (input_norm=unit)",
                                                               "topk"]


def test_matched_within_window(sizes):
    fc = _family(sizes[64], "relu")
    m = fc.match
    assert m.method == "matched" and m.seeds == 2
    assert {r.name for r in m.runs} == {"relu-t32-s0", "relu-t32-s1"}  # L0 60 is outside [24, 40]
    assert m.l0.mean == pytest.approx(33.0) and m.l0.std == pytest.approx(math.sqrt(18))
    assert m.metrics["fvu"].mean == pytest.approx(0.21) and m.metrics["fvu"].std == pytest.approx(math.sqrt(2e-4))
    # fvu: Δ = 0.21 − 0.12 = 0.09 > 2·√((0.02² + 0.0002)/2) = 2·√3e-4 ≈ 0.0346 → sparsemax better
    v = fc.verdicts["fvu"]
    assert v.delta == pytest.approx(0.09) and v.pooled_std == pytest.approx(math.sqrt(3e-4))
    assert v.outcome == "reference better"
    # ce: Δ = 0.065 − 0.06 = 0.005 ≤ 2·√((0.01² + 0.0002)/2) ≈ 0.0245 → within seed spread
    v = fc.verdicts["ce_degradation"]
    assert v.delta == pytest.approx(0.005) and v.pooled_std == pytest.approx(math.sqrt(1.5e-4))
    assert v.outcome == "within seed spread"


def test_interpolated_in_log_l0(sizes):
    fc = _family(sizes[64], "topk")
    m = fc.match
    assert m.method == "interpolated" and m.seeds == 2
    a, b = m.bracket
    assert (a.target_l0, b.target_l0) == (16, 128)
    # t = (ln 32 − ln 16)/(ln 128 − ln 16) = ln 2 / ln 8 = 1/3 (linear in L0 would give 16/112)
    assert m.t == pytest.approx(1 / 3)
    # fvu: a = 0.06 ± √2e-4, b = 0.03 ± √2e-4 → 2/3·0.06 + 1/3·0.03 = 0.05, std √2e-4
    assert m.metrics["fvu"].mean == pytest.approx(0.05)
    assert m.metrics["fvu"].std == pytest.approx(math.sqrt(2e-4))
    # ce: a = 0.03, b = 0.09 → 0.05; dead: a = 0, b = 0.5 → 1/6
    assert m.metrics["ce_degradation"].mean == pytest.approx(0.05)
    assert m.metrics["dead_frac"].mean == pytest.approx(1 / 6)
    # fvu Δ = 0.05 − 0.12 = −0.07, |Δ| > 2·√3e-4 → sparsemax worse
    v = fc.verdicts["fvu"]
    assert v.delta == pytest.approx(-0.07) and v.outcome == "reference worse"


def test_unmatched_is_not_conclusive(sizes):
    fc = _family(sizes[64], "gated")
    m = fc.match
    assert m.method == "unmatched" and m.nearest is not None
    assert m.nearest.l0.mean == pytest.approx(105.0)  # nearest in log L0: 105 rather than 300
    assert m.metrics["fvu"].mean == pytest.approx(0.01)
    for v in fc.verdicts.values():
        assert v.outcome == "not conclusive" and "not at the same sparsity" in v.reason


def test_one_seed_is_not_conclusive(sizes):
    jump = _family(sizes[64], "jumprelu")
    assert jump.match.method == "matched" and jump.match.seeds == 1
    # Δ fvu = 0.38 is large, still no verdict from one seed
    assert jump.verdicts["fvu"].delta == pytest.approx(0.38)
    assert jump.verdicts["fvu"].outcome == "not conclusive"
    assert jump.verdicts["fvu"].reason == "one jumprelu seed: no spread to compare against"
    relu128 = _family(sizes[128], "relu")
    assert relu128.match.method == "matched" and relu128.match.seeds == 2
    assert relu128.verdicts["fvu"].reason == "one sparsemax seed: no spread to compare against"
    assert sizes[256].reference is None and sizes[256].others == ["relu"]


def test_unit_norm_family_within_spread(sizes):
    fc = _family(sizes[64], "relu (input_norm=unit)")
    assert fc.match.method == "matched"
    assert fc.verdicts["fvu"].delta == pytest.approx(0.0) and fc.verdicts["fvu"].outcome == "within seed spread"


def test_two_runs_of_one_seed_are_one_seed():
    def pt(name, key, l0, fvu):
        return RunRecord.of(name, {"sae": {"variant": "relu", "m": 8, "seed": 0, "key": key}},
                            {"l0": l0, "fvu": fvu, "ce_degradation": None, "dead_frac": 0.0})
    ref = matched.pool([pt("a", "s", 10.0, 0.1), pt("b", "s", 10.0, 0.2)])
    m = matched.match_family("relu", [pt("c", "x", 10.0, 0.5), pt("d", "y", 11.0, 0.6)], 10.0)
    assert m.seeds == 1
    v = matched.verdict("fvu", ref.metrics["fvu"], 2, m)
    assert v.outcome == "not conclusive" and "one relu seed" in v.reason
    assert matched.verdict("ce_degradation", ref.metrics["ce_degradation"], 2, m).reason == \
        "ce_degradation was not computed for sparsemax"


def test_report_renders_matched_section(sweep):
    text = Path(write_report(str(sweep))).read_text()
    header_end = text.index("Row filter:")
    section = text.index("## Matched sparsity")
    assert header_end < section < text.index("## fvu / ce_degradation by variant and dictionary size")
    assert "only meaningful at equal sparsity (the same L0) and with more than one seed" in text
    assert "|Δ| > 2·s_p" in text
    assert "Sparsemax SAE (3 runs, seeds 0, 1, 2): L0 = 32.00 ± 2.00, fvu = 0.1200 ± 0.0200" in text
    assert ("| relu | matched (2 runs, seeds 0, 1) | 33.0 ± 4.2 | 0.2100 ± 0.0141 | +0.0900 | 0.0650 ± 0.0141 | "
            "+0.0050 | 0.300 ± 0.000 | +0.200 |") in text
    assert ("| topk | interpolated in log L0 between L0 16.0 ± 0.0 (2 seeds, target 16) and L0 128.0 ± 0.0 "
            "(2 seeds, target 128), t = 0.33 | ≈ 32.0 | 0.0500 ± 0.0141 | -0.0700 |") in text
    assert "| gated | no match: nearest L0 105.0 ± 7.1 (2 seeds) — not at the same sparsity | 105.0 ± 7.1 |" in text
    assert ("- relu, fvu: the Sparsemax SAE is **better** than relu (Δ = +0.0900, |Δ| > 2 × pooled std = 0.0346)."
            in text)
    assert ("- relu, ce_degradation: the difference is **within seed spread** (Δ = +0.0050, |Δ| ≤ 2 × pooled std "
            "= 0.0245).") in text
    assert "- topk, fvu: the Sparsemax SAE is **worse** than topk (Δ = -0.0700, |Δ| > 2 × pooled std = 0.0346)." in text
    assert "Sparsemax SAE (1 run, seed 0): L0 = 20.00" in text
    assert "- gated, fvu: **not conclusive** — not at the same sparsity" in text
    assert "- jumprelu, fvu: **not conclusive** — one jumprelu seed: no spread to compare against." in text
    assert "- relu, fvu: **not conclusive** — one sparsemax seed: no spread to compare against." in text
    assert "No sparsemax run at M = 256: nothing to compare relu against." in text
    assert "![fvu–L0 frontier per M](frontier.png)" in text
    assert (sweep / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    # paper table: mean ± std when a cell holds more than one run
    assert "| sparsemax | 0.1200 ± 0.0200 / 0.0600 ± 0.0100 (n=3) | 0.0800 / 0.0400 |" in text
    # runs table: the seed and target_l0 columns ("–" for runs older than target_l0)
    assert "| relu-t32-s1 | relu | 64 | none | 1 | 32 | 36.0 |" in text
    assert "| sm-s2 | sparsemax | 64 | none | 2 | – | 34.0 |" in text
    assert "| old-relu-no-target | relu | 64 | none | 3 | – | not evaluated |" in text


# ---- concept metrics: higher is better ---------------------------------------------------------------

CONCEPT_RUNS = [
    # (name, sae, l0, fvu, extra eval.json fields)
    ("sm-s0", {"variant": "sparsemax", "m": 64, "seed": 0}, 20.0, 0.10, {"probe_top1": 0.6, "gt_mcc": 0.90}),
    ("sm-s1", {"variant": "sparsemax", "m": 64, "seed": 1}, 22.0, 0.12, {"probe_top1": 0.7, "gt_mcc": 0.92}),
    ("topk-s0", {"variant": "topk", "m": 64, "seed": 0, "target_l0": 21}, 21.0, 0.08, {"probe_top1": 0.4, "gt_mcc": 0.91}),
    ("topk-s1", {"variant": "topk", "m": 64, "seed": 1, "target_l0": 21}, 21.0, 0.10, {"probe_top1": 0.5, "gt_mcc": 0.93}),
]


@pytest.fixture(scope="module")
def concept_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "concepts"
    for name, sae, l0, fvu, extra in CONCEPT_RUNS:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"name": name, "sae": sae}))
        (root / name / "eval.json").write_text(json.dumps({"variant": sae["variant"], "m": 64, "l0": l0, "fvu": fvu,
                                                           "dead_frac": 0.0, **extra}))
    return root


def test_concept_metrics_are_higher_is_better(concept_sweep):
    points = discover_runs(str(concept_sweep))
    assert matched.present_metrics(points) == ("fvu", "ce_degradation", "dead_frac", "probe_top1", "gt_mcc")
    (size,) = matched.compare(points)
    topk = _family(size, "topk")
    # probe_top1: sparsemax 0.65 ± 0.0707, topk 0.45 ± 0.0707: Δ = −0.2, 2 × pooled std = 0.1414 ⇒ sparsemax better
    probe = topk.verdicts["probe_top1"]
    assert probe.delta == pytest.approx(-0.2) and probe.pooled_std == pytest.approx(math.sqrt(0.005))
    assert probe.outcome == "reference better"
    # fvu: lower is better, topk 0.09 vs sparsemax 0.11: Δ = −0.02 within 2 × 0.01414
    assert topk.verdicts["fvu"].outcome == "within seed spread"
    mcc = topk.verdicts["gt_mcc"]  # 0.92 vs 0.91 ± 0.0141: within spread
    assert mcc.delta == pytest.approx(0.01) and mcc.outcome == "within seed spread"
    worse = matched.verdict("gt_mcc", matched.Stat(0.5, 0.01, 2), 2, topk.match)
    assert worse.outcome == "reference worse"  # topk's 0.92 is higher


def test_report_shows_concept_verdicts_and_table(concept_sweep):
    text = Path(write_report(str(concept_sweep))).read_text()
    assert "higher is better for probe_top1, gt_mcc" in text
    assert "Sparsemax SAE (2 runs, seeds 0, 1): L0 = 21.00 ± 1.41, fvu = 0.1100 ± 0.0141" in text
    assert "probe_top1 = 0.650 ± 0.071, gt_mcc = 0.910 ± 0.014." in text
    assert "| family | values obtained by | L0 | fvu | Δ fvu | ce_degradation | Δ ce_degradation | dead | Δ dead | " \
           "probe_top1 | Δ probe_top1 | gt_mcc | Δ gt_mcc |" in text
    assert "| 0.450 ± 0.071 | -0.200 | 0.920 ± 0.014 | +0.010 |" in text
    assert ("- topk, probe_top1: the Sparsemax SAE is **better** than topk (Δ = -0.200, |Δ| > 2 × pooled std = "
            "0.141).") in text
    assert "- topk, gt_mcc: the difference is **within seed spread**" in text
    assert text.index("## Matched sparsity") < text.index("## Concept quality") < text.index("## fvu / ce_degradation")
    assert "| family | M | n | L0 | probe on 1 | probe on 5 | probe on 10 | probe on 50 | gt_mcc |" in text
    assert "| topk | 64 | 2 | 21.0 ± 0.0 | 0.450 ± 0.071 | – | – | – | 0.920 ± 0.014 |" in text


def test_probe_verdict_counts_the_sampling_error_of_the_few_test_documents():
    """Two seeds that score the same 12/31 vs 10/31 documents (std 0) are not a verdict: each side's spread is
    at least √(p̄(1 − p̄)/31), 0.08748 and 0.08396, so 2·s_p = 2·√((0.0076533 + 0.0070491)/2) = 0.1715 > 0.0645."""
    probe = {"test_documents": 31, "train_documents": 74}

    def run(name, variant, seed, acc, with_probe=True):
        ev = {"l0": 30.0, "fvu": 0.3, "dead_frac": 0.0, "probe_top1": acc, **({"probe": probe} if with_probe else {})}
        return RunRecord.of(name, {"sae": {"variant": variant, "m": 64, "seed": seed}}, ev)

    for with_probe, outcome, pooled in ((True, "within seed spread", 0.085739), (False, "reference better", 0.0)):
        ref = matched.pool([run(f"sm{s}", "sparsemax", s, 12 / 31, with_probe) for s in (0, 1)])
        base = matched.match_family("attn_relu", [run(f"ar{s}", "attn_relu", s, 10 / 31, with_probe)
                                                  for s in (0, 1)], 30.0)
        v = matched.verdict("probe_top1", ref.metrics["probe_top1"], 2, base, "sparsemax", ref.runs)
        assert v.delta == pytest.approx(-2 / 31)
        assert v.pooled_std == pytest.approx(pooled, abs=1e-6) and v.outcome == outcome
    # the floor is for probe accuracies only: fvu with std 0 on both sides keeps its exact rule
    assert matched.sampling_floor("fvu", matched.Stat(0.3, 0.0, 2), ref.runs) == 0.0
