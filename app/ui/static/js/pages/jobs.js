// Jobs: the create form, the list, and one job live (progress with ETA, loss curve, event log, cancel).

import { api } from "../api.js";
import { lineChart, validationSeries } from "../charts.js";
import {
  badge, clear, errorBox, fmt, h, hashQuery, pageHead, pagedTable, panel, progressBar, toast,
} from "../dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// The hyperparameters the form offers; any other stays as the recipe has it.
const HYPERPARAMETERS = [
  ["max_steps", "Max steps", "int", "-1: run by epochs"],
  ["num_train_epochs", "Epochs", "float"],
  ["learning_rate", "Learning rate", "float"],
  ["per_device_train_batch_size", "Batch size", "int"],
  ["lora_r", "LoRA r", "int"],
  ["max_input_length", "Max input tokens", "int"],
  ["eval_every_steps", "Validate every", "int", "steps; 0: only after training (needs a validation set)"],
  ["eval_max_samples", "Validation sample", "int", "dialogues scored each time"],
  ["early_stopping_patience", "Early stopping", "int", "evaluations without a better macro-F1; 0: off"],
];
const HEADS = [
  ["lm", "LoRA adapter: learns to write the intent (label scoring, generation)"],
  ["linear", "linear head on the frozen base: one forward per dialogue (CPU recipe)"],
];
const CLASS_BALANCE = [
  ["none", "none: as in the data"],
  ["sqrt", "sqrt: rare intents drawn more often"],
  ["balanced", "balanced: every intent equally often"],
];

// What a job is doing now, as a fraction, a line of text and an ETA in seconds (null when unknown).
export function jobPhase(job, evalClock) {
  const p = job.progress || {};
  if (job.status === "succeeded") {
    const trained = p.features_total && p.max_steps === 1 ? "trained a linear head"
      : p.max_steps ? `trained ${p.step ?? p.max_steps} steps` : null;
    const parts = [trained,
                   p.total ? `evaluated ${fmt.num(p.total)} dialogues` : null].filter(Boolean);
    return { fraction: 1, text: `Done${parts.length ? `: ${parts.join(", ")}` : ""}`, eta: null };
  }
  if (job.status === "failed" || job.status === "cancelled") {
    const where = p.total ? ` after ${fmt.num(p.done)} / ${fmt.num(p.total)} dialogues`
      : p.max_steps ? ` at step ${p.step ?? 0} / ${p.max_steps}`
      : p.features_total ? ` reading the ${p.phase || "dialogues"}: ${fmt.num(p.features_done)} / ${fmt.num(p.features_total)}`
      : "";
    return { fraction: p.total ? p.done / p.total : p.max_steps ? (p.step || 0) / p.max_steps
             : p.features_total ? p.features_done / p.features_total : 0,
             text: `${job.status === "failed" ? "Failed" : "Cancelled"}${where}`, eta: null };
  }
  if (p.total) {
    const eta = evalClock ? evalClock(p.done, p.total) : null;
    const label = job.kind === "train" ? "Evaluating the validation set" : "Evaluating";
    return { fraction: p.done / p.total, text: `${label}: ${fmt.num(p.done)} / ${fmt.num(p.total)} dialogues`, eta };
  }
  if (p.features_total && !p.max_steps) {
    return { fraction: p.features_done / p.features_total,
             text: `Reading the ${p.phase || "dialogues"}: ${fmt.num(p.features_done)} / ${fmt.num(p.features_total)} dialogues`,
             eta: job.status === "running" ? p.eta_seconds : null };
  }
  if (p.max_steps) {
    return { fraction: (p.step || 0) / p.max_steps, text: `Training: step ${p.step ?? 0} / ${p.max_steps}`,
             eta: job.status === "running" ? p.eta_seconds : null };
  }
  const text = { queued: "Waiting for a worker", running: "Preparing (base model, data)" }[job.status];
  return { fraction: 0, text: text || job.status, eta: null };
}

// ETA of an evaluation from how fast `done` grew since this page first saw it.
function evaluationClock() {
  let first = null;
  return (done, total) => {
    const now = performance.now() / 1000;
    if (!first || done < first.done) first = { done, now };
    const rate = (done - first.done) / (now - first.now);
    return rate > 0 ? (total - done) / rate : null;
  };
}

function miniProgress(job) {
  const phase = jobPhase(job);
  if (job.status === "running") {
    return h("div", { title: phase.text }, progressBar(phase.fraction, { small: true }),
             h("span", { class: "small muted" }, phase.text.replace(/^[^:]*: /, "")));
  }
  if (job.status === "succeeded" && job.started_at && job.finished_at) {
    return h("span", { class: "small muted" }, `took ${fmt.duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`);
  }
  return h("span", { class: "small muted" }, job.status === "queued" ? "waiting" : "");
}

async function createForm(onCreated) {
  const [datasets, recipes, models] = await Promise.all([api("/datasets"), api("/configs"), api("/models")]);
  const wanted = hashQuery().dataset;
  const datasetOptions = (withNone) => [
    withNone ? h("option", { value: "" }, "none") : null,
    ...datasets.map((d) => h("option", { value: d.id },
                             `${d.name} (${fmt.num(d.n_rows)} rows, ${d.n_labels} labels)`)),
  ];
  const dataset = h("select", { id: "job-dataset", name: "dataset_id", required: true }, datasetOptions(false));
  // Train on what the operator chose, else on the newest upload that is not named like a held-out set.
  const heldOut = (d) => /val|dev|test/i.test(d.name);
  dataset.value = (datasets.find((d) => d.id === wanted) ?? datasets.find((d) => !heldOut(d)) ?? datasets[0])?.id ?? "";
  const validation = h("select", { id: "job-validation", name: "validation_dataset_id" }, datasetOptions(true));
  const recipe = h("select", { id: "job-config", name: "config" },
                   recipes.map((r) => h("option", { value: r.name, selected: r.default }, r.default ? `${r.name} (default)` : r.name)));
  const baseModel = h("select", { id: "job-base-model", name: "base_model" });
  const inputs = Object.fromEntries(HYPERPARAMETERS.map(([key, , kind]) => [key, h("input", {
    id: `hp-${key}`, name: key, type: "number", step: kind === "int" ? "1" : "any",
  })]));
  const classBalance = h("select", { id: "hp-class_balance", name: "class_balance" },
                        CLASS_BALANCE.map(([value, text]) => h("option", { value }, text)));
  const head = h("select", { id: "hp-head", name: "head" }, HEADS.map(([value, text]) => h("option", { value }, text)));
  const error = h("div");

  const currentRecipe = () => recipes.find((r) => r.name === recipe.value);
  const fillFromRecipe = () => {
    const r = currentRecipe();
    for (const [key] of HYPERPARAMETERS) inputs[key].value = r?.hyperparameters[key] ?? "";
    classBalance.value = r?.hyperparameters.class_balance ?? "none";
    head.value = r?.hyperparameters.head ?? "lm";
    clear(baseModel,
          h("option", { value: "" }, `the recipe's${r?.base_model ? ` (${r.base_model})` : ""}`),
          models.base_models.map((m) => h("option", { value: m.name, disabled: !m.available },
                                          `${m.name}${m.prepared ? "" : m.available ? " (prepared on first use)" : " (not available here)"}`)));
  };
  recipe.addEventListener("change", fillFromRecipe);
  fillFromRecipe();

  // Validation sets are usually the other uploads: pick one whose name says so when the operator has not.
  const guessValidation = () => {
    const other = datasets.find((d) => d.id !== dataset.value && heldOut(d));
    if (other && !validation.value) validation.value = other.id;
  };
  dataset.addEventListener("change", guessValidation);
  guessValidation();

  const submit = h("button", { class: "btn btn-primary", type: "submit", id: "job-submit" }, "Start training");
  const form = h("form", { class: "stack", id: "job-form" },
                 h("div", {}, h("label", { for: "job-dataset" }, "Training dataset"), dataset),
                 h("div", {}, h("label", { for: "job-validation" }, "Validation set"), validation,
                   h("div", { class: "field-hint" },
                     "Evaluated after training (the job's report, beside the TF-IDF baseline) and, with "
                     + "\u201cValidate every\u201d, during it: the best adapter by macro-F1 is kept.")),
                 h("div", {}, h("label", { for: "job-config" }, "Recipe"), recipe),
                 h("div", {}, h("label", { for: "job-base-model" }, "Base model"), baseModel),
                 h("div", { class: "row" }, HYPERPARAMETERS.map(([key, title, , hint]) =>
                   h("div", {}, h("label", { for: `hp-${key}` }, title), inputs[key],
                     hint ? h("div", { class: "field-hint" }, hint) : null))),
                 h("div", {}, h("label", { for: "hp-head" }, "Classifier"), head,
                   h("div", { class: "field-hint" }, "What is trained: a LoRA adapter, or a linear head on the "
                     + "base model's hidden states (no LoRA; the step and LoRA fields do not apply).")),
                 h("div", {}, h("label", { for: "hp-class_balance" }, "Class balance"), classBalance,
                   h("div", { class: "field-hint" }, "How often each intent is drawn in training (imbalanced data).")),
                 error,
                 h("div", { class: "actions" }, submit));
  if (!datasets.length) {
    submit.disabled = true;
    clear(error, h("p", { class: "muted" }, "Upload a dataset first (Datasets page)."));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const r = currentRecipe();
    const hyperparameters = {};
    for (const [key, , kind] of HYPERPARAMETERS) {
      const raw = inputs[key].value.trim();
      if (raw === "") continue;
      const value = kind === "int" ? parseInt(raw, 10) : parseFloat(raw);
      if (value !== r?.hyperparameters[key]) hyperparameters[key] = value;
    }
    if (classBalance.value !== (r?.hyperparameters.class_balance ?? "none")) {
      hyperparameters.class_balance = classBalance.value;
    }
    if (head.value !== (r?.hyperparameters.head ?? "lm")) hyperparameters.head = head.value;
    const body = { dataset_id: dataset.value, config: recipe.value };
    if (validation.value) body.validation_dataset_id = validation.value;
    if (baseModel.value) body.base_model = baseModel.value;
    if (Object.keys(hyperparameters).length) body.hyperparameters = hyperparameters;
    submit.disabled = true;
    clear(error);
    try {
      const job = await api("/jobs", { method: "POST", json: body });
      toast(`Job ${job.id} queued`);
      onCreated(job);
    } catch (err) {
      clear(error, errorBox(err));
      const field = err.field?.replace(/^hyperparameters\./, "");
      (inputs[field] || form.elements[field])?.focus();
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

export async function list(container, ctx) {
  const table = pagedTable([
    { title: "Status", render: (j) => badge(j.status) },
    { title: "Job", render: (j) => [h("a", { href: `#/jobs/${j.id}` }, j.id), h("div", { class: "small muted" },
      j.kind === "train" ? "training" : "evaluation")] },
    { title: "Model", render: (j) => j.kind === "train" ? [j.base_model, h("div", { class: "small muted" }, j.config)]
      : j.target_model_id },
    { title: "Progress", render: miniProgress },
    { title: "Created", render: (j) => h("span", { class: "nowrap" }, fmt.time(j.created_at)) },
  ], { id: "jobs-table", pageSize: 20, onRowClick: (j) => { location.hash = `#/jobs/${j.id}`; },
       empty: "No job yet." });

  clear(container, pageHead("Jobs"),
        h("div", { class: "grid grid-side" },
          panel("New training job", await createForm((job) => { location.hash = `#/jobs/${job.id}`; })),
          panel("Recent jobs", table.el)));
  let active = false;
  let last = 0;
  await ctx.poll(async () => {
    // Fast while something runs; otherwise every 10 s.
    if (!active && performance.now() - last < 10000 && last) return true;
    last = performance.now();
    const jobs = await api("/jobs", { params: { limit: 1000 } });
    active = jobs.some((j) => !TERMINAL.has(j.status));
    table.setRows(jobs);
    return true;
  }, 2000);
}

export async function detail(container, ctx, id) {
  let job = await api(`/jobs/${encodeURIComponent(id)}`);
  const evalClock = evaluationClock();
  const title = h("h1", {}, job.kind === "train" ? "Training job" : "Evaluation job");
  const status = h("span", { id: "job-status" });
  const cancel = h("button", { class: "btn btn-danger", type: "button", id: "job-cancel" }, "Cancel");
  const outcome = h("div", { id: "job-outcome" });
  const phaseText = h("span", { id: "job-phase" });
  const etaText = h("span", { id: "job-eta" });
  const barHolder = h("div", { id: "job-progress" });
  const stats = h("div", { class: "stats", id: "job-stats" });
  const loss = lineChart({ id: "loss-chart", empty: "The loss appears at the first logged step." });
  const eventsBody = h("tbody");
  const eventsBox = h("div", { class: "events", id: "job-events" }, h("table", {}, eventsBody));
  const showSteps = h("input", { type: "checkbox", id: "show-step-logs" });
  const events = [];
  const lossByStep = new Map();
  const validationByStep = new Map();
  let bestStep = null;
  let afterId = 0;

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      toast(job.status === "cancelled" ? "Cancelled" : "Cancel requested: the worker stops within one step");
      render();
    } catch (error) {
      toast(error.describe(), { error: true });
    }
  });
  showSteps.addEventListener("change", () => renderEvents(true));

  // The log follows its end unless the operator scrolled up to read; step logs only on request (the
  // loss curve shows them), and at most the last 1000 lines.
  function renderEvents(jumpToEnd) {
    const atBottom = eventsBox.scrollTop + eventsBox.clientHeight >= eventsBox.scrollHeight - 8;
    const shown = events.filter((e) => showSteps.checked || e.kind !== "train_log");
    const rows = shown.slice(-1000).map((e) => h("tr", { "data-kind": e.kind },
      h("td", { class: "nowrap muted" }, fmt.time(e.created_at)), h("td", { class: "kind" }, e.kind),
      h("td", {}, e.message)));
    clear(eventsBody, rows.length ? rows : h("tr", {}, h("td", { class: "empty" }, "No events yet.")));
    if (atBottom || jumpToEnd) eventsBox.scrollTop = eventsBox.scrollHeight;
  }

  function render() {
    clear(status, badge(job.status), job.cancel_requested && !TERMINAL.has(job.status)
      ? h("span", { class: "muted small" }, " cancel requested") : null);
    cancel.hidden = TERMINAL.has(job.status) || job.cancel_requested;
    const phase = jobPhase(job, evalClock);
    phaseText.textContent = phase.text;
    etaText.textContent = phase.eta != null ? `ETA ${fmt.duration(phase.eta)}` :
      job.status === "succeeded" && job.started_at && job.finished_at
        ? `took ${fmt.duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}` : "";
    clear(barHolder, progressBar(job.status === "succeeded" ? 1 : phase.fraction));
    const p = job.progress || {};
    const stat = (label, value) => h("span", {}, `${label} `, h("b", {}, value));
    clear(stats,
          p.loss != null ? stat("loss", fmt.loss(p.loss)) : null,
          p.learning_rate != null ? stat("lr", Number(p.learning_rate).toExponential(2)) : null,
          p.epoch != null ? stat("epoch", fmt.num(p.epoch, 2)) : null,
          p.tokens_per_second != null ? stat("tokens/s", fmt.num(p.tokens_per_second, 0)) : null,
          p.steps_per_second != null ? stat("steps/s", fmt.num(p.steps_per_second, 2)) : null,
          stat("attempt", job.attempts),
          job.heartbeat_at && job.status === "running" ? stat("heartbeat", fmt.ago(job.heartbeat_at)) : null);
    const links = [];
    if (job.model_id) links.push(h("a", { class: "btn", href: `#/models/${job.model_id}`, id: "open-model" }, "Open model"));
    if (job.report_id) links.push(h("a", { class: "btn btn-primary", href: `#/reports/${job.report_id}`, id: "open-report" }, "Open report"));
    clear(outcome,
          job.error ? h("p", { class: "form-error", role: "alert" }, `${job.error.code}: ${job.error.message}`) : null,
          links.length ? h("div", { class: "actions" }, links) : null);
  }

  function addEvents(batch) {
    for (const e of batch) {
      events.push(e);
      afterId = Math.max(afterId, e.id);
      if (e.kind === "train_log" && e.data?.loss != null) lossByStep.set(e.data.step, e.data.loss);
      if (e.kind === "validation" && e.data?.macro_f1 != null) validationByStep.set(e.data.step, e.data);
      if (e.kind === "best_checkpoint") bestStep = e.data?.step ?? null;
    }
    if (batch.length) {
      const validation = [...validationByStep.values()].sort((a, b) => a.step - b.step);
      loss.update([...lossByStep].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({ x, y })),
                  validationSeries(validation, bestStep));
      renderEvents(false);
    }
  }

  const dl = (pairs) => h("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  clear(container,
        h("div", { class: "page-head" },
          h("div", {}, h("div", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", job.id), title),
          h("div", { class: "actions" }, status, cancel)),
        h("section", { class: "panel" },
          h("div", { class: "progress-line" }, phaseText, etaText), barHolder, stats, outcome),
        h("div", { class: "grid grid-2", style: { marginTop: "16px" } },
          panel("Training loss and validation", loss.el),
          panel("Details", dl([
            ["Job", h("code", {}, job.id)],
            ["Dataset", h("a", { href: `#/datasets/${job.dataset_id}` }, job.dataset_id)],
            ["Validation set", job.validation_dataset_id
              ? h("a", { href: `#/datasets/${job.validation_dataset_id}` }, job.validation_dataset_id) : "none"],
            job.kind === "train" ? ["Base model", job.base_model] : ["Model", job.target_model_id],
            job.kind === "train" ? ["Recipe", job.config] : ["Mode", "score"],
            ["Created", fmt.time(job.created_at)],
          ]), job.kind === "train" ? h("details", {}, h("summary", {}, "Hyperparameters"),
                                        dl(Object.entries(job.hyperparameters).map(([k, v]) => [k, JSON.stringify(v)])))
            : null)),
        h("section", { class: "panel", style: { marginTop: "16px" } },
          h("div", { class: "panel-head" }, h("h2", {}, "Event log"),
            h("label", { class: "small", for: "show-step-logs" }, showSteps, " show every logged step")),
          eventsBox));
  showSteps.style.width = "auto";
  render();

  await ctx.poll(async () => {
    const [fresh, batch] = await Promise.all([
      api(`/jobs/${encodeURIComponent(id)}`),
      api(`/jobs/${encodeURIComponent(id)}/events`, { params: { after_id: afterId } }),
    ]);
    if (!ctx.alive) return false;
    job = fresh;
    addEvents(batch);
    render();
    if (TERMINAL.has(job.status)) {
      // Events written with the job's end may land after the status was read: one last look.
      const last = await api(`/jobs/${encodeURIComponent(id)}/events`, { params: { after_id: afterId } });
      if (!ctx.alive) return false;
      addEvents(last);
      container.dataset.final = job.status; // for tests and scripts: this page's job has ended
      return false;
    }
    return true;
  }, 1000);
  renderEvents(true);
}
