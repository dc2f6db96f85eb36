// Reports: metric cards, the fine-tuned model beside the TF-IDF baseline (lift), calibration (ECE and the
// reliability diagram), confusion matrix, per-class F1 (worst first), confused pairs, wrong predictions,
// and two reports side by side.

import { api, blobUrl } from "../api.js";
import { barChart, scoreTone } from "../charts.js";
import { card, clear, fmt, h, pageHead, pagedTable, panel, shortId } from "../dom.js";

function metricCards(r, id) {
  const m = r.metrics;
  const failed = m.n_failed ?? 0;
  return h("div", { class: "cards", id },
           card("Accuracy", fmt.metric(m.accuracy), { tone: toneOf(m.accuracy), id: "accuracy" }),
           card("Macro-F1", fmt.metric(m.macro_f1), { tone: toneOf(m.macro_f1), id: "macro_f1" }),
           card("Weighted F1", fmt.metric(m.weighted_f1), { tone: toneOf(m.weighted_f1), id: "weighted_f1" }),
           card("Unparseable", fmt.num(failed), { tone: failed ? "bad" : "good", id: "unparseable",
                                                  hint: `success rate ${fmt.pct(m.success_rate)}` }),
           card("Dialogues", fmt.num(m.n_samples), { hint: `${fmt.num((m.seconds_per_sample || 0) * 1000, 0)} ms each · ${r.mode}` }),
           m.lift ? card("Macro-F1 lift", signed(m.lift.macro_f1), {
             tone: m.lift.macro_f1 > 0 ? "good" : "bad", id: "macro_f1_lift",
             hint: `over the TF-IDF baseline (${fmt.metric(m.baseline.macro_f1)})` }) : null,
           m.ece != null ? card("ECE", fmt.metric(m.ece), { id: "ece", tone: m.ece < 0.1 ? "good" : m.ece < 0.25 ? "warn" : "bad",
                                                         hint: "expected calibration error" }) : null);
}

function signed(value) {
  return value == null ? "–" : `${value > 0 ? "+" : ""}${Number(value).toFixed(3)}`;
}

const LIFT_METRICS = [["Accuracy", "accuracy"], ["Macro-F1", "macro_f1"], ["Weighted F1", "weighted_f1"]];

// The model and the TF-IDF + logistic-regression baseline trained on the model's training dataset, on the
// same rows: did fine-tuning pay?
function baselineTable(r, id) {
  const m = r.metrics;
  if (!m.baseline) {
    return h("p", { class: "muted", id }, m.baseline_error || "No baseline in this report (made before baselines were added).");
  }
  const table = pagedTable([
    { title: "Metric", render: (row) => row[0] },
    { title: "Fine-tuned", num: true, render: (row) => fmt.metric(m[row[1]]) },
    { title: "TF-IDF baseline", num: true, render: (row) => fmt.metric(m.baseline[row[1]]) },
    { title: "Lift", num: true, render: (row) => {
      const value = m.lift[row[1]];
      return h("span", { class: value > 0 ? "delta-up" : value < 0 ? "delta-down" : "" }, signed(value));
    } },
  ], { id, pageSize: 5 });
  table.setRows(LIFT_METRICS);
  return h("div", {}, table.el,
           h("p", { class: "small muted" }, `Baseline: character 1-3-gram TF-IDF + logistic regression, trained on `,
             h("a", { href: `#/datasets/${m.baseline.train_dataset_id}` }, m.baseline.train_dataset_id),
             ` (${fmt.num(m.baseline.n_train)} rows) in ${fmt.num(m.baseline.fit_seconds, 1)} s, scored on the same `
             + `${fmt.num(m.baseline.n_samples)} dialogues.`));
}

function reliabilityImage(r, id) {
  if (!r.reliability_diagram_url) {
    return h("p", { class: "muted", id }, "Generated answers carry no probability: no calibration in this mode.");
  }
  const img = h("img", { class: "matrix", id, alt: `reliability diagram of ${r.id}` });
  blobUrl(r.reliability_diagram_url).then((url) => { img.src = url; },
                                          (error) => img.replaceWith(h("p", { class: "muted" }, error.describe())));
  return h("div", {}, img, h("p", { class: "small muted" },
    `Expected calibration error ${fmt.metric(r.metrics.ece)}: per confidence bin, how often the model was right `
    + "against how sure it said it was (the diagonal is perfect calibration)."));
}

function toneOf(value) {
  return { bad: "bad", mid: "warn", good: "good" }[scoreTone(value)] || null;
}

function confusionImage(r, id) {
  const img = h("img", { class: "matrix", id, alt: `confusion matrix of ${r.id}` });
  const link = h("a", { class: "small", target: "_blank" }, "open full size");
  link.hidden = true;
  blobUrl(r.confusion_matrix_url).then((url) => {
    img.src = url;
    link.href = url;
    link.hidden = false;
  }, (error) => img.replaceWith(h("p", { class: "muted" }, error.describe())));
  return h("div", {}, img, link);
}

function perClassBars(r, id) {
  const rows = [...r.metrics.per_class].sort((a, b) => a.f1 - b.f1 || b.support - a.support);
  return barChart(rows.map((c) => ({
    label: `${c.intent_id} · ${c.label}`, value: c.f1, tone: scoreTone(c.f1),
    display: `${c.f1.toFixed(3)}  n=${c.support}`,
    title: `${c.label}: precision ${c.precision.toFixed(3)}, recall ${c.recall.toFixed(3)}, support ${c.support}`,
  })), { max: 1, id });
}

function confusedPairs(r, id) {
  const table = pagedTable([
    { title: "True", render: (p) => `${p.true_id} · ${p.true_label}` },
    { title: "Predicted as", render: (p) => `${p.pred_id} · ${p.pred_label}` },
    { title: "Count", num: true, render: (p) => p.count },
  ], { id, pageSize: 10, empty: "No confusion: every prediction was right." });
  table.setRows(r.metrics.most_confused_pairs || []);
  return table.el;
}

function wrongPredictions(rows, perClass) {
  const filter = h("select", { id: "wrong-filter" }, h("option", { value: "" }, "all true labels"),
                   perClass.filter((c) => rows.some((w) => w.true_id === c.intent_id))
                     .map((c) => h("option", { value: c.intent_id }, `${c.intent_id} · ${c.label}`)));
  const search = h("input", { type: "search", id: "wrong-search", placeholder: "search the dialogues" });
  const table = pagedTable([
    { title: "#", num: true, render: (w) => w.index },
    { title: "Dialogue", cls: "text", render: (w) => w.text },
    { title: "True", render: (w) => h("span", { class: "nowrap" }, `${w.true_id} · ${w.true_label}`) },
    { title: "Predicted", render: (w) => h("span", { class: "nowrap" }, `${w.pred_id} · ${w.pred_label}`) },
    { title: "Confidence", num: true, render: (w) => fmt.pct(w.confidence) },
  ], { id: "wrong-table", pageSize: 20, empty: "No wrong prediction." });
  const apply = () => {
    const label = filter.value === "" ? null : Number(filter.value);
    const needle = search.value.trim();
    table.setRows(rows.filter((w) => (label == null || w.true_id === label) && (!needle || w.text.includes(needle))));
  };
  filter.addEventListener("change", apply);
  search.addEventListener("input", apply);
  apply();
  filter.style.width = "auto";
  search.style.width = "240px";
  return h("div", {}, h("div", { class: "actions", style: { justifyContent: "flex-start", marginBottom: "8px" } },
                        filter, search), table.el);
}

export async function list(container, ctx) {
  const reports = await api("/reports");
  const chosen = new Set();
  const compare = h("button", { class: "btn btn-primary", type: "button", id: "compare-selected", disabled: true },
                    "Compare two");
  const table = pagedTable([
    { title: "", render: (r) => {
      const box = h("input", { type: "checkbox", "aria-label": `choose ${r.id}`, checked: chosen.has(r.id) });
      box.style.width = "auto";
      box.addEventListener("click", (event) => event.stopPropagation());
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(r.id); else chosen.delete(r.id);
        compare.disabled = chosen.size !== 2;
      });
      return box;
    } },
    { title: "Report", render: (r) => h("a", { href: `#/reports/${r.id}` }, r.id) },
    { title: "Model", render: (r) => r.model_id.startsWith("ft_") ? h("a", { href: `#/models/${r.model_id}` }, r.model_id) : r.model_id },
    { title: "Dataset", render: (r) => shortId(r.dataset_id) },
    { title: "Dialogues", num: true, render: (r) => fmt.num(r.summary.n_samples) },
    { title: "Accuracy", num: true, render: (r) => fmt.metric(r.summary.accuracy) },
    { title: "Macro-F1", num: true, render: (r) => fmt.metric(r.summary.macro_f1) },
    { title: "Weighted F1", num: true, render: (r) => fmt.metric(r.summary.weighted_f1) },
    { title: "Macro-F1 lift", num: true, render: (r) => signed(r.summary.lift?.macro_f1) },
    { title: "Unparseable", num: true, render: (r) => fmt.num(r.summary.n_failed) },
    { title: "Created", render: (r) => h("span", { class: "nowrap" }, fmt.time(r.created_at)) },
  ], { id: "reports-table", pageSize: 20, onRowClick: (r) => { location.hash = `#/reports/${r.id}`; },
       empty: "No report yet: train with a validation set, or evaluate a model." });
  table.setRows(reports);
  compare.addEventListener("click", () => {
    const [a, b] = [...chosen];
    location.hash = `#/reports/${a}/vs/${b}`;
  });
  clear(container, pageHead("Reports", { actions: [compare] }), panel(null, table.el));
}

export async function detail(container, ctx, id) {
  const path = `/reports/${encodeURIComponent(id)}`;
  const [r, wrong, others] = await Promise.all([api(path), api(`${path}/errors`), api("/reports")]);
  const failed = r.metrics.n_failed ? await api(`${path}/failed`) : [];
  const other = h("select", { id: "compare-with" }, others.filter((o) => o.id !== id).map((o) =>
    h("option", { value: o.id }, `${o.id} · ${o.model_id} · acc ${fmt.metric(o.summary.accuracy)}`)));
  other.style.width = "auto";
  const compare = h("button", { class: "btn", type: "button", id: "compare-button",
                                onclick: () => { location.hash = `#/reports/${id}/vs/${other.value}`; } }, "Compare");
  const actions = others.length > 1 ? [other, compare] : [];

  clear(container,
        pageHead(`Report ${r.id}`, {
          crumbs: [h("a", { href: "#/reports" }, "Reports"), " / model ",
                   r.model_id.startsWith("ft_") ? h("a", { href: `#/models/${r.model_id}` }, r.model_id) : r.model_id,
                   " on ", h("a", { href: `#/datasets/${r.dataset_id}` }, r.dataset_id)],
          actions,
        }),
        metricCards(r, "report-cards"),
        h("div", { class: "grid grid-2" },
          panel("Fine-tuned vs TF-IDF baseline", baselineTable(r, "baseline-lift")),
          panel("Calibration", reliabilityImage(r, "reliability-diagram"))),
        h("div", { class: "grid grid-2", style: { marginTop: "16px" } },
          panel("Per-class F1, worst first", perClassBars(r, "per-class-f1")),
          panel("Most confused pairs", confusedPairs(r, "confused-pairs"))),
        h("div", { class: "grid", style: { marginTop: "16px" } },
          panel("Confusion matrix", confusionImage(r, "confusion-matrix")),
          panel(`Wrong predictions (${fmt.num(wrong.length)})`, wrongPredictions(wrong, r.metrics.per_class))),
        failed.length ? panel(`Unparseable answers (${failed.length})`, (() => {
          const table = pagedTable([
            { title: "#", num: true, render: (f) => f.index },
            { title: "Dialogue", cls: "text", render: (f) => f.text },
            { title: "True", render: (f) => `${f.true_id} · ${f.true_label}` },
            { title: "Model output", render: (f) => h("code", {}, f.raw_output ?? "") },
          ], { id: "failed-table", pageSize: 20 });
          table.setRows(failed);
          return table.el;
        })()) : null);
}

export async function compare(container, ctx, a, b) {
  const [ra, rb] = await Promise.all([a, b].map((id) => api(`/reports/${encodeURIComponent(id)}`)));
  const byId = new Map(rb.metrics.per_class.map((c) => [c.intent_id, c]));
  const rows = ra.metrics.per_class.map((c) => ({ ...c, other: byId.get(c.intent_id)?.f1 ?? null }))
    .map((c) => ({ ...c, delta: c.other == null ? null : c.other - c.f1 }))
    .sort((x, y) => (x.delta ?? 0) - (y.delta ?? 0));
  const delta = (value) => value == null ? "–" : h("span", { class: value > 0 ? "delta-up" : value < 0 ? "delta-down" : "" },
                                                   `${value > 0 ? "+" : ""}${value.toFixed(3)}`);
  const summary = pagedTable([
    { title: "Metric", render: (row) => row[0] },
    { title: a, num: true, render: (row) => fmt.metric(ra.metrics[row[1]]) },
    { title: b, num: true, render: (row) => fmt.metric(rb.metrics[row[1]]) },
    { title: "Δ (B − A)", num: true, render: (row) => (rb.metrics[row[1]] == null || ra.metrics[row[1]] == null
      ? "–" : delta(rb.metrics[row[1]] - ra.metrics[row[1]])) },
  ], { id: "compare-summary", pageSize: 10 });
  summary.setRows([["Accuracy", "accuracy"], ["Macro-F1", "macro_f1"], ["Weighted F1", "weighted_f1"],
                   ["Success rate", "success_rate"], ["ECE (calibration)", "ece"]]);
  const perClass = pagedTable([
    { title: "Label", render: (c) => `${c.intent_id} · ${c.label}` },
    { title: "F1 A", num: true, render: (c) => c.f1.toFixed(3) },
    { title: "F1 B", num: true, render: (c) => (c.other == null ? "–" : c.other.toFixed(3)) },
    { title: "Δ", num: true, render: (c) => delta(c.delta) },
    { title: "Support", num: true, render: (c) => c.support },
  ], { id: "compare-per-class", pageSize: 40 });
  perClass.setRows(rows);
  const column = (r, side) => h("div", { id: `side-${side}` },
    h("h2", {}, `${side}: `, h("a", { href: `#/reports/${r.id}` }, r.id)),
    h("p", { class: "muted small" }, `model ${r.model_id} on ${r.dataset_id}`),
    metricCards(r, `cards-${side}`),
    panel("Confusion matrix", confusionImage(r, `matrix-${side}`)),
    panel("Per-class F1, worst first", perClassBars(r, `per-class-${side}`)));

  clear(container,
        pageHead("Two reports side by side", { crumbs: [h("a", { href: "#/reports" }, "Reports"), " / compare"] }),
        h("div", { class: "grid grid-2" }, column(ra, "A"), column(rb, "B")),
        h("div", { class: "grid grid-2", style: { marginTop: "16px" } },
          panel("Headline metrics", summary.el),
          panel("Per-class F1, most worsened first", perClass.el)));
}
