"""Concept cards: stream a run's dataset through its SAE and collect, per concept, what the browser shows.

Pass 1 (streaming, bounded memory, vectorised over concepts): :class:`~.stats.ConceptStats`
(frequency, mean when firing, max, histogram) over every kept row, and :class:`~.stats.TopN`
over *units*: rows for text, images for vision (an image's score for a concept is its largest
activation over the kept patch rows, so an image appears once).

Pass 2 (examples): the windows of the top units — ±W tokens around a text row within its
sequence, or the patch rows of an image — are read back from the store and **encoded again**,
and each concept's activation is gathered on its own windows. Only the unique window rows are
encoded (at most the streamed rows plus their neighbours), in row order, in bounded pieces.
Rows that the run's filter excludes (BOS, attention sinks) show no activation (``null``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluator.concepts.data import (
    READ_ROWS,
    RunInfo,
    encode_dense,
    iter_blocks,
    keep_mask,
    plan_blocks,
    read_rows,
    split_ranges,
)
from evaluator.concepts.stats import ConceptStats, TopN, display_histograms
from store.errors import UserError


@dataclass
class StreamResult:
    """Output of pass 1."""

    stats: ConceptStats
    top: TopN
    rows_read: int
    units_read: int


@dataclass
class Examples:
    """Pass 2: per concept and example slot, the window rows and the concept's activations on them.

    ``rows`` (M, n, L) int64 global row ids (-1 = outside the sequence / no example),
    ``acts`` (M, n, L) float32 (NaN = excluded by the row filter or no row).
    """

    rows: torch.Tensor
    acts: torch.Tensor
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # per unique row: token_ids, seq_ids, positions
    unique_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    where: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int64))  # rows -> unique index



def unit_rows(run: RunInfo) -> int:
    """Rows per unit: one (text) or the rows of one image (vision)."""
    return int(run.manifest.context_length) if run.is_vision else 1


@torch.no_grad()
def stream_stats(run: RunInfo, units: int, top_n: int, split: str = "eval",
                 block_rows: int = READ_ROWS, max_elems: int = 1 << 25) -> StreamResult:
    """Pass 1 over the first ``units`` tokens (text) or images (vision) of ``split``.

    Rows are read ``block_rows`` at a time and encoded in pieces of about ``max_elems`` code
    entries (whole images for vision).
    """
    per_unit = unit_rows(run)
    ranges = split_ranges(run.dataset, split)
    if not ranges:
        raise UserError(f"dataset {run.dataset.url} has no rows in its {split!r} split; use --split all.")
    blocks = plan_blocks(ranges, units * per_unit, per_unit, block_rows)
    m = run.m
    stats, top = ConceptStats(m), TopN(m, top_n)
    rows_read = 0
    bar = tqdm(total=sum(b - a for a, b in blocks), unit="row", unit_scale=True, desc="concepts")
    # vision: encode whole images per piece so an image's patches are scored together
    max_elems = max(max_elems, per_unit * m)
    for start, cols in iter_blocks(run.dataset, blocks, ("acts", "positions", "seq_ids")):
        acts = torch.from_numpy(cols["acts"].astype(np.float32, copy=False))
        positions = torch.from_numpy(cols["positions"].astype(np.int64))
        keep = keep_mask(run, acts, positions)
        rows = torch.arange(start, start + acts.shape[0], dtype=torch.int64)
        step = max(per_unit, max_elems // m // per_unit * per_unit)
        for lo in range(0, acts.shape[0], step):
            hi = min(lo + step, acts.shape[0])
            kept = keep[lo:hi]
            codes = next(encode_dense(run.sae, acts[lo:hi][kept], max_elems=1 << 62))[1] if kept.any() \
                else torch.zeros(0, m)
            stats.update(codes)
            scores = torch.where(codes != 0, codes, -math.inf)
            kept_rows = rows[lo:hi][kept]
            if per_unit == 1:
                top.update(scores, kept_rows)
            else:
                # image score = max over its kept patch rows; unit id = the image's first row
                image_start = kept_rows - positions[lo:hi][kept]
                starts, inverse = torch.unique(image_start, return_inverse=True)
                per_image = torch.full((starts.numel(), m), -math.inf)
                per_image.scatter_reduce_(0, inverse[:, None].expand(-1, m), scores, "amax")
                top.update(per_image, starts)
        rows_read += acts.shape[0]
        bar.update(acts.shape[0])
    bar.close()
    if stats.rows == 0:
        raise UserError(f"no rows of dataset {run.dataset.url} passed the run's row filter "
                        f"({run.row_filter.describe()}); raise --tokens or check the filter.")
    return StreamResult(stats, top, rows_read, rows_read // per_unit)


def window_rows(run: RunInfo, top_ids: torch.Tensor, window: int) -> torch.Tensor:
    """(M, n, L) candidate rows of each example's window, before the same-sequence check.

    Text: L = 2W + 1 rows centred on the top row. Vision: L = context_length rows of the image.
    """
    n_rows = int(run.dataset.num_rows)
    if run.is_vision:
        offsets = torch.arange(unit_rows(run), dtype=torch.int64)
    else:
        offsets = torch.arange(-window, window + 1, dtype=torch.int64)
    rows = top_ids[:, :, None] + offsets
    valid = (top_ids[:, :, None] >= 0) & (rows >= 0) & (rows < n_rows)
    return torch.where(valid, rows, -1)


@torch.no_grad()
def collect_examples(run: RunInfo, ids: torch.Tensor, window: int, max_elems: int = 1 << 25) -> Examples:
    """Pass 2: encode the unique window rows of the examples ``ids`` (M, n) (-1 = none) and gather
    each concept's activation on its windows."""
    rows = window_rows(run, ids, window)
    m, n, length = rows.shape
    flat = rows.reshape(-1)
    valid = flat >= 0
    uniq = torch.unique(flat[valid]).numpy()
    names = ["seq_ids", "positions"] + ([] if run.is_vision else ["token_ids"])
    columns = {name: read_rows(run.dataset, uniq, name) for name in names}
    where = np.where(rows.numpy() >= 0, np.searchsorted(uniq, np.maximum(rows.numpy(), 0)), -1)
    # same-sequence check: a window row must belong to the example's sequence (the centre's
    # window slot is W for text, 0 = the image's first row for vision)
    seqs = np.where(where >= 0, columns["seq_ids"][np.maximum(where, 0)], -1)
    centre = seqs[:, :, 0 if run.is_vision else window]
    where = np.where((seqs == centre[:, :, None]) & (where >= 0), where, -1)
    rows = torch.where(torch.from_numpy(where >= 0), rows, -1)
    ex = Examples(rows=rows, acts=torch.full((m, n, length), math.nan), columns=columns, unique_rows=uniq,
                  where=where)
    flat = rows.reshape(-1)
    valid_idx = (flat >= 0).nonzero().flatten()
    if valid_idx.numel() == 0:
        return ex
    # entry e needs codes[row_e, concept_e]; sort entries by unique-row position to walk rows in order
    upos = torch.from_numpy(where.reshape(-1)[valid_idx.numpy()])
    concept = valid_idx // (n * length)
    order = torch.argsort(upos, stable=True)
    upos, concept, valid_idx = upos[order], concept[order], valid_idx[order]
    out = ex.acts.view(-1)
    piece = max(1, max_elems // m)
    positions_all = torch.from_numpy(columns["positions"].astype(np.int64))
    bar = tqdm(total=len(uniq), unit="row", unit_scale=True, desc="examples")
    for lo in range(0, len(uniq), piece):
        hi = min(lo + piece, len(uniq))
        acts = torch.from_numpy(read_rows(run.dataset, uniq[lo:hi], "acts").astype(np.float32, copy=False))
        keep = keep_mask(run, acts, positions_all[lo:hi])
        codes = next(encode_dense(run.sae, acts, max_elems=1 << 62))[1]
        codes[~keep] = math.nan
        a, b = torch.searchsorted(upos, torch.tensor([lo, hi]))
        sel = slice(int(a), int(b))
        out[valid_idx[sel]] = codes[upos[sel] - lo, concept[sel]]
        bar.update(hi - lo)
    bar.close()
    return ex


def round_array(values: np.ndarray, digits: int = 4) -> np.ndarray:
    """Values rounded to ``digits`` significant digits (vectorised; NaN/inf kept)."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(v)))
        scale = np.where(np.isfinite(mag), 10.0 ** (digits - 1 - np.nan_to_num(mag, posinf=0, neginf=0)), 1.0)
        return np.where(np.isfinite(mag), np.round(v * scale) / scale, v)


def round_sig(values: np.ndarray, digits: int = 4) -> list[float | None]:
    """Values rounded to ``digits`` significant digits for compact JSON (NaN -> None)."""
    r = round_array(values, digits)
    return [x if math.isfinite(x) else None for x in r.tolist()]


def summary(stats: ConceptStats) -> dict[str, list]:
    """Columnar per-concept summary: freq, fires, mean, max."""
    return {
        "freq": round_sig(stats.freq().numpy()),
        "fires": stats.fires.tolist(),
        "mean": round_sig(stats.mean().numpy()),
        "max": round_sig(stats.max().numpy()),
    }


def histograms(stats: ConceptStats) -> list[list[list[float]]]:
    """Display histograms of all concepts (bar edges to 3 significant digits)."""
    return [[[float(f"{lo:.3g}"), float(f"{hi:.3g}"), c] for lo, hi, c in bars]
            for bars in display_histograms(stats.hist)]


def most_common(items: list[str], k: int) -> list[str]:
    """The k most frequent items (ties by first appearance)."""
    return [item for item, _count in Counter(items).most_common(k)] if items else []


def text_cards(run: RunInfo, res: StreamResult, ex: Examples, window: int,
               decode: Any) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per-concept card dicts (text) and each concept's top token strings.

    ``decode(ids) -> list[str]`` maps token ids to display strings.
    """
    m, n, length = ex.rows.shape
    finite = np.isfinite(res.top.values.numpy())
    cs, js = finite.nonzero()                               # the K real examples, concept-major
    where = ex.where[cs, js]                                # (K, L) index into the unique rows
    present = where >= 0

    def col(name: str) -> np.ndarray:
        return np.where(present, ex.columns[name][np.maximum(where, 0)], -1)

    token_ids = col("token_ids")
    centre_pos = col("positions")[:, window].tolist()
    centre_seq = col("seq_ids")[:, window].tolist()
    rows = ex.rows.numpy()[cs, js, window].tolist()
    uniq_tokens = np.unique(token_ids[present])
    strings = dict(zip(uniq_tokens.tolist(), decode(uniq_tokens.tolist())))
    values = round_sig(res.top.values.numpy()[cs, js])
    centres = (window - (~present[:, :window]).sum(1)).tolist()   # centre index after clipping
    acts = round_array(ex.acts.numpy()[cs, js], 3)
    toks_all, acts_all, present_all = token_ids.tolist(), acts.tolist(), present.tolist()
    cards: list[dict[str, Any]] = [{"id": c, "examples": [], "top_tokens": []} for c in range(m)]
    centre_strings: list[list[str]] = [[] for _ in range(m)]
    for e, c in enumerate(cs.tolist()):
        keep = present_all[e]
        toks = [strings[t] for t, k in zip(toks_all[e], keep) if k]
        centre_strings[c].append(toks[centres[e]])
        cards[c]["examples"].append({
            "act": values[e],
            "seq": centre_seq[e],
            "pos": centre_pos[e],
            "row": rows[e],
            "center": centres[e],
            "toks": toks,
            "acts": [None if a != a else a for a, k in zip(acts_all[e], keep) if k],  # NaN -> null
        })
    tops = []
    for card, strs in zip(cards, centre_strings):
        card["top_tokens"] = most_common(strs, 3)
        tops.append(card["top_tokens"])
    return cards, tops


def vision_cards(run: RunInfo, res: StreamResult, ex: Examples, labels: np.ndarray | None,
                 image_path: Any) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per-concept card dicts (vision): image id, label, score; the first examples (those in ``ex``)
    also carry the patch-grid mask (CLS excluded) and their thumbnail.

    ``image_path(seq_id) -> str | None`` gives the thumbnail's relative path in the output.
    """
    m, n = res.top.ids.shape
    length = ex.rows.shape[2]
    class_names = run.manifest.class_names or []
    patches = length - 1                      # position 0 is CLS
    side = int(round(math.sqrt(patches)))
    if side * side != patches:
        raise UserError(f"dataset {run.dataset.url} has {length} rows per image, which is not 1 + a square "
                        f"patch grid; the concept browser expects a ViT with a CLS token.")
    ids = res.top.ids.numpy()
    uniq = np.unique(ids[ids >= 0])
    seq_of = dict(zip(uniq.tolist(), read_rows(run.dataset, uniq, "seq_ids").tolist()))
    cs, js = np.isfinite(res.top.values.numpy()).nonzero()     # the K real examples, concept-major
    values = round_sig(res.top.values.numpy()[cs, js])
    with_mask = ex.acts.shape[1]
    masked = js < with_mask
    masks = iter(round_array(np.nan_to_num(ex.acts.numpy()[cs[masked], js[masked], 1:], nan=0.0), 3).tolist())
    cards: list[dict[str, Any]] = [{"id": c, "examples": [], "top_tokens": []} for c in range(m)]
    names: list[list[str]] = [[] for _ in range(m)]
    for e, (c, j) in enumerate(zip(cs.tolist(), js.tolist())):
        seq = int(seq_of[int(ids[c, j])])
        label_idx = int(labels[seq]) if labels is not None and 0 <= seq < len(labels) else -1
        label = class_names[label_idx] if 0 <= label_idx < len(class_names) else None
        if label is not None:
            names[c].append(label)
        example = {"act": values[e], "seq": seq, "label": label}
        if j < with_mask:
            example.update(img=image_path(seq), grid=[side, side], mask=next(masks))
        cards[c]["examples"].append(example)
    tops = []
    for card, strs in zip(cards, names):
        card["top_tokens"] = most_common(strs, 3)
        tops.append(card["top_tokens"])
    return cards, tops
