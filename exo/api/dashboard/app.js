// The dashboard: one live feed (snapshot, events, status) drives every view.
import { apiKey, call, follow, setApiKey, Unauthorized } from "./api.js";
import { setupChat } from "./chat.js";

const view = { nodeId: null, state: null, status: null, events: [], models: [], modelsAt: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

export function bytes(n) {
  if (!Number.isFinite(n)) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function eventLine(indexed) {
  const { type, ...fields } = indexed.event;
  const detail = Object.entries(fields)
    .filter(([, value]) => typeof value !== "object" || value === null)
    .map(([key, value]) => `${key}=${value}`).join(" ");
  return el("li", { value: indexed.index, "data-index": indexed.index }, `${type} ${detail}`);
}

// --- views ------------------------------------------------------------------------------
function renderHeader() {
  const state = view.state;
  $("node").textContent = `node ${view.nodeId} · index ${state.last_event_index}`;
  $("master").textContent = state.master_node_id ? `master ${state.master_node_id} · term ${state.term}` : "no master";
  $("master").dataset.master = state.master_node_id || "";
}

function links() { return view.status?.links || {}; }

function renderTopology() {
  const nodes = Object.values(view.state.nodes).sort((a, b) => a.node_id.localeCompare(b.node_id));
  const svg = $("topology");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const place = (i) => {
    const angle = (2 * Math.PI * i) / Math.max(nodes.length, 1) - Math.PI / 2;
    return [200 + 140 * Math.cos(angle) * (nodes.length > 1 ? 1 : 0), 110 + 75 * Math.sin(angle) * (nodes.length > 1 ? 1 : 0)];
  };
  const svgEl = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const [x1, y1] = place(i), [x2, y2] = place(j);
    svgEl("line", { x1, y1, x2, y2 });
    const link = nodes[i].node_id === view.nodeId ? links()[nodes[j].node_id] : nodes[j].node_id === view.nodeId ? links()[nodes[i].node_id] : null;
    if (link?.rtt_ms !== undefined) svgEl("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, `${link.rtt_ms.toFixed(2)} ms`);
  }
  nodes.forEach((node, i) => {
    const [x, y] = place(i);
    const master = node.node_id === view.state.master_node_id;
    svgEl("circle", { cx: x, cy: y, r: 22, class: `${node.status}${master ? " master" : ""}` });
    svgEl("text", { x, y: y + 4, "text-anchor": "middle" }, master ? "★" : node.status === "gone" ? "✕" : "");
    svgEl("text", { x, y: y + 38, "text-anchor": "middle" }, node.node_id);
  });
  $("nodes").tBodies[0].replaceChildren(...nodes.map((node) => {
    const used = node.memory_total_bytes - node.memory_available_bytes;
    const link = links()[node.node_id];
    const linkText = node.node_id === view.nodeId ? "this node"
      : link ? [link.rtt_ms !== undefined ? `${link.rtt_ms.toFixed(2)} ms` : null,
                link.bandwidth_bytes_per_s ? `${bytes(link.bandwidth_bytes_per_s)}/s` : null].filter(Boolean).join(" · ") : "—";
    return el("tr", { "data-node": node.node_id, "data-status": node.status },
      el("td", {}, node.node_id, node.node_id === view.state.master_node_id ? el("span", { class: "pill" }, "master") : null),
      el("td", { class: node.status }, node.status),
      el("td", {}, `${bytes(used)} / ${bytes(node.memory_total_bytes)}`),
      el("td", {}, linkText));
  }));
  const blas = view.status?.blas;
  $("blas").textContent = blas ? `BLAS on ${view.nodeId}: ${blas.mapped || blas.library || "?"}${blas.gflops ? ` (${blas.gflops.toFixed(1)} GFLOP/s)` : ""}` : "";
}

function downloadsOf(modelId) {
  const model = view.models.find((m) => m.id === modelId);
  return Object.entries(model?.nodes || {}).filter(([, s]) => s.status === "downloading");
}

function progress(done, total) {
  return el("progress", { max: total || 1, value: done || 0, title: `${bytes(done)} / ${bytes(total)}` });
}

function renderInstances() {
  const instances = Object.values(view.state.instances).sort((a, b) => a.instance_id.localeCompare(b.instance_id));
  const rows = instances.map((instance) => {
    const stages = Object.entries(instance.shard_assignments).sort((a, b) => (a[1].start_layer ?? a[1].rank ?? 0) - (b[1].start_layer ?? b[1].rank ?? 0));
    const split = el("div", { class: "split", role: "img", "aria-label": "layer split" }, ...stages.map(([node, shard]) => {
      const width = shard.n_layers ? (100 * (shard.end_layer - shard.start_layer)) / shard.n_layers : 100 / stages.length;
      const label = shard.start_layer !== undefined ? `${node} ${shard.start_layer}–${shard.end_layer}` : `${node} rank ${shard.rank}`;
      return el("span", { style: `width:${width}%`, title: label }, label);
    }));
    const downloads = downloadsOf(instance.model_id).map(([node, s]) => el("div", {}, `${node} `, progress(s.bytes_done, s.bytes_total)));
    return el("tr", { "data-instance": instance.instance_id, "data-status": instance.status },
      el("td", {}, instance.model_id, el("div", { class: "muted" }, instance.instance_id)),
      el("td", {}, instance.sharding),
      el("td", {}, split),
      el("td", { class: instance.status }, instance.status, instance.failure_reason ? el("div", { class: "error" }, instance.failure_reason) : null, ...downloads),
      el("td", {}, el("button", { type: "button", "aria-label": `delete ${instance.instance_id}`, onclick: () => removeInstance(instance.instance_id) }, "Delete")));
  });
  $("instances").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no instances: place one below"))]));
}

async function removeInstance(id) {
  try { await call("DELETE", `/instance/${encodeURIComponent(id)}`); }
  catch (error) { $("place-error").textContent = `delete ${id}: ${error.message}`; }
}

function renderModels() {
  const supported = view.models.filter((m) => m.supported);
  for (const select of [$("place-model"), $("chat-model")]) {
    const chosen = select.value;
    const ids = select.id === "chat-model"
      ? [...new Set(Object.values(view.state?.instances || {}).filter((i) => i.status === "ready").map((i) => i.model_id))]
      : supported.map((m) => m.id);
    const list = select.id === "chat-model" && !ids.length ? supported.map((m) => m.id) : ids;
    if (select.options.length === list.length && [...select.options].every((o, i) => o.value === list[i])) continue;
    select.replaceChildren(...list.map((id) => el("option", { value: id }, id)));
    if (list.includes(chosen)) select.value = chosen;
  }
  $("models").tBodies[0].replaceChildren(...view.models.map((model) => {
    const states = Object.entries(model.nodes || {}).map(([node, s]) =>
      el("div", { class: s.status }, `${node}: ${s.status} `, s.status === "downloading" ? progress(s.bytes_done, s.bytes_total) : null, s.reason ? ` ${s.reason}` : ""));
    return el("tr", { "data-model": model.id },
      el("td", {}, model.id),
      el("td", {}, bytes(model.bytes)),
      el("td", {}, `${model.architecture}${model.n_layers ? `, ${model.n_layers} layers` : ""}`),
      el("td", {}, model.supported ? (model.local === false ? "not here" : "local") : el("span", { class: "error" }, model.reason || "unsupported"), ...states));
  }));
}

function renderEvents(fresh) {
  const list = $("events");
  for (const indexed of fresh) list.prepend(eventLine(indexed));
  while (list.children.length > 200) list.lastChild.remove();
}

function renderAll() {
  if (!view.state) return;
  renderHeader(); renderTopology(); renderInstances(); renderModels();
}

async function refreshModels(force = false) {
  const now = Date.now();
  const downloading = view.models.some((m) => Object.values(m.nodes || {}).some((s) => s.status === "downloading"));
  if (!force && !downloading && now - view.modelsAt < 10000) return;
  view.modelsAt = now;
  try { view.models = (await call("GET", "/models")).data; renderModels(); renderInstances(); }
  catch (error) { if (error instanceof Unauthorized) askForKey(); }
}

// --- trace timeline ----------------------------------------------------------------------
// Request-wide spans (prepare, queue + prefill, decode) one row each over the whole request; the
// stages' spans (queue, prefill, pass, sampling, hop: the first tokens in full) one lane per stage
// and one for the hops, over the window they cover; then each stage's figures over every token.
const fmt = (ms) => (ms >= 100 ? ms.toFixed(0) : ms >= 1 ? ms.toFixed(1) : ms.toFixed(2));

function lane(label, title, spans, from, width) {
  return el("div", { class: "bar" },
    el("span", { class: "label", title }, label),
    el("span", { class: "track" }, ...spans.map((span) => el("span", {
      class: `fill ${span.name.replace(/[^a-z]/g, "")}`,
      style: `left:${(100 * (span.start_ms - from)) / width}%;width:${(100 * span.duration_ms) / width}%`,
      title: `${span.name}${span.step !== null && span.step !== undefined ? ` (token ${span.step})` : ""}: ${fmt(span.duration_ms)} ms · ${span.detail}`,
    }))),
    el("span", { class: "muted" }, spans.length === 1 ? `${fmt(spans[0].duration_ms)} ms` : `${spans.length} spans`));
}

function figures(summary) {
  return summary && summary.mean !== undefined ? `${fmt(summary.mean)} / ${fmt(summary.p95)}` : "–";
}

export async function showTrace(id) {
  let trace;
  try { trace = await call("GET", `/v1/traces/${encodeURIComponent(id)}`); } catch { return; }
  const total = Math.max(trace.total_ms, 1);
  const box = $("trace");
  box.classList.remove("muted");
  const request = trace.spans.filter((span) => span.stage === null || span.stage === undefined || span.name === "stage");
  const staged = trace.spans.filter((span) => !request.includes(span));
  const from = staged.length ? Math.min(...staged.map((span) => span.start_ms)) : 0;
  const until = staged.length ? Math.max(...staged.map((span) => span.start_ms + span.duration_ms)) : 1;
  const width = Math.max(until - from, 0.001);
  const stages = trace.stages || [];
  const lanes = stages.map((stage) => lane(`stage ${stage.stage_index} ${stage.node_id ?? ""}`, stage.detail,
    staged.filter((span) => span.stage === stage.stage_index && span.name !== "hop"), from, width));
  const hops = staged.filter((span) => span.name === "hop");
  box.replaceChildren(
    el("p", {}, `${trace.request_id} · ${trace.model} · ${trace.prompt_tokens} prompt + ${trace.completion_tokens} tokens · ${trace.total_ms.toFixed(0)} ms`
      + (trace.ttft_ms !== null ? ` · TTFT ${trace.ttft_ms.toFixed(0)} ms` : "")
      + (trace.tokens_per_second ? ` · ${trace.tokens_per_second.toFixed(1)} tok/s` : "")),
    el("div", { class: "timeline" }, ...request.map((span) =>
      lane(span.node_id ? `${span.name} ${span.node_id}` : span.name, span.detail, [span], 0, total))),
    stages.length ? el("h3", {}, `Stages, from ${fmt(from)} to ${fmt(until)} ms (the first tokens in full)`) : null,
    stages.length ? el("div", { class: "timeline stages" }, ...lanes,
      hops.length ? lane("hops", "network between the requester and the stages (estimated from one clock per stage)", hops, from, width) : null) : null,
    stages.length ? el("p", { class: "legend muted" }, ...["queue", "prefill", "pass", "sampling", "hop"].map((name) =>
      el("span", {}, el("span", { class: `swatch ${name}` }), name))) : null,
    stages.length ? el("table", { class: "stage-figures" },
      el("tr", {}, ...["stage", "node", "tokens", "pass ms mean / p95", "sampling", "wait", "hop ms"].map((h) => el("th", {}, h))),
      ...stages.map((stage) => el("tr", {},
        el("td", { title: stage.detail }, `${stage.stage_index} (${stage.detail})`), el("td", {}, stage.node_id ?? "?"),
        el("td", {}, String(stage.steps)), el("td", {}, figures(stage.pass_ms)), el("td", {}, figures(stage.sampling_ms)),
        el("td", {}, figures(stage.wait_ms)), el("td", {}, stage.hop_ms === null ? "–" : fmt(stage.hop_ms))))) : null,
    trace.inter_token_ms?.mean !== undefined ? el("p", { class: "muted" }, `inter-token ms: mean ${trace.inter_token_ms.mean} · p50 ${trace.inter_token_ms.p50} · p95 ${trace.inter_token_ms.p95} · max ${trace.inter_token_ms.max}`) : null);
}

// --- placing -----------------------------------------------------------------------------
function setupPlacing() {
  const form = $("place-form");
  $("preview-button").addEventListener("click", async () => {
    $("place-error").textContent = "";
    const model = $("place-model").value;
    try {
      const { previews } = await call("GET", `/instance/previews?model_id=${encodeURIComponent(model)}`);
      $("previews").replaceChildren(...previews.map((p) => el("li", { "data-nodes": p.n_nodes },
        `${p.n_nodes} node${p.n_nodes > 1 ? "s" : ""}: `,
        p.placement ? Object.entries(p.placement.shard_assignments).map(([n, s]) => `${n} ${s.start_layer}–${s.end_layer}`).join(", ")
          : el("span", { class: "error" }, p.refusal.reasons.join("; ")))));
    } catch (error) { $("place-error").textContent = error.message; }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    $("place-error").textContent = "";
    const body = { model_id: $("place-model").value, sharding: $("place-sharding").value, min_nodes: Number($("place-min-nodes").value) || 1 };
    $("place-button").disabled = true;
    try { await call("POST", "/place_instance", body); }
    catch (error) { $("place-error").textContent = error.message; }
    finally { $("place-button").disabled = false; }
  });
}

// --- the feed ----------------------------------------------------------------------------
function onFrame(event, data) {
  if (event === "snapshot") {
    view.nodeId = data.node_id; view.state = data.state; view.status = data.status;
    $("events").replaceChildren();
    renderEvents(data.events);
    renderAll();
    refreshModels(true);
  } else if (event === "events") {
    view.state = data.state;
    renderEvents(data.events);
    renderAll();
    if (data.events.some((e) => /Model|Download/.test(e.event.type))) refreshModels(true);
  } else if (event === "status") {
    view.status = data;
    renderTopology();
    refreshModels();
  }
  document.body.dataset.index = view.state?.last_event_index ?? "";
}

function setLive(live) {
  $("live").textContent = live ? "live" : "offline";
  $("live").className = `pill ${live ? "live" : "offline"}`;
}

function askForKey(message = "") {
  const dialog = $("key-dialog");
  $("key-error").textContent = message;
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

async function start() {
  try {
    await call("GET", "/node_id");
  } catch (error) {
    if (error instanceof Unauthorized) { askForKey(apiKey() ? "that key was refused" : ""); return; }
  }
  try { await follow(onFrame, setLive); }
  catch (error) { if (error instanceof Unauthorized) askForKey("that key was refused"); }
}

$("key-form").addEventListener("submit", () => { setApiKey($("key-input").value); $("key-input").value = ""; start(); });
setupPlacing();
setupChat(showTrace, () => askForKey("that key was refused"));
start();
