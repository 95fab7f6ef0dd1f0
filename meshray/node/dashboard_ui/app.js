// The meshray dashboard: plain DOM, no framework, nothing loaded from elsewhere.
// Every value from the cluster is put in the page as text (textContent), never
// as HTML: actor names, labels and job logs are data, not markup.
"use strict";

const REFRESH_MS = 3000;       // how often the open view re-reads its JSON
const SAMPLE_MS = 3000;        // how often the metrics charts take a sample
const HISTORY = 100;           // samples kept (5 minutes at 3 s)
const CSRF_KEY = "meshray_csrf";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
                "#db2777", "#4b5563", "#65a30d"];

const samples = [];            // cluster_status samples, oldest first
let refreshTimer = null;
let sampleTimer = null;
let viewToken = 0;             // bumped on navigation: stale async work stops

// ------------------------------------------------------------ helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

// Ids begin with their node's prefix: show both ends so rows differ.
function short(id) {
  const text = id ? String(id) : "";
  return text.length > 16 ? `${text.slice(0, 6)}…${text.slice(-6)}` : text;
}
function fmtTime(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtResources(res) {
  return Object.entries(res || {})
    .filter(([k]) => !k.startsWith("node:"))
    .map(([k, v]) => `${k}: ${k.includes("memory") ? fmtBytes(v) : v}`).join(", ");
}
function stateCell(state) { return el("td", {class: `state state-${state}`}, state); }

function table(id, headers, rows) {
  return el("table", {id},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

class Unauthorized extends Error {}

async function api(path, options) {
  const opts = Object.assign({credentials: "same-origin", headers: {}}, options || {});
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = sessionStorage.getItem(CSRF_KEY) || "";
  }
  const response = await fetch(path, opts);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) throw new Unauthorized((body && body.error) || "log in");
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

function setStatus(text, isError) {
  const line = document.getElementById("status-line");
  line.textContent = text;
  line.className = isError ? "error" : "muted";
}

// ------------------------------------------------------------ login
function showLogin(message) {
  stopTimers();
  document.getElementById("app").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").focus();
}

async function login(event) {
  event.preventDefault();
  const token = document.getElementById("token").value.trim();
  const errorLine = document.getElementById("login-error");
  errorLine.textContent = "";
  try {
    const response = await fetch("/login", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({token})});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      errorLine.textContent = body.error || `login refused (HTTP ${response.status})`;
      return;
    }
    sessionStorage.setItem(CSRF_KEY, body.csrf_token);
    document.getElementById("token").value = "";
    showApp();
  } catch (e) {
    errorLine.textContent = `cannot reach the node: ${e.message}`;
  }
}

async function logout() {
  try { await api("/logout", {method: "POST"}); } catch (e) { /* logged out anyway */ }
  sessionStorage.removeItem(CSRF_KEY);
  showLogin("");
}

function showApp() {
  document.getElementById("login").hidden = true;
  document.getElementById("app").hidden = false;
  if (!location.hash) location.hash = "#nodes";
  startSampling();
  route();
}

function stopTimers() {
  viewToken++;
  clearTimeout(refreshTimer);
  clearInterval(sampleTimer);
  sampleTimer = null;
}

// ------------------------------------------------------------ routing
const VIEWS = {nodes: viewNodes, jobs: viewJobs, job: viewJob, actors: viewActors,
               tasks: viewTasks, pgs: viewPlacementGroups, objects: viewObjects,
               metrics: viewMetrics};

function route() {
  const [name, arg] = location.hash.replace(/^#/, "").split("/", 2);
  const view = VIEWS[name] || viewNodes;
  const token = ++viewToken;
  clearTimeout(refreshTimer);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === name ||
                          (name === "job" && link.dataset.view === "jobs"));
  }
  const root = document.getElementById("view");
  root.replaceChildren();
  const state = {root, token, arg: arg ? decodeURIComponent(arg) : ""};
  const tick = async () => {
    if (token !== viewToken) return;
    try {
      await view(state, state.root.childElementCount === 0);
      setStatus(`updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      if (e instanceof Unauthorized) { showLogin("your session ended: log in again"); return; }
      setStatus(e.message, true);
    }
    if (token === viewToken) refreshTimer = setTimeout(tick, REFRESH_MS);
  };
  tick();
}

// Each view builds its frame once (first) and refills its parts on every tick.
function part(state, id, build) {
  let node = state.root.querySelector(`#${id}`);
  if (!node) { node = build(); state.root.append(node); }
  return node;
}

function fill(state, id, content) {
  const holder = part(state, `${id}-holder`, () => el("div", {id: `${id}-holder`}));
  holder.replaceChildren(content);
}

// ------------------------------------------------------------ nodes
async function viewNodes(state) {
  const data = await api("/api/v0/nodes");
  document.getElementById("served-by").textContent = `served by node ${short(data.this_node)}`;
  part(state, "nodes-title", () => el("h2", {id: "nodes-title"}, "Nodes"));
  const latest = samples.length ? samples[samples.length - 1].nodes : {};
  fill(state, "nodes", table("nodes-table",
    ["Node", "Address", "State", "etcd lease", "Resources (total)", "Available", "Labels",
     "Metrics port", "Dashboard"],
    data.items.map((n) => el("tr", {"data-node-id": n.node_id},
      el("td", {class: "mono", title: n.node_id}, short(n.node_id),
         n.node_id === data.this_node ? el("span", {class: "muted"}, " (this node)") : null),
      el("td", {class: "mono"}, n.address), stateCell(n.state),
      el("td", {class: "lease"}, leaseText(latest[n.node_id])),
      el("td", {}, fmtResources(n.resources_total)),
      el("td", {}, fmtResources(n.resources_available)),
      el("td", {class: "mono"}, Object.entries(n.labels).map(([k, v]) => `${k}=${v}`).join(" ")),
      el("td", {}, n.metrics_port ?? ""),
      el("td", {}, n.dashboard_url
        ? el("a", {href: n.dashboard_url, class: "node-dashboard-link"}, `:${n.dashboard_port}`)
        : "")))));
}

function leaseText(figures) {
  // From the node's own metrics (meshray_etcd_lease_up, meshray_etcd_registrations).
  if (!figures || figures.lease_up === undefined) return "…";
  if (!figures.lease_up) return "not held";
  const joins = figures.registrations || 1;
  return joins > 1 ? `held (rejoined ${joins - 1}×)` : "held";
}

// ------------------------------------------------------------ jobs
async function viewJobs(state) {
  const jobs = await api("/api/jobs/");
  part(state, "jobs-title", () => el("h2", {id: "jobs-title"}, "Jobs"));
  jobs.sort((a, b) => (b.start_time || 0) - (a.start_time || 0));
  fill(state, "jobs", table("jobs-table",
    ["Submission id", "Status", "Entrypoint", "Start", "End", "Message"],
    jobs.map((j) => el("tr", {"data-job-id": j.submission_id},
      el("td", {class: "mono"},
         el("a", {href: `#job/${encodeURIComponent(j.submission_id)}`}, j.submission_id)),
      stateCell(j.status), el("td", {class: "mono"}, j.entrypoint),
      el("td", {}, fmtTime(j.start_time)), el("td", {}, fmtTime(j.end_time)),
      el("td", {}, j.message || "")))));
}

async function viewJob(state, first) {
  const id = state.arg;
  const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  if (first) {
    state.root.append(
      el("h2", {}, "Job ", el("span", {class: "mono", id: "job-id"}, id)),
      el("div", {class: "toolbar"},
        el("span", {}, "Status: ", el("span", {id: "job-status"})),
        el("button", {id: "stop-job", class: "danger", type: "button",
                      onclick: () => stopJob(id)}, "Stop")),
      el("div", {id: "job-info"}),
      el("h3", {}, "Logs (following)"),
      el("pre", {id: "job-logs"}));
    followLogs(id, state.token);
  }
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = `state-${job.status}`;
  document.getElementById("stop-job").disabled =
    ["SUCCEEDED", "FAILED", "STOPPED"].includes(job.status);
  document.getElementById("job-info").replaceChildren(table("job-table", ["Field", "Value"],
    ["entrypoint", "message", "driver_exit_code", "driver_node_id", "start_time", "end_time"]
      .map((k) => el("tr", {}, el("td", {}, k), el("td", {class: "mono"},
        k.endsWith("_time") ? fmtTime(job[k]) : (job[k] ?? ""))))));
}

async function followLogs(id, token) {
  // The node's long-poll tail: each call waits up to 10 s for new output.
  let offset = 0;
  const out = document.getElementById("job-logs");
  while (token === viewToken) {
    let chunk;
    try {
      chunk = await api(`/api/jobs/${encodeURIComponent(id)}/logs/tail?offset=${offset}&wait=10`);
    } catch (e) {
      if (e instanceof Unauthorized) return;
      await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
      continue;
    }
    if (token !== viewToken) return;
    out.append(document.createTextNode(chunk.data));
    offset = chunk.next_offset;
    if (chunk.done) { out.dataset.done = "true"; return; }
  }
}

async function stopJob(id) {
  try {
    const answer = await api(`/api/jobs/${encodeURIComponent(id)}/stop`, {method: "POST"});
    setStatus(answer.stopped ? `asked job ${id} to stop` : `job ${id} had already ended`);
  } catch (e) {
    setStatus(`stop failed: ${e.message}`, true);
  }
}

// ------------------------------------------------------------ actors
async function viewActors(state) {
  const page = await api("/api/v0/actors");
  part(state, "actors-title", () => el("h2", {id: "actors-title"}, "Actors"));
  fill(state, "actors", el("div", {}, missingNote(page), table("actors-table",
    ["Actor", "Class", "Name", "Namespace", "State", "Node", "PID", "Restarts", "Death cause"],
    page.items.map((a) => el("tr", {"data-actor-id": a.actor_id},
      el("td", {class: "mono", title: a.actor_id}, short(a.actor_id)),
      el("td", {}, a.class_name), el("td", {}, a.name), el("td", {}, a.ray_namespace),
      stateCell(a.state), el("td", {class: "mono"}, short(a.node_id)), el("td", {}, a.pid ?? ""),
      el("td", {}, a.num_restarts ?? 0),
      el("td", {}, a.death_cause ? JSON.stringify(a.death_cause) : ""))))));
}

function missingNote(page) {
  const missing = Object.entries(page.missing || {});
  if (!missing.length) return null;
  return el("p", {class: "error"}, "Nodes that did not answer: ",
            missing.map(([node, why]) => `${short(node)} (${why})`).join("; "));
}

// ------------------------------------------------------------ tasks
const TASK_STATES = ["", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER",
                     "RUNNING", "FINISHED", "FAILED"];

async function viewTasks(state, first) {
  if (first) {
    state.root.append(
      el("h2", {}, "Tasks"),
      el("h3", {}, "Task stream (last 60 s, one row per worker)"),
      svgEl("svg", {id: "task-stream", height: "60"}),
      el("h3", {}, "Summary by function"), el("div", {id: "task-summary"}),
      el("h3", {}, "Tasks"),
      el("div", {class: "toolbar"}, el("label", {}, "State: ",
        el("select", {id: "task-state-filter", onchange: () => route()},
          TASK_STATES.map((s) => el("option", {value: s}, s || "any"))))),
      el("div", {id: "tasks-list"}));
    const wanted = sessionStorage.getItem("meshray_task_state") || "";
    document.getElementById("task-state-filter").value = wanted;
  }
  const filter = document.getElementById("task-state-filter").value;
  sessionStorage.setItem("meshray_task_state", filter);
  const [page, summary, stream] = await Promise.all([
    api(`/api/v0/tasks${filter ? `?state=${encodeURIComponent(filter)}` : ""}`),
    api("/api/v0/tasks/summary"), api("/api/v0/timeline?window_s=60")]);
  const states = new Set();
  for (const entry of Object.values(summary.summary)) {
    Object.keys(entry.state_counts).forEach((s) => states.add(s));
  }
  const columns = [...states].sort();
  document.getElementById("task-summary").replaceChildren(table("task-summary-table",
    ["Function", "Type", ...columns],
    Object.entries(summary.summary).map(([name, entry]) => el("tr", {"data-func": name},
      el("td", {class: "mono"}, name), el("td", {}, entry.type),
      columns.map((s) => el("td", {}, entry.state_counts[s] || 0))))));
  document.getElementById("tasks-list").replaceChildren(missingNote(page) || "",
    el("p", {class: "muted"}, `${page.items.length} shown of ${page.total}`),
    table("tasks-table", ["Task", "Function", "State", "Type", "Node", "Worker PID", "Error"],
      page.items.map((t) => el("tr", {"data-task-id": t.task_id},
        el("td", {class: "mono", title: t.task_id}, short(t.task_id)),
        el("td", {class: "mono"}, t.func_or_class_name || t.name), stateCell(t.state),
        el("td", {}, t.type), el("td", {class: "mono"}, short(t.node_id)),
        el("td", {}, t.worker_pid ?? ""), el("td", {}, t.error_type || "")))));
  drawTaskStream(document.getElementById("task-stream"), stream);
}

function drawTaskStream(svg, stream) {
  // Dask-style: one row per worker, one bar per task run, colored by function.
  const rows = [...new Set(stream.slices.map((s) => s.worker))].sort();
  const width = svg.clientWidth || 900, rowH = 18, left = 130;
  const height = Math.max(40, rows.length * rowH + 24);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const t1 = stream.now_ms, t0 = t1 - stream.window_s * 1000;
  const x = (t) => left + Math.max(0, (t - t0) / (t1 - t0)) * (width - left - 10);
  const names = [...new Set(stream.slices.map((s) => s.name))].sort();
  rows.forEach((row, i) => {
    const label = svgEl("text", {x: 4, y: i * rowH + 13, "font-size": "11",
                                 "font-family": "monospace"});
    label.textContent = row;
    svg.append(label);
  });
  for (const s of stream.slices) {
    const i = rows.indexOf(s.worker);
    const start = x(s.start_ms), end = x(s.end_ms ?? t1);
    const bar = svgEl("rect", {x: start, y: i * rowH + 2, width: Math.max(1.5, end - start),
                               height: rowH - 4, class: "task-slice",
                               fill: s.state === "FAILED" ? "#b91c1c"
                                 : COLORS[names.indexOf(s.name) % COLORS.length]});
    const tip = svgEl("title", {});
    tip.textContent = `${s.name} ${s.state} ${((s.end_ms ?? t1) - s.start_ms).toFixed(0)} ms`;
    bar.append(tip);
    svg.append(bar);
  }
  const axis = svgEl("text", {x: left, y: height - 4, "font-size": "10", fill: "#6b7785"});
  axis.textContent = `${stream.window_s} s ago`;
  const now = svgEl("text", {x: width - 40, y: height - 4, "font-size": "10", fill: "#6b7785"});
  now.textContent = "now";
  svg.append(axis, now);
}

// ------------------------------------------------------------ placement groups
async function viewPlacementGroups(state) {
  const page = await api("/api/v0/placement_groups");
  part(state, "pgs-title", () => el("h2", {id: "pgs-title"}, "Placement groups"));
  fill(state, "pgs", table("pgs-table", ["Placement group", "Name", "State", "Bundles (node: resources)"],
    page.items.map((g) => el("tr", {"data-pg-id": g.placement_group_id},
      el("td", {class: "mono", title: g.placement_group_id}, short(g.placement_group_id)),
      el("td", {}, g.name), stateCell(g.state),
      el("td", {}, el("ul", {}, (g.bundles || []).map((b) => el("li", {class: "bundle"},
        `#${b.bundle_id} on ${b.node_id ? short(b.node_id) : "(unplaced)"}: `
        + fmtResources(b.unit_resources)))))))));
}

// ------------------------------------------------------------ objects
async function viewObjects(state) {
  const page = await api("/api/v0/objects");
  part(state, "objects-title", () => el("h2", {id: "objects-title"}, "Objects and memory"));
  const perNode = {};
  for (const o of page.items) {
    const entry = perNode[o.node_id] || (perNode[o.node_id] = {count: 0, bytes: 0, in_store: 0});
    entry.count += 1;
    entry.bytes += o.object_size || 0;
    if (o.in_store) entry.in_store += o.object_size || 0;
  }
  fill(state, "objects", el("div", {}, missingNote(page),
    el("h3", {}, "Per node"),
    table("objects-per-node", ["Node", "Objects", "Bytes", "In shared memory"],
      Object.entries(perNode).map(([node, e]) => el("tr", {"data-node-id": node},
        el("td", {class: "mono"}, short(node)), el("td", {}, e.count),
        el("td", {}, fmtBytes(e.bytes)), el("td", {}, fmtBytes(e.in_store))))),
    el("h3", {}, `Objects (${page.items.length} shown of ${page.total})`),
    table("objects-table", ["Object", "Size", "Status", "Reference", "Holder PID", "Node"],
      page.items.map((o) => el("tr", {"data-object-id": o.object_id},
        el("td", {class: "mono", title: o.object_id}, short(o.object_id)),
        el("td", {}, fmtBytes(o.object_size)), el("td", {}, o.task_status),
        el("td", {}, o.reference_type), el("td", {}, o.pid ?? ""),
        el("td", {class: "mono"}, short(o.node_id)))))));
}

// ------------------------------------------------------------ metrics
async function sample() {
  try {
    const status = await api("/api/v0/cluster_status");
    samples.push(status);
    while (samples.length > HISTORY) samples.shift();
  } catch (e) {
    if (e instanceof Unauthorized) showLogin("your session ended: log in again");
  }
}

function startSampling() {
  if (sampleTimer) return;
  sample();
  sampleTimer = setInterval(sample, SAMPLE_MS);
}

function seriesPerNode(key, scale) {
  const out = {};
  samples.forEach((s) => {
    for (const [node, figures] of Object.entries(s.nodes)) {
      if (figures[key] === undefined) continue;
      (out[short(node)] || (out[short(node)] = [])).push([s.time_ms, figures[key] * (scale || 1)]);
    }
  });
  return out;
}

function seriesTaskStates() {
  const out = {};
  samples.forEach((s) => {
    const totals = {};
    for (const figures of Object.values(s.nodes)) {
      for (const [state, n] of Object.entries(figures.tasks || {})) {
        totals[state] = (totals[state] || 0) + n;
      }
    }
    for (const [state, n] of Object.entries(totals)) {
      (out[state] || (out[state] = [])).push([s.time_ms, n]);
    }
  });
  return out;
}

function lineChart(id, title, series, format) {
  const width = 420, height = 160, pad = 34;
  const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, id: `${id}-svg`});
  const points = Object.values(series).flat();
  const box = el("div", {class: "chart", id}, el("h3", {}, title), svg);
  if (!points.length) { box.append(el("p", {class: "muted"}, "waiting for samples...")); return box; }
  const t0 = Math.min(...points.map((p) => p[0])), t1 = Math.max(...points.map((p) => p[0]));
  const top = Math.max(1e-9, ...points.map((p) => p[1]));
  const x = (t) => pad + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (width - pad - 6);
  const y = (v) => height - 16 - (v / top) * (height - 28);
  svg.append(svgEl("line", {x1: pad, y1: y(0), x2: width - 6, y2: y(0), stroke: "#d9dee4"}));
  const label = svgEl("text", {x: 2, y: 12, "font-size": "10", fill: "#6b7785"});
  label.textContent = format(top);
  svg.append(label);
  const legend = el("div", {class: "legend"});
  Object.entries(series).forEach(([name, pts], i) => {
    const color = COLORS[i % COLORS.length];
    svg.append(svgEl("polyline", {fill: "none", stroke: color, "stroke-width": "1.8",
      class: "series", points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}));
    const swatch = el("i", {});
    swatch.style.background = color;      // CSSOM, which the page's CSP allows
    legend.append(el("span", {}, swatch, name));
  });
  box.append(legend);
  return box;
}

async function viewMetrics(state) {
  part(state, "metrics-title", () => el("h2", {id: "metrics-title"},
    "Metrics (sampled every 3 s while this page is open)"));
  const last = samples[samples.length - 1];
  fill(state, "charts", el("div", {class: "charts", id: "charts"},
    last ? missingNote(last) : null,
    lineChart("chart-cpu", "CPU utilization per node (%)", seriesPerNode("cpu_percent"),
              (v) => `${v.toFixed(0)}%`),
    lineChart("chart-mem", "Memory used per node", seriesPerNode("mem_used"), fmtBytes),
    lineChart("chart-tasks", "Tasks by state (cluster)", seriesTaskStates(), (v) => v.toFixed(0)),
    lineChart("chart-store", "Object store bytes per node", seriesPerNode("store_bytes"),
              fmtBytes)));
}

// ------------------------------------------------------------ start
async function start() {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout-button").addEventListener("click", logout);
  window.addEventListener("hashchange", () => { if (!document.getElementById("app").hidden) route(); });
  try {
    await api("/api/v0/nodes");
    showApp();
  } catch (e) {
    showLogin(e instanceof Unauthorized ? "" : e.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
