// The spikelm playground: one request at a time to this server's own OpenAI-compatible API, streamed
// (`stream: true` with `stream_options.include_usage`), exactly as any client would send it. Each stream
// chunk is one generated token with the energy of the forward pass that made it (`choices[0].energy`);
// the last chunk carries the request's `usage`. Nothing is stored outside this tab's memory.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const OTHER_REFERENCE_COLOURS = ["#2a9d5b", "#8e44ad", "#d68910", "#566573"];

// ---------------------------------------------------------------- state of the request on screen
let controller = null;      // AbortController of the request in flight
let tokens = [];            // one per stream chunk: {text, pj, ac, mac, firing_rate, firing_rate_per_layer, gpt2_pj}
let usage = null;           // the last chunk's usage (absent when stopped)
let startedAt = 0, lastTokenAt = 0;
let scale = {low: 0, high: 0};
let drawPending = false;

// ---------------------------------------------------------------- formatting
const integer = (x) => Math.round(x).toLocaleString("en-US");
const pj = (x) => `${integer(x)} pJ`;
function joules(x) {  // 4 significant digits in a unit that suits the size
  for (const [unit, factor] of [["J", 1], ["mJ", 1e-3], ["µJ", 1e-6], ["nJ", 1e-9]]) {
    if (Math.abs(x) >= factor) return `${(x / factor).toPrecision(4)} ${unit}`;
  }
  return `${(x / 1e-12).toPrecision(4)} pJ`;
}
// names of usage's further per-token figures (energy_<key>_pj_per_token), where the server reports them
const FIGURE_NAMES = {gpt2: "same-shape GPT-2", gpt2_int8: "GPT-2 in int8", ann_twin: "ANN twin",
                      memory: "spikelm memory traffic", total: "spikelm compute + memory"};
function figureName(key) {
  if (FIGURE_NAMES[key]) return FIGURE_NAMES[key];
  const base = key.replace(/_total$/, ""), name = FIGURE_NAMES[base] || base.replace(/_/g, " ");
  return base !== key ? `${name}, compute + memory` : name;
}

// ---------------------------------------------------------------- the request
function requestBody() {
  const body = {
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    stream: true,
    stream_options: {include_usage: true},
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const stops = $("stop").value.split("\n").filter((s) => s !== "")
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
  if (stops.length) body.stop = stops;
  if ($("mode").value === "chat") {
    body.messages = [];
    if ($("system").value.trim()) body.messages.push({role: "system", content: $("system").value});
    body.messages.push({role: "user", content: $("prompt").value});
  } else {
    body.prompt = $("prompt").value;
  }
  return body;
}

async function generate() {
  resetOutput();
  const chat = $("mode").value === "chat";
  const headers = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  controller = new AbortController();
  setRunning(true);
  setStatus("waiting for the first token...");
  startedAt = performance.now();
  let finish = null, done = false;
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers, body: JSON.stringify(requestBody()), signal: controller.signal});
    if (!response.ok) {
      setStatus(await describeError(response), true);
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    while (!done) {
      const {value, done: ended} = await reader.read();
      if (ended) break;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while (!done && (cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
        const data = buffer.slice(0, cut).split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        buffer = buffer.slice(cut + 2);
        if (data === "[DONE]") { done = true; break; }
        if (!data) continue;
        const event = JSON.parse(data);
        if (event.error) { setStatus(`the server stopped this generation: ${event.error.message}`, true); return; }
        if (event.usage) usage = event.usage;
        const choice = (event.choices || [])[0];
        if (choice) {
          addToken(chat ? (choice.delta.content || "") : choice.text, choice.energy || {});
          finish = choice.finish_reason || finish;
        }
      }
    }
    if (!done) { setStatus("the stream ended before [DONE]: the server went away", true); return; }
    setStatus(`done: ${tokens.length} tokens, finish reason "${finish}"`);
  } catch (error) {
    if (error.name === "AbortError") setStatus(`stopped after ${tokens.length} tokens`);
    else setStatus(`could not talk to the server: ${error.message}`, true);
  } finally {
    controller = null;
    setRunning(false);
    draw();
    renderSummary();
  }
}

async function describeError(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  let text = `error ${response.status}: ${message}`;
  const retry = response.headers.get("Retry-After");
  if (retry !== null) text += ` (the server asks to retry after ${retry} s)`;
  if (response.status === 401) text += ". Type the server's key in the API key field.";
  return text;
}

function stop() {
  if (controller) controller.abort();  // closes the connection: the server frees the slot at its next step
}

// ---------------------------------------------------------------- page state
function setRunning(running) {
  $("generate").disabled = running;
  $("stop-button").disabled = !running;
  document.body.dataset.state = running ? "running" : "idle";
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function resetOutput() {
  tokens = []; usage = null; scale = {low: 0, high: 0};
  $("output").replaceChildren();
  $("sum-extra").replaceChildren();
  for (const id of ["sum-tokens", "sum-prompt", "sum-rate", "sum-joules", "sum-pj", "sum-ratio"]) {
    $(id).textContent = "-"; delete $(id).dataset.value;
  }
  draw();
}

// ---------------------------------------------------------------- tokens, shaded by energy
function addToken(text, energy) {
  lastTokenAt = performance.now();
  const token = {text, ...energy};
  const index = tokens.push(token) - 1;
  const span = document.createElement("span");
  span.className = "token" + (text === "" ? " empty" : "") + (index === 0 ? " first" : "");
  span.textContent = text;
  span.dataset.index = index;
  span.dataset.pj = energy.pj;
  $("output").appendChild(span);
  // the first token also paid for the prompt: the scale runs over the others (when there are others)
  const rest = tokens.length > 1 ? tokens.slice(1) : tokens;
  const low = Math.min(...rest.map((t) => t.pj)), high = Math.max(...rest.map((t) => t.pj));
  if (low !== scale.low || high !== scale.high) {
    scale = {low, high};
    for (const el of $("output").children) shade(el, tokens[el.dataset.index].pj);
    $("legend-low").textContent = pj(low);
    $("legend-high").textContent = pj(high);
  } else {
    shade(span, token.pj);
  }
  renderSummary();
  scheduleDraw();
}

function colour(fraction) {  // pale yellow (cheap) to deep red (dear)
  const f = Math.min(1, Math.max(0, fraction));
  return `hsl(${Math.round(55 - 55 * f)}, 95%, ${Math.round(88 - 36 * f)}%)`;
}

function shade(el, value) {
  const span = scale.high - scale.low;
  el.style.backgroundColor = colour(span > 0 ? (value - scale.low) / span : 0.5);
}

function showTooltip(event) {
  const el = event.target.closest(".token");
  const tip = $("tooltip");
  if (!el) { tip.hidden = true; return; }
  const t = tokens[el.dataset.index];
  const lines = [`token ${Number(el.dataset.index) + 1}${el.dataset.index === "0" ? " (with the prompt)" : ""}`,
    `${pj(t.pj)}`, `${integer(t.ac)} ACs`, `${integer(t.mac)} MACs`,
    `firing rate ${t.firing_rate.toFixed(4)}`];
  if (t.gpt2_pj) lines.push(`same-shape GPT-2: ${pj(t.gpt2_pj)}`);
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

// ---------------------------------------------------------------- summary
function summaryCell(id, text, value) {
  $(id).textContent = text;
  $(id).dataset.value = value;
}

function renderSummary() {
  const seconds = (lastTokenAt - startedAt) / 1000;
  if (usage) {
    summaryCell("sum-tokens", integer(usage.completion_tokens), usage.completion_tokens);
    summaryCell("sum-prompt", integer(usage.prompt_tokens), usage.prompt_tokens);
    summaryCell("sum-joules", joules(usage.energy_joules), usage.energy_joules);
    summaryCell("sum-pj", pj(usage.energy_pj_per_token), usage.energy_pj_per_token);
    summaryCell("sum-ratio", `${usage.energy_ratio_to_gpt2.toFixed(3)}x (GPT-2: ${pj(usage.energy_gpt2_pj_per_token)})`,
                usage.energy_ratio_to_gpt2);
    const extra = $("sum-extra");
    extra.replaceChildren();
    for (const [key, value] of otherFigures()) {
      const row = extra.insertRow();
      const name = document.createElement("th");
      name.textContent = `${figureName(key)} per token`;
      row.appendChild(name);
      const cell = row.insertCell();
      cell.textContent = pj(value);
      cell.dataset.value = value;
    }
  } else if (tokens.length) {  // still streaming, or stopped: what the chunks so far say
    const total = tokens.reduce((sum, t) => sum + t.pj, 0);
    const gpt2 = tokens.reduce((sum, t) => sum + (t.gpt2_pj || 0), 0);
    summaryCell("sum-tokens", integer(tokens.length), tokens.length);
    summaryCell("sum-joules", joules(total * 1e-12), total * 1e-12);
    summaryCell("sum-pj", pj(total / tokens.length), total / tokens.length);
    summaryCell("sum-ratio", gpt2 ? `${(total / gpt2).toFixed(3)}x` : "-", gpt2 ? total / gpt2 : "");
  }
  if (tokens.length && seconds > 0) summaryCell("sum-rate", (tokens.length / seconds).toFixed(1), tokens.length / seconds);
}

// usage's further per-token figures (memory traffic, other references), whatever this server reports
function otherFigures() {
  if (!usage) return [];
  return Object.entries(usage)
    .map(([key, value]) => [key.match(/^energy_(.+)_pj_per_token$/), value])
    .filter(([match, value]) => match && match[1] !== "gpt2" && typeof value === "number" && value > 0)
    .map(([match, value]) => [match[1], value]);
}

// the ones drawn as lines: other models' compute (GPT-2 itself is drawn token by token from the chunks)
const chartReferences = () => otherFigures().filter(([key]) => !["memory", "total"].includes(key) && !key.endsWith("_total"));

// ---------------------------------------------------------------- charts (hand-drawn SVG)
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; draw(); });
}

function el(parent, name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

function draw() {
  drawEnergyChart();
  drawLayerBars();
}

function drawEnergyChart() {
  const svg = $("chart");
  svg.replaceChildren();
  const [W, H, left, right, top, bottom] = [420, 220, 52, 10, 10, 26];
  const references = chartReferences();
  const values = tokens.flatMap((t) => [t.pj, t.gpt2_pj || 0]).concat(references.map(([, v]) => v))
    .filter((v) => v > 0);
  if (!values.length) {
    el(svg, "text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "press Generate");
    $("chart-key").replaceChildren();
    return;
  }
  // logarithmic y: the first token (with the prompt) and the reference can be decades apart
  const lo = Math.floor(Math.log10(Math.min(...values))), hi = Math.ceil(Math.log10(Math.max(...values)) + 1e-9);
  const decades = Math.max(hi - lo, 1);
  const n = Math.max(tokens.length, 2);
  const x = (i) => left + (W - left - right) * i / (n - 1);
  const y = (v) => top + (H - top - bottom) * (1 - (Math.log10(v) - lo) / decades);
  for (let d = lo; d <= lo + decades; d++) {
    el(svg, "line", {class: "grid", x1: left, x2: W - right, y1: y(10 ** d), y2: y(10 ** d)});
    el(svg, "text", {x: left - 4, y: y(10 ** d) + 3, "text-anchor": "end"}, `1e${d}`);
    for (const m of (decades <= 3 && d < lo + decades ? [2, 5] : [])) {  // minor lines at 2x and 5x
      el(svg, "line", {class: "grid minor", x1: left, x2: W - right, y1: y(m * 10 ** d), y2: y(m * 10 ** d)});
      el(svg, "text", {x: left - 4, y: y(m * 10 ** d) + 3, "text-anchor": "end"}, `${m}e${d}`);
    }
  }
  el(svg, "text", {x: left, y: H - 8}, "token 1");
  el(svg, "text", {x: W - right, y: H - 8, "text-anchor": "end"}, `token ${n}`);
  const key = [["var(--spikelm)", "spikelm"]];
  const gpt2 = tokens.map((t, i) => [i, t.gpt2_pj]).filter(([, v]) => v > 0);
  if (gpt2.length) {
    el(svg, "polyline", {class: "ref gpt2", points: gpt2.map(([i, v]) => `${x(i)},${y(v)}`).join(" ")});
    key.push(["var(--gpt2)", "same-shape GPT-2 (same forward pass)"]);
  }
  references.forEach(([name, value], r) => {
    const stroke = OTHER_REFERENCE_COLOURS[r % OTHER_REFERENCE_COLOURS.length];
    el(svg, "line", {class: "ref", stroke, x1: left, x2: W - right, y1: y(value), y2: y(value)});
    key.push([stroke, `${figureName(name)} (request mean)`]);
  });
  const own = tokens.map((t, i) => `${x(i)},${y(Math.max(t.pj, 10 ** lo))}`);
  el(svg, "polyline", {class: "series", points: own.join(" ")});
  tokens.forEach((t, i) => el(svg, "circle", {class: "point", cx: x(i), cy: y(Math.max(t.pj, 10 ** lo)),
                                              r: tokens.length > 120 ? 1.2 : 2.2}));
  $("chart-key").replaceChildren(...key.map(([stroke, label]) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = stroke;
    item.append(swatch, label);
    return item;
  }));
}

function drawLayerBars() {
  const svg = $("layers");
  svg.replaceChildren();
  const last = tokens[tokens.length - 1];
  const rates = Object.entries((last && last.firing_rate_per_layer) || {});
  if (!rates.length) return;
  const [W, H, left, bottom, top] = [420, 150, 40, 20, 14];
  const max = Math.max(0.05, Math.ceil(Math.max(...rates.map(([, r]) => r)) * 10) / 10);
  const y = (r) => top + (H - top - bottom) * (1 - r / max);
  for (const r of [0, max / 2, max]) {
    el(svg, "line", {class: "grid", x1: left, x2: W - 6, y1: y(r), y2: y(r)});
    el(svg, "text", {x: left - 4, y: y(r) + 3, "text-anchor": "end"}, r.toFixed(2));
  }
  const slot = (W - left - 6) / rates.length;
  rates.forEach(([layer, rate], i) => {
    const bx = left + i * slot + slot * 0.15, width = slot * 0.7;
    el(svg, "rect", {class: "bar", x: bx, y: y(rate), width, height: y(0) - y(rate), "data-layer": layer,
                     "data-rate": rate});
    el(svg, "text", {x: bx + width / 2, y: y(rate) - 3, "text-anchor": "middle"}, rate.toFixed(3));
    el(svg, "text", {x: bx + width / 2, y: H - 6, "text-anchor": "middle"}, layer.replace("layers.", "layer "));
  });
}

// ---------------------------------------------------------------- wiring
document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", generate);
  $("stop-button").addEventListener("click", stop);
  $("mode").addEventListener("change", () => { $("system-label").hidden = $("mode").value !== "chat"; });
  $("output").addEventListener("mousemove", showTooltip);
  $("output").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  $("legend-bar").style.background = `linear-gradient(to right, ${colour(0)}, ${colour(0.5)}, ${colour(1)})`;
  $("prompt").addEventListener("keydown", (e) => {  // Ctrl/Cmd+Enter generates
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) generate();
  });
  setRunning(false);
  draw();
});
