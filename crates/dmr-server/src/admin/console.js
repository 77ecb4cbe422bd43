// The operators' console: calls the admin API with the token kept in this tab's sessionStorage.
"use strict";
const $ = (id) => document.getElementById(id);
let selectedAgent = null;

function token() { return sessionStorage.getItem("dmr-admin-token"); }

async function api(path, body) {
  const init = { headers: { "Authorization": "Bearer " + token() } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    sessionStorage.removeItem("dmr-admin-token");
    show();
    throw new Error("the token was refused");
  }
  const json = await response.json();
  if (!response.ok) throw new Error(json.error || response.statusText);
  return json;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

function fill(tbody, items, render) {
  tbody.replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    render(row, item);
    return row;
  }));
}

async function refreshAgents() {
  const view = await api("/api/v1/agents");
  $("instance").textContent = "answered by " + view.instance;
  fill($("agents").tBodies[0], view.agents, (row, a) => {
    const s = a.sessions[0] || {};
    row.className = a.connected ? "connected" : "offline";
    row.dataset.agent = a.id;
    cell(row, a.id);
    cell(row, a.name);
    cell(row, a.connected ? "connected" : "offline").className = "state";
    cell(row, s.instance);
    cell(row, s.transport);
    cell(row, s.since);
    cell(row, s.remoteAddress);
    cell(row, a.queueDepth);
    cell(row, a.dlqDepth).className = "dlq-depth";
    const button = document.createElement("button");
    button.textContent = "Dead letters";
    button.className = "show-dead-letters";
    button.onclick = () => { selectedAgent = a.id; refreshDeadLetters().catch(report); };
    cell(row, "").appendChild(button);
  });
}

async function refreshDeadLetters() {
  if (!selectedAgent) return;
  const view = await api("/api/v1/agents/" + encodeURIComponent(selectedAgent) + "/dead-letters");
  $("dead-letters").classList.remove("hidden");
  $("dl-agent").textContent = view.agentId;
  $("dl-depth").textContent = view.depth;
  fill($("dead-letter-table").tBodies[0], view.messages, (row, m) => {
    row.dataset.id = m.id || "";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = m.id || "";
    cell(row, "").appendChild(box);
    cell(row, m.id);
    cell(row, m.senderId);
    cell(row, m.type);
    cell(row, m.timestamp);
    cell(row, m.receivedAt);
    cell(row, m.deadLetter.reason);
    cell(row, m.deadLetter.count);
    cell(row, m.deadLetter.lastError);
  });
}

async function refreshValidationFailures() {
  const view = await api("/api/v1/validation-failures");
  $("vf-depth").textContent = view.depth;
  fill($("validation-failures").tBodies[0], view.records, (row, r) => {
    cell(row, r.id);
    cell(row, r.receivedAt);
    cell(row, r.senderId);
    cell(row, r.recipientId);
    cell(row, (r.errors || []).map((e) => e.message || JSON.stringify(e)).join("; "));
  });
}

async function deadLetterAction(action, all) {
  const ids = [...document.querySelectorAll("#dead-letter-table input:checked")].map((b) => b.value).filter(Boolean);
  if (!all && ids.length === 0) { $("dl-result").textContent = "select messages first"; return; }
  if (action === "purge" && !confirm(all ? "Delete every dead letter of this agent?" : "Delete " + ids.length + " dead letter(s)?")) return;
  const result = await api("/api/v1/agents/" + encodeURIComponent(selectedAgent) + "/dead-letters/" + action, all ? { all: true } : { ids });
  $("dl-result").textContent = (action === "replay" ? "replayed " : "purged ") + result.count
    + (result.notFound.length ? ", not found: " + result.notFound.join(", ") : "");
  await Promise.all([refreshDeadLetters(), refreshAgents()]);
}

function report(e) { $("error").textContent = e.message; }

// Listing a queue takes its messages and returns them (RabbitMQ counts that as a delivery of each):
// only the agents table (queue depths, no listing) refreshes by itself; dead letters and validation
// failures are listed when asked for.
async function refresh(withLists) {
  if (!token()) return;
  try {
    await Promise.all([refreshAgents(), withLists ? refreshValidationFailures() : Promise.resolve()]);
    $("error").textContent = "";
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) { report(e); }
}

function show() {
  const signedIn = Boolean(token());
  $("login").classList.toggle("hidden", signedIn);
  $("console").classList.toggle("hidden", !signedIn);
}

$("login").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem("dmr-admin-token", $("token").value.trim());
  $("token").value = "";
  show();
  refresh(true);
};
$("replay-selected").onclick = () => deadLetterAction("replay", false).catch(report);
$("replay-all").onclick = () => deadLetterAction("replay", true).catch(report);
$("purge-selected").onclick = () => deadLetterAction("purge", false).catch(report);
$("purge-all").onclick = () => deadLetterAction("purge", true).catch(report);
$("vf-purge-all").onclick = () => {
  if (!confirm("Delete every validation failure?")) return;
  api("/api/v1/validation-failures/purge", { all: true }).then(() => refresh(true)).catch(report);
};
$("vf-refresh").onclick = () => refresh(true);
show();
refresh(true);
setInterval(() => refresh(false), 2000);
