"""report.md + plots from a tiny sweep of really trained SAEs (relu and sparsemax at two sizes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ev_helpers import make_run, train_sae

from evaluator.__main__ import main
from evaluator.evaluate import evaluate_run
from evaluator.report import write_report
from store.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, text_dataset):
    root = tmp_path_factory.mktemp("runs") / "sweep1"
    reports = {}
    for variant in ("relu", "sparsemax"):
        for m in (16, 32):
            name = f"variant-{variant}_m-{m}"
            sae = train_sae(text_dataset, {"variant": variant, "m": m}, steps=30)
            run = make_run(str(root / name), text_dataset, sae)
            reports[name] = evaluate_run(run, ce_contexts=2 if m == 16 else 0, progress=False)
    # one run that was never evaluated
    make_run(str(root / "variant-topk_m-16"), text_dataset,
             train_sae(text_dataset, {"variant": "topk", "m": 16, "k": 4}, steps=2))
    return root, reports


def test_report_renders_every_section(tiny_sweep):
    root, reports = tiny_sweep
    url = write_report(str(root))
    text = Path(url).read_text()
    # the matched-sparsity section is the headline, right after the header paragraph; one seed per
    # variant here, so every comparison is marked not conclusive
    assert text.index("Row filter:") < text.index("## Matched sparsity") < text.index("## fvu / ce_degradation")
    for m in (16, 32):
        assert f"### M = {m}" in text
    section = text.split("## Matched sparsity")[1].split("## fvu / ce_degradation")[0]
    verdicts = [line for line in section.splitlines() if line.startswith("- relu, ")]
    assert len(verdicts) == 2 * 3 and all("**not conclusive** — " in line for line in verdicts)
    for heading in ("## Matched sparsity", "## fvu / ce_degradation by variant and dictionary size", "## Runs",
                    "## fvu vs dictionary size", "## L0–fvu frontier",
                    "## Support size of the dynamic-K runs and the suggested TopK K"):
        assert heading in text
    # paper table: rows variants, columns sizes, cells fvu / ce_degradation
    assert "| variant | M = 16 | M = 32 |" in text
    r16, r32 = reports["variant-relu_m-16"], reports["variant-relu_m-32"]
    assert f"| relu | {r16.fvu:.4f} / {r16.ce_degradation:.4f} | {r32.fvu:.4f} / – |" in text
    s16 = reports["variant-sparsemax_m-16"]
    assert f"| sparsemax | {s16.fvu:.4f} / {s16.ce_degradation:.4f} |" in text
    # the unevaluated run is listed, not dropped
    assert re.search(r"\| variant-topk_m-16 \| topk \| 16 \| none \| 0 \| – \| not evaluated \|", text)
    assert "CE not computed: ce_contexts = 0." in text
    # suggested K per sparsemax run, from the mean support size
    for name in ("variant-sparsemax_m-16", "variant-sparsemax_m-32"):
        rep = reports[name]
        assert f"| {name} | {rep.m} | {max(1, round(rep.l0))} | {rep.l0:.2f} |" in text
        assert f"![support size of {name}](support_{name}.png)" in text
    assert "K = round(mean support size" in text
    assert "## Concept quality" in text and "No run has concept metrics (sparse probing: the dataset has no labels" in text
    for png in ("frontier.png", "fvu_vs_m.png", "l0_fvu.png", "support_variant-sparsemax_m-16.png",
                "support_variant-sparsemax_m-32.png"):
        assert (root / png).read_bytes()[:8] == PNG_MAGIC
        assert f"({png})" in text
    assert not (root / "support_variant-relu_m-16.png").exists()


def test_report_follows_summary_json_and_cli(tiny_sweep, capsys):
    root, _ = tiny_sweep
    summary = {"sweep": "sweep1", "runs": [{"name": "variant-relu_m-32", "status": "finished",
                                            "run_url": str(root / "variant-relu_m-32")}]}
    (root / "summary.json").write_text(json.dumps(summary))
    try:
        assert main(["report", str(root)]) == 0
        assert capsys.readouterr().out.strip() == str(root / "report.md")
        text = (root / "report.md").read_text()
        assert "from 1 runs (1 evaluated)" in text and "variant-relu_m-16" not in text
        assert re.search(r"No run of a variant that chooses its support per token \(.*\bsparsemax\b.*\) in this sweep\.",
                         text)
        assert "No sparsemax run at M = 32: nothing to compare relu against." in text
    finally:
        (root / "summary.json").unlink()


def test_report_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no run directories"):
        write_report(str(tmp_path / "empty"))


def test_concept_quality_table_text_probes_beside_vision_zero_shot(tmp_path):
    """Hand-built eval.json files: the paper's on-1/5/10/50 columns (probing, zero-shot) and the raw baselines."""
    root = tmp_path / "concepts"
    probe = {"documents": 90, "classes": 9, "train_documents": 63, "test_documents": 27, "seed": 0,
             "majority_baseline": 0.148}
    runs = {
        "sm-s0": ({"variant": "sparsemax", "m": 64, "seed": 0}, {"probe_top1": 0.30, "probe_top5": 0.50}),
        "sm-s1": ({"variant": "sparsemax", "m": 64, "seed": 1}, {"probe_top1": 0.40, "probe_top5": 0.60}),
        "vit-s0": ({"variant": "topk", "m": 64, "seed": 0},
                   {"zeroshot": {"pets": {"accuracy_top_n": {"1": 0.25, "5": 0.5, "10": 0.75, "50": 1.0}}}}),
    }
    for name, (sae, extra) in runs.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"name": name, "sae": sae}))
        if "probe_top1" in extra:
            extra = {**extra, "probe_raw_top1": 0.2, "probe_raw_top5": 0.4, "probe_raw_top10": 0.5,
                     "probe_raw_top50": 0.7, "probe_raw_all": 0.9, "probe": probe}
        (root / name / "eval.json").write_text(json.dumps({"variant": sae["variant"], "m": 64, "l0": 10.0,
                                                           "fvu": 0.1, "dead_frac": 0.0, **extra}))
    text = Path(write_report(str(root))).read_text()
    assert ("| family | M | n | L0 | probe on 1 | probe on 5 | probe on 10 | probe on 50 | zero-shot pets on 1 | "
            "zero-shot pets on 5 | zero-shot pets on 10 | zero-shot pets on 50 |") in text
    assert "| sparsemax | 64 | 2 | 10.0 ± 0.0 | 0.350 ± 0.071 | 0.550 ± 0.071 | – | – | – | – | – | – |" in text
    assert "| topk | 64 | 1 | 10.0 | – | – | – | – | 0.250 | 0.500 | 0.750 | 1.000 |" in text
    assert ("the n best of the d dimensions — on 1: 0.200 ± 0.000, on 5: 0.400 ± 0.000, on 10: 0.500 ± 0.000, "
            "on 50: 0.700 ± 0.000; all d dimensions: 0.900 ± 0.000.") in text
    assert "90 labelled documents of the eval split in 9 classes, 63 to train the probes and 27 to test" in text
    assert "most frequent class scores 0.148" in text
