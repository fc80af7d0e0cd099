// diffguard's page: plain JavaScript against the HTTP API (no build step, no CDN).
// Untrusted strings (filenames, error messages, model names) only ever go through textContent, never innerHTML.
"use strict";

const KEY_STORE = "diffguard.apiKey";
const ACTION_WORDS = { allow: "allowed", flag: "reported", blur: "blurred", black: "blacked out", block: "blocked" };
const SHOWS_PIXELS = new Set(["allow", "flag", "blur", "black"]); // the API only sends pixels the policy releases
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;
const SCALE = 0.25; // a margin of +-0.25 fills half a bar

const $ = (id) => document.getElementById(id);
let conceptNames = { concept: [], special: [] };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...init, headers });
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch { body = null; }
  if (!response.ok) {
    // The API's own words ({"error", "request_id"}); anything else (a proxy's page) as plain text.
    const words = body && typeof body.error === "string" ? body.error : (text || response.statusText);
    const rid = body && body.request_id ? ` (request ${body.request_id})` : "";
    if (response.status === 401) showKeyForm(true);
    const retry = response.headers.get("Retry-After");
    throw new ApiError(response.status, `${response.status}: ${words}${rid}${retry ? `; retry after ${retry}s` : ""}`);
  }
  return body;
}

function showKeyForm(show) {
  $("key-form").hidden = !show;
  if (show) $("api-key").value = apiKey();
}

async function loadInfo() {
  try {
    const info = await call("v1/info");
    showMessage("");
    showKeyForm(Boolean(info.auth && info.auth.required));
    showCaller(info.caller);
    showWeights(info);
    const limits = info.limits || {};
    setBounds("num_images", 1, limits.max_images);
    setBounds("steps", limits.min_steps, limits.max_steps);
    setBounds("guidance_scale", limits.min_guidance, limits.max_guidance);
    for (const id of ["width", "height"]) {
      setBounds(id, limits.min_size, limits.max_size);
      if (limits.size_multiple) $(id).step = String(limits.size_multiple);
    }
    const concepts = (info.checker && info.checker.concepts) || [];
    conceptNames = {
      concept: concepts.filter((c) => c.kind !== "special").map((c) => String(c.name)),
      special: concepts.filter((c) => c.kind === "special").map((c) => String(c.name)),
    };
    if (!info.generator) $("generate-summary").textContent = "This service has no generator: moderation only.";
  } catch (err) {
    showCaller(null);
    showMessage(err.message);
  }
}

// Who the key is: its tenant and the policy its images are moderated with (the service's own when it names none).
function showCaller(caller) {
  $("caller").hidden = !caller;
  if (!caller) return;
  $("caller-tenant").textContent = String(caller.tenant);
  $("caller-policy").textContent = caller.policy ? String(caller.policy) : "the service's own";
  $("caller-key").textContent = `(key ${String(caller.key_id)})`;
}

// The banner names the parts whose weights are demo (tiny, random: their scores are meaningless) and those that are
// real, so a real detector's verdict is not dismissed along with the demo checker's.
function showWeights(info) {
  const demo = Array.isArray(info.demo) ? info.demo.map(String) : [];
  const real = Array.isArray(info.real) ? info.real.map(String) : [];
  $("demo-warning").hidden = !(demo.length || info.demo_weights);
  $("demo-note").textContent = demo.length
    ? `${demo.join(", ")} — their scores are meaningless.`
    : "this service runs tiny demo models, so its verdicts are meaningless.";
  $("real-note").textContent = real.length ? ` Real: ${real.join(", ")}.` : "";
}

function setBounds(id, min, max) {
  if (min !== undefined && min !== null) $(id).min = String(min);
  if (max !== undefined && max !== null) $(id).max = String(max);
}

function scoreRows(title, entries) {
  const grid = el("div", { class: "scores", role: "list", "aria-label": title });
  for (const [name, value] of entries) {
    const v = Number(value);
    const width = Math.min(Math.abs(v) / SCALE, 1) * 50;
    const bar = el("div", { class: v > 0 ? "bar hit" : "bar" });
    bar.style.width = `${width}%`;
    bar.style.left = v > 0 ? "50%" : `${50 - width}%`;
    const track = el("div", { class: "track", role: "img", "aria-label": `${name}: margin ${v.toFixed(3)}${v > 0 ? " (hit)" : ""}` }, bar);
    grid.append(el("span", { class: "name", text: name, role: "listitem" }), track,
      el("span", { class: "value", text: v.toFixed(3) }));
  }
  return grid;
}

// Detector probabilities in [0, 1], a bar from the left (a policy row's threshold turns one into a category margin).
function probabilityRows(verdict) {
  const demo = new Set(verdict.demo || []);
  const grid = el("div", { class: "scores probability", role: "list", "aria-label": "detector scores" });
  for (const [detector, outputs] of Object.entries(verdict.detector_scores || {})) {
    for (const [output, value] of Object.entries(outputs || {})) {
      const p = Number(value);
      const name = `${detector}: ${output}${demo.has(detector) ? " (demo)" : ""}`;
      const bar = el("div", { class: "bar" });
      bar.style.width = `${Math.min(Math.max(p, 0), 1) * 100}%`;
      const track = el("div", { class: "track", role: "img", "aria-label": `${name}: probability ${p.toFixed(3)}` }, bar);
      grid.append(el("span", { class: "name", text: name, role: "listitem" }), track,
        el("span", { class: "value", text: p.toFixed(3) }));
    }
  }
  return grid.childElementCount ? el("div", { class: "detectors" }, el("p", { class: "caption", text: "detector probabilities" }), grid) : null;
}

function card({ title, action, verdict, pixels, error }) {
  const node = el("article", { class: "card", "data-action": action });
  const head = el("h3", {}, el("span", { text: `${title} ` }),
    el("span", { class: `badge ${action}`, text: ACTION_WORDS[action] || action }));
  node.append(head);
  const frame = el("div", { class: "frame" });
  if (pixels && SHOWS_PIXELS.has(action)) {
    frame.append(el("img", { src: pixels, alt: `${title}: ${ACTION_WORDS[action] || action}` }));
  } else {
    const why = error ? "Unscorable: not shown" : `${capital(ACTION_WORDS[action] || action)} by the policy: not shown`;
    frame.append(el("div", { class: "placeholder", role: "img", "aria-label": why, text: why }));
  }
  node.append(frame);
  if (error) node.append(el("p", { class: "error-text", text: error }));
  if (verdict) {
    const flagged = verdict.flagged_categories || [];
    const chips = el("div", { class: "chips", "aria-label": "flagged categories" });
    for (const c of flagged) chips.append(el("span", { class: "chip", text: c }));
    if (!flagged.length && !error) chips.append(el("span", { class: "muted", text: "no category flagged" }));
    node.append(chips);
    if (verdict.truncated) node.append(el("p", { class: "muted", text: "truncated file: scored on what decodes" }));
    if (verdict.views > 1 || verdict.views_sampled) {  // frames, pages, backgrounds, tiles: say which one decided
      const sampled = verdict.views_sampled ? ` (sampled from ${verdict.views_total})` : "";
      node.append(el("p", { class: "muted view", text: `${verdict.views} views scored${sampled}; deciding view: ${verdict.view}` }));
    }
    const categories = Object.entries(verdict.categories || {});
    if (categories.length) node.append(scoreRows("category scores", categories));
    const detectors = probabilityRows(verdict);
    if (detectors) node.append(detectors);
    const concepts = (verdict.concept_scores || []).map((v, i) => [conceptNames.concept[i] || `concept ${i}`, v]);
    const special = (verdict.special_scores || []).map((v, i) => [conceptNames.special[i] || `special ${i}`, v]);
    if (concepts.length || special.length) {
      const more = el("details", {}, el("summary", { text: "concept scores" }));
      more.append(scoreRows("concept scores", concepts.concat(special)));
      node.append(more);
    }
  }
  return node;
}

function capital(text) { return text.charAt(0).toUpperCase() + text.slice(1); }

function pngData(b64) {
  return typeof b64 === "string" && BASE64.test(b64) ? `data:image/png;base64,${b64}` : null;
}

function intOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate-button");
  const results = $("generate-results");
  const request = {
    prompt: $("prompt").value,
    num_images: Number($("num_images").value),
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance_scale").value),
    safety: $("safety").value,
  };
  const negative = $("negative_prompt").value;
  if (negative) request.negative_prompt = negative;
  for (const id of ["seed", "width", "height"]) {
    const v = intOrNull(id);
    if (v !== null) request[id] = v;
  }
  button.disabled = true;
  $("generate-summary").textContent = "Generating…";
  try {
    const body = await call("v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    showMessage("");
    results.replaceChildren(...body.images.map((img) => card({
      title: `#${img.index}`,
      action: img.action,
      verdict: img.moderation,
      pixels: img.action === "block" ? null : pngData(img.image_png_base64),
    })));
    const summary = $("generate-summary");
    summary.replaceChildren(
      el("span", { text: `seed ${body.seed} · ${body.width}×${body.height} · ` }),
      el("span", { text: body.images.map((i) => ACTION_WORDS[i.action] || i.action).join(", ") }),
      el("span", { text: ` · request ${body.request_id}` }),
    );
    const again = el("button", { type: "button", text: "Reuse seed" });
    again.addEventListener("click", () => { $("seed").value = String(body.seed); $("seed").focus(); });
    summary.append(" ", again);
    for (const w of body.warnings || []) summary.append(el("div", { class: "muted", text: w }));
  } catch (err) {
    $("generate-summary").textContent = "";
    showMessage(err.message);
  } finally {
    button.disabled = false;
  }
}

async function moderate(files) {
  if (!files.length) return;
  const results = $("moderate-results");
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  $("moderate-summary").textContent = `Scoring ${files.length} file(s)…`;
  try {
    const body = await call("v1/moderate", { method: "POST", body: form });
    showMessage("");
    for (const old of results.querySelectorAll("img")) URL.revokeObjectURL(old.src);
    // Results come in the order the files were sent: row i is files[i] (never matched by name: two files may share
    // one, and a blocked file's pixels must never show on another's card). A count that differs shows no preview.
    const inOrder = body.results.length === files.length;
    results.replaceChildren(...body.results.map((row, i) => {
      // Only released actions show the local file; blurred, blacked-out and blocked files show a placeholder.
      const file = inOrder ? files[i] : null;
      const pixels = file && (row.action === "allow" || row.action === "flag") && !row.error ? URL.createObjectURL(file) : null;
      return card({ title: row.filename || "(body)", action: row.action, verdict: row, pixels, error: row.error });
    }));
    $("moderate-summary").textContent = `${body.results.length} file(s) · checker fingerprint ${body.fingerprint} · request ${body.request_id}`;
  } catch (err) {
    $("moderate-summary").textContent = "";
    results.replaceChildren();
    showMessage(err.message);
  }
}

function selectTab(which) {
  for (const name of ["generate", "moderate"]) {
    const on = name === which;
    $(`tab-${name}`).setAttribute("aria-selected", String(on));
    $(`tab-${name}`).tabIndex = on ? 0 : -1;
    $(`view-${name}`).hidden = !on;
  }
}

function init() {
  $("generate-form").addEventListener("submit", generate);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    loadInfo();
  });
  const tabs = ["generate", "moderate"];
  for (const name of tabs) {
    const tab = $(`tab-${name}`);
    tab.addEventListener("click", () => selectTab(name));
    tab.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
      const next = tabs[(tabs.indexOf(name) + 1) % tabs.length];
      selectTab(next);
      $(`tab-${next}`).focus();
    });
  }
  const input = $("files");
  input.addEventListener("change", () => { moderate([...input.files]); input.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    moderate([...event.dataTransfer.files]);
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
