"""The page at ``GET /``: one HTML file with its CSS and JavaScript inline; no build step, no external assets.

A person drops or picks images; each goes to ``POST /predict?map=png`` and comes back as a card with the
verdict, the score against the threshold and the heat map over the image; a canvas charts recent scores.
"""

from __future__ import annotations

import html
import json

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>mhpc serve: __TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.3rem;margin:0 0 .3rem}
#meta{color:#555;font-size:.9rem;margin-bottom:1rem}
#drop{display:block;max-width:680px;border:2px dashed #888;border-radius:8px;padding:1.5rem;text-align:center;background:#fff;cursor:pointer}
#drop.over{border-color:#1565c0;background:#e3f2fd}
#chart{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1rem 0;width:100%;max-width:720px;height:180px}
#results{display:flex;flex-wrap:wrap;gap:1rem}
.result{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.7rem;width:260px}
.result img{width:100%;image-rendering:auto;border-radius:4px}
.verdict{font-weight:700;font-size:1.1rem}
.verdict.anomaly{color:#c62828}.verdict.ok{color:#2e7d32}.verdict.unknown{color:#555}.verdict.error{color:#c62828}
.bar{position:relative;height:10px;background:#eee;border-radius:5px;margin:.4rem 0}
.bar .fill{position:absolute;left:0;top:0;bottom:0;border-radius:5px;background:#1565c0}
.bar .mark{position:absolute;top:-3px;bottom:-3px;width:2px;background:#222;left:50%}
.small{font-size:.8rem;color:#555;word-break:break-all}
</style></head>
<body>
<h1>mhpc serve: <span id="name">__TITLE__</span></h1>
<div id="meta">loading the model's description&hellip;</div>
<label id="drop">Drop images here, or click to pick them
<input id="pick" type="file" accept="image/*" multiple hidden></label>
<canvas id="chart" width="720" height="180" aria-label="recent scores"></canvas>
<div id="results"></div>
<script>
"use strict";
const NAME = __NAME__;
const recent = [];          // recent scores, oldest first, for the chart
window.mhpcScores = recent; // read by the browser test
let threshold = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function loadMeta() {
  try {
    const r = await fetch("v2/models/" + encodeURIComponent(NAME));
    const m = await r.json();
    const p = m.parameters || {};
    threshold = p.threshold;
    const live = p.live_model || {};
    document.getElementById("meta").textContent =
      "threshold " + (threshold === null ? "none (no verdicts)" : threshold.toPrecision(4)) +
      " \u00b7 engine " + live.engine + " \u00b7 model " + String(live.sha256).slice(0, 12) +
      " \u00b7 " + live.n_train_images + " training images \u00b7 saved " + live.saved;
  } catch (e) {
    document.getElementById("meta").textContent = "cannot read the model's description: " + e;
  }
}

function drawChart() {
  const c = document.getElementById("chart"), g = c.getContext("2d");
  const w = c.width, h = c.height, pad = 28;
  g.clearRect(0, 0, w, h);
  g.font = "11px sans-serif"; g.fillStyle = "#555";
  if (!recent.length) { g.fillText("recent scores appear here", pad, h / 2); return; }
  const seen = threshold === null ? recent : recent.concat([threshold]);
  let lo = Math.min(...seen), hi = Math.max(...seen);
  const span = (hi - lo) || Math.abs(hi) || 1;
  lo -= 0.15 * span; hi += 0.15 * span;
  const y = v => h - pad + (pad * 2 - h) * ((v - lo) / (hi - lo));
  const x = i => pad + (w - 2 * pad) * (recent.length === 1 ? 0.5 : i / (recent.length - 1));
  g.strokeStyle = "#ccc"; g.beginPath(); g.moveTo(pad, h - pad); g.lineTo(w - pad, h - pad); g.stroke();
  g.fillText(lo.toPrecision(3), 2, h - pad + 14); g.fillText(hi.toPrecision(3), 2, pad - 6);
  if (threshold !== null) {
    g.strokeStyle = "#c62828"; g.setLineDash([5, 4]); g.beginPath();
    g.moveTo(pad, y(threshold)); g.lineTo(w - pad, y(threshold)); g.stroke(); g.setLineDash([]);
    g.fillStyle = "#c62828"; g.fillText("threshold", w - pad - 52, y(threshold) - 4);
  }
  g.strokeStyle = "#1565c0"; g.beginPath();
  recent.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v)))); g.stroke();
  recent.forEach((v, i) => {
    g.fillStyle = threshold !== null && v >= threshold ? "#c62828" : "#2e7d32";
    g.beginPath(); g.arc(x(i), y(v), 3, 0, 2 * Math.PI); g.fill();
  });
}

function card(file) {
  const box = el("div", "result");
  box.appendChild(el("div", "small name", file.name));
  const verdict = el("div", "verdict pending", "scoring\u2026");
  box.appendChild(verdict);
  document.getElementById("results").prepend(box);
  return {box, verdict};
}

async function score(file) {
  const {box, verdict} = card(file);
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    const r = await fetch("predict?map=png", {method: "POST", body: form});
    body = await r.json();
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
  } catch (e) {
    verdict.className = "verdict error"; verdict.textContent = "error: " + e.message; return;
  }
  const res = body.results[0];
  if (res.error) { verdict.className = "verdict error"; verdict.textContent = "error: " + res.error; return; }
  const t = res.threshold;
  verdict.className = "verdict " + (res.is_anomaly === null ? "unknown" : res.is_anomaly ? "anomaly" : "ok");
  verdict.textContent = res.is_anomaly === null ? "no threshold" : res.is_anomaly ? "ANOMALY" : "OK";
  const line = el("div", "score", "score " + res.score.toPrecision(4) +
                  (t === null ? "" : " vs threshold " + t.toPrecision(4)));
  box.appendChild(line);
  if (t !== null) {  // the threshold mark sits mid-bar, as in the heat map's colour scale (0 .. 2x threshold)
    const bar = el("div", "bar"), fill = el("div", "fill"), mark = el("div", "mark");
    fill.style.width = Math.min(100, 50 * res.score / t) + "%";
    if (res.is_anomaly) fill.style.background = "#c62828";
    bar.append(fill, mark); box.appendChild(bar);
  }
  const img = el("img", "overlay");
  img.alt = "heat map over " + res.filename;
  img.src = "data:image/png;base64," + res.overlay_png;
  box.appendChild(img);
  box.appendChild(el("div", "small", res.width + "\u00d7" + res.height + " px \u00b7 " +
                     (1000 * res.time_s).toFixed(0) + " ms \u00b7 model " + body.model_sha256.slice(0, 12)));
  recent.push(res.score);
  if (recent.length > 50) recent.shift();
  drawChart();
}

function take(files) { for (const f of files) score(f); }
const drop = document.getElementById("drop"), pick = document.getElementById("pick");
pick.addEventListener("change", () => { take(pick.files); pick.value = ""; });
["dragenter", "dragover"].forEach(ev => drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(ev => drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", e => take(e.dataTransfer.files));
loadMeta().then(drawChart);
</script>
</body></html>
"""


def render_page(name: str) -> str:
    """The page for the model ``name`` (escaped for HTML and for the script)."""
    return _PAGE.replace("__TITLE__", html.escape(name)).replace("__NAME__", json.dumps(name).replace("<", "\\u003c"))
