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

// A line over points [{x, y}] (x ascending). Returns {el, update(points, extra)} for live curves.
// extra: more series on a second axis from 0 to 1 at the right (validation accuracy / macro-F1), named
// in a legend:
// [{name, cls, points: [{x, y}], mark?: {x, y, title}}].
export function lineChart({ id, xLabel = "step", yLabel = "loss", width = 640, height = 230, empty = "No points yet." } = {}) {
  const el = h("div", { class: "chart", id });
  const margin = { left: 52, right: 14, top: 12, bottom: 34 };

  function update(points, extra = []) {
    extra = extra.filter((series) => series.points.length);
    margin.right = extra.length ? 40 : 14;
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                           "aria-label": `${yLabel} by ${xLabel}, ${points.length} points` });
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    svg.append(s("line", { class: "axis", x1: margin.left, y1: margin.top + plotH, x2: margin.left + plotW,
                           y2: margin.top + plotH }));
    if (!points.length && !extra.length) {
      svg.append(s("text", { class: "empty-chart", x: margin.left + plotW / 2, y: margin.top + plotH / 2,
                             "text-anchor": "middle" }, empty));
      clear(el, svg);
      el.dataset.points = "0";
      return;
    }
    const xs = [...points, ...extra.flatMap((series) => series.points)].map((p) => p.x);
    const ys = points.length ? points.map((p) => p.y) : [0, 1];
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
    if (extra.length) {
      const R = (y) => margin.top + plotH - y * plotH; // the right axis: 0..1
      for (const t of [0, 0.5, 1]) {
        svg.append(s("text", { class: "tick", x: margin.left + plotW + 6, y: R(t) + 4 }, t.toFixed(1)));
      }
      extra.forEach((series, k) => {
        const path = series.points.map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${R(p.y).toFixed(1)}`).join("");
        svg.append(s("path", { class: `series ${series.cls}`, d: path, "data-series": series.name }));
        for (const p of series.points) {
          svg.append(s("circle", { class: `series-dot ${series.cls}`, cx: X(p.x), cy: R(p.y), r: 3 },
                       s("title", {}, `${xLabel} ${p.x}: ${series.name} ${p.y.toFixed(4)}`)));
        }
        if (series.mark) {
          svg.append(s("circle", { class: "series-best", cx: X(series.mark.x), cy: R(series.mark.y), r: 7 },
                       s("title", {}, series.mark.title)));
        }
        const lx = margin.left + 8 + k * 150;
        svg.append(s("line", { class: `series ${series.cls}`, x1: lx, x2: lx + 18, y1: margin.top + 8, y2: margin.top + 8 }),
                   s("text", { class: "tick", x: lx + 22, y: margin.top + 12 }, series.name));
      });
    }
    clear(el, svg);
    el.dataset.points = String(points.length);
    el.dataset.extraPoints = String(extra.reduce((n, series) => n + series.points.length, 0));
  }

  update([]);
  return { el, update };
}

// The validation series of a loss chart from {step, accuracy, macro_f1} items; the best macro-F1 circled
// (the first of equal ones, as the trainer keeps it) unless bestStep says which step was kept.
export function validationSeries(items, bestStep = null) {
  if (!items.length) return [];
  const best = items.find((v) => v.step === bestStep)
    ?? items.reduce((a, b) => (b.macro_f1 > a.macro_f1 ? b : a));
  return [
    { name: "val accuracy", cls: "val-accuracy", points: items.map((v) => ({ x: v.step, y: v.accuracy })) },
    { name: "val macro-F1", cls: "val-f1", points: items.map((v) => ({ x: v.step, y: v.macro_f1 })),
      mark: { x: best.step, y: best.macro_f1, title: `best: step ${best.step}, macro-F1 ${best.macro_f1.toFixed(4)}` } },
  ];
}
