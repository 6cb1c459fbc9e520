// The ldm serve page: a form over /sdapi/v1/txt2img and /img2img, live progress from /ldmkit/v1/jobs,
// a gallery of results, a mask painted on a canvas, PNG settings read back with /sdapi/v1/png-info.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", key: sessionStorage.getItem("ldmkit-key") || "", job: null, info: null,
                maskPainted: false };

// ---------------------------------------------------------------- HTTP
async function api(path, body, retry = true) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const res = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401 && retry) {
    await askKey();
    return api(path, body, false);
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(describe(data) || `HTTP ${res.status}`);
  return data;
}

function describe(data) {
  const d = data && data.detail;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("\n");
  return d ? String(d) : "";
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    dialog.addEventListener("close", () => {
      state.key = $("key-input").value.trim();
      sessionStorage.setItem("ldmkit-key", state.key);
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

// ---------------------------------------------------------------- the form
function fillSelect(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => new Option(label, v)));
  if (value !== undefined && items.some(([v]) => v === value)) select.value = value;
}

async function loadInfo() {
  const info = state.info = await api("/ldmkit/v1/info");
  fillSelect($("model"), info.models.map((m) => [m.model_name, m.title]), info.current);
  fillSelect($("sampler_name"), info.samplers.map((s) => [s.name, s.name]), info.defaults.sampler_name);
  fillSelect($("scheduler"), info.schedulers.map((s) => [s, s]), info.defaults.scheduler);
  for (const k of ["steps", "cfg_scale", "width", "height"]) $(k).value = info.defaults[k];
  for (const k of ["width", "height"]) { $(k).step = info.size_multiple; $(k).max = info.limits.max_size; }
  $("steps").max = info.limits.max_steps;
  $("lora-box").hidden = !info.loras.length;
  fillSelect($("lora-name"), info.loras.map((n) => [n, n]));
  $("cn-box").hidden = !info.controlnets.length;
  fillSelect($("cn-model"), [["", "(none)"], ...info.controlnets.map((n) => [n, n])]);
  fillSelect($("cn-module"), info.controlnet_modules.map((n) => [n, n]));
  $("status").textContent = `ldmkit ${info.version}, ${info.conditioning} model`;
}

function setMode(mode) {
  state.mode = mode;
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.mode === mode);
  $("i2i-box").hidden = mode !== "img2img";
}

function num(id) { return Number($(id).value); }

async function fileDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody(taskId) {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
                 sampler_name: $("sampler_name").value, scheduler: $("scheduler").value, steps: num("steps"),
                 cfg_scale: num("cfg_scale"), width: num("width"), height: num("height"), seed: num("seed"),
                 batch_size: num("batch_size"), n_iter: num("n_iter"), force_task_id: taskId };
  const cn = $("cn-model").value;
  if (cn) {
    const file = $("cn-image").files[0];
    if (!file) throw new Error("ControlNet: choose a control image");
    body.alwayson_scripts = { controlnet: { args: [{ model: cn, module: $("cn-module").value,
                                                     weight: num("cn-weight"), image: await fileDataUrl(file) }] } };
  }
  if (state.mode === "img2img") {
    if (!$("init-canvas").width) throw new Error("img2img: choose an input image");
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = num("denoising_strength");
    if ($("mask-on").checked && state.maskPainted) body.mask = maskDataUrl();
  }
  return body;
}

// ---------------------------------------------------------------- generating
async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  const taskId = "page-" + (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
  let body;
  try { body = await requestBody(taskId); } catch (e) { $("error").textContent = e.message; return; }
  state.job = taskId;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("preview").hidden = true;
  const poll = setInterval(() => watch(taskId), 500);
  try {
    const res = await api(state.mode === "img2img" ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", body);
    const info = JSON.parse(res.info);
    if (info.interrupted) $("progress-text").textContent = "cancelled";
    else addResult(res.images, info);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    clearInterval(poll);
    state.job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    $("progress-box").hidden = true;
  }
}

async function watch(taskId) {
  let s;
  try { s = await api(`/ldmkit/v1/jobs/${taskId}?preview=true`); } catch (e) { return; }
  if (state.job !== taskId) return;
  $("progress").value = s.progress;
  const text = s.state === "queued" ? `waiting: ${s.position} job(s) ahead`
    : s.state === "running" ? `step ${s.step}/${s.steps}` + (s.eta ? `, ${s.eta.toFixed(1)} s left` : "")
    : s.state;
  $("progress-text").textContent = text;
  if (s.preview) {
    $("preview").src = "data:image/png;base64," + s.preview;
    $("preview").hidden = false;
  }
}

async function cancel() {
  if (state.job) await api(`/ldmkit/v1/jobs/${state.job}/cancel`, {}).catch(() => {});
}

function addResult(images, info) {
  const card = document.createElement("div");
  card.className = "card";
  const pics = document.createElement("div");
  pics.className = "images";
  images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = info.all_prompts[i] || "result";
    img.title = info.files[i] || "";
    img.className = "result";
    pics.append(img);
  });
  const side = document.createElement("div");
  const text = document.createElement("pre");
  text.textContent = info.infotexts[0] + (info.ignored_fields.length ? `\nignored: ${info.ignored_fields.join(", ")}` : "");
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse settings";
  reuse.addEventListener("click", () => applySettings({ prompt: info.prompt, negative_prompt: info.negative_prompt,
    sampler_name: info.sampler_name, scheduler: info.scheduler, steps: info.steps, cfg_scale: info.cfg_scale,
    width: info.width, height: info.height, seed: info.seed }));
  const send = document.createElement("button");
  send.type = "button";
  send.textContent = "Send to img2img";
  send.addEventListener("click", () => { setMode("img2img"); loadInitImage(pics.firstChild.src); });
  side.append(text, reuse, " ", send);
  card.append(pics, side);
  $("gallery").prepend(card);
}

function applySettings(s) {
  const set = (id, v) => { if (v !== undefined && v !== null && v !== "") $(id).value = v; };
  set("prompt", s.prompt);
  $("negative_prompt").value = s.negative_prompt || "";
  if (s.sampler_name && [...$("sampler_name").options].some((o) => o.value === s.sampler_name)) {
    $("sampler_name").value = s.sampler_name;
  }
  set("scheduler", s.scheduler || "Automatic");
  for (const k of ["steps", "cfg_scale", "width", "height", "seed"]) set(k, s[k]);
}

// ---------------------------------------------------------------- img2img and the mask
function loadInitImage(src) {
  const img = new Image();
  img.onload = () => {
    for (const c of [$("init-canvas"), $("mask-canvas")]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    $("init-canvas").getContext("2d").drawImage(img, 0, 0);
    clearMask();
    $("width").value = img.naturalWidth;
    $("height").value = img.naturalHeight;
  };
  img.src = src;
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.maskPainted = false;
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const c = $("mask-canvas");
  const r = c.getBoundingClientRect();
  const x = (event.clientX - r.left) * c.width / r.width, y = (event.clientY - r.top) * c.height / r.height;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.beginPath();
  ctx.arc(x, y, num("brush") * c.width / Math.max(r.width, 1) / 2, 0, 2 * Math.PI);
  ctx.fill();
  state.maskPainted = true;
  $("mask-on").checked = true;
}

function maskDataUrl() {
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width; out.height = src.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(src, 0, 0);
  return out.toDataURL("image/png");
}

// ---------------------------------------------------------------- PNG settings by drag and drop
async function readPng(file) {
  try {
    const res = await api("/sdapi/v1/png-info", { image: await fileDataUrl(file) });
    const p = res.parameters || {};
    if (!p.Prompt && !res.info) throw new Error(`${file.name}: no generation settings in this PNG`);
    applySettings({ prompt: p.Prompt, negative_prompt: p["Negative prompt"], sampler_name: p.Sampler,
                    scheduler: p["Schedule type"], steps: p.Steps, cfg_scale: p["CFG scale"], seed: p.Seed,
                    width: p["Size-1"], height: p["Size-2"] });
    $("error").textContent = "";
    $("status").textContent = `settings read from ${file.name}`;
  } catch (e) {
    $("error").textContent = e.message;
  }
}

function setupDrop() {
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop-hint").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-hint").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop-hint").hidden = true;
    const file = e.dataTransfer.files[0];
    if (file) readPng(file);
  });
}

// ---------------------------------------------------------------- wiring
function setup() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("model").addEventListener("change", async () => {
    try { await api("/sdapi/v1/options", { sd_model_checkpoint: $("model").value }); await loadInfo(); }
    catch (e) { $("error").textContent = e.message; }
  });
  $("lora-add").addEventListener("click", () => {
    $("prompt").value = `${$("prompt").value.trim()} <lora:${$("lora-name").value}:${$("lora-weight").value}>`.trim();
  });
  $("init-file").addEventListener("change", async () => {
    const file = $("init-file").files[0];
    if (file) loadInitImage(await fileDataUrl(file));
  });
  $("mask-canvas").addEventListener("pointerdown", paint);
  $("mask-canvas").addEventListener("pointermove", paint);
  $("mask-clear").addEventListener("click", clearMask);
  setupDrop();
  loadInfo().catch((e) => { $("error").textContent = e.message; });
}

document.addEventListener("DOMContentLoaded", setup);
