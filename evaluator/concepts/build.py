"""``python -m evaluator.concepts RUN_URL``: compute the cards of a run and write its browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evaluator.concepts.cards import (
    collect_examples,
    histograms,
    stream_stats,
    summary,
    text_cards,
    vision_cards,
)
from evaluator.concepts.data import RunInfo, open_run
from evaluator.concepts.images import thumbnails
from evaluator.concepts.page import publish, staging_dir, write_site
from evaluator.concepts.tokens import load_tokenizer, token_decoder, token_joiner
from store.io import join_url

TOP_IMAGES = 5  # images with a thumbnail per vision card


def default_out(run_url: str) -> str:
    """``<run_dir>/concepts``."""
    return join_url(run_url, "concepts")


def build_cards(run: RunInfo, *, units: int, top: int, window: int, split: str, out: Path
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Index and cards of a run (thumbnails for vision are written into ``out``)."""
    res = stream_stats(run, units, top, split)
    # vision: masks (and thumbnails) for the first TOP_IMAGES images of each concept only
    ex = collect_examples(run, res.top.ids[:, :TOP_IMAGES] if run.is_vision else res.top.ids, window)
    note, joiner = None, ""
    if run.is_vision:
        labels = run.dataset.labels()
        first = ex.where[:, :, 0]                               # each shown image's first row
        seqs = set(ex.columns["seq_ids"][first[first >= 0]].tolist())
        paths = thumbnails(run.manifest, seqs, out)
        if not paths and seqs:
            note = (f"The images of source {run.manifest.source.name!r} were not found on this machine; "
                    "the masks are shown without their images.")
        cards, tops = vision_cards(run, res, ex, labels, paths.get)
    else:
        tokenizer, reason = load_tokenizer(run.manifest.model)
        if tokenizer is None:
            note = f"Tokens are shown as ids (#id) because {reason}."
        joiner = token_joiner(tokenizer)
        cards, tops = text_cards(run, res, ex, window, token_decoder(tokenizer))
    cols = summary(res.stats)
    for c, (card, hist) in enumerate(zip(cards, histograms(res.stats))):
        card.update(freq=cols["freq"][c], fires=cols["fires"][c], mean=cols["mean"][c], max=cols["max"][c],
                    hist=hist)
    man = run.manifest
    index = {
        "title": f"Concepts of {run.url.rstrip('/').split('/')[-1]}",
        "kind": "vision" if run.is_vision else "text",
        "run": run.url,
        "dataset": run.dataset.url,
        "model": man.model.name,
        "hook": f"layer {man.hook.layer} {man.hook.site}",
        "sae": {k: v for k, v in run.sae.config.model_dump(mode="json").items()
                if k in ("variant", "m", "k", "activation", "input_norm")},
        "split": split,
        "filter": run.row_filter.describe(),
        "m": run.m,
        "rows": res.stats.rows,
        "units": res.units_read,
        "top": top,
        "window": window,
        "images": TOP_IMAGES,
        "tokenizer_note": note,
        "token_joiner": joiner,
        "concepts": dict(cols, top=tops),
    }
    return index, cards


def write_browser(run_url: str, *, dataset_url: str | None = None, units: int = 65536, top: int = 20,
                  window: int = 8, split: str = "eval", out: str | None = None, device: str = "cpu",
                  storage_options: dict[str, Any] | None = None) -> str:
    """Build the concept browser of a run; returns the URL of its index.html."""
    run = open_run(run_url, dataset_url, device=device, storage_options=storage_options)
    out_url = out or default_out(run_url)
    with staging_dir(out_url) as local, torch.no_grad():
        index, cards = build_cards(run, units=units, top=top, window=window, split=split, out=local)
        write_site(local, index, cards)
        publish(local, out_url, storage_options)
    return join_url(out_url, "index.html")
