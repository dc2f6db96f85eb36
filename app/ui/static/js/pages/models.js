// Models: fine-tuned adapters (metrics, loss curve, reports, evaluate) and the classify playground.

import { api, blobUrl } from "../api.js";
import { barChart, lineChart, validationSeries } from "../charts.js";
import { badge, card, clear, errorBox, fmt, h, pageHead, pagedTable, panel, shortId, toast } from "../dom.js";

const SAMPLE_TEXT = "您好请讲[SEP]我想开通一个流量包[SEP]好的请问您要哪一档的[SEP]五十块的那个";

function playground(models, selected) {
  const choices = [
    ...models.adapters.map((m) => h("option", { value: m.id, selected: m.id === selected }, `${m.name} (${m.id})`)),
    ...models.base_models.filter((m) => m.prepared).map((m) =>
      h("option", { value: m.name, selected: m.name === selected }, `${m.name} (zero-shot, CMCC-34 labels)`)),
  ];
  const model = h("select", { id: "classify-model", required: true }, choices);
  const text = h("textarea", { id: "classify-text", rows: "4", required: true,
                               placeholder: "One dialogue, turns joined by [SEP]" }, SAMPLE_TEXT);
  const topK = h("select", { id: "classify-top-k" }, [1, 3, 5, 10].map((k) => h("option", { value: k, selected: k === 5 }, k)));
  const mode = h("select", { id: "classify-mode" },
                 h("option", { value: "score" }, "score (rank the labels)"),
                 h("option", { value: "generate" }, "generate (free text, parsed)"));
  const submit = h("button", { class: "btn btn-primary", type: "submit", id: "classify-submit" }, "Classify");
  const result = h("div", { id: "classify-result", "aria-live": "polite" });
  if (!choices.length) {
    submit.disabled = true;
    result.append(h("p", { class: "muted" }, "No model yet: train one (Jobs), or prepare a base model for zero-shot."));
  }

  const form = h("form", { class: "stack", id: "classify-form" },
                 h("div", {}, h("label", { for: "classify-model" }, "Model"), model),
                 h("div", {}, h("label", { for: "classify-text" }, "Dialogue"), text),
                 h("div", { class: "row" },
                   h("div", {}, h("label", { for: "classify-top-k" }, "Top k"), topK),
                   h("div", {}, h("label", { for: "classify-mode" }, "Mode"), mode)),
                 h("div", { class: "actions" }, submit),
                 result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    clear(result, h("p", { class: "muted" }, "Classifying… (the first request loads the model)"));
    const started = performance.now();
    try {
      const answer = await api("/classify", { method: "POST", json: {
        model: model.value, text: text.value, top_k: Number(topK.value), mode: mode.value } });
      const roundTrip = performance.now() - started;
      const p = answer.predictions[0];
      clear(result, h("div", { class: "prediction" },
        h("div", { class: "muted small" }, "Predicted intent"),
        h("div", { class: "top", id: "classify-label" },
          h("span", { id: "classify-label-name" }, p.label != null ? `${p.intent_id} · ${p.label}` : "unparseable answer"),
          p.confidence != null ? h("span", { class: "muted" }, `  ${fmt.pct(p.confidence)}`) : null),
        p.raw_output != null ? h("div", { class: "small muted" }, "raw output: ", h("code", {}, p.raw_output)) : null,
        h("h3", {}, `Top ${p.top_k.length}`),
        barChart(p.top_k.map((t) => ({ label: `${t.intent_id} · ${t.label}`, value: t.score, display: fmt.pct(t.score) })),
                 { max: 1, id: "classify-top" }),
        h("p", { class: "latency", id: "classify-latency" },
          `Server ${fmt.num(answer.latency_ms, 1)} ms · round trip ${fmt.num(roundTrip, 0)} ms`)));
    } catch (error) {
      clear(result, errorBox(error));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export async function list(container, ctx) {
  const models = await api("/models");
  const adapters = pagedTable([
    { title: "Model", render: (m) => h("a", { href: `#/models/${m.id}` }, m.name) },
    { title: "Id", render: (m) => shortId(m.id) },
    { title: "Base", render: (m) => m.base_model },
    { title: "Labels", num: true, render: (m) => m.labels.length },
    { title: "Steps", num: true, render: (m) => fmt.num(m.metrics.steps ?? m.metrics.global_step) },
    { title: "Final loss", num: true, render: (m) => fmt.loss(m.metrics.final_loss) },
    { title: "Created", render: (m) => h("span", { class: "nowrap" }, fmt.time(m.created_at)) },
  ], { id: "adapters-table", pageSize: 15, onRowClick: (m) => { location.hash = `#/models/${m.id}`; },
       empty: "No fine-tuned model yet: start a training job." });
  adapters.setRows(models.adapters);
  const bases = pagedTable([
    { title: "Base model", render: (m) => [m.name, m.default ? h("span", { class: "badge running" }, " default") : null] },
    { title: "Architecture", render: (m) => m.architecture },
    { title: "Source", render: (m) => m.source },
    { title: "State", render: (m) => badge(m.prepared ? "succeeded" : m.available ? "queued" : "failed") },
    { title: "", render: (m) => h("span", { class: "small muted" }, m.prepared ? "prepared" : m.available
      ? "prepared on first use" : "not available here") },
  ], { id: "base-models-table", pageSize: 15 });
  bases.setRows(models.base_models);
  clear(container, pageHead("Models"),
        h("div", { class: "grid grid-side" },
          panel("Classify playground", playground(models, models.adapters[0]?.id)),
          h("div", {}, panel("Fine-tuned adapters", adapters.el), panel("Base models", bases.el))));
}

function evaluateForm(model, datasets) {
  // Held-out data first: a dataset named like a validation or test set, else any but the training set.
  const preferred = datasets.find((d) => d.id !== model.dataset_id && /val|dev|test/i.test(d.name))
    ?? datasets.find((d) => d.id !== model.dataset_id) ?? datasets[0];
  const dataset = h("select", { id: "evaluate-dataset" }, datasets.map((d) =>
    h("option", { value: d.id, selected: d === preferred }, `${d.name} (${fmt.num(d.n_rows)} rows)`)));
  const error = h("div");
  const submit = h("button", { class: "btn", type: "submit", id: "evaluate-submit" }, "Evaluate");
  const form = h("form", { class: "stack" },
                 h("div", {}, h("label", { for: "evaluate-dataset" }, "Dataset"), dataset,
                   h("div", { class: "field-hint" }, "Runs in a worker; progress shows on the job's page.")),
                 error, h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear(error);
    try {
      const job = await api("/evaluations", { method: "POST", json: { model: model.id, dataset_id: dataset.value } });
      toast(`Evaluation ${job.id} queued`);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      clear(error, errorBox(err));
    }
  });
  return form;
}

export async function detail(container, ctx, id) {
  const path = `/models/${encodeURIComponent(id)}`;
  const [model, history, reports, models, datasets] = await Promise.all([
    api(path), api(`${path}/loss_history`), api("/reports", { params: { model_id: id } }), api("/models"),
    api("/datasets"),
  ]);
  const m = model.metrics || {};
  const latest = reports[0]?.summary;
  const curve = lineChart({ id: "model-loss-chart" });
  const validation = history.validation || [];
  curve.update(history.points.map((p) => ({ x: p.step, y: p.loss })), validationSeries(validation, history.best_step));
  let curvePanel = curve.el;
  if (!history.points.length && !validation.length && model.loss_curve_url) {
    curvePanel = h("img", { class: "matrix", alt: "loss curve" });
    blobUrl(model.loss_curve_url).then((url) => { curvePanel.src = url; }, () => curvePanel.replaceWith(curve.el));
  }
  const reportTable = pagedTable([
    { title: "Report", render: (r) => h("a", { href: `#/reports/${r.id}` }, r.id) },
    { title: "Dataset", render: (r) => shortId(r.dataset_id) },
    { title: "Accuracy", num: true, render: (r) => fmt.metric(r.summary.accuracy) },
    { title: "Macro-F1", num: true, render: (r) => fmt.metric(r.summary.macro_f1) },
    { title: "Lift", num: true, render: (r) => (r.summary.lift ? fmt.metric(r.summary.lift.macro_f1) : "–") },
    { title: "Created", render: (r) => h("span", { class: "nowrap" }, fmt.time(r.created_at)) },
  ], { id: "model-reports", pageSize: 10, onRowClick: (r) => { location.hash = `#/reports/${r.id}`; },
       empty: "No report yet." });
  reportTable.setRows(reports);

  clear(container,
        pageHead(model.name, { crumbs: [h("a", { href: "#/models" }, "Models"), " / ", model.id] }),
        h("div", { class: "cards", id: "model-cards" },
          card("Base model", model.base_model, { hint: `quantization ${model.quantization}${model.head === "linear" ? ", linear head (no LoRA)" : ""}` }),
          card("Steps", fmt.num(m.steps ?? m.global_step), { hint: m.train_runtime_s != null
            ? `in ${fmt.duration(m.train_runtime_s)}` : null }),
          card("Final loss", fmt.loss(m.final_loss)),
          card("Tokens / s", fmt.num(m.tokens_per_second, 0), { hint: m.device ? `on ${m.device}` : null }),
          card("Labels", model.labels.length),
          latest ? card("Last accuracy", fmt.metric(latest.accuracy), { hint: `macro-F1 ${fmt.metric(latest.macro_f1)}` })
            : card("Last accuracy", "–", { hint: "not evaluated yet" }),
          latest?.lift ? card("Macro-F1 vs baseline", `${latest.lift.macro_f1 > 0 ? "+" : ""}${fmt.metric(latest.lift.macro_f1)}`,
                              { tone: latest.lift.macro_f1 > 0 ? "good" : "bad",
                                hint: `TF-IDF baseline ${fmt.metric(latest.baseline.macro_f1)}` }) : null,
          m.best_step != null ? card("Kept step", fmt.num(m.best_step), {
            hint: `best validation macro-F1 ${fmt.metric(m.best_val_macro_f1)}${m.early_stopped_at ? `, stopped early at ${m.early_stopped_at}` : ""}` })
            : null),
        h("div", { class: "grid grid-2" },
          panel(validation.length ? "Training loss and validation" : "Training loss", curvePanel),
          panel("Classify playground", playground(models, model.id))),
        h("div", { class: "grid grid-2", style: { marginTop: "16px" } },
          panel("Reports", reportTable.el, h("h3", {}, "Evaluate on a dataset"), evaluateForm(model, datasets)),
          panel("Training metrics",
                h("dl", { class: "kv" }, Object.entries(m).flatMap(([k, v]) => [
                  h("dt", {}, k), h("dd", {}, typeof v === "number" && !Number.isInteger(v) ? fmt.num(v, 4)
                    : v !== null && typeof v === "object" ? JSON.stringify(v) : String(v))])),
                h("details", {}, h("summary", {}, `${model.labels.length} labels`),
                  h("p", { class: "small" }, model.labels.map((l) => `${l.id} ${l.name}`).join(" · "))))));
}
