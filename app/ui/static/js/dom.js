// Small DOM helpers: element building, number/time formats, a paginated table, toasts.

// h("div", {class: "x", onclick: fn}, child, "text", [more children])
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "style") Object.assign(el.style, value); // CSSOM: allowed by the page's CSP
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const fmt = {
  num(value, digits = 0) {
    if (value == null || Number.isNaN(value)) return "–";
    return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  },
  pct(value, digits = 1) {
    return value == null ? "–" : `${(value * 100).toFixed(digits)}%`;
  },
  metric(value) {
    return value == null ? "–" : Number(value).toFixed(3);
  },
  loss(value) {
    return value == null ? "–" : Number(value).toFixed(4);
  },
  bytes(value) {
    if (value == null) return "–";
    const units = ["B", "KB", "MB", "GB"];
    let v = value, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  duration(seconds) {
    if (seconds == null || !Number.isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  },
  time(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
                                         second: "2-digit" });
  },
  ago(iso) {
    if (!iso) return "–";
    return `${fmt.duration((Date.now() - new Date(iso).getTime()) / 1000)} ago`;
  },
};

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function progressBar(fraction, { small = false } = {}) {
  const done = fraction >= 1;
  const fill = h("span");
  fill.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return h("div", { class: `progress${small ? " small" : ""}${done ? " done" : ""}`, role: "progressbar",
                    "aria-valuemin": "0", "aria-valuemax": "100",
                    "aria-valuenow": String(Math.round((fraction || 0) * 100)) }, fill);
}

export function card(label, value, { hint, tone, id } = {}) {
  return h("div", { class: `card${tone ? ` ${tone}` : ""}`, "data-card": id || label },
           h("div", { class: "label" }, label), h("div", { class: "value" }, value),
           hint ? h("div", { class: "hint" }, hint) : null);
}

// A table over `rows` that shows `pageSize` at a time. columns: [{title, render(row) -> node|text, num?}]
// Returns {el, setRows(rows)}: the page is kept when rows are replaced (live lists), clamped if it shrank.
export function pagedTable(columns, { pageSize = 25, onRowClick, rowClass, empty = "Nothing here yet.", id } = {}) {
  let rows = [];
  let loaded = false; // "Loading…" until the first rows arrive, not the empty-list text
  let page = 0;
  const tbody = h("tbody");
  const info = h("span");
  const prev = h("button", { class: "btn btn-small", type: "button", onclick: () => { page -= 1; render(); } }, "‹ Prev");
  const next = h("button", { class: "btn btn-small", type: "button", onclick: () => { page += 1; render(); } }, "Next ›");
  const pager = h("div", { class: "pager" }, info, prev, next);
  const table = h("table", { id },
                  h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
                  tbody);
  const el = h("div", {}, h("div", { class: "table-wrap" }, table), pager);

  function render() {
    const pages = Math.max(1, Math.ceil(rows.length / pageSize));
    page = Math.min(Math.max(0, page), pages - 1);
    const shown = rows.slice(page * pageSize, (page + 1) * pageSize);
    clear(tbody, shown.length ? shown.map((row) => h("tr", {
      class: [onRowClick ? "clickable" : "", rowClass ? rowClass(row) : ""].join(" ").trim() || null,
      onclick: onRowClick ? () => onRowClick(row) : null,
    }, columns.map((c) => h("td", { class: [c.num ? "num" : "", c.cls || ""].join(" ").trim() || null },
                            c.render(row))))) : h("tr", {}, h("td", { class: "empty", colspan: columns.length },
                                                  loaded ? empty : "Loading…")));
    pager.hidden = rows.length <= pageSize;
    info.textContent = `${page * pageSize + 1}–${Math.min(rows.length, (page + 1) * pageSize)} of ${rows.length}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  render();
  return {
    el,
    setRows(newRows) { rows = newRows; loaded = true; render(); },
    lastPage() { page = Number.MAX_SAFE_INTEGER; render(); },
  };
}

export function toast(message, { error = false } = {}) {
  const el = h("div", { class: `toast${error ? " error" : ""}`, role: error ? "alert" : "status" }, message);
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), error ? 8000 : 4000);
}

export function errorBox(error) {
  return h("p", { class: "form-error", role: "alert" }, error.describe ? error.describe() : String(error.message || error));
}

export function panel(title, ...children) {
  return h("section", { class: "panel" }, title ? h("div", { class: "panel-head" }, h("h2", {}, title)) : null,
           children);
}

export function pageHead(title, { crumbs, actions } = {}) {
  return h("div", { class: "page-head" },
           h("div", {}, crumbs ? h("div", { class: "crumbs" }, crumbs) : null, h("h1", {}, title)),
           actions ? h("div", { class: "actions" }, actions) : null);
}

export function shortId(id) {
  return id ? h("code", { title: id }, id) : "–";
}

// "#/jobs?dataset=ds_1" → {dataset: "ds_1"}: how one page hands a choice to another.
export function hashQuery() {
  return Object.fromEntries(new URLSearchParams(location.hash.split("?")[1] || ""));
}
