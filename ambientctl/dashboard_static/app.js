// The dashboard page: polls /api/snapshot and draws it with plain DOM and SVG.
// Names come from the mesh's objects, so they are always set as text, never as markup.
"use strict";

const POLL_MS = 3000;
const SVG_NS = "http://www.w3.org/2000/svg";
const NODE_RADIUS = 26;
const FAILING_ERROR_RATE = 0.05;

function el(tag, attributes = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function number(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (value !== 0 && Math.abs(value) < 0.01) return value.toExponential(1);
  return value.toFixed(value >= 100 ? 0 : digits);
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(value === 1 || value === 0 ? 0 : 1)}%`;
}

function millis(value) {
  return value === null || value === undefined ? "–" : `${number(value, 1)} ms`;
}

function bytesPerSecond(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B/s", "kB/s", "MB/s", "GB/s"];
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${number(value, 1)} ${units[unit]}`;
}

function duration(seconds) {
  const sign = seconds < 0 ? "-" : "";
  seconds = Math.abs(seconds);
  if (seconds >= 2 * 86400) return `${sign}${Math.floor(seconds / 86400)} d`;
  if (seconds >= 3600) return `${sign}${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${sign}${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
}

function replaceRows(tableId, rows, emptyText, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, null)]));
  if (!rows.length) body.firstChild.append(el("td", { colspan: String(columns), class: "muted" }, emptyText));
}

// --- banners ---

function renderBanners(snapshot) {
  const banners = [
    ...snapshot.problems.map((text) => el("div", { class: "banner problem", "data-problem": text }, text)),
    ...snapshot.notes.map((text) => el("div", { class: "banner note", "data-note": text }, text)),
  ];
  document.getElementById("banners").replaceChildren(...banners);
}

function showUnreachable(error) {
  const text = `The dashboard server does not answer (${error.message}); retrying every ${POLL_MS / 1000} s.`;
  document.getElementById("banners").replaceChildren(el("div", { class: "banner problem", "data-problem": text }, text));
}

// --- the service graph ---

function nodeShape(node) {
  if (node.kind === "service") {
    return svg("rect", { x: -NODE_RADIUS, y: -NODE_RADIUS * 0.75, width: 2 * NODE_RADIUS, height: 1.5 * NODE_RADIUS, rx: 8 });
  }
  const r = NODE_RADIUS;
  if (node.kind === "external") return svg("polygon", { points: `0,${-r} ${r},0 0,${r} ${-r},0` });
  if (node.kind === "waypoint") {
    const corners = [0, 1, 2, 3, 4, 5].map((i) => `${(r * Math.cos((Math.PI / 3) * i)).toFixed(1)},${(r * Math.sin((Math.PI / 3) * i)).toFixed(1)}`);
    return svg("polygon", { points: corners.join(" ") });
  }
  return svg("circle", { r: NODE_RADIUS });
}

function lockIcon(x, y, locked) {
  // A padlock: closed for mutual TLS, open for plaintext.
  const icon = svg("g", { class: locked ? "lock" : "unlocked", transform: `translate(${x - 5},${y - 12})` });
  icon.append(svg("title", {}, locked ? "mutual TLS" : "plaintext"));
  icon.append(svg("rect", { x: 0, y: 5, width: 10, height: 7, rx: 1 }));
  const shackle = locked ? "M2,5 V3 a3,3 0 0 1 6,0 V5" : "M2,5 V3 a3,3 0 0 1 6,0 V1";
  icon.append(svg("path", { d: shackle, class: "shackle" }));
  return icon;
}

function edgeLabel(edge) {
  if (edge.protocols.includes("http")) {
    return `${number(edge.rps)}/s · ${percent(edge.errorRate)} · p99 ${millis(edge.p99Ms)}`;
  }
  return `${number(edge.rps)} conn/s · ${bytesPerSecond(edge.bytesPerSecond)}`;
}

function edgeTitle(edge) {
  const lines = [`${edge.sourceName} → ${edge.destinationName}`, edge.mtls ? "mutual TLS" : "plaintext (not all of it is mutual TLS)"];
  if (edge.protocols.includes("http")) {
    lines.push(`HTTP: ${number(edge.rps)} requests/s, ${percent(edge.errorRate)} 5xx, p99 ${millis(edge.p99Ms)}`);
  }
  if (edge.protocols.includes("tcp")) {
    lines.push(`TCP: ${number(edge.connectionsPerSecond)} connections/s, ${bytesPerSecond(edge.bytesPerSecond)}`);
  }
  return lines.join("\n");
}

// Where along an edge (point(t), t in 0..1) its label goes: the first of a few spots whose box
// (estimated from the text's length) overlaps no label placed before, else the least covered one.
const LABEL_SPOTS = [0.5, 0.38, 0.62, 0.26, 0.74, 0.16, 0.84];

function placeLabel(placed, text, point) {
  const [width, height] = [text.length * 5.8 + 12, 16];
  const overlap = (box) => placed.reduce((sum, other) => sum
    + Math.max(0, Math.min(box.right, other.right) - Math.max(box.left, other.left))
    * Math.max(0, Math.min(box.bottom, other.bottom) - Math.max(box.top, other.top)), 0);
  let best = null;
  for (const t of LABEL_SPOTS) {
    const [x, y] = point(t);
    const box = { x, y, left: x - width / 2, right: x + width / 2, top: y - 10 - height, bottom: y + 8 };
    box.covered = overlap(box);
    if (best === null || box.covered < best.covered) best = box;
    if (box.covered === 0) break;
  }
  placed.push(best);
  return [best.x, best.y];
}

function renderGraph(graph) {
  const canvas = document.getElementById("graph");
  const positions = new Map(graph.nodes.map((node) => [node.id, node]));
  const width = Math.max(graph.width, 400);
  const height = Math.max(graph.height, 160);
  canvas.setAttribute("viewBox", `0 0 ${width} ${height}`);
  canvas.style.height = `${height}px`;
  const defs = svg("defs");
  for (const [id, colour] of [["arrow-mtls", "#2e8540"], ["arrow-plaintext", "#d08000"], ["arrow-failing", "#c62828"]]) {
    const marker = svg("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: colour }));
    defs.append(marker);
  }
  const children = [defs];
  if (!graph.nodes.length) {
    children.push(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" }, "Nothing to draw yet."));
  }
  // Edges both ways between two nodes bend apart.
  const pairs = new Map();
  for (const edge of graph.edges) {
    const key = [edge.source, edge.destination].sort().join(" ");
    pairs.set(key, (pairs.get(key) || 0) + 1);
  }
  const seen = new Map();
  const labels = [];
  for (const edge of graph.edges) {
    const from = positions.get(edge.source);
    const to = positions.get(edge.destination);
    const key = [edge.source, edge.destination].sort().join(" ");
    const index = seen.get(key) || 0;
    seen.set(key, index + 1);
    const bend = pairs.get(key) > 1 ? (index === 0 ? -1 : 1) * 38 : 0;
    const dx = to.x - from.x;
    const dy = to.y - from.y;
    const length = Math.hypot(dx, dy) || 1;
    const [ux, uy] = [dx / length, dy / length];
    const [x1, y1] = [from.x + ux * NODE_RADIUS, from.y + uy * NODE_RADIUS];
    const [x2, y2] = [to.x - ux * (NODE_RADIUS + 3), to.y - uy * (NODE_RADIUS + 3)];
    const [cx, cy] = [(x1 + x2) / 2 - uy * bend, (y1 + y2) / 2 + ux * bend];
    const failing = edge.errorRate !== null && edge.errorRate > FAILING_ERROR_RATE;
    const state = failing ? "failing" : edge.mtls ? "mtls" : "plaintext";
    const group = svg("g", {
      class: `edge ${edge.mtls ? "mtls" : "plaintext"}${failing ? " failing" : ""}`,
      "data-source": edge.sourceName, "data-destination": edge.destinationName, "data-protocols": edge.protocols.join(" "),
      "data-mtls": edge.mtls, "data-rps": edge.rps === null ? "" : edge.rps,
    });
    group.append(svg("title", {}, edgeTitle(edge)));
    group.append(svg("path", { class: "line", d: `M${x1},${y1} Q${cx},${cy} ${x2},${y2}`, "marker-end": `url(#arrow-${state})` }));
    // The padlock sits on the curve, the label above it: at the middle unless another label is there.
    const label = edgeLabel(edge);
    const [mx, my] = placeLabel(labels, label, (t) => [
      (1 - t) * (1 - t) * x1 + 2 * (1 - t) * t * cx + t * t * x2,
      (1 - t) * (1 - t) * y1 + 2 * (1 - t) * t * cy + t * t * y2,
    ]);
    group.append(lockIcon(mx, my + 6, edge.mtls));
    group.append(svg("text", { x: mx, y: my - 10, "text-anchor": "middle" }, label));
    children.push(group);
  }
  for (const node of graph.nodes) {
    const group = svg("g", {
      class: `node ${node.kind}`, "data-node": node.kind === "external" ? node.id : `${node.namespace}/${node.name}`,
      "data-kind": node.kind, transform: `translate(${node.x},${node.y})`,
    });
    group.append(svg("title", {}, `${node.kind} ${node.namespace ? node.namespace + "/" : ""}${node.name}`));
    group.append(nodeShape(node));
    group.append(svg("text", { y: NODE_RADIUS + 15 }, node.kind === "external" ? "outside the mesh" : node.name));
    if (node.namespace) group.append(svg("text", { y: NODE_RADIUS + 29, class: "namespace" }, node.namespace));
    children.push(group);
  }
  canvas.replaceChildren(...children);
}

// --- golden signals ---

function sparkline(points, field, fromZero) {
  const values = points.map((point) => point[field]);
  const known = values.filter((value) => value !== null);
  const line = svg("svg", { class: "spark", viewBox: "0 0 120 26", preserveAspectRatio: "none", "data-series": field });
  if (known.length < 2) return line;
  // Rates are drawn from zero; a success rate over its own range, so that a dip shows.
  const low = fromZero ? Math.min(...known, 0) : Math.min(...known);
  const high = Math.max(...known);
  const step = 120 / (values.length - 1);
  const coordinates = [];
  values.forEach((value, index) => {
    const height = high === low ? 0.5 : (value - low) / (high - low);
    if (value !== null) coordinates.push(`${(index * step).toFixed(1)},${(24 - height * 22).toFixed(1)}`);
  });
  line.append(svg("polyline", { points: coordinates.join(" ") }));
  return line;
}

function signalCell(text, history, field, className = "") {
  const cell = el("td", { class: `number ${className}`.trim() }, text);
  if (history) cell.append(sparkline(history, field, field !== "successRate"));
  return cell;
}

function renderSignals(snapshot) {
  const rows = snapshot.services.map((service) => {
    const now = service.current;
    const success = now.successRate;
    const row = el("tr", { "data-service": `${service.namespace}/${service.name}` });
    row.append(el("td", {}, `${service.namespace}/${service.name}`));
    row.append(signalCell(number(now.rps), service.history, "rps"));
    row.append(signalCell(percent(success), service.history, "successRate", success === null ? "" : success < 0.95 ? "bad" : "ok"));
    row.append(signalCell(millis(now.p50Ms)));
    row.append(signalCell(millis(now.p95Ms)));
    row.append(signalCell(millis(now.p99Ms), service.history, "p99Ms"));
    row.append(signalCell(number(now.tcpConnectionsPerSecond), service.history, "tcpConnectionsPerSecond"));
    return row;
  });
  const minutes = Math.round((snapshot.services[0]?.history.length || 0) * snapshot.sampleSeconds / 60);
  document.getElementById("history-span").textContent = rows.length ? `(sparklines: last ${Math.max(minutes, 1)} min)` : "";
  replaceRows("signals", rows, "No service has received traffic yet.", 7);
}

// --- namespaces, waypoints, certificates ---

function renderMesh(snapshot) {
  const namespaces = snapshot.mesh.namespaces.map((ns) => {
    const row = el("tr", { "data-namespace": ns.name });
    row.append(el("td", {}, ns.name), el("td", { class: ns.enrolled ? "ok" : "muted" }, ns.enrolled ? "enrolled" : "no"));
    row.append(el("td", {}, ns.useWaypoint || "–"));
    return row;
  });
  replaceRows("namespaces", namespaces, "No namespaces.", 3);
  const waypoints = snapshot.mesh.waypoints.map((waypoint) => {
    const row = el("tr", { "data-waypoint": `${waypoint.namespace}/${waypoint.name}`, "data-ready": waypoint.ready });
    row.append(el("td", {}, `${waypoint.namespace}/${waypoint.name}`));
    row.append(el("td", { class: waypoint.ready ? "ok" : "bad" }, `${waypoint.readyPods}/${waypoint.pods}`));
    row.append(el("td", {}, waypoint.trafficType));
    return row;
  });
  replaceRows("waypoints", waypoints, "No waypoints.", 3);
  const certificates = snapshot.certificates.map((cert) => {
    const row = el("tr", { "data-certificate": cert.subject, "data-state": cert.state });
    row.append(el("td", { class: "subject" }, cert.subject), el("td", {}, cert.holder));
    const left = cert.state === "expired" ? `expired ${duration(-cert.expiresInSeconds)} ago` : `in ${duration(cert.expiresInSeconds)}`;
    row.append(el("td", { class: cert.state === "ok" ? "ok" : cert.state === "expiring" ? "warn" : "bad", title: cert.notAfter }, left));
    return row;
  });
  replaceRows("certificates", certificates, "No certificates found.", 3);
}

function render(snapshot) {
  const updated = new Date(snapshot.takenAt || snapshot.generatedAt).toLocaleTimeString();
  document.getElementById("source").textContent = `Data: ${snapshot.source} · run dir ${snapshot.runDir} · sampled ${updated}`;
  renderBanners(snapshot);
  renderGraph(snapshot.graph);
  renderSignals(snapshot);
  renderMesh(snapshot);
  document.body.dataset.meshRunning = String(snapshot.mesh.running);
  document.body.dataset.state = "loaded";
}

async function refresh() {
  try {
    const response = await fetch("/api/snapshot", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    showUnreachable(error);
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

refresh();
