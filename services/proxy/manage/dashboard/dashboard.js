// The dashboard: the catalog (/v1/models) and what is loaded (/running) every REFRESH_MS,
// and at once when the live feed (/events) says something changed. Text goes in through
// textContent only: model names come from file names.
"use strict";

const REFRESH_MS = 2000;
const SHOWN_EVENTS = 60;
const KEY_STORE = "model-serve-api-key";
const FADE_MS = 4000;
const KEY_WANTED = "the events need the API key";

let apiKey = localStorage.getItem(KEY_STORE) || "";
let catalog = [];
let running = null;
let fetchedAt = 0;
// why there is no data, or why the data shown is old; empty while the proxy answers
let trouble = "";
let lastEvent = 0;
const events = [];
let refreshSoon = null;
let statusTimer = null;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

class KeyNeeded extends Error {}

async function call(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: headers(body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  if (resp.status === 401) throw new KeyNeeded("this stack wants its API key");
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const error = new Error(data.error?.message || `${resp.status} ${resp.statusText}`);
    error.code = data.error?.code;
    throw error;
  }
  return data;
}

function gib(bytes) {
  if (bytes == null) return "–";
  return bytes >= 1024 ** 3 ? `${(bytes / 1024 ** 3).toFixed(1)} GiB`
    : `${Math.round(bytes / 1024 ** 2)} MiB`;
}

function duration(seconds) {
  if (seconds == null) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 120) return `${seconds}s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 120 ? `${minutes}m ${seconds % 60}s` : `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

function bar(part, whole, estimated) {
  const share = whole > 0 && part ? part / whole : 0;
  const fill = el("div", { className: "fill" });
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  if (estimated) fill.classList.add("estimated");
  return el("div", { className: "bar" }, fill);
}

function chip(id, text, tone, title = "") {
  Object.assign($(id), { hidden: false, textContent: text, className: `chip ${tone}`, title });
}

function whyNot(e) {
  if (e instanceof KeyNeeded) return apiKey ? "the key was refused" : "enter the API key";
  // fetch rejects with a TypeError only when no answer came at all
  if (e instanceof TypeError) return "the proxy is not answering";
  return `the proxy answered with an error: ${e.message}`;
}

async function refresh() {
  try {
    const [models, now] = await Promise.all([call("GET", "/v1/models"), call("GET", "/running")]);
    catalog = models.data;
    running = now;
    fetchedAt = Date.now();
    trouble = "";
    $("key-form").hidden = true;
  } catch (e) {
    trouble = whyNot(e);
    if (e instanceof KeyNeeded) $("key-form").hidden = false;
  }
  render();
}

function soon() {
  clearTimeout(refreshSoon);
  refreshSoon = setTimeout(refresh, 150);
}

// ---- the page ------------------------------------------------------------------------

function renderTrouble() {
  const stale = Boolean(trouble && running);
  for (const id of ["memory", "models"]) $(id).classList.toggle("stale", stale);
  const problem = $("problem");
  problem.hidden = !trouble;
  problem.textContent = !trouble ? ""
    : running ? `Last update ${new Date(fetchedAt).toLocaleTimeString()}; ${trouble}.`
    : `No data: ${trouble}.`;
}

function renderSystem() {
  const system = running.system;
  const used = $("memory-used");
  used.style.width = `${Math.min(100, (100 * system.used) / system.total).toFixed(1)}%`;
  used.className = "fill" + (system.used > system.limit ? " over"
    : system.used > 0.85 * system.limit ? " high" : "");
  $("memory-limit").hidden = false;
  $("memory-limit").style.left = `${((100 * system.limit) / system.total).toFixed(1)}%`;
  const models = running.models.filter((m) => m.state !== "queued")
    .reduce((sum, m) => sum + (m.memory.measured ?? m.memory.estimated ?? 0), 0);
  const waiting = running.models.filter((m) => m.state === "queued").length;
  $("memory-text").textContent =
    `Memory: ${gib(system.used)} used of a ${gib(system.limit)} budget, ${gib(models)} of it by loaded models ` +
    `(${system.used_pct}% of ${gib(system.total)}; the governor unloads idle models above ` +
    `${system.threshold_pct}%)` + (system.reserved ? `; loads in progress reserve ${gib(system.reserved)}` : "")
    + (system.other_programs ? `; other programs hold ${gib(system.other_programs)}` : "")
    + (waiting ? `; ${waiting} load(s) wait for room` : "");

  if (trouble) {  // what the proxy last said of them may no longer hold
    chip("governor", "governor unknown", "", trouble);
    chip("ollama", "Ollama unknown", "", trouble);
  } else {
    const up = system.governor === "up";
    chip("governor", up ? "governor up" : "governor down", up ? "ok" : "bad", up ? ""
      : "idle models stay past their TTL and memory pressure is not watched");
    chip("ollama", running.ollama.ok ? "Ollama up" : "Ollama not reachable",
      running.ollama.ok ? "ok" : "warn", running.ollama.url);
  }

  const signals = $("signals");
  signals.replaceChildren("Pressure signals: ");
  const named = Object.entries(system.signals || {});
  if (!named.length) signals.append(system.governor === "up" ? "none read yet" : "not heard (no governor)");
  for (const [name, s] of named) {
    signals.append(el("span", {
      className: `chip ${s.firing ? "bad" : ""}`,
      textContent: `${name} ${s.value}${s.unit} / ${s.level}${s.unit}${s.firing ? " firing" : ""}`,
    }), " ");
  }
  for (const missing of system.missing || []) {
    signals.append(el("span", { className: "chip", textContent: `${missing}: unavailable` }), " ");
  }
}

// The catalog's order, then the models only /running lists (Ollama's outside the catalog):
// a row that moved when its model loaded or unloaded would put another model's button under
// the pointer between two clicks.
function modelRows() {
  const held = new Map(running.models.map((m) => [m.id, m]));
  const rows = catalog.map((entry) => ({ id: entry.id, backend: entry.backend, state: entry.status,
    ...held.get(entry.id), aliases: entry.aliases || [], peer: entry.peer, peers: entry.peers }));
  const listed = new Set(catalog.map((entry) => entry.id));
  for (const m of running.models) if (!listed.has(m.id)) rows.push({ ...m, aliases: [] });
  return rows;
}

// Rows are kept by model and updated in place: the page redraws every second, and a button
// replaced between a press and its release would lose the click.
const rowsById = new Map();

function modelRow(id) {
  let row = rowsById.get(id);
  if (!row) {
    const cells = Array.from({ length: 9 }, () => el("td"));
    cells[0].append(el("div", { className: "model-id", textContent: id }),
      el("div", { className: "aliases" }), el("div", { className: "saved" }));
    for (const i of [4, 5, 6, 7]) cells[i].className = "num";
    cells[3].className = "memory";
    const button = el("button");
    button.onclick = () => act(button.dataset.action, id, button);
    cells[8].append(button);
    const tr = el("tr", {}, ...cells);
    tr.dataset.model = id;
    row = { tr, cells, button };
    rowsById.set(id, row);
  }
  return row;
}

function renderModels() {
  // old data is shown as it was at its last update, not counted on
  const elapsed = trouble ? 0 : (Date.now() - fetchedAt) / 1000;
  const limit = running.system.limit;
  const models = modelRows();
  const shown = models.map((m) => {
    const { tr, cells, button } = modelRow(m.id);
    // queued: a load that waits for idle models to make room; unloading: until it has left
    const live = ["loaded", "loading", "queued", "unloading"].includes(m.state);
    const measured = m.memory?.measured;
    const size = measured ?? m.memory?.estimated;
    const idle = m.idle_seconds == null ? null : m.idle_seconds + elapsed;
    let ttl = "–";
    if (m.pinned) ttl = "pinned";
    else if (live && m.ttl && idle != null) ttl = m.in_flight ? "in use" : duration(m.ttl - idle);
    const queued = m.queue?.queued || 0;

    tr.className = live ? "" : "unloaded";
    tr.dataset.state = m.state;
    cells[0].children[1].textContent = [m.aliases.length ? `also: ${m.aliases.join(", ")}` : "",
      m.peers?.length && !m.peer ? `also on peers: ${m.peers.join(", ")}` : ""].filter(Boolean).join("; ");
    // its conversations kept on disk for its next load (CONTEXT_CACHE_DIR)
    const kept = running.contexts?.models?.[m.id];
    cells[0].children[2].textContent = kept ? `saved context: ${kept.tokens.toLocaleString()} ` +
      `tokens, ${gib(kept.bytes)}, ${duration(Date.now() / 1000 - kept.saved_at)} ago` : "";
    cells[1].className = `state ${m.state}`;
    cells[1].textContent = m.state === "queued" ? "waiting" : m.state;
    cells[1].title = m.waiting_for ? `waits for room: ${m.waiting_for}` : "";
    // a peer's model: served by that peer, which loads and unloads it itself
    cells[2].textContent = m.peer ? `peer ${m.peer.name}` : m.backend;
    cells[2].title = m.peer ? m.peer.url : "";
    button.hidden = Boolean(m.peer);
    if (live && size != null) {
      cells[3].replaceChildren(bar(size, limit, measured == null),
        el("span", { textContent: `${measured == null ? "~" : ""}${gib(size)}` +
          (m.memory.estimated != null && measured != null ? ` (estimated ${gib(m.memory.estimated)})` : "") }));
    } else {
      cells[3].replaceChildren();
    }
    cells[4].textContent = !live ? "–" : m.in_flight ? "in use" : duration(idle);
    cells[5].textContent = ttl;
    // the proxy counts a request from its arrival: the queued ones are in in_flight too
    cells[6].textContent = live ? String(Math.max(0, (m.in_flight || 0) - queued)) : "–";
    cells[7].textContent = !live ? "–"
      : queued ? `${queued} (longest ${duration(m.queue.longest_queued_seconds)})` : "0";
    if (!button.disabled) {  // a pressed one keeps its action until it is answered
      button.dataset.action = live ? "unload" : "load";
      button.textContent = live ? "Unload" : "Load";
    }
    return tr;
  });
  const ids = new Set(models.map((m) => m.id));
  for (const id of rowsById.keys()) if (!ids.has(id)) rowsById.delete(id);
  const body = $("models").tBodies[0];
  const same = shown.length === body.children.length && shown.every((tr, i) => body.children[i] === tr);
  if (!same) body.replaceChildren(...shown);
  if (!shown.length) note("No models in the catalog.");
}

function note(text) {
  $("models").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 9, textContent: text })));
}

// what follows the kind, which has its own column
function describe(e) {
  switch (e.kind) {
    case "loaded": return `in ${e.seconds}s` + (e.by === "no-admission" ? ", without memory admission (MEMORY_ADMISSION=off)" : "");
    case "unloaded": return e.reason + (e.detail ? ` (${e.detail})` : "");
    case "refused": case "load_failed": return e.message;
    case "context_saved": return `slot ${e.slot}: ${e.tokens.toLocaleString()} tokens, ${gib(e.bytes)} in ${e.seconds}s`;
    case "context_restored": return `slot ${e.slot}: ${e.tokens.toLocaleString()} tokens in ${e.seconds}s`;
    case "context_restore_failed": return `slot ${e.slot}: ${e.reason}: ${e.message}`;
    default: return "";
  }
}

function renderEvents() {
  const list = $("events");
  if (!events.length) {
    list.replaceChildren(el("li", { className: "empty", textContent: running
      ? "No loads or unloads since the proxy started." : "No events yet." }));
    return;
  }
  list.replaceChildren(...events.map((e) => {
    const at = new Date(e.at * 1000);
    const item = el("li", { className: e.kind },
      el("time", { dateTime: at.toISOString(), textContent: at.toLocaleTimeString() }),
      el("span", { className: "kind", textContent: e.kind.replace("_", " ") }),
      el("span", { className: "model-id", textContent: e.model }),
      el("span", { textContent: ` (${e.backend}) ${describe(e)}` }));
    item.dataset.kind = e.kind;
    item.dataset.model = e.model;
    return item;
  }));
}

// Each peer (PEERS): up, down or unauthorized (it refused our key), the latency of its last poll, how many of its models are served.
function renderPeers() {
  const peers = running.peers || [];
  $("peers").hidden = !peers.length;
  $("peer-table").tBodies[0].replaceChildren(...peers.map((p) => {
    const tr = el("tr", {},
      el("td", { textContent: p.name, title: `${p.url} (${p.kind})` }),
      el("td", { className: `state ${p.up ? "loaded" : "failed"}`, textContent: p.state || (p.up ? "up" : "down"),
        title: p.error || "" }),
      el("td", { className: "num", textContent: p.latency_ms == null ? "–" : `${Math.round(p.latency_ms)} ms` }),
      el("td", { className: "num", textContent: String(p.models.length) }));
    tr.dataset.peer = p.name;
    tr.dataset.up = String(p.up);
    return tr;
  }));
}

// Each llama.cpp RPC worker a model names (`rpc:`): up or down, the models that hold it now
// (else those that name it), and its memory when it runs on this machine.
function renderWorkers() {
  const workers = running.rpc_workers || [];
  $("workers").hidden = !workers.length;
  $("worker-table").tBodies[0].replaceChildren(...workers.map((w) => {
    const tr = el("tr", {},
      el("td", { textContent: w.address }),
      el("td", { className: `state ${w.up ? "loaded" : "failed"}`, textContent: w.up ? "up" : "down" }),
      el("td", { textContent: (w.in_use_by.length ? w.in_use_by : w.models).join(", "),
        title: w.in_use_by.length ? "loaded now" : "named in custom_models.yaml, not loaded" }),
      el("td", { className: "num", textContent: w.on_this_machine ? gib(w.memory) : "elsewhere" }));
    tr.dataset.worker = w.address;
    tr.dataset.up = String(w.up);
    return tr;
  }));
}

function render() {
  renderTrouble();
  if (running) {
    renderSystem();
    renderModels();
    renderPeers();
    renderWorkers();
  } else {
    note(trouble ? `No data: ${trouble}.` : "Asking the proxy…");
  }
  renderEvents();
}

// ---- actions -------------------------------------------------------------------------

// said for a while, then faded: an old failure must not read as the state of things now
function say(text, { bad = false, fades = true } = {}) {
  clearTimeout(statusTimer);
  $("action").className = bad ? "action bad" : "action";
  $("action").textContent = text;
  if (fades) statusTimer = setTimeout(() => $("action").classList.add("faded"), bad ? 4 * FADE_MS : FADE_MS);
}

async function act(action, model, button) {
  button.disabled = true;
  say(`${action === "load" ? "Loading" : "Unloading"} ${model}…`, { fades: false });
  try {
    try {
      await call("POST", `/models/${action}`, { model });
    } catch (e) {
      if (e.code !== "model_busy") throw e;
      await refresh();  // the count of requests as it is now
      const count = Math.max(1, running?.models.find((m) => m.id === model)?.in_flight || 0);
      if (!confirm(`${model} is answering ${count} request(s). Unload it anyway? ` +
          "Those requests will fail.")) {
        say(`${model} stays loaded.`);
        return;
      }
      await call("POST", "/models/unload", { model, force: true });
    }
    say(`${model} ${action === "load" ? "loaded" : "unloaded"}.`);
  } catch (e) {
    // the proxy's messages mostly name the model already; the browser's own do not help
    const why = e instanceof KeyNeeded || e instanceof TypeError ? whyNot(e) : e.message;
    say(why.includes(model) ? why : `${model}: ${why}`, { bad: true });
  } finally {
    button.disabled = false;
    refresh();
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem(KEY_STORE, apiKey);
  refresh();
});

// ---- the live feed: fetch rather than EventSource, which cannot send the API key --------

function setLive(on, why) {
  chip("live", on ? "live" : why === KEY_WANTED ? "waiting for the API key" : "reconnecting…",
    on ? "ok" : "warn", why);
}

function received(event) {
  lastEvent = Math.max(lastEvent, event.id);
  events.unshift(event);
  events.length = Math.min(events.length, SHOWN_EVENTS);
  renderEvents();
  soon();
}

async function follow() {
  for (;;) {
    try {
      const resp = await fetch(`/events?since=${lastEvent}`, {
        headers: headers({ Accept: "text/event-stream" }),
      });
      if (resp.status === 401) throw new KeyNeeded(KEY_WANTED);
      if (!resp.ok) throw new Error(`${resp.status} ${resp.statusText}`);
      setLive(true);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const data = buffer.slice(0, end).split("\n")
            .filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
          buffer = buffer.slice(end + 2);
          if (data) received(JSON.parse(data));
        }
      }
      setLive(false, "the proxy ended the feed");
    } catch (e) {
      setLive(false, e instanceof KeyNeeded ? KEY_WANTED : whyNot(e));
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
setInterval(render, 1000); // idle times and TTL countdowns move between refreshes
follow();
