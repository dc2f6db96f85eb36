// The REST API from the browser: the bearer key (asked once per browser session), the one error body
// {"detail": {"message", "field", "row"?}}, uploads with byte progress, and images that need the key.

const KEY_STORAGE = "intent-tuner.api-key";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail?.message || `HTTP ${status}`);
    this.status = status;
    this.field = detail?.field ?? null;
    this.row = detail?.row ?? null;
    this.errors = detail?.errors ?? null;
  }

  // "row 4, field 'label_raw': …" as the server says it, with where it points when the message does not.
  describe() {
    const where = [];
    if (this.row != null && !this.message.includes(`row ${this.row}`)) where.push(`row ${this.row}`);
    if (this.field && !this.message.includes(this.field)) where.push(`field ${this.field}`);
    return where.length ? `${this.message} (${where.join(", ")})` : this.message;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  document.dispatchEvent(new CustomEvent("api-key-changed"));
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// One prompt at a time, however many requests were refused together.
let keyPrompt = null;

function askForKey(rejected) {
  if (keyPrompt) return keyPrompt;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  error.hidden = !rejected;
  error.textContent = rejected ? "That key was refused (401). Try again." : "";
  input.value = "";
  keyPrompt = new Promise((resolve) => {
    form.addEventListener("submit", () => {
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      keyPrompt = null;
      document.dispatchEvent(new CustomEvent("api-key-changed"));
      resolve();
    }, { once: true });
  });
  dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return keyPrompt;
}

async function readError(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch { /* not JSON: the status says enough */ }
  if (typeof detail === "string") detail = { message: detail };
  return new ApiError(response.status, detail);
}

// fetch with the key; a 401 asks for the key and tries again with it.
async function send(path, init = {}) {
  for (;;) {
    const hadKey = Boolean(apiKey());
    const response = await fetch(path, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
    if (response.status !== 401) return response;
    await askForKey(hadKey);
  }
}

export async function api(path, { method = "GET", json, params } = {}) {
  let url = path;
  if (params) {
    const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null && v !== ""));
    if ([...query].length) url += `?${query}`;
  }
  const init = { method, headers: {} };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await send(url, init);
  if (!response.ok) throw await readError(response);
  if (response.status === 204) return null;
  return response.json();
}

// An image (or any file) the key protects, as an object URL for <img src>.
export async function blobUrl(path) {
  const response = await send(path);
  if (!response.ok) throw await readError(response);
  return URL.createObjectURL(await response.blob());
}

// POST a multipart form with upload progress (fetch has none); 401 asks for the key and sends again.
export function upload(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress?.(event.loaded, event.total);
    });
    request.addEventListener("load", async () => {
      const response = new Response(request.responseText, { status: request.status });
      if (request.status === 401) {
        await askForKey(Boolean(apiKey()));
        upload(path, formData, onProgress).then(resolve, reject);
      } else if (request.status >= 200 && request.status < 300) {
        resolve(JSON.parse(request.responseText));
      } else {
        reject(await readError(response));
      }
    });
    request.addEventListener("error", () => reject(new ApiError(0, { message: "the server could not be reached" })));
    request.send(formData);
  });
}
