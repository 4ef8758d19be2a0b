// The dashboard: the catalog (/v1/models) and what is loaded (/running) every REFRESH_MS,
// and at once when the live feed (/events) says something changed. Text goes in through
// textContent only: model names come from file names.
"use strict";

const REFRESH_MS = 2000;
const SHOWN_EVENTS = 60;
const KEY_STORE = "model-serve-api-key";

let apiKey = localStorage.getItem(KEY_STORE) || "";
let catalog = [];
let running = null;
let fetchedAt = 0;
let lastEvent = 0;
const events = [];
let refreshSoon = null;

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

function showProblem(text) {
  $("problem").hidden = !text;
  $("problem").textContent = text || "";
}

function askForKey() {
  $("key-form").hidden = false;
  showProblem("This stack has an API key: enter it to see and manage its models.");
}

async function refresh() {
  try {
    const [models, now] = await Promise.all([call("GET", "/v1/models"), call("GET", "/running")]);
    catalog = models.data;
    running = now;
    fetchedAt = Date.now();
    $("key-form").hidden = true;
    showProblem("");
  } catch (e) {
    if (e instanceof KeyNeeded) askForKey();
    else showProblem(`The proxy did not answer: ${e.message}`);
  }
  render();
}

function soon() {
  clearTimeout(refreshSoon);
  refreshSoon = setTimeout(refresh, 150);
}

// ---- the page ------------------------------------------------------------------------

function renderSystem() {
  const system = running.system;
  const used = $("memory-used");
  used.style.width = `${Math.min(100, (100 * system.used) / system.total).toFixed(1)}%`;
  used.className = "fill" + (system.used > system.limit ? " over"
    : system.used > 0.85 * system.limit ? " high" : "");
  $("memory-limit").style.left = `${((100 * system.limit) / system.total).toFixed(1)}%`;
  const models = running.models.reduce((sum, m) => sum + (m.memory.measured ?? m.memory.estimated ?? 0), 0);
  $("memory-text").textContent =
    `Memory: ${gib(system.used)} used of a ${gib(system.limit)} budget, ${gib(models)} of it by loaded models ` +
    `(${system.used_pct}% of ${gib(system.total)}; the governor unloads idle models above ` +
    `${system.threshold_pct}%)` + (system.reserved ? `; loads in progress reserve ${gib(system.reserved)}` : "");

  const governor = $("governor");
  governor.textContent = system.governor === "up" ? "governor up" : "governor down";
  governor.className = `chip ${system.governor === "up" ? "ok" : "bad"}`;
  governor.title = system.governor === "up" ? ""
    : "models load without memory admission and no pressure signals are heard";
  const ollama = $("ollama");
  ollama.textContent = running.ollama.ok ? "Ollama up" : "Ollama not reachable";
  ollama.className = `chip ${running.ollama.ok ? "ok" : "warn"}`;
  ollama.title = running.ollama.url;

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

function modelRows() {
  const loaded = new Map(running.models.map((m) => [m.id, m]));
  const rows = running.models.map((m) => ({ ...m, aliases: [] }));
  for (const entry of catalog) {
    const row = loaded.get(entry.id);
    if (row) row.aliases = entry.aliases || [];
    else rows.push({ id: entry.id, backend: entry.backend, state: entry.status, aliases: entry.aliases || [] });
  }
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
      el("div", { className: "aliases" }));
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
  const elapsed = (Date.now() - fetchedAt) / 1000;
  const limit = running.system.limit;
  const models = modelRows();
  const shown = models.map((m) => {
    const { tr, cells, button } = modelRow(m.id);
    const live = m.state === "loaded" || m.state === "loading";
    const measured = m.memory?.measured;
    const size = measured ?? m.memory?.estimated;
    const idle = m.idle_seconds == null ? null : m.idle_seconds + elapsed;
    let ttl = "–";
    if (m.pinned) ttl = "pinned";
    else if (live && m.ttl && idle != null) ttl = m.in_flight ? "in use" : duration(m.ttl - idle);
    const queued = m.queue?.queued || 0;

    tr.className = live ? "" : "unloaded";
    tr.dataset.state = m.state;
    cells[0].lastChild.textContent = m.aliases.length ? `also: ${m.aliases.join(", ")}` : "";
    cells[1].className = `state ${m.state}`;
    cells[1].textContent = m.state;
    cells[2].textContent = m.backend;
    if (live && size != null) {
      cells[3].replaceChildren(bar(size, limit, measured == null),
        el("span", { textContent: `${measured == null ? "~" : ""}${gib(size)}` +
          (m.memory.estimated != null && measured != null ? ` (estimated ${gib(m.memory.estimated)})` : "") }));
    } else {
      cells[3].replaceChildren();
    }
    cells[4].textContent = live ? duration(idle) : "–";
    cells[5].textContent = ttl;
    // the proxy counts a request from its arrival: the queued ones are in in_flight too
    cells[6].textContent = live ? String(Math.max(0, (m.in_flight || 0) - queued)) : "–";
    cells[7].textContent = live ? String(queued) : "–";
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
  if (!shown.length) body.append(el("tr", {}, el("td", { colSpan: 9, textContent: "No models in the catalog." })));
}

function describe(e) {
  switch (e.kind) {
    case "loading": return "loading";
    case "loaded": return `loaded in ${e.seconds}s` + (e.by === "proxy" ? " (without the governor's admission)" : "");
    case "unloaded": return `unloaded: ${e.reason}` + (e.detail ? ` (${e.detail})` : "");
    case "refused": return `refused: ${e.message}`;
    case "load_failed": return `load failed: ${e.message}`;
    default: return e.kind;
  }
}

function renderEvents() {
  const list = $("events");
  if (!events.length) {
    list.replaceChildren(el("li", { className: "empty", textContent: "No loads or unloads yet." }));
    return;
  }
  list.replaceChildren(...events.map((e) => {
    const at = new Date(e.at * 1000);
    const item = el("li", { className: e.kind },
      el("time", { dateTime: at.toISOString(), textContent: at.toLocaleTimeString() }),
      el("span", { className: "kind", textContent: e.kind.replace("_", " ") }),
      el("span", { className: "model-id", textContent: `${e.model} ` }),
      el("span", { textContent: `on ${e.backend}: ${describe(e)}` }));
    item.dataset.kind = e.kind;
    item.dataset.model = e.model;
    return item;
  }));
}

function render() {
  if (running) {
    renderSystem();
    renderModels();
  }
  renderEvents();
}

// ---- actions -------------------------------------------------------------------------

async function act(action, model, button) {
  const status = $("action");
  button.disabled = true;
  status.className = "action";
  status.textContent = `${action === "load" ? "Loading" : "Unloading"} ${model}…`;
  try {
    try {
      await call("POST", `/models/${action}`, { model });
    } catch (e) {
      if (e.code !== "model_busy" || !confirm(`${e.message}\n\nUnload it anyway?`)) throw e;
      await call("POST", "/models/unload", { model, force: true });
    }
    status.textContent = `${model} ${action === "load" ? "loaded" : "unloaded"}.`;
  } catch (e) {
    if (e instanceof KeyNeeded) askForKey();
    status.className = "action bad";
    status.textContent = `${model}: ${e.message}`;
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
  const live = $("live");
  live.textContent = on ? "live" : "reconnecting…";
  live.className = `chip ${on ? "ok" : "warn"}`;
  live.title = why || "";
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
      if (resp.status === 401) throw new KeyNeeded("the events need the API key");
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
      if (e instanceof KeyNeeded) askForKey();
      setLive(false, e.message);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
setInterval(render, 1000); // idle times and TTL countdowns move between refreshes
follow();
