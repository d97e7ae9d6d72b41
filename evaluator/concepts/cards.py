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
from evaluator.concepts.stats import ConceptStats, TopN, display_histogram
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

    def column(self, name: str, rows: torch.Tensor) -> np.ndarray:
        """``name`` at the given global rows (which must be among the window rows; -1 gives -1)."""
        r = rows.numpy()
        pos = np.searchsorted(self.unique_rows, np.maximum(r, 0))
        out = self.columns[name][np.minimum(pos, len(self.unique_rows) - 1)].astype(np.int64)
        return np.where(r >= 0, out, -1)


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
def collect_examples(run: RunInfo, top: TopN, window: int, max_elems: int = 1 << 25) -> Examples:
    """Pass 2: encode the unique window rows and gather each concept's activation on its windows."""
    rows = window_rows(run, top.ids, window)
    m, n, length = rows.shape
    flat = rows.reshape(-1)
    valid = flat >= 0
    uniq = torch.unique(flat[valid]).numpy()
    names = ["seq_ids", "positions"] + ([] if run.is_vision else ["token_ids"])
    columns = {name: read_rows(run.dataset, uniq, name) for name in names}
    # same-sequence check: a window row must belong to the example's sequence
    ex = Examples(rows=rows, acts=torch.full((m, n, length), math.nan), columns=columns, unique_rows=uniq)
    centre = (top.ids if not run.is_vision else top.ids).clamp_min(0)
    seq_centre = torch.from_numpy(ex.column("seq_ids", centre))
    seq_rows = torch.from_numpy(ex.column("seq_ids", rows))
    rows = torch.where((seq_rows == seq_centre[:, :, None]) & (rows >= 0), rows, -1)
    ex.rows = rows
    flat = rows.reshape(-1)
    valid_idx = (flat >= 0).nonzero().flatten()
    if valid_idx.numel() == 0:
        return ex
    # entry e needs codes[row_e, concept_e]; sort entries by unique-row position to walk rows in order
    upos = torch.from_numpy(np.searchsorted(uniq, flat[valid_idx].numpy()))
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


def round_sig(values: np.ndarray, digits: int = 4) -> list[float | None]:
    """Values rounded to ``digits`` significant digits for compact JSON (NaN -> None)."""
    out: list[float | None] = []
    for v in values.tolist():
        if v is None or not math.isfinite(v):
            out.append(None)
        elif v == 0:
            out.append(0.0)
        else:
            out.append(float(f"{v:.{digits}g}"))
    return out


def summary(stats: ConceptStats) -> dict[str, list]:
    """Columnar per-concept summary: freq, fires, mean, max."""
    return {
        "freq": round_sig(stats.freq().numpy()),
        "fires": stats.fires.tolist(),
        "mean": round_sig(stats.mean().numpy()),
        "max": round_sig(stats.max().numpy()),
    }


def histograms(stats: ConceptStats, concepts: range) -> list[list[list[float]]]:
    """Display histograms of the given concepts."""
    return [[[float(f"{lo:.3g}"), float(f"{hi:.3g}"), c] for lo, hi, c in display_histogram(stats.hist[i])]
            for i in concepts]


def most_common(items: list[str], k: int) -> list[str]:
    """The k most frequent items (ties by first appearance)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return [s for s, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:k]]


def text_cards(run: RunInfo, res: StreamResult, ex: Examples, window: int,
               decode: Any) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per-concept card dicts (text) and each concept's top token strings.

    ``decode(ids) -> list[str]`` maps token ids to display strings.
    """
    m, n, length = ex.rows.shape
    token_ids = ex.column("token_ids", ex.rows)             # (M, n, L)
    positions = ex.column("positions", ex.rows)
    seq_ids = ex.column("seq_ids", ex.rows)
    uniq_tokens = np.unique(token_ids[token_ids >= 0])
    strings = dict(zip(uniq_tokens.tolist(), decode(uniq_tokens.tolist())))
    values = res.top.values.numpy()
    acts = ex.acts.numpy()
    cards, tops = [], []
    for c in range(m):
        examples, centres = [], []
        for j in range(n):
            if not math.isfinite(values[c, j]):
                break
            present = ex.rows[c, j].numpy() >= 0
            toks = [strings[t] for t in token_ids[c, j][present].tolist()]
            centre = window - int((~present[:window]).sum())
            centres.append(toks[centre])
            examples.append({
                "act": round_sig(values[c, j:j + 1])[0],
                "seq": int(seq_ids[c, j][window]),
                "pos": int(positions[c, j][window]),
                "row": int(ex.rows[c, j, window]),
                "center": centre,
                "toks": toks,
                "acts": round_sig(acts[c, j][present], 3),
            })
        top_tokens = most_common(centres, 3)
        tops.append(top_tokens)
        cards.append({"id": c, "examples": examples, "top_tokens": top_tokens})
    return cards, tops


def vision_cards(run: RunInfo, res: StreamResult, ex: Examples, labels: np.ndarray | None,
                 image_path: Any) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per-concept card dicts (vision): image id, label, score and the patch-grid mask (CLS excluded).

    ``image_path(seq_id) -> str | None`` gives the thumbnail's relative path in the output.
    """
    m, n, length = ex.rows.shape
    class_names = run.manifest.class_names or []
    patches = length - 1                      # position 0 is CLS
    side = int(round(math.sqrt(patches)))
    if side * side != patches:
        raise UserError(f"dataset {run.dataset.url} has {length} rows per image, which is not 1 + a square "
                        f"patch grid; the concept browser expects a ViT with a CLS token.")
    seq_ids = ex.column("seq_ids", ex.rows[:, :, 0].clamp_min(-1))
    values = res.top.values.numpy()
    acts = ex.acts.numpy()
    cards, tops = [], []
    for c in range(m):
        examples, names = [], []
        for j in range(n):
            if not math.isfinite(values[c, j]):
                break
            seq = int(seq_ids[c, j])
            label_idx = int(labels[seq]) if labels is not None and 0 <= seq < len(labels) else -1
            label = class_names[label_idx] if 0 <= label_idx < len(class_names) else None
            if label is not None:
                names.append(label)
            examples.append({
                "act": round_sig(values[c, j:j + 1])[0],
                "seq": seq,
                "label": label,
                "img": image_path(seq),
                "grid": [side, side],
                "mask": round_sig(np.nan_to_num(acts[c, j, 1:], nan=0.0), 3),
            })
        top_labels = most_common(names, 3)
        tops.append(top_labels)
        cards.append({"id": c, "examples": examples, "top_tokens": top_labels})
    return cards, tops
