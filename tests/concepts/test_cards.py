"""Streaming statistics and examples equal brute force on a tiny real store and real SAEs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluator.concepts.cards import collect_examples, stream_stats
from evaluator.concepts.data import encode_rows, open_run
from evaluator.concepts.stats import HALF_BINS, ConceptStats, TopN, bin_edges, display_histogram


def all_rows(run, split="eval"):
    """Brute force: every row of the split, its codes, and which rows the run's filter keeps."""
    ds = run.dataset
    rows = np.concatenate([np.arange(a, b) for a, b in ds.split_row_ranges(split)])
    acts = torch.from_numpy(np.concatenate([ds.read(a, b, "acts") for a, b in ds.split_row_ranges(split)]))
    pos = np.concatenate([ds.read(a, b, "positions") for a, b in ds.split_row_ranges(split)])
    keep = ~np.isin(pos, run.config.filter.exclude_positions)
    return rows, acts.float(), pos, keep, encode_rows(run.sae, acts.float())


# ----------------------------------------------------------------------------------- pure stats

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_topn_merge_equals_brute_force(n_batches, batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    m = 7
    top = TopN(m, n)
    scores, ids = [], []
    next_id = 0
    for _ in range(n_batches):
        s = torch.randn(batch, m, generator=g)
        s[torch.rand(batch, m, generator=g) < 0.5] = -math.inf        # concept did not fire
        i = torch.arange(next_id, next_id + batch)
        next_id += batch
        top.update(s, i)
        scores.append(s)
        ids.append(i)
    s, i = torch.cat(scores), torch.cat(ids)
    for c in range(m):
        col = s[:, c]
        finite = torch.isfinite(col)
        order = torch.argsort(col[finite], descending=True)[:n]
        want_v, want_i = col[finite][order], i[finite][order]
        got = torch.isfinite(top.values[c])
        assert int(got.sum()) == min(n, int(finite.sum()))
        assert torch.equal(top.values[c][got], want_v)
        assert torch.equal(top.ids[c][got], want_i)
        assert (top.ids[c][~got] == -1).all()


def test_concept_stats_hand_computed():
    a = torch.tensor([[0.0, 2.0, -0.5],
                      [1.0, 0.0, 0.0],
                      [3.0, 4.0, 0.0]])
    s = ConceptStats(3)
    s.update(a[:2])
    s.update(a[2:])
    assert s.rows == 3
    assert s.fires.tolist() == [2, 2, 1]
    assert s.freq().tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert s.mean().tolist() == pytest.approx([2.0, 3.0, -0.5])   # mean when firing
    assert s.max().tolist() == pytest.approx([3.0, 4.0, -0.5])
    assert s.hist.sum(1).tolist() == [2, 2, 1]
    # 2.0 and 4.0 are 0.301 decades apart: 16 bins per decade puts them 4..5 bins apart, both positive
    pos = s.hist[1, :HALF_BINS].nonzero().flatten().tolist()
    assert len(pos) == 2 and 4 <= pos[1] - pos[0] <= 5
    assert s.hist[2, HALF_BINS:].sum() == 1                        # the negative value
    edges = bin_edges()
    b = s.hist[0, :HALF_BINS].nonzero().flatten()
    assert edges[b[0]] <= 1.0 < edges[b[0] + 1] and edges[b[1]] <= 3.0 < edges[b[1] + 1]


def test_display_histogram_spans_the_concept_range():
    s = ConceptStats(1)
    vals = torch.tensor([0.01, 0.02, 0.5, 0.9, 7.0, -0.3]).reshape(-1, 1)
    s.update(vals)
    bars = display_histogram(s.hist[0], max_bars=8)
    assert sum(b[2] for b in bars) == 6
    assert [b[0] < b[1] for b in bars] == [True] * len(bars)
    assert bars[0][1] < 0 and bars[0][2] == 1                     # negative bar first
    pos = [b for b in bars if b[0] > 0]
    assert pos[0][0] <= 0.01 < pos[0][1] and pos[-1][0] <= 7.0 < pos[-1][1]
    assert len(pos) <= 8


# ----------------------------------------------------------------------------------- on a real store

@pytest.mark.parametrize("which", [0, 1])
def test_streaming_equals_brute_force(text_runs, which):
    run = open_run(text_runs[which])
    rows, acts, pos, keep, codes = all_rows(run)
    n = 5
    # small reads and pieces so that many merges happen
    res = stream_stats(run, units=10**6, top_n=n, block_rows=48, max_elems=40 * 16)
    kept = codes[torch.from_numpy(keep)]
    assert res.stats.rows == int(keep.sum())
    assert torch.equal(res.stats.fires, (kept != 0).sum(0))
    nz = kept != 0
    mean = torch.where(nz, kept, 0).sum(0, dtype=torch.float64) / nz.sum(0).clamp_min(1)
    assert torch.allclose(res.stats.mean(), mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(res.stats.max().float(), torch.where(nz, kept, -math.inf).amax(0).clamp_min(0)
                          .where(nz.any(0), torch.zeros(())), rtol=1e-6)
    kept_rows = torch.from_numpy(rows[keep])
    for c in range(run.m):
        fired = kept[:, c] != 0
        order = torch.argsort(kept[fired, c], descending=True)[:n]
        valid = res.top.ids[c] >= 0
        assert int(valid.sum()) == min(n, int(fired.sum()))
        got_ids, got_vals = res.top.ids[c][valid], res.top.values[c][valid]
        assert torch.equal(got_vals, kept[fired, c][order])     # the n best values, in order
        # ids: distinct rows that hold exactly those values (equal activations may swap places)
        assert len(set(got_ids.tolist())) == len(got_ids)
        where = torch.searchsorted(kept_rows, got_ids)
        assert torch.equal(kept_rows[where], got_ids) and torch.equal(kept[where, c], got_vals)
        untied = got_vals != got_vals[-1]
        assert set(got_ids[untied].tolist()) <= set(kept_rows[fired][order].tolist())


def test_token_budget_is_respected(text_runs):
    run = open_run(text_runs[0])
    rows, _acts, pos, keep, _codes = all_rows(run)
    res = stream_stats(run, units=100, top_n=3, block_rows=32)
    assert res.rows_read == 100
    assert res.stats.rows == int(keep[:100].sum())
    assert int(res.top.ids.max()) <= int(rows[99])


def test_window_activations_equal_encoding_the_window(text_runs):
    run = open_run(text_runs[0])
    res = stream_stats(run, units=10**6, top_n=3)
    w = 4
    ex = collect_examples(run, res.top.ids, w, max_elems=40 * 8)
    ctx = run.manifest.context_length
    checked = 0
    for c in range(run.m):
        for j in range(3):
            r = int(res.top.ids[c, j])
            if r < 0:
                continue
            seq_start = r - r % ctx
            want_rows = [q for q in range(r - w, r + w + 1) if seq_start <= q < seq_start + ctx]
            got_rows = ex.rows[c, j][ex.rows[c, j] >= 0].tolist()
            assert got_rows == want_rows
            acts = torch.from_numpy(run.dataset.read(want_rows[0], want_rows[-1] + 1, "acts")).float()
            want = encode_rows(run.sae, acts)[:, c]
            want[torch.tensor([q % ctx == 0 for q in want_rows])] = math.nan   # BOS: excluded
            got = ex.acts[c, j][ex.rows[c, j] >= 0]
            assert torch.allclose(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)
            assert got[want_rows.index(r)] == res.top.values[c, j]
            checked += 1
    assert checked > 10


def test_cli_writes_index_and_shards(text_runs, words, tmp_path):
    from evaluator.concepts.__main__ import main

    out = tmp_path / "site"
    assert main([text_runs[0], "--tokens", "150", "--top", "4", "--window", "3", "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["m"] == 40 and index["kind"] == "text" and index["units"] == 150
    assert index["tokenizer_note"] is None
    js = (out / "index.js").read_text()
    assert js.startswith("window.__index = ") and json.loads(js[len("window.__index = "):-2]) == index
    shard = (out / "cards" / "00000.js").read_text()
    assert shard.startswith("window.__cards_0 = ")
    cards = json.loads(shard[len("window.__cards_0 = "):-2])
    assert sorted(map(int, cards)) == list(range(40))
    for cid, card in cards.items():
        assert card["fires"] == index["concepts"]["fires"][int(cid)]
        assert sum(b[2] for b in card["hist"]) == card["fires"]
        for ex in card["examples"]:
            assert len(ex["toks"]) == len(ex["acts"]) <= 7
            assert ex["acts"][ex["center"]] == pytest.approx(ex["act"], rel=6e-3)
            assert all(t.strip() in [*words, "<bos>"] for t in ex["toks"])
    assert (out / "index.html").read_text().count("<script") == 2


def test_bad_run_is_one_sentence(tmp_path):
    from evaluator.concepts.__main__ import main
    from store.errors import run_cli

    assert run_cli(main, [str(tmp_path / "nope")]) == 2


def test_vision_mask_equals_patch_activations(vision_run, tmp_path):
    from evaluator.concepts.build import write_browser

    page = write_browser(vision_run, units=100, top=3, out=str(tmp_path / "v"))
    out = Path(page).parent
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "vision"
    cards = json.loads((out / "cards" / "00000.js").read_text().split(" = ", 1)[1][:-2])
    run = open_run(vision_run)
    labels = run.dataset.labels()
    checked = 0
    for cid, card in cards.items():
        for ex in card["examples"]:
            seq = ex["seq"]
            acts = torch.from_numpy(run.dataset.read(seq * 197, (seq + 1) * 197, "acts")).float()
            codes = encode_rows(run.sae, acts)[1:, int(cid)]                # CLS excluded
            assert ex["grid"] == [14, 14] and len(ex["mask"]) == 196
            assert np.allclose(ex["mask"], codes.numpy(), rtol=6e-3, atol=1e-6)  # 3 significant digits
            assert ex["act"] == pytest.approx(float(codes.max()), rel=1e-3)
            assert ex["label"] == ["circle", "square"][int(labels[seq])]
            assert ex["img"] == f"images/{seq}.jpg" and (out / ex["img"]).is_file()
            checked += 1
    assert checked > 5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: abs(v) > 1e-5), min_size=1, max_size=60),
       st.integers(1, 10))
def test_display_histogram_bars_partition_the_values(values, max_bars):
    s = ConceptStats(1)
    s.update(torch.tensor(values, dtype=torch.float32).reshape(-1, 1))
    bars = display_histogram(s.hist[0], max_bars=max_bars)
    assert sum(b[2] for b in bars) == len(values)
    neg = [b for b in bars if b[1] <= 0]
    pos = [b for b in bars if b[0] > 0]
    assert len(neg) + len(pos) == len(bars) and len(neg) <= max_bars and len(pos) <= max_bars
    assert bars == sorted(bars)                                    # ascending, no overlap
    for group in (neg, pos):
        assert all(a[1] == pytest.approx(b[0]) for a, b in zip(group, group[1:]))   # contiguous
    for v in values:                                               # every value falls in a bar that counts it
        v32 = float(np.float32(v))
        assert any(lo * (1 - 1e-6) <= v32 <= hi * (1 + 1e-6) if v32 > 0 else lo * (1 + 1e-6) <= v32 <= hi
                   * (1 - 1e-6) for lo, hi, _ in bars)


def test_labelled_text_is_not_vision():
    """Class labels alone do not make a dataset vision: labelled text stores them per document
    (``documents``) and is browsed as text; labels per image (no ``documents``) are vision."""
    from types import SimpleNamespace

    from evaluator.concepts.data import RunInfo

    def run(kind, class_names, documents):
        model = SimpleNamespace(kind=kind)
        manifest = SimpleNamespace(model=model, class_names=class_names, documents=documents)
        return RunInfo(url="run", config=None, sae=None, dataset=SimpleNamespace(manifest=manifest), row_filter=None,
                       median_norm=None)

    assert not run("hf_causal_lm", ["net", "os"], True).is_vision
    assert not run("hf_causal_lm", None, None).is_vision
    assert run("open_clip", ["cat", "dog"], None).is_vision
    assert run("hf_image_folder", ["cat", "dog"], None).is_vision
