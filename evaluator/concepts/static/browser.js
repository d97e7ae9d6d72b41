/* dynsae concept browser. Static, no network: the index arrives as window.__index (index.js),
 * card shards as window.__cards_<k> (cards/<k>.js, loaded by a script tag on demand, because
 * fetch() of file:// URLs is blocked in Chromium). State lives in the URL hash:
 *   #concept=<id>&q=<search>&sort=<freq|max|mean|id>&view=<list|card>
 * Keys: ArrowUp/ArrowDown or k/j move in the list, Enter opens, / focuses search, Escape back to list. */
(function () {
  "use strict";
  var IDX = window.__index;
  var C = IDX.concepts;
  var ROW_H = 28;
  var DIM = 0.75;        // opacity of the dark veil over a patch where the concept is silent
  var state = { concept: null, q: "", sort: "freq", view: "list" };
  var order = [];        // concept ids currently listed (filtered + sorted)
  var cursor = 0;        // index into order of the selected row
  var shardWaiters = {};

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) { for (var k in attrs) { e.setAttribute(k, attrs[k]); } }
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) { return "–"; }
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) { return v.toExponential(2); }
    return String(Number(v.toPrecision(3)));
  }
  function pct(v) { return v === null ? "–" : (100 * v < 0.01 && v > 0 ? (100 * v).toExponential(1) : (100 * v).toPrecision(3)) + "%"; }

  /* ---------------------------------------------------------------- hash state */
  function readHash() {
    var h = location.hash.replace(/^#/, "");
    h.split("&").forEach(function (kv) {
      if (!kv) { return; }
      var i = kv.indexOf("=");
      var k = decodeURIComponent(i < 0 ? kv : kv.slice(0, i));
      var v = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
      if (k === "concept") { var n = parseInt(v, 10); state.concept = isNaN(n) ? null : n; }
      else if (k === "q") { state.q = v; }
      else if (k === "sort" && ["freq", "max", "mean", "id"].indexOf(v) >= 0) { state.sort = v; }
      else if (k === "view" && ["list", "card"].indexOf(v) >= 0) { state.view = v; }
    });
    if (state.concept !== null && !/(^|&)view=/.test(h)) { state.view = "card"; }
  }
  function writeHash() {
    var parts = [];
    if (state.concept !== null) { parts.push("concept=" + state.concept); }
    if (state.q) { parts.push("q=" + encodeURIComponent(state.q)); }
    if (state.sort !== "freq") { parts.push("sort=" + state.sort); }
    parts.push("view=" + state.view);
    history.replaceState(null, "", "#" + parts.join("&"));
  }

  /* ---------------------------------------------------------------- list */
  function matches(id, q) {
    if (!q) { return true; }
    var m = /^#?(\d+)$/.exec(q.trim());
    if (m) { return String(id) === m[1]; }
    var needle = q.toLowerCase();
    var tops = C.top[id] || [];
    for (var i = 0; i < tops.length; i++) {
      if (String(tops[i]).toLowerCase().indexOf(needle) >= 0) { return true; }
    }
    return false;
  }
  function rebuild() {
    var q = state.q;
    order = [];
    for (var i = 0; i < IDX.m; i++) { if (matches(i, q)) { order.push(i); } }
    var key = state.sort;
    if (key !== "id") {
      var col = C[key];
      order.sort(function (a, b) { return (col[b] || 0) - (col[a] || 0) || a - b; });
    }
    $("count").textContent = order.length + (order.length === 1 ? " concept" : " concepts") +
      (q ? " match “" + q + "”" : "") + ", sorted by " + key;
    $("spacer").style.height = (order.length * ROW_H) + "px";
    var at = state.concept === null ? -1 : order.indexOf(state.concept);
    cursor = at >= 0 ? at : 0;
    renderRows(true);
  }
  function rowLabel(id) {
    return "concept " + id + ", frequency " + pct(C.freq[id]) + ", max " + fmt(C.max[id]) +
      ((C.top[id] || []).length ? ", top: " + C.top[id].join(" ") : "");
  }
  function renderRows(scrollToCursor) {
    var list = $("list"), spacer = $("spacer");
    if (scrollToCursor && order.length) {
      var y = cursor * ROW_H;
      if (y < list.scrollTop || y + ROW_H > list.scrollTop + list.clientHeight) {
        list.scrollTop = Math.max(0, y - list.clientHeight / 2);
      }
    }
    var first = Math.max(0, Math.floor(list.scrollTop / ROW_H) - 5);
    var last = Math.min(order.length, first + Math.ceil((list.clientHeight || 600) / ROW_H) + 10);
    spacer.textContent = "";
    for (var i = first; i < last; i++) {
      var id = order[i];
      var r = el("div", { "class": "row", role: "option", id: "opt-" + id, "data-id": String(id),
                          "aria-selected": i === cursor ? "true" : "false", "aria-label": rowLabel(id) });
      r.style.top = (i * ROW_H) + "px";
      r.appendChild(el("span", { "class": "cid" }, "#" + id));
      r.appendChild(el("span", { "class": "num", title: "firing frequency" }, pct(C.freq[id])));
      r.appendChild(el("span", { "class": "num", title: "max activation" }, fmt(C.max[id])));
      r.appendChild(el("span", { "class": "tops" }, (C.top[id] || []).map(JSON.stringify).join(" ")));
      spacer.appendChild(r);
    }
    if (order.length) { list.setAttribute("aria-activedescendant", "opt-" + order[cursor]); }
    else { list.removeAttribute("aria-activedescendant"); }
  }
  function move(delta) {
    if (!order.length) { return; }
    cursor = Math.max(0, Math.min(order.length - 1, cursor + delta));
    renderRows(true);
  }

  /* ---------------------------------------------------------------- cards */
  function withCard(id, fn) {
    var shard = Math.floor(id / IDX.shard_size);
    var name = "__cards_" + shard;
    if (window[name]) { fn(window[name][String(id)]); return; }
    if (shardWaiters[shard]) { shardWaiters[shard].push(function () { fn(window[name][String(id)]); }); return; }
    shardWaiters[shard] = [function () { fn(window[name][String(id)]); }];
    var s = document.createElement("script");
    s.src = "cards/" + ("0000" + shard).slice(-5) + ".js";
    s.onload = function () { var w = shardWaiters[shard]; shardWaiters[shard] = null; w.forEach(function (f) { f(); }); };
    s.onerror = function () { $("card").textContent = "Could not load " + s.src + "."; };
    document.head.appendChild(s);
  }
  function shade(v, scale) {
    if (v === null || v === undefined || !scale) { return null; }
    var a = Math.max(0, Math.min(1, Math.abs(v) / scale));
    a = Math.round(a * 1000) / 1000;
    return v >= 0 ? "rgba(255, 140, 0, " + a + ")" : "rgba(60, 120, 220, " + a + ")";
  }
  function histogram(bars) {
    var W = 360, H = 90, pad = 14;
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", W); svg.setAttribute("height", H + pad + 4);
    svg.setAttribute("role", "img");
    var total = bars.reduce(function (s, b) { return s + b[2]; }, 0);
    svg.setAttribute("aria-label", "histogram of " + total + " non-zero activations from " +
      (bars.length ? fmt(bars[0][0]) + " to " + fmt(bars[bars.length - 1][1]) : "none") + ", log-spaced bins");
    if (!bars.length) { return svg; }
    var maxc = Math.max.apply(null, bars.map(function (b) { return b[2]; }));
    var w = W / bars.length;
    bars.forEach(function (b, i) {
      var h = maxc ? Math.max(b[2] ? 1 : 0, H * b[2] / maxc) : 0;
      var r = document.createElementNS(svg.namespaceURI, "rect");
      r.setAttribute("class", b[0] < 0 ? "bar neg" : "bar");
      r.setAttribute("x", (i * w + 0.5).toFixed(1)); r.setAttribute("width", Math.max(1, w - 1).toFixed(1));
      r.setAttribute("y", (H - h).toFixed(1)); r.setAttribute("height", h.toFixed(1));
      var t = document.createElementNS(svg.namespaceURI, "title");
      t.textContent = "[" + fmt(b[0]) + ", " + fmt(b[1]) + "): " + b[2];
      r.appendChild(t); svg.appendChild(r);
    });
    [[0, bars[0][0], "start"], [W, bars[bars.length - 1][1], "end"]].forEach(function (p) {
      var t = document.createElementNS(svg.namespaceURI, "text");
      t.setAttribute("x", p[0]); t.setAttribute("y", H + pad); t.setAttribute("text-anchor", p[2]);
      t.textContent = fmt(p[1]); svg.appendChild(t);
    });
    return svg;
  }
  function textExamples(card, scale) {
    var ol = el("ol", { "class": "examples" });
    card.examples.forEach(function (ex) {
      var li = el("li");
      li.appendChild(el("span", { "class": "ex-act", title: "activation at the marked token" }, fmt(ex.act)));
      var ctx = el("span", { "class": "ctx", "aria-label": "context of sequence " + ex.seq + " position " + ex.pos });
      ex.toks.forEach(function (t, i) {
        var v = ex.acts[i];
        if (i && IDX.token_joiner) { ctx.appendChild(document.createTextNode(IDX.token_joiner)); }
        var s = el("span", { "class": "tok" + (i === ex.center ? " center" : "") + (v === null ? " excluded" : ""),
                             "data-act": v === null ? "" : String(v),
                             title: v === null ? "excluded by the run's row filter" : "activation " + fmt(v) }, t);
        var bg = shade(v, scale);
        if (bg) { s.style.background = bg; }
        ctx.appendChild(s);
      });
      li.appendChild(ctx);
      ol.appendChild(li);
    });
    return ol;
  }
  function imageExamples(card, scale) {
    var box = el("div", { "class": "images" });
    card.examples.slice(0, IDX.images || 5).forEach(function (ex) {
      var fig = el("figure");
      var frame = el("div", { "class": "frame" });
      if (ex.img) { frame.appendChild(el("img", { src: ex.img, alt: "image " + ex.seq + (ex.label ? " (" + ex.label + ")" : "") })); }
      var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      var gw = ex.grid[1], gh = ex.grid[0];
      svg.setAttribute("viewBox", "0 0 " + gw + " " + gh); svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("class", "mask"); svg.setAttribute("aria-hidden", "true"); svg.setAttribute("shape-rendering", "crispEdges");
      ex.mask.forEach(function (v, i) {
        var r = document.createElementNS(svg.namespaceURI, "rect");
        r.setAttribute("x", i % gw); r.setAttribute("y", Math.floor(i / gw)); r.setAttribute("width", 1); r.setAttribute("height", 1);
        r.setAttribute("class", "patch"); r.setAttribute("data-act", String(v));
        // mask: patches are dimmed by 1 - |activation| / max, so the activating patches stay bright
        var a = scale ? Math.min(1, Math.abs(v) / scale) : 0;
        r.setAttribute("fill", "rgb(0, 0, 0)");
        r.setAttribute("fill-opacity", (DIM * (1 - a)).toFixed(3));
        svg.appendChild(r);
      });
      frame.appendChild(svg);
      fig.appendChild(frame);
      fig.appendChild(el("figcaption", null, "image " + ex.seq + (ex.label ? " · " + ex.label : "") + " · max " + fmt(ex.act) +
        (ex.img ? "" : " · (image file not found)")));
      box.appendChild(fig);
    });
    return box;
  }
  function renderCard(id) {
    var pane = $("card");
    pane.textContent = "Loading concept " + id + "…";
    withCard(id, function (card) {
      pane.textContent = "";
      if (!card) { pane.textContent = "Concept " + id + " is not in this browser."; return; }
      var h = el("h2", { id: "card-title", tabindex: "-1" }, "Concept " + id);
      pane.appendChild(h);
      var dl = el("dl", { "class": "facts" });
      [["frequency", pct(card.freq)], ["fires", String(card.fires)], ["mean when firing", fmt(card.mean)],
       ["max", fmt(card.max)]].forEach(function (p) { dl.appendChild(el("dt", null, p[0])); dl.appendChild(el("dd", null, p[1])); });
      pane.appendChild(dl);
      pane.appendChild(el("h3", null, "Activation histogram (non-zero values)"));
      pane.appendChild(histogram(card.hist || []));
      if (card.logit_lens && card.logit_lens.length) {
        pane.appendChild(el("h3", null, "Promoted tokens (logit lens)"));
        pane.appendChild(el("p", { "class": "ctx" }, card.logit_lens.map(function (p) { return JSON.stringify(p[0]); }).join("  ")));
      }
      var scale = card.max > 0 ? card.max : Math.max.apply(null, [1e-12].concat(card.examples.map(function (e) { return Math.abs(e.act || 0); })));
      if (IDX.kind === "vision") {
        pane.appendChild(el("h3", null, "Top images (mask = activation per patch)"));
        pane.appendChild(imageExamples(card, scale));
      } else {
        pane.appendChild(el("h3", null, "Top activating contexts (shading = this concept's activation)"));
        if (!card.examples.length) { pane.appendChild(el("p", null, "This concept never fired on the streamed tokens.")); }
        pane.appendChild(textExamples(card, scale));
      }
      document.title = "Concept " + id + " · " + IDX.title;
      pane.setAttribute("data-loaded", String(id));
    });
  }

  /* ---------------------------------------------------------------- wiring */
  function openConcept(id, focusCard) {
    state.concept = id; state.view = "card";
    writeHash(); renderCard(id);
    if (focusCard) { $("card").focus(); }
  }
  function init() {
    readHash();
    $("search").value = state.q;
    $("sort").value = state.sort;
    rebuild();
    if (state.view === "card" && state.concept !== null) { renderCard(state.concept); }
    $("search").addEventListener("input", function () { state.q = this.value; state.concept = null; rebuild(); writeHash(); });
    $("sort").addEventListener("change", function () { state.sort = this.value; rebuild(); writeHash(); });
    $("list").addEventListener("scroll", function () { renderRows(false); });
    $("list").addEventListener("click", function (e) {
      var r = e.target.closest(".row"); if (!r) { return; }
      var id = parseInt(r.getAttribute("data-id"), 10);
      cursor = order.indexOf(id); renderRows(false); openConcept(id, false);
    });
    $("list").addEventListener("keydown", function (e) {
      if (e.key === "ArrowDown" || e.key === "j") { move(1); e.preventDefault(); }
      else if (e.key === "ArrowUp" || e.key === "k") { move(-1); e.preventDefault(); }
      else if (e.key === "PageDown") { move(10); e.preventDefault(); }
      else if (e.key === "PageUp") { move(-10); e.preventDefault(); }
      else if (e.key === "Home") { move(-order.length); e.preventDefault(); }
      else if (e.key === "End") { move(order.length); e.preventDefault(); }
      else if (e.key === "Enter" && order.length) { openConcept(order[cursor], false); e.preventDefault(); }
    });
    $("search").addEventListener("keydown", function (e) {
      if (e.key === "ArrowDown" || e.key === "Enter") { $("list").focus(); if (e.key === "Enter" && order.length) { openConcept(order[cursor], false); } e.preventDefault(); }
    });
    document.addEventListener("keydown", function (e) {
      var typing = /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName);
      if (e.key === "/" && !typing) { $("search").focus(); $("search").select(); e.preventDefault(); }
      else if (e.key === "Escape") { state.view = "list"; writeHash(); $("list").focus(); }
    });
    window.addEventListener("hashchange", function () {
      var before = state.concept; readHash();
      if ($("search").value !== state.q) { $("search").value = state.q; rebuild(); }
      if (state.concept !== null && state.concept !== before) { renderCard(state.concept); }
    });
  }
  init();
})();
