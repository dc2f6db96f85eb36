// Two hand-built charts: horizontal bars (HTML, so long Chinese names lay out like text) and a line
// (SVG) for loss curves. No library: both are a few dozen lines and need no build step.

import { h, clear } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) if (value != null) el.setAttribute(name, value);
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

// items: [{label, value, display?, tone?, title?}]; max: the value of a full bar (default: the largest).
export function barChart(items, { max, id, format = (v) => String(v) } = {}) {
  const top = max ?? Math.max(1e-9, ...items.map((item) => item.value));
  const el = h("div", { class: "bars", id, role: "list" });
  for (const item of items) {
    const fill = h("div", { class: `bar-fill${item.tone ? ` ${item.tone}` : ""}` });
    fill.style.width = `${Math.max(0, Math.min(1, item.value / top)) * 100}%`;
    el.append(
      h("div", { class: "bar-label", title: item.title || item.label, role: "listitem" }, item.label),
      h("div", { class: "bar-track" }, fill),
      h("div", { class: "bar-value" }, item.display ?? format(item.value)),
    );
  }
  if (!items.length) el.append(h("div", { class: "muted" }, "No data."));
  return el;
}

// The tone of a score in 0..1: red, amber, green.
export function scoreTone(value) {
  if (value == null) return null;
  return value < 0.5 ? "bad" : value < 0.8 ? "mid" : "good";
}

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const step = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => raw <= m) || step * 10;
  const ticks = [];
  for (let t = Math.ceil(lo / nice) * nice; t <= hi + nice * 1e-9; t += nice) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// A line over points [{x, y}] (x ascending). Returns {el, update(points)} for live curves.
export function lineChart({ id, xLabel = "step", yLabel = "loss", width = 640, height = 230, empty = "No points yet." } = {}) {
  const el = h("div", { class: "chart", id });
  const margin = { left: 52, right: 14, top: 12, bottom: 34 };

  function update(points) {
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                           "aria-label": `${yLabel} by ${xLabel}, ${points.length} points` });
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    svg.append(s("line", { class: "axis", x1: margin.left, y1: margin.top + plotH, x2: margin.left + plotW,
                           y2: margin.top + plotH }));
    if (!points.length) {
      svg.append(s("text", { class: "empty-chart", x: margin.left + plotW / 2, y: margin.top + plotH / 2,
                             "text-anchor": "middle" }, empty));
      clear(el, svg);
      el.dataset.points = "0";
      return;
    }
    const xs = points.map((p) => p.x);
    const ys = points.map((p) => p.y);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
    y0 = Math.max(0, y0 - pad);
    y1 += pad;
    const X = (x) => margin.left + ((x - x0) / (x1 - x0)) * plotW;
    const Y = (y) => margin.top + plotH - ((y - y0) / (y1 - y0)) * plotH;

    for (const t of niceTicks(y0, y1, 4)) {
      svg.append(s("line", { class: "grid-line", x1: margin.left, x2: margin.left + plotW, y1: Y(t), y2: Y(t) }),
                 s("text", { class: "tick", x: margin.left - 6, y: Y(t) + 4, "text-anchor": "end" },
                   Math.abs(t) >= 100 ? t.toFixed(0) : t.toFixed(2)));
    }
    for (const t of niceTicks(x0, x1, 6).filter(Number.isInteger)) { // steps are whole numbers
      svg.append(s("text", { class: "tick", x: X(t), y: margin.top + plotH + 16, "text-anchor": "middle" }, t));
    }
    svg.append(s("text", { class: "tick", x: margin.left + plotW, y: height - 2, "text-anchor": "end" }, xLabel),
               s("text", { class: "tick", x: 4, y: margin.top + 2 }, yLabel));
    const d = points.map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join("");
    svg.append(s("path", { class: "series", d }));
    if (points.length <= 60) {
      for (const p of points) svg.append(s("circle", { class: "series-dot", cx: X(p.x), cy: Y(p.y), r: 2.5 },
                                           s("title", {}, `${xLabel} ${p.x}: ${yLabel} ${p.y.toFixed(4)}`)));
    }
    clear(el, svg);
    el.dataset.points = String(points.length);
  }

  update([]);
  return { el, update };
}
