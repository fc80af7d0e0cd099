// The review page: plain JavaScript, no build step. Everything comes from the JSON API under /api.
"use strict";
const $ = (id) => document.getElementById(id);

// The start-up URL carries this start's key in its fragment (#token=...: never sent to a server, so never in a log or
// a Referer). Keep it for this tab and take it out of the address bar, so it is not bookmarked, shared or left on screen.
(function takeToken() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token === null) return;
  sessionStorage.setItem("diffguard-token", token);
  history.replaceState(null, "", location.pathname + location.search);
})();

const state = { items: [], current: 0, cursor: null, info: null, token: sessionStorage.getItem("diffguard-token") };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  if (resp.status === 401) {
    $("auth").hidden = false;
    $("api-key").focus();
  }
  if (!resp.ok) {
    let detail = resp.statusText;
    try { const body = await resp.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new Error(resp.status + ": " + detail);
  }
  return resp;
}

const itemPath = (key) => "/api/items/" + encodeURIComponent(key);

function say(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label || value;
  select.appendChild(o);
}

const shown = new Map();  // key -> sha256 of the bytes its thumbnail was made from

async function loadThumb(img, key, reveal) {
  try {
    const resp = await api(itemPath(key) + "/thumbnail" + (reveal ? "?reveal=1" : ""));
    shown.set(key, resp.headers.get("X-Diffguard-Sha256"));  // the bytes these pixels come from: a decision names them
    const url = URL.createObjectURL(await resp.blob());
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = url;
    img.src = url;
    img.dataset.revealed = reveal ? "1" : "0";
    img.alt = (reveal ? "revealed " : "blurred ") + "thumbnail of " + key;
  } catch (e) {  // a labelled placeholder in its place, the reason in its tooltip (never the broken-image alt text)
    img.replaceWith(placeholder(/^409\b/.test(e.message) ? "Changed since the scan: not shown" : "No preview", e.message));
  }
}

// What stands where no pixels can be shown, in the service page's style (deployments/static: "...: not shown").
function placeholder(text, detail) {
  const box = document.createElement("div");
  box.className = "thumb placeholder";
  box.setAttribute("role", "img");
  box.setAttribute("aria-label", text);
  box.textContent = text;
  if (detail) box.title = detail;
  return box;
}

function render(item, index) {
  const li = document.createElement("li");
  li.className = "item";
  li.dataset.key = item.key;
  li.dataset.index = index;
  // An unscorable object has no pixels the scan could read: its placeholder, no request for a thumbnail.
  const img = item.unscorable ? placeholder("Unscorable: not shown", item.error) : document.createElement("img");
  if (!item.unscorable) {
    img.className = "thumb";
    img.alt = "blurred thumbnail of " + item.key;
    img.title = "click to reveal (v)";
    img.addEventListener("click", () => loadThumb(img, item.key, img.dataset.revealed !== "1"));
    loadThumb(img, item.key, false);
  }
  const body = document.createElement("div");
  const key = document.createElement("div");
  key.className = "key";
  key.textContent = item.key;
  const meta = document.createElement("div");
  meta.className = "meta";
  const badge = document.createElement("span");
  badge.className = "badge " + (item.action || "");
  badge.textContent = item.unscorable ? "unscorable · " + item.action : item.action;
  meta.appendChild(badge);
  meta.append(" " + (item.size == null ? "?" : item.size) + " bytes · score " +
    (item.score == null ? "—" : item.score.toFixed(3)) + (item.error ? " · " + item.error : ""));
  if (item.view) {  // the view that decided (a frame, a page, a background, a tile): what the thumbnail shows
    const view = document.createElement("span");
    view.className = "view";
    view.textContent = " · shown: " + item.view + " (" + item.views + " of " + item.views_total + " views" +
      (item.views_sampled ? ", sampled" : "") + ")";
    meta.appendChild(view);
  }
  if (!item.unscorable) {
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = "full image";
    link.addEventListener("click", async (ev) => {
      ev.preventDefault();
      try {
        const resp = await api(itemPath(item.key) + "/image");
        window.open(URL.createObjectURL(await resp.blob()), "_blank", "noopener");
      } catch (e) {
        say(e.message, true);
      }
    });
    meta.append(" · ");
    meta.appendChild(link);
  }
  const table = document.createElement("table");
  table.className = "scores";
  const flagged = new Set(item.flagged_categories || []);
  Object.entries(item.categories || {}).sort((a, b) => b[1] - a[1]).forEach(([name, score]) => {
    const tr = table.insertRow();
    tr.className = flagged.has(name) ? "hit" : "";
    tr.insertCell().textContent = name;
    tr.insertCell().textContent = score.toFixed(3) + (score > 0 ? " > 0 (hit)" : " ≤ 0");
  });
  const demo = new Set(item.demo || []);
  Object.entries(item.detector_scores || {}).forEach(([detector, outputs]) => {
    Object.entries(outputs || {}).forEach(([output, p]) => {  // probabilities: a policy row's threshold decides
      const tr = table.insertRow();
      tr.className = "detector";
      tr.insertCell().textContent = `${detector}: ${output}` + (demo.has(detector) ? " (demo)" : "");
      tr.insertCell().textContent = "probability " + Number(p).toFixed(3);
    });
  });
  body.append(key, meta, table);
  const side = document.createElement("div");
  side.className = "actions";
  const st = document.createElement("span");
  st.className = "state " + item.state;
  const d = item.decision;
  st.textContent = item.state === "stale" ? "stale " + d.decision + " (object changed)" :
    item.state + (d && d.category && item.state !== "overturn" ? " · " + d.category : "");
  side.appendChild(st);
  for (const [label, decision] of [["confirm (c)", "confirm"], ["overturn (o)", "overturn"], ["relabel (r)", "relabel"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.decision = decision;
    b.addEventListener("click", () => { select(index); decide(decision); });
    side.appendChild(b);
  }
  li.append(img, body, side);
  return li;
}

function select(index) {
  const nodes = $("queue").children;
  if (!nodes.length) return;
  state.current = Math.max(0, Math.min(index, nodes.length - 1));
  for (const n of nodes) n.classList.remove("current");
  nodes[state.current].classList.add("current");
  nodes[state.current].scrollIntoView({ block: "nearest" });
}

async function decide(decision, category, note) {
  const item = state.items[state.current];
  if (!item) return;
  if (note == null && state.note) { note = state.note; }
  if (decision === "relabel" && !category) { openRelabel(); return; }
  try {
    const resp = await api(itemPath(item.key) + "/decision", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        decision: decision, category: category || null, note: note || null, sha256: shown.get(item.key) || null,
      }),
    });
    const saved = await resp.json();
    state.note = null;
    item.state = saved.decision;
    item.decision = saved;
    const node = $("queue").children[state.current];
    const fresh = render(item, state.current);
    fresh.querySelector(".thumb").replaceWith(node.querySelector(".thumb"));
    node.replaceWith(fresh);
    say("saved: " + saved.decision + " " + item.key);
    select(state.current + 1);
  } catch (e) {
    say(e.message, true);
  }
}

function openRelabel() {
  const sel = $("relabel-category");
  sel.textContent = "";
  for (const c of state.info.categories) option(sel, c);
  $("relabel-note").value = state.note || "";
  $("relabel").showModal();
}

$("relabel").addEventListener("close", () => {
  if ($("relabel").returnValue === "ok") decide("relabel", $("relabel-category").value, $("relabel-note").value || null);
});

async function load(reset) {
  // Filters can change while a page is in flight: only the answer to the latest request is shown.
  if (reset) { state.gen = (state.gen || 0) + 1; state.items = []; state.cursor = null; $("queue").textContent = ""; }
  const gen = state.gen;
  const q = new URLSearchParams({ state: $("f-state").value, limit: "50" });
  if ($("f-category").value) q.set("category", $("f-category").value);
  if ($("f-action").value) q.set("action", $("f-action").value);
  if (state.cursor) q.set("cursor", state.cursor);
  try {
    const page = await (await api("/api/items?" + q)).json();
    if (gen !== state.gen) return;  // superseded by a newer filter
    for (const item of page.items) {
      $("queue").appendChild(render(item, state.items.length));
      state.items.push(item);
    }
    state.cursor = page.next_cursor;
    $("more").disabled = !page.next_cursor;
    $("empty").hidden = state.items.length > 0;
    $("summary").textContent = state.info.queue + " objects in the queue · " + state.items.length + " shown · reviewer " + state.info.reviewer;
    if (reset) select(0);
  } catch (e) {
    say(e.message, true);
  }
}

document.addEventListener("keydown", (ev) => {
  if (ev.target.closest("input, select, textarea, dialog") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const actions = {
    j: async () => {
      if (state.current >= state.items.length - 1 && state.cursor) await load(false);  // the next page, on demand
      select(state.current + 1);
    },
    k: () => select(state.current - 1),
    c: () => decide("confirm"),
    o: () => decide("overturn"),
    r: () => openRelabel(),
    v: () => { const img = $("queue").children[state.current]?.querySelector(".thumb"); if (img) img.click(); },
    n: () => { const note = window.prompt("note for the next decision on " + state.items[state.current]?.key); if (note !== null) state.note = note; },
  };
  if (actions[ev.key]) { ev.preventDefault(); actions[ev.key](); }
});

async function start() {
  for (const id of ["f-state", "f-category", "f-action"]) $(id).querySelectorAll("option[value]:not([value=''])").forEach((o) => o.remove());
  try {
    state.info = await (await api("/api/info")).json();
  } catch (e) {
    say(e.message, true);
    return;
  }
  $("demo-warning").hidden = state.info.demo_weights !== true;  // unknown (a scan that did not record it): no banner
  for (const s of state.info.states) option($("f-state"), s);
  $("f-state").value = "undecided";
  for (const c of state.info.categories) option($("f-category"), c);
  for (const a of state.info.actions) option($("f-action"), a);
  await load(true);
}

for (const id of ["f-state", "f-category", "f-action"]) $(id).addEventListener("change", () => load(true));
$("more").addEventListener("click", () => load(false));

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("api-key").value.trim();
  sessionStorage.setItem("diffguard-token", state.token);
  $("auth").hidden = true;
  say("");
  start();
});

start();
