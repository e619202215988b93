"""The memory timeline as one self-contained HTML page: inline SVG and script, no network.

:func:`render` writes the data of a :class:`~remat_kit.report.timeline.MemoryTimeline`
into the page as JSON and draws it in the browser: a stacked area of live bytes by
kind over program order (one policy at a time, switched by buttons, all on one
scale), the peak and the backward pass's start marked, the device's capacity where
the target has one, the schedule's regions (phase and scope: "forward · blocks (scan
body)") under the axis, and a panel listing the buffers of the band under the mouse.
The page opens from disk on an air-gapped machine.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

__all__ = ["COLORS", "render"]

# One color per kind (the PNG uses the same).
COLORS = {
    "parameter": "#4c72b0", "optimizer state": "#8172b3", "input": "#64b5cd", "constant": "#2a9d8f",
    "gradient": "#55a868", "output": "#937860", "activation": "#dd8452",
    "forward temporary": "#f2c45a", "backward temporary": "#c44e52", "temporary": "#da8bc3",
    "other": "#8c8c8c", "packing": "#d9d9d9",
}


def _page_data(mt: Any) -> dict[str, Any]:
  out = []
  for label, t in mt.timelines.items():
    out.append({
        "label": label, "points": t.points, "peak_point": t.peak_point,
        "peak_bytes": t.peak_bytes, "backward": t.backward,
        "kinds": [[k, v] for k, v in t.by_kind.items()],
        "buffers": [[b.start, b.end, b.bytes, b.name, b.op, b.kind,
                     (b.dtype + "[" + ",".join(map(str, b.shape)) + "]") if b.dtype else "",
                     b.source, b.memory] for b in t.buffers],
        "regions": [list(r) for r in t.regions], "ops": [list(r) for r in t.ops]})
  return {"target": mt.target, "capacity": mt.capacity_bytes, "timelines": out,
          "colors": COLORS}


def render(mt: Any, title: str) -> str:
  """The page for ``mt`` (a :class:`~remat_kit.report.timeline.MemoryTimeline`)."""
  data = json.dumps(_page_data(mt), separators=(",", ":")).replace("</", "<\\/")
  return (_PAGE.replace("__TITLE__", html.escape(title))
          .replace("__DATA__", data).replace("__SCRIPT__", _PAGE_SCRIPT))


def _one_line(source: str, comment: str | None = None) -> str:
  """``source`` on one line: each line stripped, joined by a space, ``comment`` lines and
  trailing comments dropped. The template stays readable here; the pages it writes are
  compact (every page would otherwise repeat the same few hundred lines). Safe for this
  template's HTML, CSS and script: no ``<pre>``, no template literals, and no statement
  whose end only a line break marks (the browser tests run the page)."""
  out = []
  for line in source.splitlines():
    if comment:
      line = re.sub(rf"(^|\s){re.escape(comment)}\s.*$", "", line)
    line = line.strip()
    if line:
      out.append(line)
  return " ".join(out)


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px 24px;color:#222}
h1{font-size:18px;margin:0 0 4px}
.sub{color:#666;margin-bottom:10px}
#switch button{font:inherit;margin:0 4px 6px 0;padding:4px 10px;border:1px solid #999;
 background:#f6f6f6;border-radius:4px;cursor:pointer}
#switch button.on{background:#333;color:#fff;border-color:#333}
#wrap{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
#chart{border:1px solid #ddd;background:#fff;flex:none}
#details{width:600px;max-width:100%;max-height:560px;overflow:auto;font-size:12px;
 overflow-wrap:anywhere}
#details table,#summary{border-collapse:collapse}
#details td,#details th,#summary td,#summary th{border-bottom:1px solid #eee;padding:2px 6px;
 text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#legend span{display:inline-block;margin-right:12px;white-space:nowrap}
#legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px}
.band:hover{opacity:.85}
</style></head><body>
<h1>__TITLE__</h1>
<div class="sub" id="sub"></div>
<table id="summary"></table>
<div id="switch"></div>
<label><input type="checkbox" id="packing" checked> show packing (temp memory reserved
 but not in use)</label>
<div id="legend"></div>
<div id="wrap"><svg id="chart" width="960" height="470"></svg>
<div id="details"><p>Hover over a band to list its buffers; click to pin.</p></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
const W = 960, H = 470, L = 70, R = 16, T = 24, B = 70, PW = W - L - R, PH = H - T - B;
const st = {cur: 0, pinned: false, packing: true};
function fmt(n) {
  const u = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [s, v] of u) if (Math.abs(n) >= v) return (n / v).toFixed(2) + " " + s;
  return Math.round(n) + " B";
}
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function esc(s) {
  return String(s == null ? "-" : s).replace(/[&<>"]/g, c => "&#" + c.charCodeAt(0) + ";");
}
function kindsOf(tl) {
  return tl.kinds.filter(([k]) => st.packing || k !== "packing");
}
// Shared scale: the largest total over all policies (the capacity too when it is near).
const TOP = Math.max(...D.timelines.map(t => t.peak_bytes), 1);
const capNear = D.capacity && D.capacity <= 3 * TOP;
const YMAX = 1.08 * (capNear ? Math.max(TOP, D.capacity) : TOP);
function y(v) { return T + PH - PH * v / YMAX; }
function x(tl, t) { return L + PW * t / tl.points; }
function label(runs, t) {
  for (const r of runs) if (r[0] <= t && t <= r[1]) return r[2];
  return "";
}
function stackAt(tl, t) {
  let lo = 0;
  const out = [];
  for (const [k, v] of kindsOf(tl)) { out.push([k, lo, lo + v[t]]); lo += v[t]; }
  return out;
}
function draw() {
  const tl = D.timelines[st.cur], svg = document.getElementById("chart");
  svg.innerHTML = "";
  svg.setAttribute("data-policy", tl.label);
  const n = tl.points;
  // y axis
  for (let i = 0; i <= 5; i++) {
    const v = YMAX * i / 5.4, yy = y(v);
    el("line", {x1: L, x2: L + PW, y1: yy, y2: yy, stroke: "#eee"}, svg);
    el("text", {x: L - 6, y: yy + 4, "text-anchor": "end", "font-size": 11, fill: "#555"},
       svg).textContent = fmt(v);
  }
  // stacked bands: steps over the program points
  let base = new Array(n).fill(0);
  for (const [k, v] of kindsOf(tl)) {
    const up = base.map((b, i) => b + v[i]);
    let d = "M" + x(tl, 0) + "," + y(up[0]);
    for (let i = 0; i < n; i++) {
      if (i && up[i] !== up[i - 1]) d += "V" + y(up[i]);
      if (i === n - 1 || up[i + 1] !== up[i]) d += "H" + x(tl, i + 1);
    }
    d += "V" + y(base[n - 1]);
    for (let i = n - 1; i >= 0; i--) {
      if (i < n - 1 && base[i] !== base[i + 1]) d += "V" + y(base[i]);
      if (i === 0 || base[i - 1] !== base[i]) d += "H" + x(tl, i);
    }
    const p = el("path", {d: d + "Z", fill: D.colors[k] || "#999", class: "band",
                          "data-kind": k}, svg);
    el("title", {}, p).textContent = k;
    base = up;
  }
  // the backward pass's start
  if (tl.backward < n) {
    const bx = x(tl, tl.backward);
    el("line", {x1: bx, x2: bx, y1: T, y2: T + PH, stroke: "#555", "stroke-dasharray": "2,3"},
       svg);
    el("text", {x: bx + 4, y: T + PH - 6, "font-size": 11, fill: "#555"}, svg)
      .textContent = "backward \u2192";
  }
  // capacity
  if (D.capacity) {
    if (capNear) {
      const cy = y(D.capacity);
      el("line", {x1: L, x2: L + PW, y1: cy, y2: cy, stroke: "#b00", "stroke-width": 1.5,
                  "stroke-dasharray": "6,3", id: "capacity"}, svg);
      el("text", {x: L + PW - 4, y: cy - 4, "text-anchor": "end", fill: "#b00",
                  "font-size": 11}, svg).textContent = "device capacity " + fmt(D.capacity);
    } else {
      el("text", {x: L + PW - 4, y: T - 8, "text-anchor": "end", fill: "#b00",
                  "font-size": 11, id: "capacity"}, svg).textContent =
        "device capacity " + fmt(D.capacity) + " (off scale: the peak is " +
        (100 * tl.peak_bytes / D.capacity).toPrecision(2) + "% of it)";
    }
  }
  // the peak
  const px = x(tl, tl.peak_point + 0.5), py = y(tl.peak_bytes);
  el("line", {x1: px, x2: px, y1: py, y2: T + PH, stroke: "#000", "stroke-width": 1.2,
              "stroke-dasharray": "5,3", "pointer-events": "none"}, svg);
  el("circle", {cx: px, cy: py, r: 4, fill: "#000", "pointer-events": "none"}, svg);
  const right = px > L + PW / 2;  // the label on the side with room
  const pl = el("text", {x: right ? px - 6 : px + 6, y: py - 8, "font-size": 12,
                         "text-anchor": right ? "end" : "start",
                         "font-weight": "bold", id: "peak-label",
                         "data-bytes": tl.peak_bytes, "data-point": tl.peak_point}, svg);
  pl.textContent = "peak " + fmt(tl.peak_bytes) + " (" + tl.peak_bytes.toLocaleString("en") +
    " B) at point " + tl.peak_point;
  // x axis and the regions of the schedule
  el("line", {x1: L, x2: L + PW, y1: T + PH, y2: T + PH, stroke: "#333"}, svg);
  for (let i = 0; i <= 8; i++) {
    const t = Math.round(n * i / 8);
    el("text", {x: x(tl, t), y: T + PH + 14, "text-anchor": "middle", "font-size": 10,
                fill: "#555"}, svg).textContent = t;
  }
  el("text", {x: L + PW / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#333"},
     svg).textContent = "program point (the compiled schedule's order)";
  for (const [s, e, lab] of tl.regions) {
    const fill = lab.startsWith("backward") ? "#f4c7a1" : lab.startsWith("forward") ?
      "#b9d3ee" : "#e3e3e3";
    const r = el("rect", {x: x(tl, s), y: T + PH + 20, width: Math.max(x(tl, e + 1) - x(tl, s),
                 0.5), height: 16, fill: fill, stroke: "#fff", "stroke-width": 0.3}, svg);
    el("title", {}, r).textContent = lab + " (points " + s + "-" + e + ")";
    if (x(tl, e + 1) - x(tl, s) > 7 * lab.length)
      el("text", {x: x(tl, s) + 3, y: T + PH + 32, "font-size": 10, fill: "#333",
                  "pointer-events": "none"}, svg).textContent = lab;
  }
  el("rect", {x: L, y: T, width: PW, height: PH, fill: "transparent", id: "hit"}, svg);
  legend(tl);
  summary();
  if (!st.pinned)
    document.getElementById("details").innerHTML =
      "<p>Hover over a band to list its buffers; click to pin.</p>";
}
function legend(tl) {
  const at = stackAt(tl, tl.peak_point);
  document.getElementById("legend").innerHTML = at.slice().reverse()
    .filter(([, lo, hi]) => hi > lo).map(([k, lo, hi]) =>
    "<span><i style='background:" + (D.colors[k] || "#999") + "'></i>" + esc(k) + " " +
    fmt(hi - lo) + "</span>").join("") + "<span>(at the peak)</span>";
}
function summary() {
  const first = D.timelines[0].peak_bytes;
  let h = "<tr><th>policy</th><th>peak</th><th>live at peak</th><th>saved residuals at " +
    "peak</th><th>vs " + esc(D.timelines[0].label) + "</th></tr>";
  for (const tl of D.timelines) {
    const at = Object.fromEntries(tl.kinds.map(([k, v]) => [k, v[tl.peak_point]]));
    const pack = at["packing"] || 0;
    h += "<tr><td>" + esc(tl.label) + "</td><td class=num>" + fmt(tl.peak_bytes) +
      "</td><td class=num>" + fmt(tl.peak_bytes - pack) + "</td><td class=num>" +
      fmt(at["activation"] || 0) + "</td><td class=num>" +
      (tl.peak_bytes / first).toFixed(2) + "x</td></tr>";
  }
  document.getElementById("summary").innerHTML = h;
}
function pointAt(tl, mx) {
  return Math.max(0, Math.min(tl.points - 1, Math.floor((mx - L) / PW * tl.points)));
}
function show(t, kind) {
  const tl = D.timelines[st.cur];
  const [, lo, hi] = stackAt(tl, t).find(s => s[0] === kind) || [kind, 0, 0];
  const bufs = tl.buffers.filter(b => b[0] <= t && t <= b[1] && b[5] === kind)
    .sort((a, b) => b[2] - a[2]);
  let h = "<p><b>" + esc(kind) + "</b>: " + fmt(hi - lo) + " at point " + t + " (" +
    esc(label(tl.ops, t)) + ")" + (t === tl.peak_point ? " <b>(the peak)</b>" : "") + "</p>";
  if (kind === "packing") {
    h += "<p>Temp memory the runtime reserves for the step that the compiler's packing " +
      "leaves unused at this point.</p>";
  } else {
    h += "<table><tr><th>bytes</th><th>name (or op)</th><th>shape</th><th>source</th>" +
      "<th>live</th></tr>";
    for (const b of bufs.slice(0, 200))
      h += "<tr class=buf title='" + esc(b[5] + ", op " + b[4]) + "'><td class=num>" +
        fmt(b[2]) + "</td><td class=bname>" + esc(b[3] || b[4]) + "</td><td>" + esc(b[6]) +
        (b[8] !== "device" ? " (" + esc(b[8]) + ")" : "") + "</td><td>" +
        esc(b[7]) + "</td><td class=num>" + b[0] + "-" + b[1] + "</td></tr>";
    h += "</table>";
    if (bufs.length > 200) h += "<p>and " + (bufs.length - 200) + " more</p>";
  }
  document.getElementById("details").innerHTML = h;
}
function hover(ev, click) {
  const tl = D.timelines[st.cur], svg = document.getElementById("chart");
  const r = svg.getBoundingClientRect();
  const mx = ev.clientX - r.left, my = ev.clientY - r.top;
  if (mx < L || mx > L + PW || my < T || my > T + PH) return;
  const t = pointAt(tl, mx), v = (T + PH - my) / PH * YMAX;
  const band = stackAt(tl, t).find(([, lo, hi]) => lo <= v && v < hi);
  if (!band) return;
  if (click) st.pinned = !st.pinned;
  else if (st.pinned) return;
  show(t, band[0]);
}
// For tests and scripts: where a band lies on the screen.
window.rkTimeline = {
  data: D, state: st,
  bandCenter(t, kind) {
    const tl = D.timelines[st.cur], svg = document.getElementById("chart");
    const r = svg.getBoundingClientRect();
    const s = stackAt(tl, t).find(b => b[0] === kind);
    return {x: r.left + x(tl, t + 0.5), y: r.top + y((s[1] + s[2]) / 2)};
  },
};
const sw = document.getElementById("switch");
D.timelines.forEach((tl, i) => {
  const b = document.createElement("button");
  b.textContent = tl.label + " \u00b7 " + fmt(tl.peak_bytes);
  b.dataset.index = i;
  b.className = "policy" + (i === 0 ? " on" : "");
  b.onclick = () => {
    st.cur = i; st.pinned = false;
    for (const o of sw.children) o.classList.toggle("on", o === b);
    draw();
  };
  sw.appendChild(b);
});
document.getElementById("packing").onchange = e => { st.packing = e.target.checked; draw(); };
const svgEl = document.getElementById("chart");
svgEl.addEventListener("mousemove", e => hover(e, false));
svgEl.addEventListener("click", e => hover(e, true));
document.getElementById("sub").textContent = "target " + D.target +
  (D.capacity ? " \u00b7 device memory " + fmt(D.capacity) : "") +
  " \u00b7 bytes live at each point of the compiled schedule, by kind (remat_kit)";
draw();
"""


_PAGE = _one_line(_TEMPLATE) + "\n"
_PAGE_SCRIPT = _one_line(_SCRIPT, comment="//")
