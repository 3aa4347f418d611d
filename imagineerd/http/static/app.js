// imagineerd web UI. Plain ES module, no build step: it uses only the public REST API and
// the event stream (/api/events), so everything it does a script can do too.

const $ = (selector, root = document) => root.querySelector(selector);

// With a token on the server, the page logs in once (POST /api/session) and the browser
// keeps an HttpOnly session cookie: the token is never stored here, nor put in a URL.
const state = {
  options: null,
  running: [],          // the running jobs (with .progress): several when a batch runs
  queued: [],
  history: [],
  stepClocks: new Map(),  // id -> {step, at, firstStep, firstAt}: live ETA from the step rate
  gallery: [],
  galleryCursor: undefined,  // undefined: not loaded yet; null: no more pages
  galleryLoading: false,
  lastSeed: null,
  events: null,
  models: null,         // GET /api/models: {checkpoints, loras, embeddings, vaes, default}
  modelStatus: null,    // {name, phase: "loading" | "failed", from, error}: a model switch
  healthTimer: null,
  // The Create form's input image: {data} (a data: URL) or {name} (an output's file name),
  // with {url, label, width, height}; null for text to image.
  input: null,
  sizeBeforeInput: null,  // the size fields before an input set them, for ×
  brush: "paint",         // or "erase"
  // Results: the jobs submitted from this page, by id (newest first in mineOrder).
  mine: new Map(),
  mineOrder: [],
  batch: null,            // {ids, note, bad}: the last submission, which the status line follows
  // The form fields the user set: only these are sent; the rest take the server's defaults,
  // which may change while the page is open (config.changed).
  touched: new Set(),
  offline: false,         // the event stream dropped and has not come back yet
  before: null,           // id -> {status, started_at} of unfinished jobs when it dropped
  viewerItems: [],        // what ← and → step through in the viewer
  viewerIndex: -1,
  doneUnseen: false,      // a job of ours finished while the tab was in the background
  queuePaused: false,     // POST /api/queue/pause: nothing new starts until it is resumed
  previews: new Map(),    // id -> the newest job.preview of a running job
  // Images this page is starring, deleting or restoring right now: the events of its own
  // changes may come before its answer, and the page itself does what they say.
  ownOutputs: new Set(),
  galleryFilters: {},     // the filter bar as GET /api/outputs takes it
  galleryGeneration: 0,   // counts filter changes: a page of older filters is dropped
  selected: new Set(),    // select mode: the file names picked
  undo: null,             // the toast's Undo
};

// What this browser keeps (never the token): the draft prompts and the recent prompts.
const DRAFT_KEY = "imagineerd.draft";
const HISTORY_KEY = "imagineerd.prompts";
const HISTORY_MAX = 100;

function loadStored(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;  // storage disabled, or not ours
  }
}

function store(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* storage disabled or full */ }
}

// ---------------------------------------------------------------------------------- API
class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.field = body && body.field;
  }
}

let tokenPrompt = null;

// The jobs this page sends say so: the gallery can then tell them from the API's, the
// inbox's and the other front doors' (its source filter).
const UI_SOURCE = { headers: { "X-Imagineerd-Source": "ui" } };

// options: {type} sends body as it is (a Blob: a PNG's bytes) with that Content-Type;
// {headers} adds headers; {blob: true} answers the body as a Blob (a zip), not JSON.
async function api(method, path, body, options = {}) {
  for (;;) {
    // Every state change says it is JSON, body or not: the server refuses other types,
    // which is what keeps other sites' pages from posting forms to it.
    const headers = method === "GET" ? {} : { "Content-Type": options.type || "application/json" };
    Object.assign(headers, options.headers);
    let response;
    try {
      response = await fetch(path, {
        method, headers,
        body: body === undefined ? undefined : options.type ? body : JSON.stringify(body),
      });
    } catch {
      throw new ApiError(0, { error: "The server could not be reached." });
    }
    if (response.status === 401 && path !== "/api/session") {
      await askToken("");
      continue;
    }
    if (options.blob && response.ok) return { blob: await response.blob(), headers: response.headers };
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

// Esc (or anything else that closes it) must not leave the page behind a missing token:
// every request waits on the dialog, so the form would look usable and do nothing.
function setupTokenDialog() {
  const dialog = $("#token-dialog");
  dialog.addEventListener("cancel", (event) => event.preventDefault());
  dialog.addEventListener("close", () => {
    if (tokenPrompt) {
      dialog.showModal();
      $("#token-input").focus();
    }
  });
}

function askToken(message) {
  // One dialog for all the requests that hit 401 at the same time.
  if (tokenPrompt) return tokenPrompt;
  const dialog = $("#token-dialog");
  $("#token-error").textContent = message;
  tokenPrompt = new Promise((resolve) => {
    $("#token-form").onsubmit = async (event) => {
      event.preventDefault();
      const value = $("#token-input").value.trim();
      if (!value) return;
      try {
        await api("POST", "/api/session", { token: value });
      } catch (error) {
        $("#token-error").textContent = error.status === 401
          ? "That token was not accepted." : error.message;
        return;
      }
      $("#token-input").value = "";
      $("#logout").hidden = false;
      tokenPrompt = null;
      dialog.close();
      connectEvents();
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  $("#token-input").focus();
  return tokenPrompt;
}

// ---------------------------------------------------------------------------------- tabs
const TABS = ["create", "queue", "gallery", "settings"];

function showTab(name, { focus = false } = {}) {
  if (!TABS.includes(name)) name = "create";
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $(`#tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`#view-${tab}`).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "gallery" && state.galleryCursor === undefined) loadGallery().catch((error) => showGalleryError(error));
  placeToast();
  if (name === "settings") loadSettings();
}

function setupTabs() {
  for (const tab of TABS) $(`#tab-${tab}`).addEventListener("click", () => showTab(tab));
  $("nav[role=tablist]").addEventListener("keydown", (event) => {
    const index = TABS.findIndex((t) => $(`#tab-${t}`).getAttribute("aria-selected") === "true");
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (step) showTab(TABS[(index + step + TABS.length) % TABS.length], { focus: true });
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
}

// ------------------------------------------------------------------------------- helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// Small line icons, drawn inline: no icon font to load, and they look the same everywhere.
const ICONS = {
  top: '<path d="M5 4h14M12 20V9m-5.5 5.5L12 9l5.5 5.5"/>',
  up: '<path d="M12 19V5m-6 6 6-6 6 6"/>',
  down: '<path d="M12 5v14m-6-6 6 6 6-6"/>',
  star: '<path d="m12 3.2 2.7 5.5 6 .9-4.35 4.25 1.03 6L12 17l-5.38 2.85 1.03-6L3.3 9.6l6-.9z"/>',
  trash: '<path d="M4 7h16M10 11v6m4-6v6M6 7l1 13h10l1-13M9 7V4h6v3"/>',
  check: '<path d="m5 12.5 4.5 4.5L19 7.5"/>',
};

function icon(name) {
  const holder = document.createElement("span");
  holder.innerHTML = `<svg class="icon" viewBox="0 0 24 24" width="18" height="18" aria-hidden="true" focusable="false"
    fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round">${ICONS[name]}</svg>`;
  return holder.firstElementChild;
}

function showErrors(form, error, prefix = "") {
  clearErrors(form);
  const path = error.field ? error.field.replace(prefix, "") : null;
  // "loras[1].weight": the message goes under the LoRAs, the focus to that row's weight.
  const field = path && path.split(/[.[]/)[0];
  const slot = field && $(`[data-error-for="${field}"]`, form);
  if (slot) {
    slot.textContent = error.message;
    const box = slot.closest(".field");
    box.classList.add("invalid");
    const details = slot.closest("details");
    if (details) details.open = true;
    const index = /^loras\[(\d+)\]/.exec(path);
    const row = index && $("#lora-list").children[Number(index[1])];
    // "hires.scale": that input of the hires fix.
    const part = /^hires\.(\w+)/.exec(path);
    const input = row ? $(".lora-weight", row)
      : (part && $(`#hires-${part[1]}`, form)) || form.elements[field]
        || $("input:not([type=range]), select", box);
    // A control that is hidden now (Choose a file… while an input shows): the field's first visible one.
    const visible = (node) => Boolean(node && node.getClientRects && node.getClientRects().length);
    const target = visible(input) ? input : [...box.querySelectorAll("button, input, select")].find(visible);
    if (target) target.focus();
    return true;
  }
  return false;
}

function clearErrors(form) {
  for (const slot of form.querySelectorAll("[data-error-for]")) slot.textContent = "";
  for (const field of form.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "…";
  if (seconds < 10) return `${Math.max(0, seconds).toFixed(1)}s`;
  seconds = Math.round(seconds);
  return seconds < 60 ? `${seconds}s` : `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
}

function summary(job) {
  const from = job.source === "inbox" && job.source_name ? ` · from ${job.source_name}` : "";
  const mode = modeLabel(job);
  return `${job.width}×${job.height}${mode ? ` · ${mode}` : ""} · ${job.steps} steps · seed ${job.seed}`
    + `${modelSummary(job)}${from}`;
}

function formatNumber(value) {
  return String(Math.round(Number(value) * 100) / 100);
}

// "img2img", "inpaint" or "hires ×2" (A1111's names for what a job does); "" for plain text to image.
function modeLabel(job) {
  if (job.init_image) return job.mask ? "inpaint" : "img2img";
  if (job.hires) return `hires ×${formatNumber(job.hires.scale ?? 2)}`;
  return "";
}

// ------------------------------------------------------------------------------- models
const ARCH_NAMES = { sd15: "SD1.5", sd2: "SD2.x", sdxl: "SDXL" };

// A model as its PNGs name it: the file's stem, never a path (what the server's label() does).
function modelLabel(name) {
  const last = String(name || "").replace(/\\/g, "/").replace(/\/+$/, "").split("/").pop();
  return last.replace(/\.(safetensors|ckpt)$/i, "");
}

// model.name may be a local path (shown by its stem) or a hub id / listed name (shown whole).
function displayModel(name) {
  return /^([A-Za-z]:)?[\\/]/.test(String(name || "")) ? modelLabel(name) : String(name || "");
}

function defaultModel() {
  return state.models ? state.models.default : null;
}

// Jobs store the default written out (model.name), images its stem: both are the default.
function isDefaultModel(name) {
  const fallback = defaultModel();
  if (!name) return true;
  return fallback !== null && (name === fallback || name === modelLabel(fallback));
}

function modelSummary(job) {
  const parts = [];
  if (job.model && state.models && !isDefaultModel(job.model)) parts.push(displayModel(job.model));
  for (const lora of job.loras || []) parts.push(`${lora.name} ${lora.weight}`);
  if (job.vae && job.vae !== "default") parts.push(`VAE ${job.vae}`);
  return parts.length ? ` · ${parts.join(" + ")}` : "";
}

function checkpointArch(name) {
  const list = (state.models && state.models.checkpoints) || [];
  const found = name ? list.find((c) => c.name === name) : list.find((c) => isDefaultModel(c.name));
  return found ? found.arch : "unknown";
}

// LoRAs and VAEs for the chosen model's architecture, or where either is not known.
function fits(item, arch) {
  return arch === "unknown" || !item.arch || item.arch === "unknown" || item.arch === arch;
}

function withArch(name, arch) {
  return ARCH_NAMES[arch] ? `${name} · ${ARCH_NAMES[arch]}` : name;
}

async function loadModels({ refresh = false } = {}) {
  try {
    state.models = refresh ? await api("POST", "/api/models/refresh") : await api("GET", "/api/models");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {  // a server without models
      $("#model-field").hidden = $("#lora-field").hidden = true;
      return;
    }
    throw error;
  }
  renderModels();
  renderQueue();  // rows name a job's model only when it is not the default
}

function renderModels() {
  const models = state.models;
  if (!models) return;
  const select = $("#model");
  const chosen = select.value;
  const fallback = models.default;
  const own = models.checkpoints.find((c) => isDefaultModel(c.name));
  const others = models.checkpoints.filter((c) => !isDefaultModel(c.name));
  select.replaceChildren(
    el("option", { value: "" }, `${withArch(displayModel(fallback), own && own.arch)} (default)`),
    ...others.map((c) => el("option", { value: c.name }, withArch(c.name, c.arch))));
  if (chosen && !others.some((c) => c.name === chosen)) {
    const status = $("#create-status");
    status.textContent = `The model ${chosen} is no longer in the models folder; the default is chosen.`;
    status.className = "status bad";
  }
  select.value = others.some((c) => c.name === chosen) ? chosen : "";
  renderModelExtras();
  renderSizePresets();
  galleryModels();
}

function renderModelExtras() {
  const models = state.models;
  if (!models) return;
  const arch = checkpointArch($("#model").value);
  const archName = ARCH_NAMES[arch] || arch;
  const added = new Set(readLoras().map((l) => l.name));
  const loras = models.loras.filter((l) => fits(l, arch));
  const addable = loras.filter((l) => !added.has(l.name));
  const maxItems = (state.options && state.options.limits.loras && state.options.limits.loras.max_items) || 16;
  $("#lora-add").replaceChildren(el("option", { value: "" }, "Add a LoRA…"),
    ...addable.map((l) => el("option", { value: l.name }, withArch(l.name, l.arch))));
  $("#lora-adder").hidden = addable.length === 0 || added.size >= maxItems;
  const none = $("#lora-none");
  none.hidden = loras.length > 0;
  none.textContent = models.loras.length
    ? `No LoRA in the models folder is made for ${archName}.`
    : "No LoRAs in the models folder (loras/). Put some there, then press ↻.";
  for (const row of $("#lora-list").children) {
    const item = models.loras.find((l) => l.name === row.dataset.lora);
    let text = "";
    if (!item) text = "Not in the models folder (any more).";
    else if (!fits(item, arch)) text = `Made for ${ARCH_NAMES[item.arch] || item.arch}; this model is ${archName}.`;
    row.classList.toggle("mismatch", Boolean(text));
    const note = $(".lora-note", row);
    note.textContent = text;
    note.hidden = !text;
  }
  const vae = $("#vae");
  const chosenVae = vae.value;
  const vaes = models.vaes.filter((v) => fits(v, arch));
  vae.replaceChildren(el("option", { value: "default" }, "Default (the model's own)"),
    ...vaes.map((v) => el("option", { value: v.name }, withArch(v.name, v.arch))));
  vae.value = vaes.some((v) => v.name === chosenVae) ? chosenVae : "default";
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function addLora(name, weight = 1) {
  if (readLoras().some((l) => l.name === name)) return null;
  const limit = (state.options && state.options.limits.loras) || {};
  // The slider covers the useful range; the number takes any weight the server allows.
  const slider = el("input", { type: "range", min: "-2", max: "2", step: "0.05",
    value: String(clamp(weight, -2, 2)), "aria-label": `${name} weight` });
  const number = el("input", { type: "number", class: "lora-weight", step: "0.05",
    min: String(limit.min ?? -10), max: String(limit.max ?? 10), value: String(weight),
    "aria-label": `${name} weight, exact` });
  slider.addEventListener("input", () => { number.value = slider.value; });
  number.addEventListener("input", () => {
    const value = Number(number.value);
    if (number.value.trim() !== "" && isFinite(value)) slider.value = String(clamp(value, -2, 2));
  });
  const row = el("li", { class: "lora-row", "data-lora": name },
    el("span", { class: "lora-name" }, name), slider, number,
    el("button", { type: "button", class: "lora-remove", title: "Remove", "aria-label": `Remove ${name}`,
      onclick: () => {
        row.remove();
        renderModelExtras();
        const next = $("#lora-list .lora-weight") || $("#lora-add");
        next.focus();
      } }, "✕"),
    el("p", { class: "hint lora-note", hidden: true }));
  $("#lora-list").append(row);
  return row;
}

function readLoras() {
  return [...$("#lora-list").children].map((row) => {
    const input = $(".lora-weight", row);
    const raw = input.value.trim();
    let weight = Number(raw);
    // Empty is 1, as the API has it; what the browser cannot read as a number goes as text,
    // so the server's message says what is wrong.
    if (raw === "") weight = input.validity.badInput ? "not a number" : 1;
    else if (isNaN(weight)) weight = raw;
    return { name: row.dataset.lora, weight };
  });
}

function setLoras(loras) {
  $("#lora-list").replaceChildren();
  for (const lora of loras || []) addLora(lora.name, lora.weight ?? 1);
  renderModelExtras();
}

function setupModels() {
  $("#model").addEventListener("change", renderModelExtras);
  $("#lora-add-button").addEventListener("click", () => {
    const select = $("#lora-add");
    if (!select.value) {
      select.focus();
      return;
    }
    const row = addLora(select.value);
    renderModelExtras();
    if (row) $(".lora-weight", row).focus();
  });
  $("#models-refresh").addEventListener("click", async () => {
    const button = $("#models-refresh");
    button.disabled = true;
    try {
      await loadModels({ refresh: true });
    } catch (error) {
      $("#create-status").textContent = error.message;
      $("#create-status").className = "status bad";
    } finally {
      button.disabled = false;
    }
  });
}

// The default model could not be loaded (a fresh install without network, most often).
function showFirstRun(backend) {
  $("#first-run").hidden = !backend;
  if (!backend) return;
  $("#first-run-model").textContent = displayModel(backend.model);
  $("#first-run-error").textContent = backend.error || "";
}

async function checkHealth() {
  clearTimeout(state.healthTimer);
  let health;
  try {
    health = await api("GET", "/api/health");
  } catch {
    return;
  }
  const backend = health.backend;  // absent without the token: nothing to say then
  showFirstRun(backend && backend.state === "error" && backend.error ? backend : null);
  // A switch already under way when the page opened shows as if its event had come.
  const loading = (health.workers || []).map((w) => w.models && w.models.loading).find(Boolean);
  if (loading && !state.modelStatus) {
    state.modelStatus = { name: loading, phase: "loading", seen: "health" };
    renderQueue();
  } else if (!loading && state.modelStatus && state.modelStatus.seen === "health") {
    state.modelStatus = null;
    renderQueue();
  }
  // Until the model is in, look again now and then: its events may come before the stream.
  if ((backend && backend.state === "loading") || loading) {
    state.healthTimer = setTimeout(checkHealth, 2000);
  }
}

// -------------------------------------------------------------------------------- create
function applyLimits(limits) {
  // The bounds come from the server's one table (GET /api/options), never from here.
  for (const form of [$("#create-form"), $("#settings-form")]) {
    for (const [name, limit] of Object.entries(limits || {})) {
      const input = form.elements[name];
      if (!input || !limit) continue;
      if (limit.min !== undefined) input.min = String(limit.min);
      if (limit.max !== undefined) input.max = String(limit.max);
      if (limit.multiple_of) input.step = String(limit.multiple_of);
      if (limit.max_length !== undefined) input.maxLength = limit.max_length;
    }
  }
}

function fillSelects(options) {
  for (const select of [$("#scheduler"), $("#set-scheduler")]) {
    select.replaceChildren(...options.schedulers.map((s) => el("option", { value: s.id }, s.label)));
  }
  renderSizePresets();
}

// The sizes each architecture was trained at (SD1.5 around 512, SD2 around 768, SDXL around
// 1024 in the aspect buckets of its paper): far from them, subjects repeat or get cropped.
// A model of unknown architecture gets the server's list.
const SIZE_PRESETS = {
  sd15: [[512, 512], [512, 768], [768, 512], [512, 640], [640, 512], [768, 768]],
  sd2: [[768, 768], [576, 768], [768, 576], [640, 896], [896, 640], [512, 512]],
  sdxl: [[1024, 1024], [896, 1152], [1152, 896], [832, 1216], [1216, 832], [768, 1344], [1344, 768]],
};

function sizeLabel(width, height) {
  const shape = width === height ? "Square" : width > height ? "Landscape" : "Portrait";
  return `${shape} ${width}×${height}`;
}

function currentArch() {
  return state.models ? checkpointArch($("#model").value) : "unknown";
}

function renderSizePresets() {
  if (!state.options) return;
  const arch = currentArch();
  const own = SIZE_PRESETS[arch];
  state.presets = own
    ? own.map(([width, height]) => ({ label: sizeLabel(width, height), width, height }))
    : state.options.sizes;
  const options = state.presets.map((s, i) => el("option", { value: String(i) }, s.label));
  $("#size-preset").replaceChildren(el("option", { value: "" }, "Custom"),
    ...(own ? [el("optgroup", { label: `For ${ARCH_NAMES[arch]}` }, ...options)] : options));
  syncSizePreset();
}

// The fields whose value the server's generation defaults give. They are sent only once the
// user set them, so a default changed meanwhile (Settings, another client) still applies.
const DEFAULT_FIELDS = ["steps", "width", "height", "guidance_scale", "scheduler", "negative_prompt", "clip_skip"];

function touch(...names) {
  for (const name of names) state.touched.add(name);
}

function applyDefaults(generation, { force = false } = {}) {
  const form = $("#create-form");
  if (force) state.touched.clear();
  for (const name of DEFAULT_FIELDS) {
    if (generation[name] !== undefined && !state.touched.has(name)) form.elements[name].value = generation[name];
  }
  syncSizePreset();
}

function syncSizePreset() {
  const width = Number($("#width").value), height = Number($("#height").value);
  const index = (state.presets || []).findIndex((s) => s.width === width && s.height === height);
  $("#size-preset").value = index >= 0 ? String(index) : "";
  renderHiresSize();
}

function numberValue(input) {
  const raw = input.value.trim();
  return isNaN(Number(raw)) ? raw : Number(raw);
}

function readForm(form) {
  const data = { prompt: form.elements.prompt.value };
  for (const name of DEFAULT_FIELDS) {
    if (!state.touched.has(name)) continue;  // the server's default applies
    const input = form.elements[name];
    if (name === "negative_prompt" || name === "scheduler") data[name] = input.value;
    // An emptied number is the server's default too.
    else if (input.value.trim() !== "") data[name] = numberValue(input);
  }
  if (form.elements.seed.value.trim() !== "") data.seed = numberValue(form.elements.seed);
  // The defaults are left out, so the server's (model.name, no LoRA, the model's VAE) apply.
  if (form.elements.model.value) data.model = form.elements.model.value;
  const loras = readLoras();
  if (loras.length) data.loras = loras;
  if (form.elements.vae.value && form.elements.vae.value !== "default") data.vae = form.elements.vae.value;
  Object.assign(data, readImageInputs());
  return data;
}

// ---------------------------------------------------------------------------- validation
// Every field is checked at once against the server's bounds (GET /api/options) before
// anything is sent, so all that is wrong shows together; the server checks again.
const FIELD_NAMES = {
  seed: "Seed", steps: "Steps", width: "Width", height: "Height", guidance_scale: "Guidance",
  clip_skip: "Clip skip", mask_blur: "Mask blur", copies: "Copies",
};

function rangeText(low, high) {
  return low < 0 ? `from ${low} to ${high}` : `${low}–${high}`;
}

// An optional number field: {value}, {} when empty, or {error} in plain words.
function checkNumber(input, label, limit = {}, { integer = false } = {}) {
  const raw = input.value.trim();
  const bounds = limit.min !== undefined && limit.max !== undefined ? rangeText(limit.min, limit.max) : "";
  const kind = integer ? "a whole number" : "a number";
  if (raw === "") {
    return input.validity && input.validity.badInput ? { error: `${label} must be ${kind}${bounds ? `, ${bounds}` : ""}` } : {};
  }
  const value = Number(raw);
  if (!isFinite(value) || (integer && !Number.isInteger(value))) {
    return { error: `${label} must be ${kind}${bounds ? `, ${bounds}` : ""}` };
  }
  if ((limit.min !== undefined && value < limit.min) || (limit.max !== undefined && value > limit.max)) {
    return { error: `${label} must be ${bounds}` };
  }
  const step = limit.multiple_of;
  if (step && value % step) {
    const low = Math.floor(value / step) * step;
    return { error: `${label} must be a multiple of ${step} (try ${low} or ${low + step})` };
  }
  return { value };
}

function validateForm(form) {
  const limits = (state.options && state.options.limits) || {};
  const errors = [];
  const add = (field, message, input) => errors.push({ field, message, input });
  const text = (name, label, required) => {
    const value = form.elements[name].value.trim();
    const max = limits[name] && limits[name].max_length;
    if (required && !value) add(name, `${label} is empty: describe the picture`, form.elements[name]);
    else if (max && value.length > max) {
      add(name, `${label} must be at most ${max} characters (it has ${value.length})`, form.elements[name]);
    }
  };
  text("prompt", "The prompt", true);
  text("negative_prompt", "The negative prompt", false);
  if (state.input) {
    const strength = checkNumber($("#strength"), "Strength", limits.strength);
    if (strength.error) add("strength", strength.error, $("#strength"));
    if (maskPainted()) {
      const blur = checkNumber($("#mask_blur"), "Mask blur", limits.mask_blur, { integer: true });
      if (blur.error) add("mask_blur", blur.error, $("#mask_blur"));
    }
  }
  const lora = limits.loras || {};
  const loras = readLoras();
  if (lora.max_items && loras.length > lora.max_items) {
    add("loras", `At most ${lora.max_items} LoRAs at once`, $("#lora-add"));
  }
  loras.forEach((item, i) => {
    const weight = $("#lora-list").children[i].querySelector(".lora-weight");
    const result = checkNumber(weight, `The weight of ${item.name}`, lora);
    if (result.error) add("loras", result.error, weight);
  });
  const numbers = {};
  for (const name of ["seed", "steps", "width", "height", "guidance_scale"]) {
    const result = checkNumber(form.elements[name], FIELD_NAMES[name], limits[name],
      { integer: name !== "guidance_scale" });
    if (result.error) add(name, result.error, form.elements[name]);
    numbers[name] = result.value;
  }
  const copies = checkNumber($("#copies"), "Copies", { min: 1, max: 16 }, { integer: true });
  if (copies.error) add("copies", copies.error, $("#copies"));
  const seedMax = limits.seed && limits.seed.max;
  if (numbers.seed !== undefined && copies.value > 1 && seedMax !== undefined && numbers.seed + copies.value - 1 > seedMax) {
    add("seed", `With ${copies.value} copies (one seed each, counting up) the seed must be at most ${seedMax - copies.value + 1}`,
      form.elements.seed);
  }
  const choices = limits.scheduler && limits.scheduler.choices;
  if (choices && !choices.includes(form.elements.scheduler.value)) {
    add("scheduler", "Choose a sampler from the list", form.elements.scheduler);
  }
  if (!state.input && $("#hires").checked) {
    const hires = limits.hires || {};
    const scale = checkNumber($("#hires-scale"), "The hires scale", hires.scale);
    if (scale.error) add("hires", scale.error, $("#hires-scale"));
    const steps = checkNumber($("#hires-steps"), "Hires steps", hires.steps, { integer: true });
    if (steps.error) add("hires", steps.error, $("#hires-steps"));
    const { max } = sizeLimits();
    const width = numbers.width ?? state.options.generation.width;
    const height = numbers.height ?? state.options.generation.height;
    if (scale.value && width && height) {
      const final = [round8(width * scale.value), round8(height * scale.value)];
      if (Math.max(...final) > max) {
        add("hires", `The hires fix would make ${final[0]}×${final[1]}, over ${max}: lower the scale or the size`,
          $("#hires-scale"));
      }
    }
  }
  const clipSkip = checkNumber(form.elements.clip_skip, FIELD_NAMES.clip_skip, limits.clip_skip, { integer: true });
  if (clipSkip.error) add("clip_skip", clipSkip.error, form.elements.clip_skip);
  return errors;
}

function showFieldErrors(form, errors) {
  clearErrors(form);
  const byField = new Map();
  for (const error of errors) byField.set(error.field, [...(byField.get(error.field) || []), error]);
  for (const [field, list] of byField) {
    const slot = $(`[data-error-for="${field}"]`, form);
    if (!slot) continue;
    slot.textContent = list.map((e) => e.message).join("; ");
    slot.closest(".field").classList.add("invalid");
    const details = slot.closest("details");
    if (details) details.open = true;
    for (const error of list) if (error.input) error.input.setAttribute("aria-invalid", "true");
  }
  if (errors[0].input) errors[0].input.focus();
}

// ---------------------------------------------------------------------------- submitting
function setStatus(text, bad = false) {
  const status = $("#create-status");
  // Written only when it changes: a live region repeats whatever is written to it.
  if (status.textContent !== text) status.textContent = text;
  status.className = bad ? "status bad" : "status";
}

function idRange(ids) {
  return ids.length === 1 ? `#${ids[0]}` : `#${ids[0]}–#${ids.at(-1)}`;
}

// "stopped": interrupted while running (it has a start); "cancelled": taken out of the queue.
function statusWord(job) {
  if (job.status === "cancelled" && job.started_at) return "stopped";
  if (job.status === "completed") return "done";
  return job.status;
}

const FINISHED = ["completed", "failed", "cancelled"];

// The status line follows the last submission to its end, so it never says "queued" of a
// job that is done.
function renderStatus() {
  const batch = state.batch;
  if (!batch) return;
  const jobs = batch.ids.map((id) => state.mine.get(id)).filter(Boolean);
  if (!jobs.length) return;
  let text;
  const failed = jobs.some((j) => j.status === "failed");
  if (jobs.length === 1) {
    const job = jobs[0];
    text = {
      queued: `Queued job #${job.id}.`,
      running: `Job #${job.id} is running.`,
      done: `Job #${job.id} is done.`,
      failed: `Job #${job.id} failed: ${job.error || "no reason given"}`,
      stopped: `Job #${job.id} was stopped.`,
      cancelled: `Job #${job.id} was cancelled.`,
    }[statusWord(job)] || `Job #${job.id}: ${job.status}.`;
  } else {
    const counts = new Map();
    for (const job of jobs) counts.set(statusWord(job), (counts.get(statusWord(job)) || 0) + 1);
    const range = idRange(batch.ids);
    if (counts.get("queued") === jobs.length) text = `Queued ${jobs.length} jobs (${range}).`;
    else if (counts.get("done") === jobs.length) text = `${jobs.length} jobs (${range}) are done.`;
    else {
      const order = ["done", "running", "queued", "failed", "stopped", "cancelled"];
      const parts = order.filter((w) => counts.get(w)).map((w) => `${counts.get(w)} ${w}`);
      text = `${jobs.length} jobs (${range}): ${parts.join(", ")}.`;
    }
  }
  setStatus(batch.note ? `${batch.note} ${text}` : text, failed || Boolean(batch.note));
}

function addMine(job) {
  if (!state.mine.has(job.id)) state.mineOrder.unshift(job.id);
  state.mine.set(job.id, { ...state.mine.get(job.id), ...job });
  // Its events may have come before the answer to its POST (a short job can even be done).
  const seen = [...state.running, ...state.history].find((j) => j.id === job.id);
  if (seen) updateMine(seen);
}

// What the server says of a job of ours; false when it is not one.
function updateMine(job) {
  const old = state.mine.get(job.id);
  if (!old) return false;
  if (old.status !== job.status && FINISHED.includes(job.status) && document.hidden) state.doneUnseen = true;
  state.mine.set(job.id, { ...old, ...job });
  return true;
}

// What a job sent from here looks like until the server says more: the kind of job it is,
// not its images themselves.
function submittedJob(body, job) {
  const defaults = state.options.generation;
  return { ...defaults, ...body, init_image: body.init_image ? "input" : "", mask: body.mask ? "mask" : "",
    ...job, steps: body.steps ?? defaults.steps, width: body.width ?? defaults.width,
    height: body.height ?? defaults.height };
}

async function submitCreate(event) {
  event.preventDefault();
  const form = $("#create-form");
  clearErrors(form);
  const errors = validateForm(form);
  if (errors.length) {
    showFieldErrors(form, errors);
    setStatus(errors.length === 1 ? "Nothing was sent: one field needs a fix (see below)."
      : `Nothing was sent: ${errors.length} fields need a fix (see below).`, true);
    return;
  }
  if (state.offline) {
    setStatus("The server is unreachable, so nothing was sent. The form keeps your settings: "
      + "press Generate again once it is back.", true);
    return;
  }
  const data = readForm(form);
  const copies = Math.min(16, Math.max(1, Number($("#copies").value) || 1));
  const button = $("#generate");
  button.disabled = true;
  const ids = [];
  try {
    for (let i = 0; i < copies; i++) {
      const body = { ...data };
      // N copies differ by seed: consecutive seeds from the one given, else random ones.
      if (body.seed !== undefined && typeof body.seed === "number") body.seed += i;
      const job = await api("POST", "/api/generate", body, UI_SOURCE);
      ids.push(job.id);
      state.lastSeed = job.seed;
      const shown = submittedJob(body, job);
      addMine(shown);
      upsertQueued(shown);
    }
    state.batch = { ids, note: null };
    rememberPrompt(data.prompt, form.elements.negative_prompt.value);
  } catch (error) {
    if (ids.length) {
      // The ones queued stay queued (each is a job of its own); say plainly which did not.
      state.batch = { ids, note: `Only ${ids.length} of ${copies} copies were queued: the server refused the next one (${error.message}).` };
      rememberPrompt(data.prompt, form.elements.negative_prompt.value);
    } else {
      state.batch = null;
      if (!(error instanceof ApiError) || error.status === 0 || !showErrors(form, error)) {
        setStatus(error.status === 0 ? "The server could not be reached: nothing was queued." : error.message, true);
      } else {
        setStatus("");
      }
    }
  } finally {
    button.disabled = false;
  }
  renderQueue();
  renderStatus();
}

// --------------------------------------------------------------- drafts and prompt history
function saveDraft() {
  const form = $("#create-form");
  store(DRAFT_KEY, { prompt: form.elements.prompt.value,
    // Only a negative prompt of the user's own: else the server's default applies next time.
    negative_prompt: state.touched.has("negative_prompt") ? form.elements.negative_prompt.value : null });
}

function restoreDraft() {
  const draft = loadStored(DRAFT_KEY, null);
  if (!draft || typeof draft !== "object") return;
  const form = $("#create-form");
  if (typeof draft.prompt === "string" && !form.elements.prompt.value) form.elements.prompt.value = draft.prompt;
  if (typeof draft.negative_prompt === "string") {
    form.elements.negative_prompt.value = draft.negative_prompt;
    touch("negative_prompt");
  }
}

function rememberPrompt(prompt, negative) {
  prompt = prompt.trim();
  if (!prompt) return;
  const entries = loadStored(HISTORY_KEY, []).filter((e) => e && e.prompt !== prompt);
  entries.unshift({ prompt, negative_prompt: negative, at: Date.now() });
  store(HISTORY_KEY, entries.slice(0, HISTORY_MAX));
  renderPromptHistory();
}

function renderPromptHistory() {
  const entries = loadStored(HISTORY_KEY, []);
  const words = $("#history-search").value.toLowerCase().split(/\s+/).filter(Boolean);
  const found = entries.filter((e) => e && typeof e.prompt === "string"
    && words.every((w) => `${e.prompt} ${e.negative_prompt || ""}`.toLowerCase().includes(w)));
  $("#history-list").replaceChildren(...found.slice(0, 40).map((entry) => el("li", {},
    el("button", { type: "button", class: "history-item", title: entry.prompt,
      onclick: () => usePrompt(entry) },
    el("span", { class: "prompt-text" }, entry.prompt),
    entry.negative_prompt ? el("span", { class: "sub" }, `Negative: ${entry.negative_prompt}`) : null))));
  const empty = $("#history-empty");
  empty.hidden = found.length > 0;
  empty.textContent = entries.length ? "No recent prompt has these words."
    : "Prompts you generate from this browser show here (kept in this browser only).";
  $("#history-clear").hidden = entries.length === 0;
}

function usePrompt(entry) {
  const form = $("#create-form");
  form.elements.prompt.value = entry.prompt;
  if (typeof entry.negative_prompt === "string") {
    form.elements.negative_prompt.value = entry.negative_prompt;
    touch("negative_prompt");
  }
  saveDraft();
  $("#prompt-history").open = false;
  $("#prompt").focus();
}

function setupCreate() {
  const form = $("#create-form");
  form.addEventListener("submit", submitCreate);
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  const edited = (event) => {
    const name = event.target.name;
    if (DEFAULT_FIELDS.includes(name)) touch(name);
    if (name === "prompt" || name === "negative_prompt") saveDraft();
  };
  form.addEventListener("input", edited);
  form.addEventListener("change", edited);
  form.addEventListener("input", (event) => {
    event.target.removeAttribute("aria-invalid");
    const field = event.target.closest(".field");
    if (field && field.classList.contains("invalid")) {
      field.classList.remove("invalid");
      const slot = $("[data-error-for]", field);
      if (slot) slot.textContent = "";
    }
  });
  $("#seed-random").addEventListener("click", () => {
    $("#seed").value = String(Math.floor(Math.random() * 2147483648));
  });
  $("#seed-last").addEventListener("click", () => {
    if (state.lastSeed !== null) $("#seed").value = String(state.lastSeed);
  });
  $("#size-preset").addEventListener("change", (event) => {
    const size = state.presets[Number(event.target.value)];
    if (event.target.value !== "" && size) {
      $("#width").value = size.width;
      $("#height").value = size.height;
      touch("width", "height");
      renderHiresSize();
    }
  });
  $("#width").addEventListener("input", syncSizePreset);
  $("#height").addEventListener("input", syncSizePreset);
  $("#model").addEventListener("change", renderSizePresets);
  $("#form-reset").addEventListener("click", () => {
    applyDefaults(state.options.generation, { force: true });
    clearErrors(form);
    saveDraft();
    setStatus("Steps, size, guidance, sampler, negative prompt and clip skip are the server's defaults again.");
  });
  $("#history-search").addEventListener("input", renderPromptHistory);
  $("#history-clear").addEventListener("click", () => {
    store(HISTORY_KEY, []);
    renderPromptHistory();
    $("#history-search").focus();
  });
  $("#prompt-history").addEventListener("toggle", () => {
    if ($("#prompt-history").open) $("#history-search").focus();
  });
  renderPromptHistory();
  setupImageInputs();
}

// -------------------------------------------------------------------------- image inputs
// An input image turns the job into image to image; a painted mask into inpainting. The
// mask is drawn on a canvas at the input's own size, so it lines up with it pixel for pixel.
const MASK_COLOR = "#ff2d6f";  // shown over the input; sent as white on black
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

// The nearest multiple of 8, halves to even: what the server's round8 does (Python's round).
function round8(value) {
  const q = value / 8;
  let r = Math.round(q);
  if (Math.abs(q % 1) === 0.5 && r % 2 !== 0) r -= 1;
  return Math.max(8, r * 8);
}

function sizeLimits() {
  const limits = (state.options && state.options.limits) || {};
  return { min: (limits.width && limits.width.min) || 64, max: (limits.width && limits.width.max) || 2048 };
}

// The job's size for an input: its own, rounded to 8, made to fit the bounds if it is huge.
function sizeForInput(width, height) {
  const { min, max } = sizeLimits();
  const scale = Math.min(1, max / width, max / height);
  return [width, height].map((v) => clamp(round8(v * scale), min, max));
}

function outputUrl(name) {
  return `/api/outputs/${String(name).split("/").map(encodeURIComponent).join("/")}`;
}

function inputError(message) {
  const slot = $('[data-error-for="init_image"]');
  slot.textContent = message;
  slot.closest(".field").classList.toggle("invalid", Boolean(message));
}

function readFileAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

async function setInputFile(file) {
  if (!file) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    inputError(`${file.name || "This file"} is not a PNG, JPEG or WebP image${file.type ? ` (${file.type})` : ""}.`);
    return;
  }
  let data;
  try {
    data = await readFileAsDataUrl(file);
  } catch (error) {
    inputError(`Could not read ${file.name}: ${error.message}`);
    return;
  }
  await setInput({ data, url: data, label: file.name || "pasted image" });
}

// input: {data} or {name}, with {url, label}. keepSize: leave the size fields as they are
// ("Use these settings" brings the job's own size).
async function setInput(input, { keepSize = false } = {}) {
  inputError("");
  const probe = new Image();
  probe.src = input.url;
  try {
    await probe.decode();
  } catch {
    inputError(input.name ? `The image ${input.name} could not be loaded (is it still in the outputs?).`
      : `${input.label} could not be read as an image.`);
    return false;
  }
  const width = probe.naturalWidth, height = probe.naturalHeight;
  if (!state.input) {
    state.sizeBeforeInput = { width: $("#width").value, height: $("#height").value,
      touched: ["width", "height"].filter((n) => state.touched.has(n)) };
  }
  state.input = { ...input, width, height };
  $("#input-preview").src = input.url;
  const stage = $("#input-stage");
  stage.style.setProperty("--ratio", String(width / height));
  const canvas = $("#mask-canvas");
  canvas.width = width;  // also clears it: a new input, a new mask
  canvas.height = height;
  if (!keepSize) {
    const [w, h] = sizeForInput(width, height);
    $("#width").value = w;
    $("#height").value = h;
    touch("width", "height");
    syncSizePreset();
  }
  $("#input-name").textContent = `${input.label} · ${width}×${height}`;
  renderInputMode();
  return true;
}

function clearInput({ restoreSize = true } = {}) {
  const had = state.input;
  state.input = null;
  $("#input-file").value = "";
  $("#input-preview").removeAttribute("src");
  inputError("");
  if (had && restoreSize && state.sizeBeforeInput) {
    $("#width").value = state.sizeBeforeInput.width;
    $("#height").value = state.sizeBeforeInput.height;
    state.touched.delete("width");
    state.touched.delete("height");
    touch(...state.sizeBeforeInput.touched);
    syncSizePreset();
  }
  state.sizeBeforeInput = null;
  renderInputMode();
}

function maskContext() {
  return $("#mask-canvas").getContext("2d", { willReadFrequently: true });
}

function maskPainted() {
  if (!state.input) return false;
  const canvas = $("#mask-canvas");
  const pixels = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) return true;
  return false;
}

// The mask as the API takes it: a PNG at the input's size, white where painted, on black.
function maskDataUrl() {
  const source = $("#mask-canvas");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const ctx = out.getContext("2d");
  ctx.drawImage(source, 0, 0);
  ctx.globalCompositeOperation = "source-in";  // keep the strokes' shape (and soft edges) ...
  ctx.fillStyle = "#fff";                      // ... in white
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}

function renderInputMode() {
  const input = state.input;
  $("#input-drop").hidden = Boolean(input);
  $("#input-panel").hidden = !input;
  $("#img2img-options").hidden = !input;
  $("#hires-field").hidden = Boolean(input);  // hires fix is for text to image
  if (input) $("#input-mode").textContent = maskPainted() ? "inpaint" : "img2img";
  renderHiresSize();
}

function numberOrText(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  return isNaN(Number(raw)) ? raw : Number(raw);
}

// The image fields of a job: only those that apply, so a text-to-image job carries none.
function readImageInputs() {
  const data = {};
  if (state.input) {
    data.init_image = state.input.name ?? state.input.data;
    data.strength = Number($("#strength").value);
    if (maskPainted()) {
      data.mask = maskDataUrl();
      const blur = numberOrText($("#mask_blur"));
      if (blur !== undefined) data.mask_blur = blur;
      data.inpaint_area = $("#inpaint_area").value;
    }
  } else if ($("#hires").checked) {
    const hires = {};
    for (const key of ["scale", "steps"]) {
      const value = numberOrText($(`#hires-${key}`));
      if (value !== undefined) hires[key] = value;
    }
    hires.denoising_strength = Number($("#hires-denoising_strength").value);
    hires.upscaler = $("#hires-upscaler").value;
    data.hires = hires;
  }
  return data;
}

function renderHiresSize() {
  const on = $("#hires").checked;
  $("#hires-options").hidden = !on;
  const hint = $("#hires-size");
  const width = Number($("#width").value), height = Number($("#height").value);
  const scale = Number($("#hires-scale").value);
  if (!on || !width || !height || !scale) {
    hint.textContent = "";
    return;
  }
  const final = [round8(width * scale), round8(height * scale)];
  const { max } = sizeLimits();
  hint.textContent = `→ ${final[0]}×${final[1]}${Math.max(...final) > max ? ` (over ${max}: lower the scale)` : ""}`;
  hint.classList.toggle("warn", Math.max(...final) > max);
}

function setHires(hires) {
  const defaults = { scale: 2, steps: 0, denoising_strength: 0.5, upscaler: "latent",
    ...(state.options && state.options.limits.hires && state.options.limits.hires.defaults) };
  const values = { ...defaults, ...(hires || {}) };
  $("#hires").checked = Boolean(hires);
  $("#hires-scale").value = values.scale;
  $("#hires-steps").value = values.steps;
  $("#hires-denoising_strength").value = values.denoising_strength;
  $("#hires-denoising-value").textContent = formatNumber(values.denoising_strength);
  $("#hires-upscaler").value = values.upscaler;
  renderHiresSize();
}

function setStrength(value) {
  $("#strength").value = value;
  $("#strength-value").textContent = formatNumber($("#strength").value);
}

function setBrush(mode) {
  state.brush = mode;
  $("#mask-paint").setAttribute("aria-pressed", String(mode === "paint"));
  $("#mask-erase").setAttribute("aria-pressed", String(mode === "erase"));
}

function setupMaskBrush() {
  const canvas = $("#mask-canvas");
  const cursor = $("#brush-cursor");
  let last = null;  // the stroke's previous point, in the canvas's pixels; null: not drawing
  const scale = () => canvas.width / canvas.getBoundingClientRect().width;
  const point = (event) => {
    const rect = canvas.getBoundingClientRect();
    const k = canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * k, y: (event.clientY - rect.top) * k };
  };
  // The brush size is in screen pixels: the same feel on a phone and on a 4K input.
  const radius = () => Number($("#brush-size").value) / 2 * scale();
  const draw = (from, to) => {
    const ctx = maskContext();
    ctx.globalCompositeOperation = state.brush === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = MASK_COLOR;
    ctx.lineWidth = radius() * 2;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, radius(), 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
  };
  const showCursor = (event) => {
    if (event.pointerType === "touch") {
      cursor.hidden = true;
      return;
    }
    const rect = canvas.getBoundingClientRect();
    const size = Number($("#brush-size").value);
    cursor.hidden = false;
    cursor.style.width = cursor.style.height = `${size}px`;
    cursor.style.transform = `translate(${event.clientX - rect.left - size / 2}px, ${event.clientY - rect.top - size / 2}px)`;
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    draw(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    showCursor(event);
    if (!last) return;
    // Every point the device reported since the last frame: smooth strokes on a phone too.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const each of events.length ? events : [event]) {
      const next = point(each);
      draw(last, next);
      last = next;
    }
  });
  const end = () => {
    if (!last) return;
    last = null;
    renderInputMode();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("lostpointercapture", end);
  canvas.addEventListener("pointerleave", () => { cursor.hidden = true; });
  $("#mask-paint").addEventListener("click", () => setBrush("paint"));
  $("#mask-erase").addEventListener("click", () => setBrush("erase"));
  $("#brush-size").addEventListener("input", () => {
    $("#brush-value").textContent = $("#brush-size").value;
  });
  $("#mask-clear").addEventListener("click", () => {
    maskContext().clearRect(0, 0, canvas.width, canvas.height);
    renderInputMode();
  });
}

function setupImageInputs() {
  const file = $("#input-file");
  $("#input-pick").addEventListener("click", () => file.click());
  file.addEventListener("change", () => setInputFile(file.files[0]));
  $("#input-clear").addEventListener("click", () => {
    clearInput();
    $("#input-pick").focus();
  });
  setupDropAndPaste();
  $("#strength").addEventListener("input", () => setStrength($("#strength").value));
  $("#hires").addEventListener("change", renderHiresSize);
  $("#hires-scale").addEventListener("input", renderHiresSize);
  $("#hires-denoising_strength").addEventListener("input", () => {
    $("#hires-denoising-value").textContent = formatNumber($("#hires-denoising_strength").value);
  });
  setupMaskBrush();
  renderInputMode();
}

// ------------------------------------------------------------ a PNG's settings, dropped
// A file dragged over the page shows two targets: read the settings a PNG carries into the
// form (POST /api/png-info: ours, A1111's "parameters", ComfyUI's graph), or use the image
// as the input. A pasted image with settings fills the form; one without is the input.
const PNG_MAGIC = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const FILE_KINDS = { "image/jpeg": "a JPEG image", "image/webp": "a WebP image", "image/gif": "a GIF image",
  "image/avif": "an AVIF image", "image/bmp": "a BMP image" };

function fileName(file) {
  return file.name || "the pasted image";
}

async function isPng(file) {
  const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  return head.length === 8 && PNG_MAGIC.every((byte, i) => head[i] === byte);
}

// The note above the form: what was read from a file, and what could not be used.
function showReadNote(lines, { bad = false, file = null } = {}) {
  const note = $("#read-note");
  const text = $("#read-note-text");
  text.replaceChildren(...lines.filter(Boolean).map((line) => el("p", {}, line)));
  note.classList.toggle("shown", lines.some(Boolean));
  note.classList.toggle("bad", bad);
  const useInput = $("#read-note-input");
  useInput.hidden = !file;
  useInput.onclick = file ? async () => {
    hideReadNote();
    await setInputFile(file);
    $("#input-clear").focus();
  } : null;
  $("#read-note-close").hidden = !lines.some(Boolean);
}

function hideReadNote() {
  showReadNote([]);
}

// Read a file's settings into the form; true when there were some.
async function readSettingsFrom(file, { quietIfNone = false } = {}) {
  const name = fileName(file);
  let png;
  try {
    png = await isPng(file);
  } catch (error) {
    showReadNote([`Could not read ${name}: ${error.message}`], { bad: true });
    return false;
  }
  if (!png) {
    const kind = FILE_KINDS[file.type] || (file.type ? `a ${file.type} file` : "a file of unknown type");
    showReadNote([`${name} is not a PNG (it is ${kind}): settings can be read from PNG images only.`],
      { bad: true });
    return false;
  }
  let info;
  try {
    info = await api("POST", "/api/png-info", file, { type: "image/png" });
  } catch (error) {
    showReadNote([error.status === 0 ? `Could not read ${name}: the server could not be reached.`
      : `Could not read ${name}: ${error.message}`], { bad: true });
    return false;
  }
  const found = info && info.format && info.parameters && Object.keys(info.parameters).length;
  if (!found) {
    if (!quietIfNone) {
      showReadNote([`${name} carries no generation settings (no parameters from imagineerd, `
        + "A1111 or ComfyUI): nothing was filled in."], { bad: true });
    }
    return false;
  }
  const { filled, unused } = fillFromParameters(info);
  showReadNote([
    filled.length ? `Settings read from ${name}: ${filled.join(", ")}.` : `${name} has settings, but none this form can use.`,
    unused.length ? `Not used: ${unused.join("; ")}.` : "",
  ], { bad: !filled.length, file });
  return true;
}

// A1111 keys that only repeat what is filled in already (hashes of the files named).
const QUIET_KEYS = new Set(["Model hash", "VAE hash", "Lora hashes", "TI hashes", "Hashes", "Version", "RNG",
  "Schedule type", "Hires upscale", "Hires steps", "Hires upscaler", "VAE", "Mask blur"]);
const UPSCALERS = { latent: "latent", lanczos: "lanczos" };

function findListed(kind, name) {
  const list = (state.models && state.models[kind]) || [];
  const bare = modelLabel(name).replace(/\.(pt|bin)$/i, "");
  const hit = list.find((item) => item.name === name) || list.find((item) => modelLabel(item.name) === bare);
  return hit ? hit.name : null;
}

// The form takes a PNG's parameters (our job fields); answers what was filled, in the
// form's words, and what could not be used and why.
function fillFromParameters(info) {
  const params = { ...info.parameters };
  const extra = { ...(info.extra || {}) };
  const form = $("#create-form");
  const filled = [];
  const unused = [];
  const set = (name, value) => {
    form.elements[name].value = value;
    if (DEFAULT_FIELDS.includes(name)) touch(name);
  };
  if (typeof params.prompt === "string") {
    set("prompt", params.prompt);
    filled.push("prompt");
  }
  // Ours and A1111's leave a negative prompt out only when there was none.
  if (typeof params.negative_prompt === "string" || info.format !== "comfyui") {
    set("negative_prompt", params.negative_prompt || "");
    if (params.negative_prompt) filled.push("negative prompt");
  }
  for (const [name, label] of [["seed", "seed"], ["steps", "steps"]]) {
    if (Number.isInteger(params[name])) {
      set(name, params[name]);
      filled.push(label);
    }
  }
  if (Number.isInteger(params.width) && Number.isInteger(params.height)) {
    set("width", params.width);
    set("height", params.height);
    syncSizePreset();
    filled.push(`size ${params.width}×${params.height}`);
  }
  if (typeof params.guidance_scale === "number") {
    set("guidance_scale", params.guidance_scale);
    filled.push("guidance");
  }
  if (params.scheduler) {
    const known = state.options.schedulers.find((s) => s.id === params.scheduler);
    if (known) {
      set("scheduler", params.scheduler);
      filled.push("sampler");
    } else unused.push(`the sampler ${params.scheduler} (not one this server has)`);
  } else if (extra.Sampler) {
    unused.push(`the sampler ${extra.Sampler} (not one this server has)`);
    delete extra.Sampler;
  }
  if (params.model) {
    const select = $("#model");
    if (!state.models) unused.push(`the model ${params.model} (this server lists no models)`);
    else if (isDefaultModel(params.model)) {
      select.value = "";
      filled.push("model");
    } else {
      const name = findListed("checkpoints", params.model);
      if (name) {
        select.value = name;
        filled.push("model");
      } else {
        unused.push(`the model ${displayModel(params.model)} is not in the models folder (the one chosen stays)`);
      }
    }
    renderModelExtras();
    renderSizePresets();
  }
  if (Array.isArray(params.loras)) {
    const ok = [];
    for (const lora of params.loras) {
      const name = lora && findListed("loras", lora.name);
      if (name) ok.push({ name, weight: lora.weight ?? 1 });
      else if (lora) unused.push(`the LoRA ${lora.name} is not in the models folder`);
    }
    setLoras(ok);
    if (ok.length) filled.push(ok.length === 1 ? "LoRA" : "LoRAs");
  } else if (info.format === "a1111") {
    setLoras([]);  // A1111 keeps its LoRAs as <lora:…> tags in the prompt, filled above
  }
  const vae = params.vae ?? extra.VAE;
  if (vae && vae !== "default") {
    const name = findListed("vaes", vae);
    if (name) {
      $("#vae").value = name;
      filled.push("VAE");
      $("#advanced").open = true;
    } else unused.push(`the VAE ${vae} is not in the models folder`);
  } else if (vae === "default") $("#vae").value = "default";
  if (Number.isInteger(params.clip_skip)) {
    set("clip_skip", params.clip_skip);
    filled.push("clip skip");
    if (params.clip_skip !== 1) $("#advanced").open = true;
  }
  // A1111 writes the hires fix as keys of its own, its denoising as "Denoising strength".
  let hires = params.hires || null;
  if (!hires && extra["Hires upscale"]) {
    const upscaler = String(extra["Hires upscaler"] || "latent").toLowerCase();
    hires = { scale: Number(extra["Hires upscale"]), steps: Number(extra["Hires steps"] || 0),
      denoising_strength: params.strength ?? 0.5, upscaler: UPSCALERS[upscaler] || "latent" };
    if (!UPSCALERS[upscaler]) unused.push(`the upscaler ${extra["Hires upscaler"]} (latent is chosen)`);
    delete params.strength;
  }
  if (hires) {
    if (state.input) unused.push("the hires fix (it is for text to image; an input image is set)");
    else {
      setHires(hires);
      filled.push("hires fix");
    }
  } else if (info.format !== "comfyui" && !state.input) setHires(null);
  // Image-to-image settings: kept for when an input is added (the PNG is not its input).
  if (typeof params.strength === "number") setStrength(params.strength);
  if (Number.isInteger(params.mask_blur)) $("#mask_blur").value = params.mask_blur;
  else if (/^\d+$/.test(extra["Mask blur"] || "")) $("#mask_blur").value = extra["Mask blur"];
  if (params.inpaint_area) $("#inpaint_area").value = params.inpaint_area;
  for (const [key, value] of Object.entries(extra)) {
    if (!QUIET_KEYS.has(key)) unused.push(`${key}: ${value} (no such setting here)`);
  }
  saveDraft();
  return { filled, unused };
}

async function readDroppedSettings(file, { count = 1 } = {}) {
  if ($("#viewer").open) $("#viewer").close();
  const wasCreate = !$("#view-create").hidden;
  showTab("create");
  if (!wasCreate) $("#prompt").focus();
  const found = await readSettingsFrom(file);
  if (count > 1) {
    const text = $("#read-note-text");
    text.append(el("p", {}, `Only the first of the ${count} files was read.`));
  }
  $("#read-note").scrollIntoView({ block: "nearest" });
  return found;
}

function setupDropAndPaste() {
  const overlay = $("#drop-overlay");
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  let depth = 0;  // dragenter/dragleave pairs: the overlay goes when the drag leaves the window
  const hide = () => {
    depth = 0;
    overlay.hidden = true;
    for (const zone of overlay.querySelectorAll(".drop-zone")) zone.classList.remove("over");
  };
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event) || $("#token-dialog").open) return;
    depth += 1;
    if ($("#viewer").open) $("#viewer").close();
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    depth = Math.max(0, depth - 1);
    if (depth === 0) hide();
  });
  // Without this a file dropped anywhere would replace the page with itself.
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = $("#token-dialog").open ? "none" : "copy";
    for (const zone of overlay.querySelectorAll(".drop-zone")) {
      zone.classList.toggle("over", zone.contains(event.target));
    }
  });
  document.addEventListener("dragend", hide);
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    hide();
    if ($("#token-dialog").open) return;
    const files = [...event.dataTransfer.files];
    if (!files.length) return;
    // The input field (and its target on the overlay) takes the image as the input; any
    // other place reads its settings.
    const zone = event.target.closest && event.target.closest("[data-drop]");
    const asInput = zone ? zone.dataset.drop === "input" : Boolean(event.target.closest && event.target.closest("#input-field"));
    if (asInput) {
      hideReadNote();
      showTab("create");
      setInputFile(files[0]);
    } else {
      readDroppedSettings(files[0], { count: files.length });
    }
  });
  document.addEventListener("paste", (event) => {
    if (!event.clipboardData || $("#token-dialog").open) return;
    const image = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (!image) return;  // text pastes into the prompt as always
    event.preventDefault();
    if ($("#view-create").hidden || $("#viewer").open) {
      readDroppedSettings(image);
      return;
    }
    // On Create: a PNG with settings fills the form (its note offers it as the input
    // instead); any other image is the input, as it always was.
    (async () => {
      if (image.type === "image/png" && await readSettingsFrom(image, { quietIfNone: true })) return;
      hideReadNote();
      await setInputFile(image);
      if (image.type === "image/png" && state.input) {
        showReadNote([`${fileName(image)} carries no generation settings, so it is the input image now.`]);
      }
    })().catch(() => {});
  });
  $("#read-note-close").addEventListener("click", () => {
    hideReadNote();
    $("#prompt").focus();
  });
}

// --------------------------------------------------------------------------------- queue
function upsertQueued(job) {
  if (state.running.some((j) => j.id === job.id)) return;
  if (state.history.some((j) => j.id === job.id)) return;
  const index = state.queued.findIndex((j) => j.id === job.id);
  if (index >= 0) state.queued[index] = { ...state.queued[index], ...job };
  else state.queued.push(job);
}

async function refreshJobs() {
  const body = await api("GET", "/api/jobs?limit=20");
  // `running` lists every running job; an older server has only `current`.
  state.running = body.running ?? (body.current ? [body.current] : []);
  state.queued = body.queued;
  state.history = body.history;
  if (typeof body.queue_paused === "boolean") setPaused(body.queue_paused);
  const ids = new Set(state.running.map((j) => j.id));
  for (const id of state.stepClocks.keys()) if (!ids.has(id)) state.stepClocks.delete(id);
  for (const id of state.previews.keys()) if (!ids.has(id)) state.previews.delete(id);
  for (const job of state.running) if (job.preview) notePreview({ id: job.id, ...job.preview });
  for (const job of state.running) if (job.progress) noteStep(job.id, job.progress.step);
  for (const job of [...state.running, ...state.queued, ...state.history]) updateMine(job);
  renderQueue();
}

// Jobs of ours the lists no longer show (finished long ago, or while the stream was away).
async function refreshMine() {
  const listed = new Set([...state.running, ...state.queued, ...state.history].map((j) => j.id));
  const missing = [...state.mine.values()].filter((j) => !FINISHED.includes(j.status) && !listed.has(j.id));
  await Promise.all(missing.map(async (job) => {
    try {
      updateMine(await api("GET", `/api/jobs/${job.id}`));
    } catch (error) {
      if (error.status === 404) updateMine({ id: job.id, status: "failed", error: "the server no longer knows this job" });
    }
  }));
  if (missing.length) renderQueue();
}

function noteStep(id, step) {
  const now = performance.now();
  let clock = state.stepClocks.get(id);
  if (!clock) state.stepClocks.set(id, (clock = { firstStep: step, firstAt: now }));
  clock.step = step;
  clock.at = now;
}

function eta(job) {
  const clock = state.stepClocks.get(job.id);
  const progress = job.progress || { step: 0, total: job.steps };
  if (clock && clock.step > clock.firstStep) {
    const perStep = (clock.at - clock.firstAt) / 1000 / (clock.step - clock.firstStep);
    return perStep * (progress.total - progress.step);
  }
  return job.estimated_time_remaining ?? null;
}

function progressOf(job) {
  return job.progress || { step: 0, total: job.steps, percent: 0 };
}

function progressText(job) {
  const progress = progressOf(job);
  return `Step ${progress.step}/${progress.total} · ${Math.round(progress.percent)}% · ETA ${formatSeconds(eta(job))}`;
}

function runningCard(job) {
  const progress = progressOf(job);
  const card = el("div", { class: "card running-job", "data-job": job.id },
    el("div", { class: "running-body" },
      el("div", { class: "sub" }, `Running · job #${job.id}${modeLabel(job) ? ` · ${modeLabel(job)}` : ""}`
        + modelSummary(job)),
      el("div", { class: "prompt-text" }, job.prompt),
      el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
        "aria-valuenow": String(progress.percent), "aria-label": "progress" },
      el("div", { style: `width:${progress.percent}%` })),
      el("div", { class: "row" },
        el("span", { class: "progress-text" }, progressText(job)),
        el("span", { style: "flex:1" }),
        el("button", { type: "button", class: "danger", "data-key": `stop-${job.id}`,
          onclick: () => interrupt(job.id) }, "Stop"))));
  const preview = state.previews.get(job.id);
  if (preview) card.prepend(el("div", { class: "running-preview" }, previewImage(preview)));
  return card;
}

// ------------------------------------------------------------------------ live previews
// job.preview: every few steps, a small JPEG of the picture so far (previews.every_steps).
// The newest one shows in the job's running card and its card in Results, scaled up
// smoothly, until the final image takes its place.
function previewAlt(preview) {
  return `Preview at step ${preview.step} of ${preview.total}`;
}

function previewImage(preview) {
  return el("img", { class: "preview", src: preview.image, alt: previewAlt(preview), decoding: "async" });
}

function notePreview(preview) {
  if (!preview || typeof preview.image !== "string" || !preview.image.startsWith("data:image/")) return;
  const old = state.previews.get(preview.id);
  // An older one overtaken on its way (a hires fix's second pass counts steps again).
  if (old && old.total === preview.total && old.step > preview.step) return;
  state.previews.set(preview.id, preview);
  showPreview(preview.id);
}

// Updated in place (the img's src and alt), never rebuilt: the cards keep their focus.
function showPreview(id) {
  const preview = state.previews.get(id);
  if (!preview) return;
  const update = (img) => {
    if (img.getAttribute("src") !== preview.image) img.src = preview.image;
    img.alt = previewAlt(preview);
  };
  for (const card of document.querySelectorAll(`.running-job[data-job="${id}"]`)) {
    const img = $(".running-preview img", card);
    if (img) update(img);
    else card.prepend(el("div", { class: "running-preview" }, previewImage(preview)));
  }
  const result = $(`#results > li[data-job="${id}"]`);
  if (result && result.dataset.status === "running") {
    const media = $(".result-media", result);
    const img = $("img.preview", media);
    if (img) update(img);
    else media.replaceChildren(previewImage(preview));
  }
}

function modelStatusCard() {
  const status = state.modelStatus;
  if (!status) return null;
  const name = displayModel(status.name);
  if (status.phase === "loading") {
    const from = status.from ? ` (from ${status.from})` : "";
    return el("div", { class: "card model-status loading", role: "status" },
      el("span", { class: "text" }, `Loading model ${name}…`, el("span", { class: "sub" }, from)));
  }
  // The first-run banner already says it for the default model.
  if (!$("#first-run").hidden && isDefaultModel(status.name)) return null;
  return el("div", { class: "card model-status failed", role: "alert" },
    el("span", { class: "text" }, `Could not load model ${name}: ${status.error}`),
    el("button", { type: "button", title: "Dismiss", "aria-label": "Dismiss",
      onclick: () => { state.modelStatus = null; renderQueue(); } }, "✕"));
}

// Lists rebuilt on an event must not take the keyboard focus with them: the control that had
// it (a Stop, a Cancel) gets it back in the new list, found by its data-key.
function keepingFocus(render) {
  const active = document.activeElement;
  const key = active && active.dataset ? active.dataset.key : null;
  const scope = key && active.closest("[data-focus-scope]");
  render();
  if (key && scope && !scope.contains(active)) {
    const again = scope.querySelector(`[data-key="${key}"]`);
    if (again) again.focus();
  }
}

// A thumbnail whose image was deleted (or is in the trash): an empty frame, not a broken icon.
function imageGone(event) {
  const img = event.target;
  img.hidden = true;
  const frame = img.parentElement;
  frame.classList.add("gone");
  frame.title = "This image is no longer in the gallery (deleted)";
}

function historyImages() {
  return state.history.filter((j) => j.status === "completed" && j.output_path).map(jobImage);
}

function historyItem(job) {
  const word = statusWord(job);
  const image = job.status === "completed" && job.output_path ? jobImage(job) : null;
  const again = rerunBody(job);
  const open = () => openViewer(image, { list: historyImages() });
  return el("li", { "data-job": job.id, class: "history-row" },
    image
      ? el("button", { type: "button", class: "history-thumb", "aria-label": `Open the image of job ${job.id}`, onclick: open },
        el("img", { src: image.thumbnail_url, alt: "", loading: "lazy", onerror: imageGone }))
      : el("span", { class: "history-thumb none", "aria-hidden": "true" }),
    el("div", { class: "text" }, el("div", { class: "prompt-text" }, job.prompt),
      el("div", { class: "sub" }, `#${job.id} · ${summary(job)}`
        + (job.duration_seconds ? ` · ${formatSeconds(job.duration_seconds)}` : "")),
      job.error ? el("div", { class: "error" }, job.error) : null),
    el("div", { class: "history-actions" },
      el("span", { class: `state ${word === "done" ? "completed" : word}` }, word === "done" ? "completed" : word),
      image ? el("button", { type: "button", "data-key": `open-${job.id}`, "aria-label": `Open the image of job ${job.id}`,
        onclick: open }, "Open") : null,
      el("button", { type: "button", "data-key": `rerun-${job.id}`, "aria-label": `Re-run job ${job.id}`,
        disabled: !again, title: again ? "Queue it again: the same settings and seed"
          : "Its input image or mask was uploaded and is not kept: use its settings and add them again",
        onclick: () => rerun(job) }, "Re-run"),
      el("button", { type: "button", "data-key": `reuse-${job.id}`, "aria-label": `Use settings of job ${job.id}`,
        onclick: () => useSettings(jobImage(job)) }, "Use settings")));
}

function renderQueue() {
  keepingFocus(() => {
    const running = $("#running");
    running.replaceChildren(...[modelStatusCard(), ...(state.running.length ? state.running.map(runningCard)
      : [el("p", { class: "empty" }, "Nothing is running.")])].filter(Boolean));
    // Beside the form: a model switch, and what other clients run (ours are in Results).
    const createRunning = $("#create-running");
    const statusCard = modelStatusCard();
    const others = state.running.filter((j) => !state.mine.has(j.id));
    createRunning.hidden = others.length === 0 && !statusCard;
    createRunning.replaceChildren(...[statusCard, ...others.map(runningCard)].filter(Boolean));

    $("#queued").replaceChildren(...state.queued.map(queuedItem));
    $("#queued-empty").hidden = state.queued.length > 0;
    const count = state.queued.length + state.running.length;
    $("#queue-count").hidden = count === 0;
    $("#queue-count").textContent = String(count);
    $("#history").replaceChildren(...state.history.slice(0, 20).map(historyItem));
  });
  // Our queued jobs' places, as the queue now has them (moves, jobs ahead started).
  state.queued.forEach((job, i) => {
    const mine = state.mine.get(job.id);
    if (mine && mine.status === "queued") mine.queue_position = i + 1;
  });
  renderResults();
  renderStatus();
  renderTitle();
}

function renderProgress(jobs = state.running) {
  // Cheap per-step update of the bar and the text in place: a card rebuilt at every step
  // would pull its Stop button from under the pointer of whoever is about to click it.
  for (const job of jobs) {
    const shown = state.mine.get(job.id) || job;
    const progress = progressOf(shown);
    for (const card of document.querySelectorAll(`.running-job[data-job="${job.id}"], .result[data-job="${job.id}"]`)) {
      const bar = $(".progress", card);
      bar.setAttribute("aria-valuenow", String(progress.percent));
      bar.firstElementChild.style.width = `${progress.percent}%`;
      $(".progress-text", card).textContent = progressText(shown);
    }
  }
  renderTitle();
}

async function cancel(id) {
  try {
    await api("DELETE", `/api/jobs/${id}`);
    state.queued = state.queued.filter((j) => j.id !== id);
    renderQueue();
  } catch (error) {
    alert(error.message);
    refreshJobs();
  }
}

// ------------------------------------------------------------------- steering the queue
// Move to top, up and down on every queued job. A control that makes no sense where its job
// is (up on the first) says so with aria-disabled rather than disabled: a disabled button
// drops the keyboard focus, and after a move the focus stays on the control just pressed.
const MOVES = {
  top: { icon: "top", title: "Move to top", label: (id) => `Move job ${id} to the top` },
  up: { icon: "up", title: "Up", label: (id) => `Move job ${id} up` },
  down: { icon: "down", title: "Down", label: (id) => `Move job ${id} down` },
};

function moveButton(job, to, off) {
  const move = MOVES[to];
  return el("button", { type: "button", class: `icon-button move-${to}`, "data-key": `${to}-${job.id}`,
    "aria-label": move.label(job.id), title: move.title, "aria-disabled": off ? "true" : null,
    onclick: () => { if (!off) moveJob(job.id, to); } }, icon(move.icon));
}

function queuedItem(job, i) {
  const last = i === state.queued.length - 1;
  return el("li", { "data-job": job.id, class: "queued-row" },
    el("span", { class: "pos" }, String(i + 1)),
    el("div", { class: "text" }, el("div", { class: "prompt-text" }, job.prompt),
      el("div", { class: "sub" }, `#${job.id} · ${summary(job)}`)),
    el("div", { class: "queue-actions" },
      moveButton(job, "top", i === 0), moveButton(job, "up", i === 0), moveButton(job, "down", last),
      el("button", { type: "button", class: "danger", onclick: () => cancel(job.id), "data-key": `cancel-${job.id}`,
        "aria-label": `Cancel job ${job.id}` }, "Cancel")));
}

async function moveJob(id, to) {
  let moved;
  try {
    moved = await api("POST", `/api/jobs/${id}/move`, { to });
  } catch (error) {
    // It started (or was cancelled) meanwhile: the lists are out of date, not the user.
    if (error.status === 409 || error.status === 404) refreshJobs().catch(() => {});
    else showNotice(`Could not move job #${id}: ${error.message}`);
    return;
  }
  // The event stream brings the same move to every open page, in order; this page applies
  // the answer itself only when the stream is down (two answers may overtake each other).
  if (!state.events || state.events.readyState !== EventSource.OPEN) applyMove(moved);
}

// A move as the server tells it (job.moved, or its answer): the jobs now at places
// first, first + 1, ... Anything that does not fit what this page shows reloads the lists.
function applyMove(job) {
  const move = job.move;
  if (!move || !Array.isArray(move.order)) return;
  const start = move.first - 1;
  const slice = state.queued.slice(start, start + move.order.length);
  const ids = new Set(slice.map((j) => j.id));
  if (slice.length !== move.order.length || !move.order.every((id) => ids.has(id))) {
    refreshJobs().catch(() => {});
    return;
  }
  const byId = new Map(slice.map((j) => [j.id, j]));
  state.queued.splice(start, move.order.length, ...move.order.map((id) => byId.get(id)));
  const index = state.queued.findIndex((j) => j.id === job.id);
  if (index >= 0) state.queued[index] = { ...state.queued[index], ...job, move: undefined };
  renderQueue();
}

// Paused: the jobs running finish, no worker takes a new one until it is resumed.
function setPaused(paused) {
  state.queuePaused = Boolean(paused);
  const button = $("#queue-pause");
  const text = state.queuePaused ? "Resume queue" : "Pause queue";
  if (button.textContent !== text) button.textContent = text;
  button.classList.toggle("primary", state.queuePaused);
  const notes = state.queuePaused
    ? ["Queue paused — the running batch finishes, nothing new starts.",
      "Queue paused: new jobs wait until it is resumed (on the Queue tab)."]
    : ["", ""];
  // Live regions: written only when the text changes, so nothing is read out twice.
  [$("#queue-paused"), $("#create-paused")].forEach((slot, i) => {
    if (slot.textContent !== notes[i]) slot.textContent = notes[i];
  });
  document.body.classList.toggle("queue-is-paused", state.queuePaused);
}

async function togglePause() {
  const button = $("#queue-pause");
  if (button.getAttribute("aria-busy") === "true") return;
  button.setAttribute("aria-busy", "true");
  try {
    const answer = await api("POST", state.queuePaused ? "/api/queue/resume" : "/api/queue/pause");
    setPaused(answer.paused);
    renderQueue();
  } catch (error) {
    showNotice(`Could not ${state.queuePaused ? "resume" : "pause"} the queue: ${error.message}`);
  } finally {
    button.removeAttribute("aria-busy");
  }
}

async function interrupt(id) {
  try {
    await api("POST", `/api/jobs/${id}/interrupt`);
  } catch (error) {
    alert(error.message);
  }
}

// A job's settings as a new job: the same seed, model files and inputs. An uploaded input
// (or a painted mask) is kept by the server only as its hash, so such a job cannot be sent
// again as it is: null.
function rerunBody(job) {
  if (job.mask || (job.init_image && !job.init_image_name)) return null;
  const body = {};
  for (const key of ["prompt", "negative_prompt", "seed", "steps", "width", "height", "guidance_scale",
    "scheduler", "clip_skip"]) {
    if (job[key] !== undefined && job[key] !== null) body[key] = job[key];
  }
  if (job.model && !(state.models && isDefaultModel(job.model))) body.model = job.model;
  if (job.loras && job.loras.length) body.loras = job.loras;
  if (job.vae && job.vae !== "default") body.vae = job.vae;
  if (job.hires) body.hires = job.hires;
  if (job.init_image_name) {
    body.init_image = job.init_image_name;
    if (job.strength !== undefined) body.strength = job.strength;
  }
  return body;
}

async function rerun(job) {
  const body = rerunBody(job);
  if (!body) return;
  try {
    const queued = await api("POST", "/api/generate", body, UI_SOURCE);
    const shown = { ...job, ...submittedJob(body, queued), status: "queued", started_at: null, progress: null,
      output_path: null, error: null, completed_at: null, duration_seconds: null };
    addMine(shown);
    upsertQueued(shown);
    state.batch = { ids: [queued.id], note: `Re-run of job #${job.id}:` };
    renderQueue();
  } catch (error) {
    alert(error.message);
  }
}

// ------------------------------------------------------------------------------- results
// Each job submitted from this page, newest first: its progress, then its image. Cards are
// updated in place (never rebuilt), so a focused Stop keeps the focus while steps go by.
const RESULTS_MAX = 60;
const STATE_LABELS = { queued: "Queued", running: "Running", done: "Done", failed: "Failed",
  stopped: "Stopped", cancelled: "Cancelled" };

function outputName(path) {
  const text = String(path || "").replace(/\\/g, "/");
  const at = text.lastIndexOf("outputs/");
  return at >= 0 ? text.slice(at + "outputs/".length) : text.split("/").pop();
}

// A finished job as the viewer shows an image: what the gallery lists, from the job record.
const jobImages = new Map();
function jobImage(job) {
  const cached = jobImages.get(job.id);
  if (cached && cached.output_path === job.output_path) return cached;
  const filename = outputName(job.output_path);
  const url = outputUrl(filename);
  const scheduler = state.options && state.options.schedulers.find((s) => s.id === job.scheduler);
  const image = { ...job, filename, url, thumbnail_url: `${url}?thumb=256`, job_id: job.id,
    sampler: scheduler ? scheduler.label : job.scheduler, created: job.completed_at };
  jobImages.set(job.id, image);
  return image;
}

function resultImages() {
  return state.mineOrder.map((id) => state.mine.get(id))
    .filter((j) => j && j.status === "completed" && j.output_path).map(jobImage);
}

function resultCard(id) {
  const found = $(`#results > li[data-job="${id}"]`);
  if (found) return found;
  return el("li", { class: "result card", "data-job": id, tabindex: "-1" },
    el("div", { class: "result-media" }, el("span", { class: "result-placeholder", "aria-hidden": "true" })),
    el("div", { class: "result-body" },
      el("div", { class: "sub" }, el("span", { class: "state" }), el("span", { class: "result-id" })),
      el("div", { class: "prompt-text" }),
      el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
        "aria-label": `Progress of job ${id}` }, el("div")),
      el("div", { class: "row" },
        el("span", { class: "progress-text" }),
        el("span", { style: "flex:1" }),
        el("button", { type: "button", class: "danger result-stop", "data-key": `stop-${id}`,
          "aria-label": `Stop job ${id}`, onclick: () => interrupt(id) }, "Stop"),
        el("button", { type: "button", class: "danger result-cancel", "data-key": `cancel-${id}`,
          "aria-label": `Cancel job ${id}`, onclick: () => cancel(id) }, "Cancel")),
      el("p", { class: "error result-error" })));
}

function renderResult(job) {
  const card = resultCard(job.id);
  const hadFocus = card.contains(document.activeElement);
  const word = statusWord(job);
  card.dataset.status = word;
  const badge = $(".state", card);
  badge.className = `state ${word}`;
  badge.textContent = STATE_LABELS[word] || job.status;
  const position = job.status === "queued" && job.queue_position ? ` · position ${job.queue_position}` : "";
  $(".result-id", card).textContent = ` · job #${job.id}${modeLabel(job) ? ` · ${modeLabel(job)}` : ""}${position}`;
  $(".prompt-text", card).textContent = job.prompt;
  const progress = progressOf(job);
  const bar = $(".progress", card);
  bar.hidden = job.status !== "running";
  bar.setAttribute("aria-valuenow", String(progress.percent));
  bar.firstElementChild.style.width = `${progress.percent}%`;
  let text = "";
  if (job.status === "running") text = progressText(job);
  else if (job.status === "queued") text = state.queuePaused ? "Waiting: the queue is paused" : "Waiting for its turn";
  else if (word === "done") text = `${job.width}×${job.height} · seed ${job.seed}`
    + (job.duration_seconds ? ` · ${formatSeconds(job.duration_seconds)}` : "");
  else if (word === "stopped" && job.progress) text = `Stopped at step ${job.progress.step}/${job.progress.total}`;
  else if (word === "cancelled") text = "Taken out of the queue";
  $(".progress-text", card).textContent = text;
  $(".result-stop", card).hidden = job.status !== "running";
  $(".result-cancel", card).hidden = job.status !== "queued";
  $(".result-error", card).textContent = job.status === "failed" ? job.error || "It failed." : "";
  const media = $(".result-media", card);
  if (job.status === "completed" && job.output_path) {
    const image = jobImage(job);
    if (media.dataset.file !== image.filename) {
      media.dataset.file = image.filename;
      media.replaceChildren(el("button", { type: "button", class: "result-thumb", "data-key": `open-${job.id}`,
        "aria-label": `Open the image of job ${job.id}`,
        onclick: () => openViewer(jobImage(state.mine.get(job.id)), { list: resultImages() }) },
      el("img", { src: image.thumbnail_url, alt: job.prompt, onerror: imageGone })));
    }
  } else if (job.status === "running" && state.previews.has(job.id) && !$("img.preview", media)) {
    media.replaceChildren(previewImage(state.previews.get(job.id)));
  }
  // The Stop or Cancel that had the focus is gone with its job: the card (or its image) takes it.
  const active = document.activeElement;
  if (hadFocus && (!card.contains(active) || !active.getClientRects().length)) {
    ($(".result-thumb", card) || card).focus();
  }
  return card;
}

function renderResults() {
  const list = $("#results");
  state.mineOrder = state.mineOrder.slice(0, RESULTS_MAX);
  const cards = state.mineOrder.map((id) => renderResult(state.mine.get(id)));
  for (const card of [...list.children]) if (!cards.includes(card)) card.remove();
  // Newest first; only cards out of place move (a moved node would lose the focus).
  cards.forEach((card, i) => {
    if (list.children[i] !== card) list.insertBefore(card, list.children[i] || null);
  });
  $("#results-empty").hidden = cards.length > 0;
}

// The tab's title: our jobs' progress, and "done" for a tab in the background.
function renderTitle() {
  const jobs = [...state.mine.values()];
  const running = jobs.filter((j) => j.status === "running");
  const queued = jobs.filter((j) => j.status === "queued").length;
  let prefix = "";
  if (running.length) {
    const percent = running.reduce((sum, j) => sum + progressOf(j).percent, 0) / running.length;
    prefix = `${Math.round(percent)}%${queued ? ` (+${queued} queued)` : ""} · `;
  } else if (queued) prefix = `Queued (${queued}) · `;
  else if (state.doneUnseen) prefix = "✓ Done · ";
  const title = `${prefix}imagineerd`;
  if (document.title !== title) document.title = title;
}

// ------------------------------------------------------------------ connection and notes
function setOffline(offline) {
  state.offline = offline;
  $("#offline").hidden = !offline;
  document.body.classList.toggle("offline", offline);
}

// The unfinished jobs shown when the stream dropped, to tell afterwards what became of them.
function snapshotJobs() {
  const before = new Map();
  const jobs = [...state.running, ...state.queued.slice(0, 20),
    ...[...state.mine.values()].filter((j) => !FINISHED.includes(j.status))];
  for (const job of jobs) before.set(job.id, { status: job.status, started_at: job.started_at || null });
  return before;
}

function knownJob(id) {
  return state.mine.get(id) || [...state.running, ...state.queued, ...state.history].find((j) => j.id === id);
}

const ENDED = { done: "finished", failed: "failed", stopped: "was stopped", cancelled: "was cancelled" };

async function reportReconnect(before) {
  const notes = [];
  for (const [id, was] of before) {
    let now = knownJob(id);
    if (!now || (!FINISHED.includes(now.status) && now.status === was.status && now.started_at === was.started_at)) {
      try {
        now = await api("GET", `/api/jobs/${id}`);
      } catch (error) {
        if (error.status === 404) notes.push(`job #${id} is gone`);
        continue;
      }
    }
    const word = statusWord(now);
    const restarted = was.status === "running" && now.started_at && now.started_at !== was.started_at;
    if (restarted) notes.push(`job #${id} was interrupted and restarted${ENDED[word] ? ` (it ${ENDED[word]} since)` : ""}`);
    else if (was.status === "running" && now.status === "queued") notes.push(`job #${id} was interrupted and is back in the queue`);
    else if (ENDED[word]) notes.push(`job #${id} ${ENDED[word]}`);
    else if (was.status === "queued" && now.status === "running") notes.push(`job #${id} started`);
  }
  const shown = notes.slice(0, 8);
  if (notes.length > shown.length) shown.push(`${notes.length - shown.length} more changed`);
  showNotice(shown.length ? `Back online. While the server was unreachable: ${shown.join("; ")}.`
    : "Back online. Nothing changed while the server was unreachable.");
}

function showNotice(text) {
  $("#notice-text").textContent = text;
  $("#notice").hidden = false;
}

// -------------------------------------------------------------------------------- events
function connectEvents() {
  if (state.events) state.events.close();
  const source = new EventSource("/api/events");
  state.events = source;
  const indicator = $("#connection");
  const say = (text) => {
    indicator.title = `live updates: ${text}`;
    indicator.setAttribute("aria-label", `Live updates: ${text}`);
  };
  // After every (re)connect the true state comes from the API; events then keep it current.
  source.onopen = async () => {
    indicator.classList.add("live");
    say("connected");
    const before = state.offline ? state.before : null;
    setOffline(false);
    state.before = null;
    checkHealth();
    try {
      await refreshJobs();
      await refreshMine();
    } catch {
      return;
    }
    if (before) reportReconnect(before).catch(() => {});
  };
  source.onerror = () => {
    indicator.classList.remove("live");
    say("reconnecting…");
    if (!state.offline) {
      state.before = snapshotJobs();
      setOffline(true);
    }
    // The browser retries a dropped stream by itself, but not one the server refused (the
    // session ended: 401; too many tabs: 503). Check now and then, and ask for the token if
    // that is what is missing, then connect again.
    if (source.readyState === EventSource.CLOSED) {
      const retry = () => {
        if (state.events !== source) return;
        refreshJobs().then(connectEvents).catch(() => setTimeout(retry, 5000));
      };
      setTimeout(retry, 5000);
    }
  };
  const on = (type, handler) => source.addEventListener(type, (e) => handler(JSON.parse(e.data)));
  on("job.submitted", (job) => { upsertQueued(job); updateMine(job); renderQueue(); });
  on("job.started", (job) => {
    state.queued = state.queued.filter((j) => j.id !== job.id);
    state.running = [...state.running.filter((j) => j.id !== job.id), job];
    updateMine(job);
    noteStep(job.id, 0);
    renderQueue();
  });
  on("job.progress", (p) => {
    const job = state.running.find((j) => j.id === p.id);
    const progress = { step: p.step, total: p.total, percent: p.percent };
    const mine = state.mine.get(p.id);
    if (mine) mine.progress = progress;
    if (!job && !mine) return;
    if (job) job.progress = progress;
    noteStep(p.id, p.step);
    renderProgress([job || mine]);  // a batch sends one event per job per step: redraw that one
  });
  on("job.preview", notePreview);
  for (const type of ["job.completed", "job.failed", "job.cancelled"]) {
    on(type, (job) => {
      state.previews.delete(job.id);
      state.queued = state.queued.filter((j) => j.id !== job.id);
      state.running = state.running.filter((j) => j.id !== job.id);
      state.stepClocks.delete(job.id);
      state.history = [job, ...state.history.filter((j) => j.id !== job.id)].slice(0, 20);
      updateMine(job);
      renderQueue();
      if (type === "job.completed") refreshGalleryHead();
    });
  }
  on("job.requeued", () => refreshJobs());
  on("job.moved", (job) => applyMove(job));
  on("output.favourite", (o) => { if (othersOnly([o.filename]).length) applyFavourite(o.filename, o.favourite); });
  on("output.trashed", (o) => dropTrashed(othersOnly(o.files || [])));
  on("output.restored", (o) => noteRestored(othersOnly(o.files || [])));
  on("queue.paused", () => { setPaused(true); renderQueue(); });
  on("queue.resumed", () => { setPaused(false); renderQueue(); });
  on("model.loading", (m) => {
    state.modelStatus = { name: m.name, phase: "loading", from: m.from };
    renderQueue();
  });
  on("model.ready", (m) => {
    if (state.modelStatus && state.modelStatus.name === m.name) state.modelStatus = null;
    if (isDefaultModel(m.name)) showFirstRun(null);
    renderQueue();
    checkHealth();
  });
  on("model.failed", (m) => {
    state.modelStatus = { name: m.name, phase: "failed", error: m.error };
    renderQueue();
    checkHealth().then(renderQueue);
  });
  // The server no longer holds the events we missed (it restarted, or we were away long):
  // everything we show may be stale, so reload it all.
  on("reset", () => {
    refreshJobs().then(refreshMine).catch(() => {});
    refreshGalleryHead().catch(() => {});
    loadModels().catch(() => {});
    checkHealth();
  });
  // New defaults (Settings here, another client, config.yaml): the fields the user has not
  // set show them, so what the form shows is what the next job gets.
  on("config.changed", () => {
    loadOptions().then((options) => {
      applyLimits(options.limits);
      applyDefaults(options.generation);
    }).catch(() => {});
    loadModels().catch(() => {});
    if (!$("#view-settings").hidden) loadSettings();
  });
}

// ------------------------------------------------------------------------------- gallery
// Tiles newest first, a page at a time, filtered by the server (GET /api/outputs with the
// filter bar's values). Each tile opens the viewer, and has a star (favourite) and Delete;
// select mode picks several for Delete or Download zip. Deleted images go to the server's
// trash, and the toast's Undo brings them back.
const GALLERY_PAGE = 24;
const SOURCES = { ui: "this web page", api: "the REST API", inbox: "the inbox folder", a1111: "A1111's API",
  openai: "OpenAI's API", cli: "the command line" };

function shortPrompt(item) {
  const text = (item.prompt || item.filename || "").trim();
  return text.length > 60 ? `${text.slice(0, 57)}…` : text;
}

// A star toggle: aria-pressed says whether it is on; the name says what it is for.
function setStar(button, on, name) {
  button.setAttribute("aria-pressed", String(Boolean(on)));
  if (name !== undefined) button.setAttribute("aria-label", name);
  if (button.id !== "filter-favourite") {
    button.title = on ? "A favourite (press to unmark it)" : "Mark as a favourite";
  }
  if (!button.querySelector("svg")) button.prepend(icon("star"));
}

function thumb(item) {
  const open = el("button", { type: "button", class: "thumb", "data-file": item.filename,
    title: item.prompt || item.filename, onclick: () => tileClicked(item, open) },
  el("img", { src: item.thumbnail_url, alt: item.prompt || item.filename, loading: "lazy" }),
  el("span", { class: "tile-check", "aria-hidden": "true" }, icon("check")));
  const star = el("button", { type: "button", class: "icon-button tile-star star-toggle", "data-key": `star-${item.filename}`,
    onclick: () => toggleFavourite(item) });
  setStar(star, item.favourite, `Favourite: ${shortPrompt(item)}`);
  const remove = el("button", { type: "button", class: "icon-button tile-delete", "data-key": `delete-${item.filename}`,
    "aria-label": `Delete: ${shortPrompt(item)}`, title: "Delete (Undo brings it back)",
    onclick: () => deleteImages([item], { from: remove }) }, icon("trash"));
  return el("div", { class: "tile", "data-file": item.filename, role: "group", "aria-label": shortPrompt(item) },
    open, el("div", { class: "tile-actions" }, star, remove));
}

function tileOf(filename) {
  return [...$("#gallery").children].find((tile) => tile.dataset.file === filename) || null;
}

// The filter bar as the API's query; only what is set.
function galleryQuery() {
  const filters = {};
  const q = $("#filter-q").value.trim();
  if (q) filters.q = q;
  const model = $("#filter-model").value;
  if (model) filters.model = model;
  const source = $("#filter-source").value;
  if (source) filters.source = source;
  if ($("#filter-favourite").getAttribute("aria-pressed") === "true") filters.favourite = "true";
  for (const name of ["width", "height"]) {
    const value = $(`#filter-${name}`).value.trim();
    if (value && Number.isInteger(Number(value)) && Number(value) > 0) filters[name] = value;
  }
  for (const name of ["since", "until"]) {
    const value = $(`#filter-${name}`).value;
    if (value) filters[name] = value;  // YYYY-MM-DD: an ISO date
  }
  return filters;
}

function queryString(params) {
  return Object.entries(params).map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
}

// What the filters say, in words, for the count line and the empty state.
function filterWords(filters) {
  const words = [];
  if (filters.q) words.push(`“${filters.q}”`);
  if (filters.favourite) words.push("favourites");
  if (filters.model) words.push(`model ${filters.model}`);
  if (filters.source) words.push(`made by ${SOURCES[filters.source] || filters.source}`);
  if (filters.width || filters.height) words.push(`${filters.width || "any"}×${filters.height || "any"}`);
  if (filters.since && filters.until) words.push(`${filters.since} to ${filters.until}`);
  else if (filters.since) words.push(`from ${filters.since}`);
  else if (filters.until) words.push(`up to ${filters.until}`);
  return words;
}

function renderGalleryState() {
  const filters = state.galleryFilters || {};
  const words = filterWords(filters);
  const count = state.gallery.length;
  const loaded = state.galleryCursor !== undefined;
  $("#gallery-empty").hidden = !loaded || count > 0;
  $("#gallery-empty-text").textContent = words.length ? `No image matches ${words.join(", ")}.` : "No images yet.";
  $("#gallery-empty-clear").hidden = !words.length;
  const more = state.galleryCursor ? "+" : "";
  const text = words.length && count ? `${count}${more} image${count === 1 && !more ? "" : "s"} match ${words.join(", ")}.` : "";
  if ($("#gallery-status").textContent !== text) $("#gallery-status").textContent = text;
  const active = Object.keys(filters).filter((k) => !["q", "favourite"].includes(k)).length;
  $("#filter-more").textContent = active ? `Filters (${active})` : "Filters";
}

async function loadGallery() {
  if (state.galleryLoading || state.galleryCursor === null) return;
  state.galleryLoading = true;
  const generation = state.galleryGeneration;
  try {
    const cursor = state.galleryCursor;
    const filters = state.galleryFilters || {};
    const params = { limit: GALLERY_PAGE, ...filters };
    if (cursor) params.before = cursor;
    const body = await api("GET", `/api/outputs?${queryString(params)}`);
    if (generation !== state.galleryGeneration) return;  // the filters changed meanwhile
    const known = new Set(state.gallery.map((i) => i.filename));
    const fresh = body.outputs.filter((i) => !known.has(i.filename));
    state.gallery.push(...fresh);
    state.galleryCursor = body.next_before ?? null;
    $("#gallery").append(...fresh.map(thumb));
    renderGalleryState();
  } finally {
    if (generation === state.galleryGeneration) state.galleryLoading = false;
  }
  // A short page can leave the end in sight: the observer only says when that changes.
  const sentinel = $("#gallery-more").getBoundingClientRect();
  if (state.galleryCursor && !$("#view-gallery").hidden && sentinel.top < innerHeight + 400) loadGallery();
}

// New filters: the gallery starts again from its newest image that matches them.
function applyGalleryFilters() {
  const filters = galleryQuery();
  if (JSON.stringify(filters) === JSON.stringify(state.galleryFilters || {})) return;
  state.galleryFilters = filters;
  restartGallery();
}

// The gallery read again from its newest image that matches the filters.
function restartGallery() {
  state.galleryGeneration += 1;
  state.galleryLoading = false;
  state.gallery.length = 0;  // the same array: the viewer's list is this one
  state.galleryCursor = undefined;
  state.selected.clear();
  $("#gallery").replaceChildren();
  renderSelection();
  renderGalleryState();
  loadGallery().catch((error) => showGalleryError(error));
}

function showGalleryError(error) {
  $("#gallery-status").textContent = `Could not load the gallery: ${error.message}`;
}

async function refreshGalleryHead() {
  if (state.galleryCursor === undefined) return; // not opened yet: it loads fresh later
  const body = await api("GET", `/api/outputs?${queryString({ limit: 10, ...(state.galleryFilters || {}) })}`);
  const known = new Set(state.gallery.map((i) => i.filename));
  const fresh = body.outputs.filter((i) => !known.has(i.filename));
  state.gallery.unshift(...fresh);
  $("#gallery").prepend(...fresh.map(thumb));
  renderGalleryState();
}

function galleryModels() {
  const select = $("#filter-model");
  const chosen = select.value;
  const names = new Set();
  if (state.models) {
    if (state.models.default) names.add(modelLabel(state.models.default));
    for (const c of state.models.checkpoints) names.add(modelLabel(c.name));
  }
  select.replaceChildren(el("option", { value: "" }, "Any model"),
    ...[...names].sort().map((name) => el("option", { value: name }, name)));
  if ([...names].includes(chosen)) select.value = chosen;
}

// ---------------------------------------------------------------------- favourites
function sameImage(filename) {
  return [state.gallery, state.viewerItems].flat().filter((i) => i && i.filename === filename);
}

async function toggleFavourite(item) {
  const want = !item.favourite;
  let entry;
  try {
    entry = await ownChange([item.filename],
      () => api("PATCH", `/api/outputs/${encodeFile(item.filename)}`, { favourite: want }));
  } catch (error) {
    showToast(`Could not ${want ? "mark" : "unmark"} it as a favourite: ${error.message}`);
    return;
  }
  const favourite = entry && typeof entry.favourite === "boolean" ? entry.favourite : want;
  item.favourite = favourite;
  applyFavourite(item.filename, favourite);
}

// ``request()`` with ``files`` marked as this page's own change until its answer is in: the
// event of the change may arrive first, and must not undo or redo what the answer does.
async function ownChange(files, request) {
  for (const file of files) state.ownOutputs.add(file);
  try {
    return await request();
  } finally {
    // After the answer's handling (a microtask later): an event queued meanwhile is ours.
    setTimeout(() => { for (const file of files) state.ownOutputs.delete(file); }, 0);
  }
}

function othersOnly(files) {
  return files.filter((file) => !state.ownOutputs.has(file));
}

// A star set here, or in another page (output.favourite), shows everywhere the image does.
function applyFavourite(filename, favourite) {
  for (const each of sameImage(filename)) each.favourite = favourite;
  const tile = tileOf(filename);
  if (tile) setStar($(".tile-star", tile), favourite);
  if ($("#viewer").open && $("#viewer").dataset.file === filename) setStar($("#viewer-favourite"), favourite);
}

// Images deleted in another page leave this one's gallery too (their Undo is that page's).
function dropTrashed(files) {
  const gone = new Set(files.filter((file) => tileOf(file) || state.gallery.some((i) => i.filename === file)));
  if (!gone.size) return; // this page's own delete: done already, focus where it put it
  for (let i = state.gallery.length - 1; i >= 0; i--) {
    if (gone.has(state.gallery[i].filename)) state.gallery.splice(i, 1); // in place: the viewer shares it
  }
  for (const file of gone) {
    const tile = tileOf(file);
    if (tile) tile.remove();
    state.selected.delete(file);
  }
  renderSelection();
  renderGalleryState();
}

// Images restored in another page come back in their places: the gallery is read again.
function noteRestored(files) {
  if (state.galleryCursor === undefined) return; // not opened yet: it loads fresh later
  if (files.some((file) => !tileOf(file))) restartGallery();
}

function encodeFile(name) {
  return String(name).split("/").map(encodeURIComponent).join("/");
}

// ----------------------------------------------------------------- delete, and undo
// Deleted images go to the server's trash (outputs/.trash) until purge_after; Undo
// restores them where they were.
async function deleteImages(items, { from = null } = {}) {
  if (!items.length) return;
  const files = items.map((i) => i.filename);
  let answer;
  try {
    answer = await ownChange(files, () => files.length === 1
      ? api("DELETE", `/api/outputs/${encodeFile(files[0])}`)
      : api("POST", "/api/outputs/delete", { files }));
  } catch (error) {
    showToast(`Could not delete ${files.length === 1 ? "the image" : `the ${files.length} images`}: ${error.message}`);
    return;
  }
  const trashed = new Set((answer && answer.trashed) || files);
  const missing = (answer && answer.missing) || [];
  // The focus moves to the next tile's same control (or the one before), never to nothing.
  let next = null;
  if (from && from.closest && from.closest(".tile")) {
    const tiles = [...$("#gallery").children];
    const at = tiles.indexOf(from.closest(".tile"));
    const after = tiles.slice(at + 1).concat(tiles.slice(0, at).reverse()).find((t) => !trashed.has(t.dataset.file));
    if (after) next = $(`.${[...from.classList].find((c) => c.startsWith("tile-")) || "thumb"}`, after);
  }
  // Where each was, counted before any goes: Undo puts them back in the same places.
  const removed = state.gallery.map((item, index) => ({ item, index })).filter(({ item }) => trashed.has(item.filename));
  for (const { index } of [...removed].reverse()) state.gallery.splice(index, 1);
  for (const file of trashed) {
    const tile = tileOf(file);
    if (tile) tile.remove();
    state.selected.delete(file);
  }
  renderSelection();
  renderGalleryState();
  if (from && !document.contains(from)) (next || $("#filter-q")).focus();
  const count = trashed.size;
  const gone = missing.length ? ` (${missing.length} ${missing.length === 1 ? "was" : "were"} already gone)` : "";
  showToast(`Deleted ${count === 1 ? "1 image" : `${count} images`}${gone}.`, {
    undo: count ? () => restoreImages([...trashed], removed) : null });
  return trashed;
}

async function restoreImages(files, removed) {
  let answer;
  try {
    answer = await ownChange(files, () => api("POST", "/api/outputs/restore", { files }));
  } catch (error) {
    showToast(`Could not bring them back: ${error.message}`);
    return;
  }
  const restored = new Set((answer && answer.restored) || files);
  for (const { item, index } of removed) {
    if (!restored.has(item.filename) || tileOf(item.filename)) continue;
    const at = Math.min(index, state.gallery.length);
    state.gallery.splice(at, 0, item);
    const before = $("#gallery").children[at] || null;
    $("#gallery").insertBefore(thumb(item), before);
  }
  renderGalleryState();
  const missing = (answer && answer.missing) || [];
  const conflicts = (answer && answer.conflicts) || [];
  const count = restored.size;
  const notes = [];
  if (missing.length) notes.push(`${missing.length} no longer in the trash`);
  if (conflicts.length) notes.push(`${conflicts.length} kept in the trash: a file has that name again`);
  showToast(`Restored ${count === 1 ? "1 image" : `${count} images`}${notes.length ? `; ${notes.join("; ")}` : ""}.`);
}

// ---------------------------------------------------------------------- the toast
let toastTimer = null;
const TOAST_SECONDS = 8;

function showToast(text, { undo = null } = {}) {
  const toast = $("#toast");
  // A modal viewer makes the rest of the page inert: the toast goes inside it then.
  const host = $("#viewer").open ? $("#viewer") : document.body;
  if (toast.parentElement !== host) host.append(toast);
  $("#toast-text").textContent = text;
  toast.classList.add("shown");
  const button = $("#toast-undo");
  button.hidden = !undo;
  state.undo = undo;
  $("#toast-close").hidden = false;
  placeToast();
  clearTimeout(toastTimer);
  toastTimer = setTimeout(hideToast, TOAST_SECONDS * 1000);
}

// Above the select bar while it shows (it sticks to the bottom of the window too).
function placeToast() {
  const toast = $("#toast");
  const bar = $("#select-bar");
  const below = toast.parentElement === document.body && !bar.hidden && !$("#view-gallery").hidden;
  toast.style.bottom = below ? `${bar.offsetHeight + 24}px` : "";
}

function hideToast() {
  clearTimeout(toastTimer);
  const toast = $("#toast");
  const hadFocus = toast.contains(document.activeElement);
  toast.classList.remove("shown");
  $("#toast-text").textContent = "";
  $("#toast-undo").hidden = true;
  $("#toast-close").hidden = true;
  state.undo = null;
  if (toast.parentElement !== document.body) document.body.append(toast);
  if (hadFocus) ($("#viewer").open ? $("#viewer-zoom") : $("#filter-q")).focus();
}

function undoLast() {
  const undo = state.undo;
  if (!undo) return;
  hideToast();
  undo();
}

// -------------------------------------------------------------------- select mode
function selecting() {
  return $("#select-mode").getAttribute("aria-pressed") === "true";
}

function setSelectMode(on) {
  $("#select-mode").setAttribute("aria-pressed", String(on));
  $("#select-bar").hidden = !on;
  $("#gallery").classList.toggle("selecting", on);
  if (!on) state.selected.clear();
  renderSelection();
  placeToast();
}

function tileClicked(item, button) {
  if (!selecting()) {
    openViewer(item, { list: state.gallery });
    return;
  }
  if (state.selected.has(item.filename)) state.selected.delete(item.filename);
  else state.selected.add(item.filename);
  renderSelection();
  button.focus();
}

function renderSelection() {
  const on = selecting();
  for (const tile of $("#gallery").children) {
    const picked = on && state.selected.has(tile.dataset.file);
    tile.classList.toggle("picked", picked);
    const open = $(".thumb", tile);
    if (on) open.setAttribute("aria-pressed", String(picked));
    else open.removeAttribute("aria-pressed");
  }
  const count = state.selected.size;
  const text = count ? `${count} selected` : "Pick images to delete or download.";
  if ($("#select-count").textContent !== text) $("#select-count").textContent = text;
  for (const id of ["#select-delete", "#select-zip"]) {
    if (count) $(id).removeAttribute("aria-disabled");
    else $(id).setAttribute("aria-disabled", "true");
  }
}

function selectedItems() {
  return state.gallery.filter((i) => state.selected.has(i.filename));
}

// The zip comes from a POST (the list is too long for a URL, and a URL would want the token):
// fetched, then handed to the browser as a download of an object URL, never a link to us.
async function downloadZip(items) {
  const button = $("#select-zip");
  if (!items.length || button.getAttribute("aria-busy") === "true") return;
  button.setAttribute("aria-busy", "true");
  const label = button.textContent;
  button.textContent = "Preparing…";
  try {
    const { blob, headers } = await api("POST", "/api/outputs/zip", { files: items.map((i) => i.filename) },
      { blob: true });
    const match = /filename="?([^";]+)"?/i.exec(headers.get("Content-Disposition") || "");
    const name = match ? match[1] : `imagineerd-${items.length}-images.zip`;
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    showToast(`Downloading ${name} (${items.length === 1 ? "1 image" : `${items.length} images`}).`);
  } catch (error) {
    showToast(`Could not make the zip: ${error.message}`);
  } finally {
    button.textContent = label;
    button.removeAttribute("aria-busy");
  }
}

function setupGalleryTools() {
  const form = $("#gallery-filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    applyGalleryFilters();
  });
  let typing = null;  // the search waits for a pause in typing
  $("#filter-q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(applyGalleryFilters, 300);
  });
  for (const id of ["#filter-model", "#filter-source", "#filter-since", "#filter-until"]) {
    $(id).addEventListener("change", applyGalleryFilters);
  }
  for (const id of ["#filter-width", "#filter-height"]) {
    $(id).addEventListener("change", applyGalleryFilters);
  }
  setStar($("#filter-favourite"), false);
  setStar($("#viewer-favourite"), false);
  $("#filter-favourite").addEventListener("click", () => {
    const on = $("#filter-favourite").getAttribute("aria-pressed") !== "true";
    $("#filter-favourite").setAttribute("aria-pressed", String(on));
    applyGalleryFilters();
  });
  $("#filter-more").addEventListener("click", () => {
    const open = $("#filter-extra").hidden;
    $("#filter-extra").hidden = !open;
    $("#filter-more").setAttribute("aria-expanded", String(open));
  });
  const clear = () => {
    form.reset();
    $("#filter-favourite").setAttribute("aria-pressed", "false");
    applyGalleryFilters();
    $("#filter-q").focus();
  };
  $("#filter-clear").addEventListener("click", clear);
  $("#gallery-empty-clear").addEventListener("click", clear);
  $("#select-mode").addEventListener("click", () => setSelectMode(!selecting()));
  $("#select-done").addEventListener("click", () => {
    setSelectMode(false);
    $("#select-mode").focus();
  });
  $("#select-all").addEventListener("click", () => {
    for (const item of state.gallery) state.selected.add(item.filename);
    renderSelection();
  });
  $("#select-delete").addEventListener("click", async () => {
    const items = selectedItems();
    if (!items.length) return;
    await deleteImages(items);
    renderSelection();
  });
  $("#select-zip").addEventListener("click", () => downloadZip(selectedItems()));
  $("#view-gallery").addEventListener("keydown", (event) => {
    if (event.key === "Escape" && selecting() && !$("#viewer").open) {
      setSelectMode(false);
      $("#select-mode").focus();
    }
  });
  $("#toast-undo").addEventListener("click", undoLast);
  $("#toast-close").addEventListener("click", hideToast);
  // Ctrl/⌘ + Z undoes a delete while its toast shows (not inside a text field: that undoes typing).
  document.addEventListener("keydown", (event) => {
    if (!state.undo || !(event.ctrlKey || event.metaKey) || event.key.toLowerCase() !== "z") return;
    if (event.target.closest("input, textarea, select")) return;
    event.preventDefault();
    undoLast();
  });
}

function setupGallery() {
  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && !$("#view-gallery").hidden) {
      loadGallery().catch((error) => showGalleryError(error));
    }
  }, { rootMargin: "400px" });
  observer.observe($("#gallery-more"));
  setupGalleryTools();
  $("#viewer-copy").addEventListener("click", async () => {
    const text = $("#viewer").dataset.prompt || "";
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // Clipboard API needs HTTPS or localhost; fall back to a selection copy.
      const area = el("textarea", {}, text);
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    $("#viewer-copy").textContent = "Copied";
    setTimeout(() => { $("#viewer-copy").textContent = "Copy prompt"; }, 1500);
  });
}

// What an image's A1111 parameters say about its files (images of other tools, or ours
// whose job is no longer in the store): "Clip skip: 2", "VAE: name.safetensors" and the
// LoRAs of "Lora hashes" (their weights are in the prompt's <lora:...> tags, if anywhere).
function parseParameters(text) {
  const found = {};
  if (!text) return found;
  const line = text.trim().split("\n").pop();
  const clip = /(?:^|,\s*)Clip skip:\s*(\d+)/.exec(line);
  if (clip) found.clip_skip = Number(clip[1]);
  const vae = /(?:^|,\s*)VAE:\s*("?)([^,"]+)\1/.exec(line);
  if (vae) found.vae = vae[2].trim().replace(/\.(safetensors|pt|bin|ckpt)$/i, "");
  const loras = /(?:^|,\s*)Lora hashes:\s*"([^"]*)"/.exec(line);
  if (loras) found.lora_names = loras[1].split(",").map((p) => p.split(":")[0].trim()).filter(Boolean);
  // What A1111 writes for image to image, inpainting and the hires fix.
  const value = (key) => {
    const match = new RegExp(`(?:^|,\\s*)${key}:\\s*([^,]+)`).exec(line);
    return match ? match[1].trim() : null;
  };
  const denoise = value("Denoising strength"), blur = value("Mask blur"), scale = value("Hires upscale");
  if (scale !== null) {
    found.hires = { scale: Number(scale), steps: Number(value("Hires steps") || 0),
      denoising_strength: denoise === null ? 0.5 : Number(denoise),
      upscaler: (value("Hires upscaler") || "latent").toLowerCase() };
  } else if (denoise !== null) {
    found.init_image = "uploaded";  // an input there was; which one, the text does not say
    found.strength = Number(denoise);
    if (blur !== null) {
      found.mask = "painted";
      found.mask_blur = Number(blur);
    }
  }
  return found;
}

const IMAGE_KEYS = ["init_image", "init_image_name", "strength", "mask", "mask_blur", "inpaint_area", "hires"];

// An image's inputs: from its record's keys (a job, or a gallery entry that has them), else
// from its A1111 parameters.
function imageInputs(source, parameters) {
  if (source && "init_image" in source) {
    return Object.fromEntries(IMAGE_KEYS.map((key) => [key, source[key] ?? null]));
  }
  const parsed = parseParameters(parameters);
  return Object.fromEntries(IMAGE_KEYS.map((key) => [key, parsed[key] ?? null]));
}

function imageModels(item) {
  const parsed = parseParameters(item.parameters);
  return {
    inputs: imageInputs(item, item.parameters),
    loras: item.loras ?? (parsed.lora_names ? parsed.lora_names.map((name) => ({ name, weight: null })) : []),
    vae: item.vae ?? parsed.vae ?? "default",
    clip_skip: item.clip_skip ?? parsed.clip_skip ?? (item.parameters ? 1 : null),
  };
}

// The gallery lists an image's model; its LoRAs (with weights), VAE and clip skip come
// from its job while the store has it (the same prompt and seed), else from its parameters.
function imageExtras(item) {
  if (!item.extras) {
    item.extras = (async () => {
      const parsed = imageModels(item);
      if ((item.loras !== undefined && "init_image" in item) || !item.job_id) return parsed;
      try {
        const job = await api("GET", `/api/jobs/${item.job_id}`);
        if (job.prompt !== item.prompt || job.seed !== item.seed) return parsed;
        return { loras: job.loras || [], vae: job.vae || "default", clip_skip: job.clip_skip ?? parsed.clip_skip,
          inputs: imageInputs(job, item.parameters), size: [job.width, job.height] };
      } catch {
        return parsed;  // gone from the store: the parameters will do
      }
    })();
  }
  return item.extras;
}

// "Use these settings" for the model files: the model, LoRAs, VAE and clip skip.
async function reuseModels(item) {
  const extra = await imageExtras(item);
  const select = $("#model");
  const status = $("#create-status");
  status.textContent = "";
  status.className = "status";
  if (item.model && !isDefaultModel(item.model)) {
    if ([...select.options].some((o) => o.value === item.model)) select.value = item.model;
    else {
      select.value = "";
      status.textContent = `The model ${item.model} is not in the models folder; the default is chosen.`;
      status.className = "status bad";
    }
  } else select.value = "";
  renderModelExtras();
  renderSizePresets();
  // LoRAs named only by their hash line (no weight) are left to the prompt's tags.
  setLoras((extra.loras || []).filter((l) => l.weight !== null));
  const vae = extra.vae || "default";
  $("#vae").value = [...$("#vae").options].some((o) => o.value === vae) ? vae : "default";
  const clipSkip = extra.clip_skip ?? state.options.generation.clip_skip;
  if (clipSkip !== undefined && clipSkip !== null) {
    $("#clip_skip").value = clipSkip;
    touch("clip_skip");
  }
  if ((clipSkip && clipSkip !== 1) || vae !== "default") $("#advanced").open = true;
}

// A date as this browser's locale writes it; the server's times are its local time.
function formatDate(value) {
  if (!value) return null;
  const date = new Date(value);
  if (isNaN(date)) return String(value);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function viewerMeta(item, extra) {
  const rows = [
    ["Prompt", item.prompt], ["Negative prompt", item.negative_prompt || "—"],
    ["Seed", item.seed], ["Steps", item.steps], ["Size", `${item.width}×${item.height}`],
    ["Guidance", item.guidance_scale], ["Sampler", item.sampler],
    ["Model", item.model ? modelLabel(item.model) : null],
    ...viewerModelRows(extra),
    ...viewerImageRows(extra.inputs),
    ["Duration", item.duration_seconds ? formatSeconds(item.duration_seconds) : null],
    ["Created", formatDate(item.completed_at || item.created)], ["Job", item.job_id ? `#${item.job_id}` : null],
    ["File", item.filename],
  ].filter(([, v]) => v !== null && v !== undefined);
  $("#viewer-meta").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

// "Use these settings": the form takes an image's (or a job's) settings.
function useSettings(item) {
  const form = $("#create-form");
  for (const name of ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler"]) {
    if (item[name] !== undefined && item[name] !== null) {
      form.elements[name].value = item[name];
      if (DEFAULT_FIELDS.includes(name)) touch(name);
    }
  }
  if (item.width && item.height) {
    [form.elements.width.value, form.elements.height.value] = jobSize(item, imageModels(item).inputs.hires);
    touch("width", "height");
  }
  syncSizePreset();
  saveDraft();
  if ($("#viewer").open) $("#viewer").close();
  showTab("create");
  $("#prompt").focus();
  // The models' note first (it resets the status line), then the inputs' own.
  reuseModels(item).catch(() => {}).then(() => reuseImageInputs(item)).catch(() => {});
}

// item: an image (a gallery entry, or a finished job as jobImage() makes it); list: the
// images ← and → step through (the gallery's, the results', the queue's).
function openViewer(item, { list = [item] } = {}) {
  const index = list.findIndex((i) => i.filename === item.filename);
  state.viewerItems = index >= 0 ? list : [item];
  state.viewerIndex = Math.max(0, index);
  showInViewer(item);
  const dialog = $("#viewer");
  if (!dialog.open) dialog.showModal();
}

function showInViewer(item) {
  const dialog = $("#viewer");
  dialog.dataset.prompt = item.prompt || "";
  dialog.dataset.file = item.filename;
  setZoom(false);
  $("#viewer-image").src = item.url;
  $("#viewer-image").alt = item.prompt || item.filename;
  $("#viewer-title").textContent = item.job_id ? `Job #${item.job_id}` : "Image";
  const count = state.viewerItems.length;
  $("#viewer-count").textContent = count > 1 ? `${state.viewerIndex + 1} of ${count}` : "";
  const focused = document.activeElement;
  $("#viewer-prev").disabled = state.viewerIndex <= 0;
  $("#viewer-next").disabled = state.viewerIndex >= count - 1
    && !(state.viewerItems === state.gallery && state.galleryCursor);
  // At an end, the button that had the focus is disabled: its twin takes it.
  if (focused && focused.disabled) (focused.id === "viewer-next" ? $("#viewer-prev") : $("#viewer-next")).focus();
  if (dialog.open && !dialog.contains(document.activeElement)) $("#viewer-zoom").focus();
  viewerMeta(item, imageModels(item));
  imageExtras(item).then((extra) => {
    if (dialog.open && dialog.dataset.file === item.filename) viewerMeta(item, extra);
  });
  const known = item.favourite ?? (state.gallery.find((i) => i.filename === item.filename) || {}).favourite;
  setStar($("#viewer-favourite"), Boolean(known));
  $("#viewer-favourite").onclick = () => toggleFavourite(item);
  $("#viewer-delete").onclick = () => deleteFromViewer(item);
  $("#viewer-download").href = item.url;
  $("#viewer-download").setAttribute("download", item.filename.split("/").pop());
  $("#viewer-open").href = item.url;
  $("#viewer-reuse").onclick = () => useSettings(item);
  $("#viewer-input").onclick = async () => {
    dialog.close();
    showTab("create");
    if (await setInput({ name: item.filename, url: item.url, label: item.filename })) $("#prompt").focus();
  };
}

// Delete in the viewer: the next image shows (the one before at the end), or it closes.
async function deleteFromViewer(item) {
  const dialog = $("#viewer");
  const list = state.viewerItems;
  const trashed = await deleteImages([item]);
  if (!trashed || !trashed.has(item.filename)) return;
  if (list !== state.gallery) {
    const index = list.findIndex((i) => i.filename === item.filename);
    if (index >= 0) list.splice(index, 1);
  }
  if (!dialog.open) return;
  if (!list.length) {
    dialog.close();
    return;
  }
  state.viewerIndex = Math.min(state.viewerIndex, list.length - 1);
  showInViewer(list[state.viewerIndex]);
  $("#viewer-delete").focus();
}

async function stepViewer(step) {
  let index = state.viewerIndex + step;
  // The gallery's next page, when → reaches the end of what is loaded.
  if (index >= state.viewerItems.length && state.viewerItems === state.gallery && state.galleryCursor) {
    await loadGallery();
  }
  index = clamp(index, 0, state.viewerItems.length - 1);
  if (index === state.viewerIndex) return;
  state.viewerIndex = index;
  showInViewer(state.viewerItems[index]);
}

// 100%: the image at its own pixels, scrolled inside its frame; else fitted to it.
function setZoom(actual) {
  $("#viewer-stage").classList.toggle("actual", actual);
  $("#viewer-zoom").setAttribute("aria-pressed", String(actual));
  $("#viewer-zoom").textContent = actual ? "Fit" : "100%";
  $("#viewer-zoom").title = actual ? "Fit the image to the window" : "Show at 100% (actual pixels)";
}

function setupViewer() {
  const dialog = $("#viewer");
  // A toast shown inside the viewer (it was modal) stays in sight once the viewer closes.
  dialog.addEventListener("close", () => {
    const toast = $("#toast");
    if (toast.parentElement === dialog) document.body.append(toast);
  });
  $("#viewer-prev").addEventListener("click", () => stepViewer(-1));
  $("#viewer-next").addEventListener("click", () => stepViewer(1));
  $("#viewer-zoom").addEventListener("click", () => setZoom(!$("#viewer-stage").classList.contains("actual")));
  $("#viewer-image").addEventListener("click", () => setZoom(!$("#viewer-stage").classList.contains("actual")));
  // On the document: a nav button that became disabled (at either end) drops the focus
  // out of the dialog, and the keys must go on working then too.
  document.addEventListener("keydown", (event) => {
    if (!dialog.open || event.target.closest("input, textarea, select")) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const step = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (step) {
      event.preventDefault();
      stepViewer(step);
    } else if (event.key === "f" || event.key === "F") {
      event.preventDefault();
      $("#viewer-favourite").click();
    } else if (event.key === "Delete") {
      event.preventDefault();
      $("#viewer-delete").click();
    }
  });
}

const AREAS = { whole: "whole picture", masked: "only masked" };

function viewerImageRows(item) {
  const hires = item.hires;
  const hash = /^sha256:([0-9a-f]{12})/.exec(item.init_image || "");
  const input = item.init_image
    ? item.init_image_name || `an uploaded image${hash ? ` (${hash[1]})` : ""}`
    : null;
  return [
    ["Mode", modeLabel(item) || null],
    ["Input", input],
    ["Strength", item.init_image ? item.strength : null],
    ["Mask", item.mask ? [`blur ${item.mask_blur ?? 4}`, AREAS[item.inpaint_area] || item.inpaint_area]
      .filter(Boolean).join(" · ") : null],
    ["Hires fix", hires ? [`×${formatNumber(hires.scale)}`, hires.steps ? `${hires.steps} steps` : "the job's steps",
      `denoising ${formatNumber(hires.denoising_strength)}`, hires.upscaler].join(" · ") : null],
  ];
}

// The size the job asked for: a hires-fixed image is larger than that, by its scale.
function jobSize(item, hires) {
  const scale = hires && Number(hires.scale);
  if (!scale || scale === 1) return [item.width, item.height];
  return [round8(item.width / scale), round8(item.height / scale)];
}

// "Use these settings" for the image inputs: strength, hires fix, and the input itself when
// it was an output (an uploaded input is not kept under a name, nor is a painted mask).
async function reuseImageInputs(image) {
  const extra = await imageExtras(image);
  const item = extra.inputs;
  const notes = [];
  if (image.width && image.height) {
    [$("#width").value, $("#height").value] = extra.size || jobSize(image, item.hires);
    touch("width", "height");
    syncSizePreset();
  }
  setStrength(item.strength ?? 0.75);
  if (item.mask_blur !== undefined && item.mask_blur !== null) $("#mask_blur").value = item.mask_blur;
  if (item.inpaint_area) $("#inpaint_area").value = item.inpaint_area;
  setHires(item.init_image ? null : item.hires || null);
  if (item.init_image && item.init_image_name) {
    const name = item.init_image_name;
    const ok = await setInput({ name, url: outputUrl(name), label: name }, { keepSize: true });
    if (ok && item.mask) notes.push("Paint the mask again: it is not kept.");
  } else {
    clearInput({ restoreSize: false });
    if (item.init_image) notes.push("Its input image was uploaded, and is not kept: drop it here again to redo it.");
  }
  if (notes.length) {
    const status = $("#create-status");
    status.textContent = [status.textContent, ...notes].filter(Boolean).join(" ");
    status.className = "status bad";
  }
}

function viewerModelRows(extra) {
  const loras = extra.loras.map((l) => (l.weight === null ? l.name : `${l.name} ${l.weight}`));
  return [
    ["LoRAs", loras.length ? loras.join(", ") : null],
    ["VAE", extra.vae !== "default" ? extra.vae : null],
    ["Clip skip", extra.clip_skip && extra.clip_skip !== 1 ? extra.clip_skip : null],
  ];
}

// ------------------------------------------------------------------------------ settings
async function loadSettings() {
  const config = await api("GET", "/api/config");
  const form = $("#settings-form");
  for (const name of ["steps", "guidance_scale", "width", "height", "scheduler", "negative_prompt"]) {
    form.elements[name].value = config.generation[name];
  }
  const rows = [];
  for (const [section, values] of Object.entries(config)) {
    if (section === "generation" || section === "restart_required") continue;
    if (typeof values !== "object" || values === null) continue;
    for (const [key, value] of Object.entries(values)) {
      rows.push(el("dt", {}, `${section}.${key}`), el("dd", {}, typeof value === "object" ? JSON.stringify(value) : String(value)));
    }
  }
  $("#config-view").replaceChildren(...rows);
  const restart = config.restart_required || [];
  $("#restart-note").hidden = restart.length === 0;
  $("#restart-note").textContent = `Saved but not yet in effect (restart the server): ${restart.join(", ")}`;
}

async function saveSettings(event) {
  event.preventDefault();
  const form = $("#settings-form");
  const status = $("#settings-status");
  clearErrors(form);
  const body = { negative_prompt: form.elements.negative_prompt.value, scheduler: form.elements.scheduler.value };
  for (const name of ["steps", "guidance_scale", "width", "height"]) {
    const raw = form.elements[name].value.trim();
    body[name] = raw === "" || isNaN(Number(raw)) ? raw : Number(raw);
  }
  try {
    const result = await api("PUT", "/api/config/generation", body);
    status.textContent = result.message;
    status.className = "status";
    state.options.generation = result.config.generation;
    applyDefaults(result.config.generation);
  } catch (error) {
    if (!(error instanceof ApiError) || !showErrors(form, error, "generation.")) {
      status.textContent = error.message;
      status.className = "status bad";
    } else {
      status.textContent = "";
    }
  }
}

async function logout() {
  await api("DELETE", "/api/session");
  $("#logout").hidden = true;
  if (state.events) state.events.close();
  location.reload();  // back to the token dialog
}

// ---------------------------------------------------------------------------------- boot
async function loadOptions() {
  state.options = await api("GET", "/api/options");
  return state.options;
}

async function main() {
  // Earlier versions kept the token itself in localStorage: do not leave it lying there.
  try { localStorage.removeItem("imagineerd.token"); } catch { /* storage disabled */ }
  setupTabs();
  setupCreate();
  setupModels();
  setupGallery();
  setupViewer();
  setupTokenDialog();
  $("#settings-form").addEventListener("submit", saveSettings);
  $("#logout").addEventListener("click", logout);
  $("#queue-pause").addEventListener("click", togglePause);
  const options = await loadOptions();
  // Logged in by a cookie from an earlier visit: offer to log out.
  api("GET", "/api/session").then((session) => {
    $("#logout").hidden = !(session.auth_required && session.authenticated);
  }).catch(() => {});
  applyLimits(options.limits);
  fillSelects(options);
  applyDefaults(options.generation);
  restoreDraft();
  await loadModels().catch(() => {});
  showTab(location.hash.slice(1) || "create");
  connectEvents();
  // Keep the ETA ticking between steps of a slow job.
  setInterval(() => { if (state.running.length) renderProgress(); }, 1000);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      state.doneUnseen = false;
      renderTitle();
    }
  });
  $("#notice-close").addEventListener("click", () => { $("#notice").hidden = true; });
}

main().catch((error) => {
  document.body.prepend(el("p", { class: "status bad", role: "alert" }, `Could not start: ${error.message}`));
});
