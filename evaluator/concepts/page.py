"""Writing the static concept browser: ``index.html`` + ``index.js``/``index.json`` + card shards.

Layout of ``<run_dir>/concepts/`` (open ``index.html`` from disk, no server, no network)::

    index.html          the page; CSS and JS inlined (static/browser.css, static/browser.js)
    index.json          the index (below), for programs
    index.js            the same index as ``window.__index = {...};`` (file:// blocks fetch())
    cards/00000.js      ``window.__cards_0 = {"0": card, ..., "255": card};`` — SHARD_SIZE concepts
                        per shard, loaded by a script tag when a concept of that shard is opened
    images/<seq>.jpg    (vision) square thumbnails of the top images, cropped as the model saw them

Index: ``{"version", "title", "kind": "text"|"vision", "run", "dataset", "model", "hook", "sae"
(variant, m, k, activation, input_norm), "split", "filter", "m", "rows" (kept rows), "units"
(tokens or images streamed), "top", "window", "images" (vision: images shown per card),
"shard_size", "shards", "tokenizer_note" (why tokens are ids, or null), "token_joiner",
"concepts": {"freq": [M], "fires": [M], "mean": [M], "max": [M], "top": [M × [str]]}}``
(columnar, one entry per concept id). Card: ``{"id", "freq", "fires", "mean", "max", "hist":
[[lo, hi, count], ...], "top_tokens", "examples": [...], "logit_lens"?}`` with text examples
``{"act", "seq", "pos", "row", "center", "toks": [str], "acts": [float|null]}`` and vision
examples ``{"act", "seq", "label"}``, the first ``images`` of them also ``{"img", "grid": [h, w],
"mask": [h·w floats]}``. Activations are rounded to 4 (scores) or 3 (contexts, masks)
significant digits; ``null`` marks a row excluded by the run's filter.
"""

from __future__ import annotations

import contextlib
import html
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SHARD_SIZE = 256
STATIC = Path(__file__).with_name("static")


def static_text(name: str) -> str:
    """Contents of a file shipped in ``static/``."""
    return (STATIC / name).read_text(encoding="utf-8")


def script_safe(text: str) -> str:
    """JSON text that is safe inside a ``<script>`` element (no ``</script>`` or ``<!--``)."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def js_assign(name: str, data: Any) -> str:
    """``window.<name> = <json>;`` (compact JSON, NaN-free)."""
    return f"window.{name} = {json.dumps(data, separators=(',', ':'), allow_nan=False)};\n"


def shard_name(shard: int) -> str:
    """File name of card shard ``shard``."""
    return f"{shard:05d}.js"


def write_shards(out: Path, cards: list[dict[str, Any]], shard_size: int = SHARD_SIZE) -> int:
    """Write ``cards/<k>.js`` files; returns the number of shards."""
    folder = out / "cards"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for start in range(0, len(cards), shard_size):
        shard = start // shard_size
        chunk = {str(card["id"]): card for card in cards[start:start + shard_size]}
        (folder / shard_name(shard)).write_text(js_assign(f"__cards_{shard}", chunk), encoding="utf-8")
        n += 1
    return n


def page_html(index: dict[str, Any]) -> str:
    """The browser page with inlined CSS and JS; the index itself comes from ``index.js``."""
    title = html.escape(index["title"])
    note = ""
    if index.get("tokenizer_note"):
        note = f'<p class="note" role="note">{html.escape(index["tokenizer_note"])}</p>'
    facts = (f'{index["m"]} concepts · {index["units"]} {"images" if index["kind"] == "vision" else "tokens"} '
             f'of the {html.escape(index["split"])} split · row filter: {html.escape(index["filter"])} · '
             f'dataset {html.escape(index["dataset"])}')
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'self' 'unsafe-inline' data:; connect-src 'none'">
<title>{title}</title>
<style>
{static_text("browser.css")}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>{facts}</p>
{note}
</header>
<main>
<nav id="side" aria-label="Concepts">
<div id="controls">
<label for="search">Search by concept id (e.g. 42) or token text</label>
<input id="search" type="search" autocomplete="off" aria-describedby="keys">
<label for="sort">Sort by</label>
<select id="sort">
<option value="freq">firing frequency</option>
<option value="max">max activation</option>
<option value="mean">mean activation when firing</option>
<option value="id">concept id</option>
</select>
<p id="count" role="status" aria-live="polite"></p>
<p id="keys" class="help"><span class="kbd">/</span> search · <span class="kbd">↑</span><span class="kbd">↓</span>
or <span class="kbd">k</span><span class="kbd">j</span> move · <span class="kbd">Enter</span> open ·
<span class="kbd">Esc</span> back to list</p>
</div>
<div id="list" role="listbox" tabindex="0" aria-label="Concept list"><div id="spacer"></div></div>
</nav>
<section id="card" aria-live="polite" aria-label="Concept card" tabindex="-1">
<p>Choose a concept from the list (Enter opens it).</p>
</section>
</main>
<script src="index.js"></script>
<script>
{script_safe(static_text("browser.js"))}
</script>
</body>
</html>
"""


def write_site(out: Path, index: dict[str, Any], cards: list[dict[str, Any]]) -> Path:
    """Write the page, the index and the card shards into ``out`` (created); returns index.html's path."""
    out.mkdir(parents=True, exist_ok=True)
    index = dict(index, version=FORMAT_VERSION, shard_size=SHARD_SIZE)
    index["shards"] = write_shards(out, cards)
    (out / "index.json").write_text(json.dumps(index, separators=(",", ":"), allow_nan=False), encoding="utf-8")
    (out / "index.js").write_text(js_assign("__index", index), encoding="utf-8")
    page = out / "index.html"
    page.write_text(page_html(index), encoding="utf-8")
    return page


def publish(local_dir: Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a finished local folder to ``url`` (any fsspec URL); a no-op when ``url`` is that folder."""
    from store.io import put_dir

    put_dir(str(local_dir), url, storage_options)


@contextlib.contextmanager
def staging_dir(url: str) -> Iterator[Path]:
    """The local folder to write into: ``url`` itself when local, else a temporary folder removed on exit."""
    from store.io import is_local, local_path

    if is_local(url):
        yield Path(local_path(url))
        return
    with tempfile.TemporaryDirectory(prefix="concepts-") as folder:
        yield Path(folder)
