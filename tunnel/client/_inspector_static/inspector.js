// The tunnel inspector page. The agent pushes every change over server-sent
// events (/api/events); nothing here polls. Everything the agent recorded is
// inserted as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const exchanges = new Map(); // id -> summary, oldest first
const rows = new Map(); // id -> <li>
let capacity = 200;
let selected = null;
let detailToken = 0;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function statusClass(summary) {
  if (summary.state === "pending" && summary.status === null) return "s-pending";
  if (summary.status === null) return "s-error";
  return "s" + String(summary.status)[0];
}

function statusText(summary) {
  if (summary.status !== null) return String(summary.status);
  return summary.state === "pending" ? "…" : "ERR";
}

function ms(value) {
  if (value === null || value === undefined) return "";
  if (value < 1) return value.toFixed(2) + " ms";
  if (value < 1000) return Math.round(value) + " ms";
  return (value / 1000).toFixed(2) + " s";
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

// -- the list ----------------------------------------------------------------

function fillRow(li, summary) {
  li.replaceChildren(
    el("span", "time", clock(summary.started_at)),
    el("span", "method", summary.method),
    el("span", "target" + (summary.replay_of ? " replayed" : ""), summary.target),
    el("span", "status " + statusClass(summary), statusText(summary)),
    el("span", "duration", summary.state === "pending" ? "" : ms(summary.duration_ms)),
  );
  li.title = summary.error || "";
  li.dataset.state = summary.state;
  li.dataset.status = summary.status === null ? "" : String(summary.status);
  li.hidden = !matchesFilter(summary);
}

function addOrUpdate(summary, animate) {
  const known = exchanges.has(summary.id);
  exchanges.set(summary.id, summary);
  let li = rows.get(summary.id);
  if (!li) {
    li = el("li", "row");
    li.dataset.id = String(summary.id);
    li.addEventListener("click", () => select(summary.id));
    rows.set(summary.id, li);
    $("list").prepend(li);
    if (animate) li.classList.add("new");
  }
  fillRow(li, summary);
  if (li.dataset.id === String(selected)) li.classList.add("selected");
  // Keep no more than the agent does.
  while (exchanges.size > capacity) {
    const oldest = exchanges.keys().next().value;
    exchanges.delete(oldest);
    rows.get(oldest)?.remove();
    rows.delete(oldest);
  }
  updateCount();
  if (known && summary.id === selected) loadDetail(summary.id);
}

function replaceAll(snapshot) {
  capacity = snapshot.capacity;
  exchanges.clear();
  rows.clear();
  $("list").replaceChildren();
  for (const summary of snapshot.exchanges) addOrUpdate(summary, false);
  if (selected !== null && !exchanges.has(selected)) showNothing();
  else if (selected !== null) loadDetail(selected);
  updateCount();
}

function updateCount() {
  const n = exchanges.size;
  $("count").textContent = n === 1 ? "1 request" : n + " requests";
  $("empty").hidden = n > 0;
}

function matchesFilter(summary) {
  const words = $("filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const text = `${summary.method} ${summary.target} ${summary.status ?? ""}`.toLowerCase();
  return words.every((word) => text.includes(word));
}

$("filter").addEventListener("input", () => {
  for (const [id, li] of rows) li.hidden = !matchesFilter(exchanges.get(id));
});

$("clear").addEventListener("click", async () => {
  await fetch("/api/exchanges", { method: "DELETE", headers: { "X-Tunnel-Inspector": "1" } });
});

// -- the detail view -----------------------------------------------------------

function select(id) {
  selected = id;
  for (const [rowId, li] of rows) li.classList.toggle("selected", rowId === id);
  $("replay-error").hidden = true;
  loadDetail(id);
}

function showNothing() {
  selected = null;
  $("detail").hidden = true;
  $("placeholder").hidden = false;
}

async function loadDetail(id) {
  const token = ++detailToken;
  const response = await fetch(`/api/exchanges/${id}`);
  if (token !== detailToken) return; // a later selection won
  if (!response.ok) {
    showNothing();
    return;
  }
  renderDetail(await response.json());
}

function headerTable(table, headers) {
  table.replaceChildren(
    ...headers.map(([name, value]) => {
      const tr = el("tr");
      tr.append(el("td", "", name), el("td", "", value));
      return tr;
    }),
  );
  if (headers.length === 0) {
    const tr = el("tr");
    tr.append(el("td", "muted", "(none)"));
    table.append(tr);
  }
}

function bodyView(box, body, what) {
  const parts = [];
  if (body.kind === "empty") {
    parts.push(el("p", "note", `No ${what} body.`));
  } else {
    let note = `${bytes(body.size)}`;
    if (body.content_type) note += ` · ${body.content_type}`;
    if (body.decoded_from) note += ` · decoded from ${body.decoded_from}`;
    if (body.truncated) note += ` · showing the first ${bytes(body.kept)} recorded`;
    if (body.kind === "binary") note = `Binary, ${note} · hex dump of the first bytes`;
    if (body.kind === "json") note += " · JSON, pretty-printed";
    parts.push(el("p", "note", note));
    const pre = el("pre", body.kind === "binary" ? "hex" : body.kind);
    pre.textContent = body.kind === "binary" ? body.hex : body.text;
    parts.push(pre);
  }
  box.replaceChildren(...parts);
}

function renderDetail(detail) {
  $("placeholder").hidden = true;
  $("detail").hidden = false;
  $("detail").dataset.id = String(detail.id);
  $("d-method").textContent = detail.method;
  $("d-target").textContent = detail.target;
  const status = $("d-status");
  status.textContent = statusText(detail);
  status.className = "status " + statusClass(detail);
  $("d-duration").textContent = detail.state === "pending" ? "in flight" : ms(detail.duration_ms);
  $("d-ttfb").textContent = ms(detail.first_byte_ms) || "–";
  $("d-started").textContent = new Date(detail.started_at * 1000).toLocaleString();
  $("d-replay-row").hidden = !detail.replay_of;
  const replayOf = $("d-replay-of");
  replayOf.textContent = detail.replay_of ? "#" + detail.replay_of : "";
  replayOf.onclick = (event) => {
    event.preventDefault();
    if (exchanges.has(detail.replay_of)) select(detail.replay_of);
  };
  $("d-error").hidden = !detail.error;
  $("d-error").textContent = detail.error || "";
  const replay = $("replay");
  replay.disabled = !detail.replayable;
  replay.title = detail.replayable
    ? "Send this request to the local service again"
    : "The request body is not all recorded (larger than the cap, or still arriving), " +
      "so it cannot be sent again";
  headerTable($("req-headers"), detail.request.headers);
  bodyView($("req-body"), detail.request.body, "request");
  headerTable($("res-headers"), detail.response.headers);
  bodyView($("res-body"), detail.response.body, "response");
}

$("replay").addEventListener("click", async () => {
  if (selected === null) return;
  const button = $("replay");
  const error = $("replay-error");
  button.disabled = true;
  button.textContent = "Replaying…";
  error.hidden = true;
  try {
    const response = await fetch(`/api/exchanges/${selected}/replay`, {
      method: "POST",
      headers: { "X-Tunnel-Inspector": "1" },
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `replay failed (${response.status})`);
    if (!exchanges.has(answer.id)) {
      // The event stream may not have brought it yet; fetch it ourselves.
      const summary = await (await fetch(`/api/exchanges/${answer.id}`)).json();
      addOrUpdate(summary, true);
    }
    select(answer.id);
  } catch (exc) {
    error.textContent = `Replay failed: ${exc.message}`;
    error.hidden = false;
  } finally {
    button.textContent = "Replay";
    button.disabled = false;
  }
});

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || selected === null) return;
  if (event.key !== "ArrowDown" && event.key !== "ArrowUp" && event.key !== "j" && event.key !== "k") return;
  const visible = [...$("list").children].filter((li) => !li.hidden);
  const index = visible.findIndex((li) => li.dataset.id === String(selected));
  const next = visible[index + (event.key === "ArrowDown" || event.key === "j" ? 1 : -1)];
  if (next) {
    event.preventDefault();
    select(Number(next.dataset.id));
    next.scrollIntoView({ block: "nearest" });
  }
});

// -- the tunnel's status and the live feed ----------------------------------------

function showStatus(status) {
  const state = $("state");
  state.textContent = status.state;
  state.className = "state " + status.state;
  const link = $("public-url");
  link.textContent = status.url || "";
  if (status.url && /^https?:/.test(status.url)) link.href = status.url;
  $("target").textContent = status.target || "";
  document.title = `tunnel inspector · ${status.url || status.state}`;
}

function connect() {
  const live = $("live");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => {
    live.textContent = "live";
    live.className = "live on";
  });
  events.addEventListener("error", () => {
    live.textContent = "reconnecting…";
    live.className = "live off";
  });
  events.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    showStatus(snapshot.status);
    replaceAll(snapshot);
  });
  events.addEventListener("exchange", (event) => addOrUpdate(JSON.parse(event.data), true));
  events.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
}

connect();
