// Datasets: upload (drag and drop), the list, and one dataset's label distribution and statistics.

import { api, upload } from "../api.js";
import { barChart } from "../charts.js";
import { card, clear, errorBox, fmt, h, pageHead, pagedTable, panel, progressBar, shortId, toast } from "../dom.js";

const FORMATS = { cmcc_csv: "CMCC-34 CSV", text_label_csv: "text,label CSV", chat_jsonl: "JSONL chat" };

function imbalance(dataset) {
  return dataset.stats?.imbalance?.ratio_max_min;
}

function uploader(onUploaded) {
  const input = h("input", { type: "file", id: "dataset-file", accept: ".csv,.jsonl,.json,.tsv,.txt", hidden: true });
  const name = h("input", { type: "text", id: "dataset-name", placeholder: "optional: defaults to the file name" });
  const status = h("div", { class: "upload-status", id: "upload-status", "aria-live": "polite" });
  const zone = h("div", { class: "dropzone", id: "dropzone", tabindex: "0", role: "button",
                          "aria-label": "Drop a dataset file here or choose one" },
                 h("strong", {}, "Drop a CSV or JSONL file here"),
                 h("span", {}, "or click to choose one"),
                 h("span", { class: "small" }, "CMCC-34 CSV · text,label CSV · JSONL chat — every row is validated"));

  async function send(file) {
    if (!file) return;
    const form = new FormData();
    form.append("file", file, file.name);
    if (name.value.trim()) form.append("name", name.value.trim());
    const bar = progressBar(0);
    const line = h("div", { class: "progress-line" }, h("span", {}, `Uploading ${file.name}`),
                   h("span", {}, fmt.bytes(file.size)));
    clear(status, line, bar);
    try {
      const dataset = await upload("/datasets", form, (loaded, total) => {
        bar.firstChild.style.width = `${(loaded / total) * 100}%`;
        if (loaded >= total) {
          // The server now parses and validates every row (and counts tokens): the answer comes when done.
          clear(line, h("span", {}, `Validating ${file.name}…`), h("span", {}, fmt.bytes(total)));
        }
      });
      clear(status, h("p", { class: "muted" }, `Stored ${dataset.name}: ${fmt.num(dataset.n_rows)} rows, ` +
                                               `${dataset.n_labels} labels.`));
      toast(`Dataset ${dataset.name} uploaded`);
      name.value = "";
      onUploaded(dataset);
    } catch (error) {
      clear(status, errorBox(error));
    } finally {
      input.value = "";
    }
  }

  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") input.click(); });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    send(event.dataTransfer?.files?.[0]);
  });
  input.addEventListener("change", () => send(input.files[0]));

  return h("div", {}, h("div", { class: "stack" }, h("label", { for: "dataset-name" }, "Name"), name),
           h("div", { style: { marginTop: "12px" } }, zone, input), status);
}

export async function list(container, ctx) {
  const table = pagedTable([
    { title: "Name", render: (d) => h("a", { href: `#/datasets/${d.id}` }, d.name) },
    { title: "Id", render: (d) => shortId(d.id) },
    { title: "Format", render: (d) => FORMATS[d.format] || d.format },
    { title: "Rows", num: true, render: (d) => fmt.num(d.n_rows) },
    { title: "Labels", num: true, render: (d) => d.n_labels },
    { title: "Imbalance", num: true, render: (d) => (imbalance(d) != null ? `${fmt.num(imbalance(d), 1)}×` : "–") },
    { title: "Size", num: true, render: (d) => fmt.bytes(d.size_bytes) },
    { title: "Uploaded", render: (d) => h("span", { class: "nowrap" }, fmt.time(d.created_at)) },
  ], { id: "datasets-table", pageSize: 20, onRowClick: (d) => { location.hash = `#/datasets/${d.id}`; },
       empty: "No dataset yet: upload one." });

  const refresh = async () => table.setRows(await api("/datasets"));
  clear(container,
        pageHead("Datasets"),
        h("div", { class: "grid grid-side" },
          panel("Upload", uploader((dataset) => { location.hash = `#/datasets/${dataset.id}`; })),
          panel("All datasets", table.el)));
  await refresh();
}

export async function detail(container, ctx, id) {
  const d = await api(`/datasets/${encodeURIComponent(id)}`);
  const stats = d.stats || {};
  const imb = stats.imbalance || {};
  const tokens = stats.tokens;
  const ratio = imb.ratio_max_min;

  let byCount = true;
  const chartHolder = h("div", { id: "label-distribution" });
  const sortButton = h("button", { class: "btn btn-small", type: "button" });
  const drawChart = () => {
    const labels = [...d.labels].sort(byCount ? (a, b) => b.count - a.count || a.id - b.id : (a, b) => a.id - b.id);
    sortButton.textContent = byCount ? "Sort by id" : "Sort by count";
    clear(chartHolder, barChart(labels.map((label) => ({
      label: `${label.id} · ${label.name}`, value: label.count || 0, title: `${label.id}: ${label.name}`,
      tone: label.count === 0 ? "bad" : null,
    })), { format: (v) => fmt.num(v) }));
  };
  sortButton.addEventListener("click", () => { byCount = !byCount; drawChart(); });
  drawChart();

  const remove = h("button", { class: "btn btn-danger", type: "button", id: "delete-dataset" }, "Delete");
  const deleteError = h("div");
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete dataset ${d.name}?`)) return;
    try {
      await api(`/datasets/${encodeURIComponent(id)}`, { method: "DELETE" });
      toast(`Deleted ${d.name}`);
      location.hash = "#/datasets";
    } catch (error) {
      clear(deleteError, errorBox(error));
    }
  });

  clear(container,
        pageHead(d.name, {
          crumbs: [h("a", { href: "#/datasets" }, "Datasets"), " / ", d.id],
          actions: [remove, h("a", { class: "btn btn-primary", href: `#/jobs?dataset=${d.id}` }, "Train on it")],
        }),
        deleteError,
        h("div", { class: "cards", id: "dataset-cards" },
          card("Rows", fmt.num(d.n_rows)),
          card("Labels", d.n_labels, { hint: imb.classes_without_rows?.length
            ? `${imb.classes_without_rows.length} without rows` : "all have rows" }),
          card("Format", FORMATS[d.format] || d.format, { hint: d.chat_style || d.original_filename }),
          card("Imbalance ratio", ratio != null ? `${fmt.num(ratio, 1)}×` : "–", {
            id: "imbalance", hint: `largest / smallest class: ${imb.max_per_class ?? "–"} / ${imb.min_per_class ?? "–"}`,
            tone: ratio == null ? null : ratio > 10 ? "bad" : ratio > 3 ? "warn" : "good",
          }),
          card("Dialogue length", `${fmt.num(stats.chars?.dialogue_mean, 0)} chars`,
               { hint: `max ${fmt.num(stats.chars?.dialogue_max)}` }),
          tokens ? card("Tokens / sample", fmt.num(tokens.sample_tokens_mean, 0),
                        { hint: `p95 ${tokens.sample_tokens_p95}, prompt ${tokens.system_prompt_tokens} (${tokens.tokenizer})` })
            : card("Size", fmt.bytes(d.size_bytes))),
        h("div", { class: "grid grid-2" },
          h("section", { class: "panel" },
            h("div", { class: "panel-head" }, h("h2", {}, "Label distribution"), sortButton), chartHolder),
          panel("Details",
                h("dl", { class: "kv" },
                  h("dt", {}, "Id"), h("dd", {}, h("code", {}, d.id)),
                  h("dt", {}, "File"), h("dd", {}, d.original_filename || "–"),
                  h("dt", {}, "Size"), h("dd", {}, fmt.bytes(d.size_bytes)),
                  h("dt", {}, "Uploaded"), h("dd", {}, fmt.time(d.created_at)),
                  h("dt", {}, "Classes without rows"),
                  h("dd", {}, imb.classes_without_rows?.length ? imb.classes_without_rows.join(", ") : "none")),
                h("h3", {}, "Shared system prompt"),
                h("pre", { class: "prompt" }, d.system_prompt))));
}
