"""``python -m evaluator.concepts compare RUN_A RUN_B (--text T | --seq ID | --image PATH)``.

Both SAEs encode the same input rows and a static ``compare.html`` shows, per token (or
image patch), how many concepts are active in each run and the top concepts of each with
links into each run's concept browser — which makes the sparsemax SAE's per-sample K visible
next to TopK's fixed K.

Inputs: ``--seq ID`` takes the rows of sequence/image ID from run A's dataset (no model needed);
``--text`` tokenizes the text with the dataset model's tokenizer (BOS first, as the harvester
packs contexts) and ``--image`` preprocesses an image with the model's own preprocessing, then
captures the residual stream at the dataset's hook (:meth:`harvester.models.ModelAdapter.capture`).
Rows the run's filter excludes (BOS/CLS) are shown greyed and left out of the summary.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluator.concepts.data import RunInfo, encode_rows, keep_mask, open_run
from evaluator.concepts.page import static_text
from evaluator.concepts.tokens import load_tokenizer, token_decoder
from store.errors import UserError
from store.io import is_local, join_url, local_path

TOP_CONCEPTS = 5


@dataclass
class CompareInput:
    """The rows both SAEs encode: activations (T, d), positions (T,), a label per row, a description."""

    acts: torch.Tensor
    positions: torch.Tensor
    labels: list[str]
    description: str


def check_compatible(a: RunInfo, b: RunInfo) -> None:
    """Both runs must read the same model at the same hook (else one input means two things)."""
    ma, mb = a.manifest, b.manifest
    if (ma.model.name, ma.hook.layer, ma.hook.site, ma.d) != (mb.model.name, mb.hook.layer, mb.hook.site, mb.d):
        raise UserError(f"runs {a.url} and {b.url} were trained on different activations "
                        f"({ma.model.name} layer {ma.hook.layer} {ma.hook.site} vs {mb.model.name} layer "
                        f"{mb.hook.layer} {mb.hook.site}); compare runs of the same model and hook.")


def patch_labels(n: int) -> list[str]:
    """Row labels of one image: CLS then patches by (row, column) of the square grid."""
    side = int(round((n - 1) ** 0.5))
    return ["CLS"] + [f"patch ({i // side},{i % side})" for i in range(n - 1)]


def input_from_seq(run: RunInfo, seq: int) -> CompareInput:
    """Rows of sequence (or image) ``seq`` of the run's dataset (rows [seq·ctx, (seq+1)·ctx))."""
    ctx = int(run.manifest.context_length)
    start, stop = seq * ctx, (seq + 1) * ctx
    if seq < 0 or stop > run.dataset.num_rows:
        raise UserError(f"sequence {seq} is not in dataset {run.dataset.url}, which holds "
                        f"{run.dataset.num_rows // ctx} sequences; pick --seq from 0 to {run.dataset.num_rows // ctx - 1}.")
    seq_ids = run.dataset.read(start, stop, "seq_ids")
    if not (seq_ids == seq).all():
        raise UserError(f"rows {start}..{stop - 1} of dataset {run.dataset.url} do not all belong to "
                        f"sequence {seq}; this dataset's layout is not one sequence per context.")
    acts = torch.from_numpy(run.dataset.read(start, stop, "acts").astype(np.float32))
    positions = torch.from_numpy(run.dataset.read(start, stop, "positions").astype(np.int64))
    if run.is_vision:
        labels = patch_labels(ctx)
    else:
        tokenizer, _reason = load_tokenizer(run.manifest.model)
        labels = token_decoder(tokenizer)(run.dataset.read(start, stop, "token_ids").tolist())
    return CompareInput(acts, positions, labels, f"sequence {seq} of {run.dataset.url}")


def model_adapter(run: RunInfo, device: str) -> Any:
    """The dataset's model, loaded with the harvester's loader."""
    from harvester.config import ModelConfig
    from harvester.models import load_model

    mod = run.manifest.model
    if mod.kind is None:
        raise UserError(f"dataset {run.dataset.url} does not record its model kind; use --seq instead.")
    cfg = ModelConfig(kind=mod.kind, name=mod.name, gguf_file=mod.gguf_file, pretrained=mod.pretrained,
                      revision=mod.revision)
    return load_model(cfg, device)


def input_from_text(run: RunInfo, text: str, device: str = "cpu") -> CompareInput:
    """Tokenize ``text`` (BOS first when the model has one) and capture the hook's activations."""
    from harvester.sources import token_spec

    if run.is_vision:
        raise UserError(f"run {run.url} is a vision run; pass --image PATH or --seq ID instead of --text.")
    if not text.strip():
        raise UserError("--text is empty; pass the text to compare on.")
    adapter = model_adapter(run, device)
    spec = token_spec(adapter.tokenizer, run.manifest.model.name)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    if spec.bos_id is not None:
        ids = [spec.bos_id] + list(ids)
    ids = ids[: int(run.manifest.context_length)]
    acts = adapter.capture(torch.tensor([ids]), run.manifest.hook.layer, run.manifest.hook.site)[0]
    labels = token_decoder(adapter.tokenizer)(ids)
    return CompareInput(acts.float().cpu(), torch.arange(len(ids)), labels, f"text {text[:60]!r}")


def input_from_image(run: RunInfo, path: str, device: str = "cpu") -> CompareInput:
    """Preprocess an image as the model does and capture the hook's activations (all tokens)."""
    from PIL import Image

    if not run.is_vision:
        raise UserError(f"run {run.url} is a text run; pass --text or --seq instead of --image.")
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except OSError as err:
        raise UserError(f"image {path} cannot be read ({err}); pass a JPEG/PNG file.") from None
    adapter = model_adapter(run, device)
    acts = adapter.capture(adapter.preprocess(image)[None], run.manifest.hook.layer, run.manifest.hook.site)[0]
    return CompareInput(acts.float().cpu(), torch.arange(acts.shape[0]), patch_labels(acts.shape[0]),
                        f"image {path}")


def browser_link(run: RunInfo, out_file: str) -> str:
    """URL of the run's concept browser relative to ``out_file`` (absolute for remote runs)."""
    target = join_url(run.url, "concepts", "index.html")
    if is_local(target) and is_local(out_file):
        return os.path.relpath(local_path(target), os.path.dirname(local_path(out_file))).replace(os.sep, "/")
    return target


def run_title(run: RunInfo) -> str:
    """A short name for a run: its directory name, variant, m and k."""
    cfg = run.sae.config
    extra = f", k={cfg.k}" if "k" in type(cfg).model_fields else ""
    return f"{run.url.rstrip('/').split('/')[-1]} ({cfg.variant}, m={cfg.m}{extra})"


def concept_cells(codes: torch.Tensor, link: str, k: int = TOP_CONCEPTS) -> str:
    """Links to the k most active concepts of one row, with their activations."""
    nz = int((codes != 0).sum())
    if nz == 0:
        return "—"
    vals, idx = codes.topk(min(k, nz))
    return " ".join(f'<a href="{html.escape(link)}#concept={int(i)}">#{int(i)}</a>&nbsp;{float(v):.3g}'
                    for v, i in zip(vals.tolist(), idx.tolist()))


def counts_chart(counts_a: np.ndarray, counts_b: np.ndarray, keep: np.ndarray, names: tuple[str, str]) -> str:
    """Inline SVG: active concepts per row, run A and run B side by side."""
    n = len(counts_a)
    width, height, bar = max(300, 12 * n), 120, 5
    top = max(1, int(max(counts_a.max(initial=0), counts_b.max(initial=0))))
    parts = [f'<svg role="img" width="{width}" height="{height + 16}" aria-label="active concepts per token: '
             f'{html.escape(names[0])} in blue, {html.escape(names[1])} in orange">']
    for i in range(n):
        for j, (count, cls) in enumerate(((counts_a[i], "bar-a"), (counts_b[i], "bar-b"))):
            h = height * count / top
            op = "1" if keep[i] else "0.3"
            parts.append(f'<rect class="{cls}" x="{12 * i + j * bar}" y="{height - h:.1f}" width="{bar}" '
                         f'height="{h:.1f}" opacity="{op}"><title>row {i}: {int(count)}</title></rect>')
    parts.append(f'<text x="0" y="{height + 14}" font-size="10">max {top}</text></svg>')
    return "".join(parts)


def compare_html(a: RunInfo, b: RunInfo, inp: CompareInput, codes_a: torch.Tensor, codes_b: torch.Tensor,
                 keep: np.ndarray, links: tuple[str, str]) -> str:
    """The compare page."""
    names = (run_title(a), run_title(b))
    ca = (codes_a != 0).sum(1).numpy()
    cb = (codes_b != 0).sum(1).numpy()

    def stats(c: np.ndarray) -> str:
        kept = c[keep] if keep.any() else c
        return f"mean {kept.mean():.2f}, min {kept.min()}, max {kept.max()}"

    rows = []
    for i, label in enumerate(inp.labels):
        cls = "" if keep[i] else ' class="excluded" title="excluded by the row filter"'
        rows.append(f"<tr{cls}><td class=n>{i}</td><td class=ctx>{html.escape(repr(label)[1:-1])}</td>"
                    f"<td class=n>{int(ca[i])}</td><td class=n>{int(cb[i])}</td>"
                    f"<td>{concept_cells(codes_a[i], links[0])}</td><td>{concept_cells(codes_b[i], links[1])}</td></tr>")
    css = static_text("browser.css")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Compare: {html.escape(names[0])} vs {html.escape(names[1])}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'self' 'unsafe-inline' data:; connect-src 'none'">
<style>{css} body {{ padding: 12px 20px; }} tr.excluded {{ color: #888; }}</style></head>
<body><h1>Active concepts per token</h1>
<p>Input: {html.escape(inp.description)}</p>
<dl class="facts" style="grid-template-columns: auto auto">
<dt>A (blue)</dt><dd>{html.escape(names[0])}: active concepts per token {stats(ca)}</dd>
<dt>B (orange)</dt><dd>{html.escape(names[1])}: active concepts per token {stats(cb)}</dd>
</dl>
<div style="overflow-x:auto">{counts_chart(ca, cb, keep, names)}</div>
<table class="cmp"><caption>Per token: number of active concepts and the {TOP_CONCEPTS} most active concepts
of each run (links open the run's concept browser)</caption>
<thead><tr><th scope=col>#</th><th scope=col>token</th><th scope=col>active A</th><th scope=col>active B</th>
<th scope=col>top concepts A</th><th scope=col>top concepts B</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
</body></html>
"""


def write_compare(run_a: str, run_b: str, *, text: str | None = None, seq: int | None = None,
                  image: str | None = None, out: str | None = None, device: str = "cpu",
                  storage_options: dict[str, Any] | None = None) -> str:
    """Write the compare page; returns its path."""
    if sum(x is not None for x in (text, seq, image)) != 1:
        raise UserError("compare needs exactly one input: --text TEXT, --seq ID or --image PATH.")
    a = open_run(run_a, device=device, storage_options=storage_options)
    b = open_run(run_b, device=device, storage_options=storage_options)
    check_compatible(a, b)
    if seq is not None:
        inp = input_from_seq(a, seq)
    elif text is not None:
        inp = input_from_text(a, text, device)
    else:
        inp = input_from_image(a, str(image), device)
    with torch.no_grad():
        codes_a, codes_b = encode_rows(a.sae, inp.acts), encode_rows(b.sae, inp.acts)
    keep = (keep_mask(a, inp.acts, inp.positions) & keep_mask(b, inp.acts, inp.positions)).numpy()
    out_file = out or join_url(run_a, "concepts", "compare.html")
    if not is_local(out_file):
        raise UserError(f"--out {out_file} is not a local path; write compare.html to a local folder.")
    path = Path(local_path(out_file))
    path.parent.mkdir(parents=True, exist_ok=True)
    links = (browser_link(a, str(path)), browser_link(b, str(path)))
    path.write_text(compare_html(a, b, inp, codes_a, codes_b, keep, links), encoding="utf-8")
    return str(path)
