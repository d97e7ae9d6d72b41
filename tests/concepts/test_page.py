"""The browser in a real headless Chromium: open a concept, see its shaded contexts, search, sort; compare view."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from evaluator.concepts.build import write_browser
from evaluator.concepts.compare import write_compare
from evaluator.concepts.data import encode_rows, open_run

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "concepts"


class Elements(HTMLParser):
    """Every element as (tag, attrs, text directly inside it), from a dumped DOM."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.items: list[tuple[str, dict[str, str], list[str]]] = []
        self.stack: list[int] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, dict(attrs), []))
        if tag not in ("img", "br", "input", "meta", "link", "rect"):
            self.stack.append(len(self.items) - 1)

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            self.items[self.stack[-1]][2].append(data)

    def with_class(self, cls: str) -> list[tuple[str, dict[str, str], str]]:
        return [(t, a, "".join(x)) for t, a, x in self.items if cls in a.get("class", "").split()]

    def by_id(self, ident: str) -> tuple[str, dict[str, str], str]:
        return next((t, a, "".join(x)) for t, a, x in self.items if a.get("id") == ident)


def load_js(path: Path) -> dict:
    return json.loads(path.read_text().split(" = ", 1)[1].rstrip().rstrip(";"))


def alpha(style: str) -> float:
    """The alpha of a CSS background colour (rgb(...) = 1)."""
    inner = style.split("(", 1)[1].split(")", 1)[0].split(",")
    return float(inner[3]) if len(inner) == 4 else 1.0


@pytest.fixture(scope="module")
def text_site(text_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "concepts"
    page = write_browser(text_runs[0], units=192, top=6, window=3, out=str(out))
    return Path(page)


def test_open_concept_shows_shaded_contexts(text_site, chromium):
    out = text_site.parent
    index = load_js(out / "index.js")
    cards = load_js(out / "cards" / "00000.js")
    cid = max(cards, key=lambda c: (len(cards[c]["examples"]), -int(c)))
    card = cards[cid]
    dom = Elements(chromium.dump_dom(f"{text_site.as_uri()}#concept={cid}"))
    assert dom.by_id("card-title")[2] == f"Concept {cid}"
    toks = dom.with_class("tok")
    want = [t for ex in card["examples"] for t in ex["toks"]]
    assert [text for _t, _a, text in toks] == want
    assert len(dom.with_class("center")) == len(card["examples"])
    shaded = 0
    for (_tag, attrs, _text), act in zip(toks, [a for ex in card["examples"] for a in ex["acts"]]):
        if act is None:                                  # BOS: excluded by the run's filter, no shading
            assert "excluded" in attrs["class"] and "background" not in attrs.get("style", "")
            continue
        assert float(attrs["data-act"]) == pytest.approx(act)
        # background alpha = |activation| / the concept's max activation, clipped to [0, 1]
        assert alpha(attrs["style"]) == pytest.approx(min(1.0, abs(act) / card["max"]), abs=6e-3)  # 8-bit alpha
        shaded += alpha(attrs["style"]) > 0
    assert shaded >= len(card["examples"])               # at least the marked tokens are shaded
    bars = [a for t, a, _ in dom.items if t == "rect" and "bar" in a.get("class", "")]
    assert len(bars) == len(card["hist"])
    assert index["token_joiner"] == " "                  # word-level tokenizer: spaces between tokens
    shot = chromium.screenshot(f"{text_site.as_uri()}#concept={cid}", ARTIFACTS / "text_card.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_by_token_text_and_by_id(text_site, chromium):
    index = load_js(text_site.parent / "index.js")
    tops = index["concepts"]["top"]
    word = next(w for w in ("cat", "dog", "fish", "bird") if 0 < sum(w in t for t in tops) <= 15)
    want = {i for i, t in enumerate(tops) if any(word in s for s in t)}
    dom = Elements(chromium.dump_dom(f"{text_site.as_uri()}#q={word}"))
    rows = {int(a["data-id"]) for _t, a, _x in dom.with_class("row")}
    assert rows == want
    assert dom.by_id("count")[2].startswith(f"{len(want)} concept")
    assert dom.by_id("search")[1].get("value", word) == word
    dom = Elements(chromium.dump_dom(f"{text_site.as_uri()}#q=17"))
    assert [int(a["data-id"]) for _t, a, _x in dom.with_class("row")] == [17]


def test_sort_by_max_activation(text_site, chromium):
    index = load_js(text_site.parent / "index.js")
    maxs = index["concepts"]["max"]
    dom = Elements(chromium.dump_dom(f"{text_site.as_uri()}#sort=max"))
    rows = [int(a["data-id"]) for _t, a, _x in dom.with_class("row")]
    assert len(rows) >= 10
    assert rows == sorted(rows, key=lambda i: (-maxs[i], i))[:len(rows)]
    assert rows[0] == max(range(len(maxs)), key=lambda i: (maxs[i], -i))
    assert [a.get("aria-selected") for _t, a, _x in dom.with_class("row")][0] == "true"


def test_vision_card_overlays_the_mask(vision_run, chromium, tmp_path):
    page = Path(write_browser(vision_run, units=100, top=6, out=str(tmp_path / "concepts")))
    cards = load_js(page.parent / "cards" / "00000.js")
    cid = max(cards, key=lambda c: (cards[c]["max"], c))
    card = cards[cid]
    dom = Elements(chromium.dump_dom(f"{page.as_uri()}#concept={cid}"))
    shown = card["examples"][:5]
    imgs = [a["src"] for t, a, _ in dom.items if t == "img"]
    assert imgs == [ex["img"] for ex in shown]
    patches = [a for t, a, _ in dom.items if t == "rect" and a.get("class") == "patch"]
    assert len(patches) == 196 * len(shown)
    for a, v in zip(patches, [v for ex in shown for v in ex["mask"]]):
        assert float(a["data-act"]) == pytest.approx(v)
        # the veil over a patch: 0.75 · (1 − |activation| / max)
        assert float(a["fill-opacity"]) == pytest.approx(0.75 * (1 - min(1.0, abs(v) / card["max"])), abs=2e-3)
    chromium.screenshot(f"{page.as_uri()}#concept={cid}", ARTIFACTS / "vision_card.png")


def test_compare_counts_active_concepts_per_token(text_runs, tmp_path):
    a, b = (open_run(r) for r in text_runs)
    seq = 5
    out = write_compare(text_runs[0], text_runs[1], seq=seq, out=str(tmp_path / "cmp.html"))
    acts = torch.from_numpy(a.dataset.read(seq * 16, seq * 16 + 16, "acts")).float()
    counts = [(encode_rows(s.sae, acts) != 0).sum(1).tolist() for s in (a, b)]
    dom = Elements(Path(out).read_text())
    body = [x for t, _a, x in dom.items if t == "td"]
    cells = ["".join(x) for x in body]
    per_row = [cells[i:i + 6] for i in range(0, len(cells), 6)]
    assert len(per_row) == 16
    assert [int(r[2]) for r in per_row] == counts[0]
    assert [int(r[3]) for r in per_row] == counts[1]
    assert all(c == 4 for c in counts[0])                   # topk: K = 4 everywhere
    links = [x["href"] for t, x, _ in dom.items if t == "a"]
    pages = [os.path.relpath(Path(r) / "concepts" / "index.html", tmp_path) for r in text_runs]
    assert {link.split("#")[0] for link in links} == set(pages)
    assert all(link.split("#")[1].startswith("concept=") for link in links)
    # the same words given as text go through the dataset's model and give the same rows
    ids = a.dataset.read(seq * 16 + 1, seq * 16 + 16, "token_ids").tolist()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.manifest.model.name)
    text = " ".join(tok.convert_ids_to_tokens(ids))
    out2 = write_compare(text_runs[0], text_runs[1], text=text, out=str(tmp_path / "cmp2.html"))
    cells2 = ["".join(x) for t, _a, x in Elements(Path(out2).read_text()).items if t == "td"]
    assert [int(c) for c in cells2[3::6]] == counts[1]


def test_keyboard_navigation(text_site, devtools):
    index = load_js(text_site.parent / "index.js")
    freq = index["concepts"]["freq"]
    by_freq = sorted(range(index["m"]), key=lambda i: (-freq[i], i))
    page = devtools(text_site.as_uri())
    page.evaluate("document.getElementById('list').focus()")
    for key, code, text in (("j", "KeyJ", "j"), ("j", "KeyJ", "j"), ("ArrowDown", "ArrowDown", None),
                            ("k", "KeyK", "k")):
        page.key(key, code, text)
    selected = page.evaluate("document.querySelector('.row[aria-selected=true]').dataset.id")
    assert int(selected) == by_freq[2]
    assert page.evaluate("document.getElementById('list').getAttribute('aria-activedescendant')") == \
        f"opt-{by_freq[2]}"
    page.key("Enter", "Enter", "\r")
    assert page.wait_for("document.getElementById('card-title') && "
                         "document.getElementById('card-title').textContent") == f"Concept {by_freq[2]}"
    assert f"concept={by_freq[2]}" in page.evaluate("location.hash")
    assert page.evaluate("document.querySelectorAll('#card .tok').length") > 0
    page.key("/", "Slash", "/")
    assert page.evaluate("document.activeElement.id") == "search"
    page.type_text("#7")
    assert page.evaluate("document.getElementById('count').textContent").startswith("1 concept")
    page.key("Escape", "Escape")
    assert page.evaluate("document.activeElement.id") == "list"
