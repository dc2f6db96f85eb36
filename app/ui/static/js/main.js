// The console's shell: hash routes to pages, polling that stops when the page is left, the health badge.

import { api, apiKey, forgetKey } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import * as datasets from "./pages/datasets.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as reports from "./pages/reports.js";

const ROUTES = [
  [/^#\/datasets\/([^/]+)$/, datasets.detail, "datasets"],
  [/^#\/datasets$/, datasets.list, "datasets"],
  [/^#\/jobs\/([^/]+)$/, jobs.detail, "jobs"],
  [/^#\/jobs$/, jobs.list, "jobs"],
  [/^#\/models\/([^/]+)$/, models.detail, "models"],
  [/^#\/models$/, models.list, "models"],
  [/^#\/reports\/([^/]+)\/vs\/([^/]+)$/, reports.compare, "reports"],
  [/^#\/reports\/([^/]+)$/, reports.detail, "reports"],
  [/^#\/reports$/, reports.list, "reports"],
];

// What a page may start: polls that end when the operator goes elsewhere.
class PageContext {
  constructor() {
    this.alive = true;
    this.timers = new Set();
  }

  // Run fn now and then every `ms` after each run ends (never two at once); stop when it returns false.
  poll(fn, ms) {
    const tick = async () => {
      if (!this.alive) return;
      let again = true;
      try {
        again = (await fn()) !== false;
      } catch (error) {
        console.warn("poll failed", error);
      }
      if (again && this.alive) {
        const timer = setTimeout(() => { this.timers.delete(timer); tick(); }, ms);
        this.timers.add(timer);
      }
    };
    return tick();
  }

  stop() {
    this.alive = false;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }
}

let current = null;

async function route() {
  const hash = (location.hash || "#/datasets").split("?")[0];
  const match = ROUTES.map(([pattern, page, tab]) => [hash.match(pattern), page, tab]).find(([m]) => m);
  if (!match) {
    location.hash = "#/datasets";
    return;
  }
  const [groups, page, tab] = match;
  for (const link of document.querySelectorAll(".tabs a")) link.classList.toggle("active", link.dataset.page === tab);
  current?.stop();
  const ctx = new PageContext();
  current = ctx;
  // Each visit draws into its own element: a page still loading when the operator moves on draws into
  // one no longer shown.
  const view = h("div", { id: "view" }, h("p", { class: "muted" }, "Loading…"));
  clear(document.getElementById("page"), view);
  try {
    await page(view, ctx, ...groups.slice(1).map(decodeURIComponent));
  } catch (error) {
    if (ctx.alive) clear(view, errorBox(error));
  }
}

async function refreshHealth() {
  const badge = document.getElementById("health");
  try {
    const health = await fetch("/health").then((r) => r.json());
    const queue = health.queue;
    badge.className = `health ${health.ready ? "ok" : "bad"}`;
    badge.textContent = `${health.workers.live} worker${health.workers.live === 1 ? "" : "s"} live · ` +
      `${queue.running} running · ${queue.queued} queued`;
  } catch {
    badge.className = "health bad";
    badge.textContent = "API unreachable";
  }
}

function showKeyButton() {
  document.getElementById("key-button").hidden = !apiKey();
}

document.getElementById("key-button").addEventListener("click", () => {
  forgetKey();
  route();
});
document.addEventListener("api-key-changed", showKeyButton);
window.addEventListener("hashchange", route);
// Chinese label names need a CJK font. Without one of its own the browser gets the server's; it is loaded
// before the first page is drawn (at most a few seconds): Chromium otherwise leaves the first text that
// asked for it drawn as empty boxes.
function hasLocalCjkFont() {
  const context = document.createElement("canvas").getContext("2d");
  const probe = "意图识别";
  context.font = "16px monospace";
  const fallback = context.measureText(probe).width;
  return ["Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei",
          "WenQuanYi Micro Hei"].some((family) => {
    context.font = `16px "${family}", monospace`;
    return context.measureText(probe).width !== fallback;
  });
}

if (!hasLocalCjkFont()) {
  await Promise.race([document.fonts.load('14px "IntentTuner CJK"', "中").catch(() => null),
                      new Promise((resolve) => setTimeout(resolve, 4000))]);
}
showKeyButton();
refreshHealth();
setInterval(refreshHealth, 5000);
route();
