// The dashboard: a study form (kept in the URL), the live heatmaps of POST /v1/patch_sweep's
// event stream, the summary, the stored runs and the exports. Every request goes to this
// page's own origin.

import { ApiError, call, json, sseData } from "./api.js";
import { FONT, Heatmap, fmt, legend, scaleBounds, tokenLabel } from "./heatmap.js";

const HOOKS = ["pre_attn", "attn_out", "post_attn", "mlp_in", "mlp_out", "post_block", "attn_head"];
const METRICS = ["recovered", "logit_diff", "logprob", "prob", "kl"];
// The bundled demo model's fact (docs/demo-model.md): the subject's last token restores it
// at layers 0-1, the last token at layers 2-3.
const DEFAULTS = {
  clean: "The capital of Rorsun is",
  corrupt: "The capital of Sunror is",
  answer: " Pesmum",
  foil: " Terzir",
  hooks: ["post_block"],
  layers: "all",
  positions: "all",
  heads: "all",
  metric: "recovered",
  alpha: "1",
  source_run: "",
  keep: false,
  by_head: false,
  noise: "",
  window: "1",
};
const TEXT_FIELDS = [
  "clean", "corrupt", "answer", "foil", "layers", "positions", "heads", "alpha", "source_run",
  "noise", "window",
];

const $ = (id) => document.getElementById(id);
const form = $("study");

// ---------------------------------------------------------------- the form and the URL

function fill(params) {
  for (const name of TEXT_FIELDS) $(name).value = params[name];
  for (const option of $("hooks").options) option.selected = params.hooks.includes(option.value);
  $("metric").value = params.metric;
  $("keep").checked = params.keep;
  $("by_head").checked = params.by_head;
  if (params.source_run || params.keep) form.querySelector("details").open = true;
  showHeadsField();
}

function readForm() {
  const params = {};
  for (const name of TEXT_FIELDS) params[name] = $(name).value;
  params.hooks = [...$("hooks").selectedOptions].map((o) => o.value);
  params.metric = $("metric").value;
  params.keep = $("keep").checked;
  params.by_head = $("by_head").checked;
  return params;
}

/** The study of the query string, the defaults for what it does not say. */
function fromURL() {
  const q = new URLSearchParams(window.location.search);
  const params = { ...DEFAULTS };
  for (const name of TEXT_FIELDS) if (q.has(name)) params[name] = q.get(name);
  if (q.has("hooks")) params.hooks = q.get("hooks").split(",").filter((h) => HOOKS.includes(h));
  if (q.has("metric") && METRICS.includes(q.get("metric"))) params.metric = q.get("metric");
  if (q.has("keep")) params.keep = q.get("keep") === "1";
  if (q.has("by_head")) params.by_head = q.get("by_head") === "1";
  return { params, given: q.has("corrupt") };
}

function toURL(params) {
  const q = new URLSearchParams();
  for (const name of TEXT_FIELDS) q.set(name, params[name]);
  q.set("hooks", params.hooks.join(","));
  q.set("metric", params.metric);
  if (params.keep) q.set("keep", "1");
  if (params.by_head) q.set("by_head", "1");
  return `${window.location.pathname}?${q}`;
}

class InputError extends Error {
  constructor(message, param) {
    super(message);
    this.param = param;
  }
}

function ints(text, param) {
  const out = [];
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const range = /^(\d+)\s*-\s*(\d+)$/.exec(part);
    if (range) {
      for (let i = Number(range[1]); i <= Number(range[2]); i += 1) out.push(i);
    } else if (/^-?\d+$/.test(part)) {
      out.push(Number(part));
    } else {
      throw new InputError(`${param}: ${JSON.stringify(part)} is not a number or a range a-b`, param);
    }
  }
  return out;
}

/** "all" | ints, ranges, -1 and span texts (quoted when they hold a comma or a digit-only text). */
function parsePositions(text) {
  const t = text.trim();
  if (t === "" || t === "all" || t === "all_prompt") return "all_prompt";
  const out = [];
  const parts = t.match(/"[^"]*"|'[^']*'|[^,]+/g) ?? [];
  for (const raw of parts.map((s) => s.trim()).filter(Boolean)) {
    if (/^-?\d+$/.test(raw)) out.push(Number(raw));
    else if (/^\d+\s*-\s*\d+$/.test(raw)) out.push(...ints(raw, "positions"));
    else out.push({ span: raw.replace(/^(["'])(.*)\1$/, "$2") });
  }
  return out;
}

/** The POST /v1/patch_sweep body of the form's study. */
function requestBody(p) {
  if (!p.corrupt) throw new InputError("the corrupt prompt is empty", "prompt");
  if (!p.hooks.length) throw new InputError("choose at least one hook", "hooks");
  const alpha = Number(p.alpha === "" ? 1 : p.alpha);
  if (!Number.isFinite(alpha)) throw new InputError(`alpha ${JSON.stringify(p.alpha)} is not a number`, "alpha");
  const body = { prompt: p.corrupt, hooks: p.hooks, metric: p.metric, alpha, stream: true };
  const window = Number(p.window === "" ? 1 : p.window);
  if (window !== 1) body.window = window;  // the server says why a bad one is a 400
  if (p.noise.trim()) {
    // ROME: the clean prompt, its subject noised (10 draws per cell), instead of the corrupt one
    body.prompt = p.clean;
    body.corruption = { type: "noise", span: p.noise.trim(), samples: 10, seed: 0 };
  } else if (p.source_run.trim()) body.source_run = p.source_run.trim();
  else body.clean_prompt = p.clean;
  if (p.keep) body.keep_source = true;
  if (p.answer !== "") body.answer_token = p.answer;
  if (p.foil !== "") body.foil_token = p.foil;
  const layers = p.layers.trim();
  body.layers = layers === "" || layers === "all" ? "all" : ints(layers, "layers");
  body.positions = parsePositions(p.positions);
  if (p.hooks.includes("attn_head")) {
    const heads = p.heads.trim();
    body.heads = heads === "" || heads === "all" ? "all" : ints(heads, "heads");
    if (p.by_head) body.per_position = false; // one cell per (layer, head), every position
  }
  return body;
}

function showHeadsField() {
  const off = !$("hooks").selectedOptions.length || ![...$("hooks").selectedOptions].some((o) => o.value === "attn_head");
  $("heads-field").classList.toggle("off", off);
  $("by-head-field").classList.toggle("off", off);
}

// ---------------------------------------------------------------- errors and progress

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  const detail = error instanceof ApiError
    ? error.detail
    : {
        message: error.message,
        type: error instanceof InputError ? "invalid_input" : error.name,
        param: error.param ?? null,
      };
  const head = document.createElement("strong");
  head.textContent = error instanceof ApiError ? `Server error ${error.status}` : error instanceof InputError ? "Invalid input" : "Error";
  const message = document.createElement("span");
  message.className = "message";
  message.textContent = detail.message;
  box.append(head, " ", message);
  const extra = [detail.type && `type: ${detail.type}`, detail.param && `param: ${detail.param}`].filter(Boolean);
  if (extra.length) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = extra.join(" · ");
    box.append(" ", meta);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

function progress(done, total, note = "") {
  const pct = total ? (100 * done) / total : 0;
  $("bar").style.width = `${pct}%`;
  $("bar").dataset.done = String(done);
  $("bar").dataset.total = String(total);
  $("progress-text").textContent = total ? `${done} / ${total} cells${note}` : note || "ready";
}

// ---------------------------------------------------------------- the study being drawn

let study = null; // {params, body, start, maps, summary, scale, dirty, t0}
let controller = null;

function metricOf() {
  return study?.start?.metric ?? study?.body?.metric;
}

/**
 * The baselines on the colour scale: the summary's clean and corrupt are in the metric's
 * own units (for `recovered` they are the raw logit difference / log p, and its scale is
 * fixed anyway).
 */
function baselinesInUnits(summary) {
  if (!summary || summary.metric === "recovered") return { clean: null, corrupt: null };
  return { clean: summary.clean, corrupt: summary.corrupt };
}

function currentScale() {
  const values = [];
  for (const map of study.maps.values()) values.push(...map.values());
  const { clean, corrupt } = baselinesInUnits(study.summary);
  return scaleBounds(metricOf(), values, clean, corrupt);
}

function repaint() {
  study.frame = 0;
  const scale = currentScale();
  const key = `${scale.low}|${scale.mid}|${scale.high}`;
  if (key !== study.scaleKey || study.summary) {
    study.scaleKey = key;
    study.scale = scale;
    for (const map of study.maps.values()) map.paintAll(scale);
    drawLegend();
  } else {
    for (const [map, cell] of study.dirty) map.paint(cell, scale);
  }
  study.dirty = [];
}

function schedule() {
  if (!study.frame) study.frame = requestAnimationFrame(repaint);
}

function drawLegend() {
  const s = study.summary;
  const { clean, corrupt } = baselinesInUnits(s);
  const box = $("legend");
  box.replaceChildren(legend(metricOf(), study.scale, {
    clean,
    corrupt,
    skipped: Boolean(s?.skipped?.length),
    corrupted: Boolean(s?.alignment?.differing_positions?.length),
  }));
}

function figureTitle(p, start, summary) {
  const answer = summary ? summary.answer_token : p.answer;
  const foil = summary ? summary.foil_token : p.foil;
  const parts = [
    `<b>${esc(start.metric)}</b>`,
    `answer ${esc(JSON.stringify(answer ?? "(clean top-1)"))}${foil ? ` vs ${esc(JSON.stringify(foil))}` : ""}`,
    `clean ${esc(JSON.stringify(p.source_run ? `run ${p.source_run}` : p.clean))} → corrupt ${esc(JSON.stringify(p.corrupt))}`,
  ];
  if (Number(p.alpha) !== 1) parts.push(`alpha ${esc(p.alpha)}`);
  if (summary?.model) parts.push(`model ${esc(summary.model)}`);
  return parts.join(" · ");
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function onStart(event) {
  study.start = event;
  const box = $("heatmaps");
  box.replaceChildren();
  study.maps = new Map();
  for (const hook of event.hooks) {
    const map = new Heatmap(hook, event, hover);
    study.maps.set(hook, map);
    box.appendChild(map.root);
  }
  $("figure-title").innerHTML = figureTitle(study.params, event, null);
  study.scale = currentScale();
  drawLegend();
  progress(0, event.total);
}

function onCell(event) {
  const map = study.maps.get(event.hook);
  const cell = map?.set(event.layer, event.position ?? null, event.head ?? null, event.value, event.error ?? null);
  if (cell) study.dirty.push([map, cell]);
  schedule();
  const seconds = (performance.now() - study.t0) / 1000;
  progress(event.done, event.total, ` · ${seconds.toFixed(1)} s`);
}

function onSummary(body) {
  study.summary = body;
  const grids = body.hook_grids ?? [{ hook: body.hook, grid: body.grid, argmax: body.argmax }];
  const reasons = new Map(body.skipped.map((s) => [`${s.hook}/${s.layer}/${s.position}/${s.head ?? ""}`, s.reason]));
  for (const { hook, grid, argmax } of grids) {
    const map = study.maps.get(hook);
    if (!map) continue;
    if (map.byHead) { // [layer][head]: each head patched at every position at once
      body.layers.forEach((layer, i) => body.heads.forEach((head, k) => map.set(layer, null, head, grid[i][k], reasons.get(`${hook}/${layer}/undefined/${head}`))));
    } else body.layers.forEach((layer, i) => body.positions.forEach((position, j) => {
      const row = grid[i][j];
      if (Array.isArray(row)) body.heads.forEach((head, k) => map.set(layer, position, head, row[k], reasons.get(`${hook}/${layer}/${position}/${head}`)));
      else map.set(layer, position, null, row, reasons.get(`${hook}/${layer}/${position}/`));
    }));
    map.markCorrupted(body.alignment?.differing_positions ?? []);
    map.markArgmax(argmax);
    if (argmax) {
      const token = argmax.position == null ? "every position" : tokenLabel(body.tokens[argmax.position] ?? "");
      const head = argmax.head != null ? ` · h${argmax.head}` : "";
      map.note(`best L${argmax.layer} · ${token}${head} = ${fmt(argmax.value)}`);
    }
  }
  $("figure-title").innerHTML = figureTitle(study.params, study.start, body);
  repaint();
  showSummary(body);
  const total = study.start.total;
  progress(total, total, ` · ${body.timing.seconds.toFixed(2)} s on the server`);
}

function row(dl, name, value, testid = null) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.appendChild(value);
  else dd.textContent = value;
  if (testid) dd.dataset.testid = testid;
  dl.append(dt, dd);
}

function showSummary(b) {
  const box = $("summary");
  box.replaceChildren();
  const h = document.createElement("h2");
  h.textContent = "Summary";
  const dl = document.createElement("dl");
  const unit = b.metric !== "recovered" ? b.metric : b.foil_token_id != null ? "logit diff" : "log p";
  const foil = b.foil_token != null ? ` vs foil ${JSON.stringify(b.foil_token)} (id ${b.foil_token_id})` : "";
  row(dl, "answer", `${JSON.stringify(b.answer_token)} (id${b.answer_token_ids.length > 1 ? "s" : ""} ${b.answer_token_ids.join(", ")})${foil}`);
  row(dl, "clean", b.clean == null ? "— (no clean run graded)" : `${fmt(b.clean, 4)} (${unit})`, "summary-clean");
  row(dl, "corrupt", `${fmt(b.corrupt, 4)} (${unit})`, "summary-corrupt");
  row(dl, "noise floor", `${fmt(b.noise_floor, 4)} (${b.metric})`, "summary-noise");
  const where = (am) => {
    const head = am.head != null ? `, head ${am.head}` : "";
    const token = JSON.stringify(b.tokens[am.position] ?? "");
    return `${fmt(am.value, 4)} at layer ${am.layer}, position ${am.position} ${token}${head}`;
  };
  const grids = b.hook_grids ?? [{ hook: b.hook, argmax: b.argmax }];
  const best = document.createElement("div");
  for (const g of grids) {
    const line = document.createElement("div");
    line.textContent = `${grids.length > 1 ? `${g.hook}: ` : ""}${g.argmax ? where(g.argmax) : "—"}`;
    best.appendChild(line);
  }
  row(dl, b.metric === "kl" ? "argmax (lowest)" : "argmax", best, "summary-argmax");
  row(dl, "warnings", b.warnings.length ? b.warnings.join("; ") : "none", "summary-warnings");
  row(dl, "skipped", b.skipped.length ? `${b.skipped.length} cells (${[...new Set(b.skipped.map((s) => s.reason))].join("; ")})` : "none", "summary-skipped");
  const a = b.alignment;
  let aligned = "— (vector source)";
  if (a) {
    const unaligned = a.unaligned_positions.length ? `, unaligned [${a.unaligned_positions.join(", ")}]` : "";
    aligned = `${a.mode}, clean ${a.n_clean} / corrupt ${a.n_corrupt} tokens, prefix ${a.prefix_len}, `
      + `suffix ${a.suffix_len}, corrupted positions [${a.differing_positions.join(", ")}]${unaligned}`;
  }
  row(dl, "alignment", aligned, "summary-alignment");
  const t = b.timing;
  row(dl, "timing", `${t.seconds.toFixed(3)} s, ${t.cells} cells (${t.cells_computed} computed, ${t.cells_free} free), ${t.cells_per_second.toFixed(0)} cells/s`, "summary-timing");
  row(dl, "source", b.auto_captured ? `clean prompt captured as ${b.captured_source_run}${study.body.keep_source ? " (kept)" : " (dropped)"}` : `stored run ${b.source_run}`);
  box.append(h, dl);
  box.dataset.state = "done";
}

// ---------------------------------------------------------------- hover

function hover(event, map, cell) {
  const tip = $("tooltip");
  if (!event) {
    tip.hidden = true;
    return;
  }
  const where = cell.position == null ? "every position" : `position ${cell.position} ${JSON.stringify(map.tokens[cell.position] ?? "")}`;
  const value = cell.state === "value" ? fmt(cell.value, 4) : cell.state === "skipped" ? `skipped${cell.reason ? `: ${cell.reason}` : ""}` : "pending";
  const head = cell.head != null ? ` · head ${cell.head}` : "";
  tip.innerHTML = `<b>${esc(map.hook)}</b> · layer ${cell.layer} · ${esc(where)}`
    + `${head}<br>${esc(metricOf())} = <b>${esc(value)}</b>`;
  tip.hidden = false;
  // Beside the pointer, flipped to its left / above near the window's edges.
  const { width, height } = tip.getBoundingClientRect();
  const left = event.clientX + 14 + width > window.innerWidth ? event.clientX - 14 - width : event.clientX + 14;
  const top = event.clientY + 14 + height > window.innerHeight ? event.clientY - 14 - height : event.clientY + 14;
  tip.style.left = `${Math.max(4, left)}px`;
  tip.style.top = `${Math.max(4, top)}px`;
}

// ---------------------------------------------------------------- running and cancelling

async function runStudy() {
  clearError();
  controller?.abort();
  const params = readForm();
  let body;
  try {
    body = requestBody(params);
  } catch (error) {
    showError(error);
    return;
  }
  history.replaceState(null, "", toURL(params));
  const mine = new AbortController();
  controller = mine;
  study = { params, body, start: null, maps: new Map(), summary: null, scale: null, scaleKey: "", dirty: [], frame: 0, t0: performance.now() };
  $("summary").dataset.state = "running";
  $("summary").replaceChildren(Object.assign(document.createElement("p"), { className: "hint", textContent: "Running…" }));
  setRunning(true);
  progress(0, 0, "starting…");
  try {
    const response = await call("/v1/patch_sweep", { method: "POST", body, signal: mine.signal });
    for await (const data of sseData(response)) {
      if (data.trim() === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.type === "start") onStart(event);
      else if (event.type === "cell") onCell(event);
      else if (event.type === "summary") onSummary(event);
      else if (event.type === "error") throw new ApiError(event.error.code ?? 500, event.error);
    }
    if (!study.summary) throw new Error("the stream ended without a summary");
  } catch (error) {
    if (mine.signal.aborted) {
      if (controller === null || controller === mine) {
        $("summary").dataset.state = "cancelled";
        $("summary").replaceChildren(Object.assign(document.createElement("p"), { className: "hint", textContent: "Cancelled: the server stopped the sweep." }));
        const bar = $("bar").dataset;
        progress(Number(bar.done ?? 0), Number(bar.total ?? 0), " · cancelled");
      }
    } else {
      $("summary").dataset.state = "error";
      $("summary").replaceChildren();
      showError(error);
      progress(0, 0, "failed");
    }
  } finally {
    if (controller === mine) {
      controller = null;
      setRunning(false);
    }
    refreshRuns();
  }
}

function setRunning(running) {
  $("cancel").disabled = !running;
  $("run").textContent = running ? "Restart" : "Run sweep";
  document.body.classList.toggle("running", running);
  $("export-png").disabled = running || !study?.start;
  $("export-json").disabled = running || !study?.start;
}

// ---------------------------------------------------------------- tokens as chips

let tokenizeTimer = 0;
let chipTokens = { corrupt: null, clean: null };

async function tokenize(prompt) {
  return json("/tokenize", { method: "POST", body: { prompt } });
}

function differing(clean, corrupt) {
  if (!clean) return new Set();
  const a = clean.tokens;
  const b = corrupt.tokens;
  const out = new Set();
  if (a.length === b.length) {
    b.forEach((t, i) => t !== a[i] && out.add(i));
    return out;
  }
  let prefix = 0;
  while (prefix < Math.min(a.length, b.length) && a[prefix] === b[prefix]) prefix += 1;
  let suffix = 0;
  while (suffix < Math.min(a.length, b.length) - prefix && a[a.length - 1 - suffix] === b[b.length - 1 - suffix]) suffix += 1;
  for (let i = prefix; i < b.length - suffix; i += 1) out.add(i);
  return out;
}

function selectedPositions(n) {
  const parsed = (() => {
    try {
      return parsePositions($("positions").value);
    } catch {
      return [];
    }
  })();
  if (parsed === "all_prompt") return new Set([...Array(n).keys()]);
  return new Set(parsed.filter((p) => typeof p === "number").map((p) => (p < 0 ? n + p : p)));
}

function drawChips() {
  const box = $("chips");
  box.replaceChildren();
  const corrupt = chipTokens.corrupt;
  if (!corrupt) return;
  const changed = differing(chipTokens.clean, corrupt);
  const chosen = selectedPositions(corrupt.count);
  corrupt.token_strs.forEach((token, i) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.dataset.position = String(i);
    chip.dataset.testid = "chip";
    chip.classList.toggle("chosen", chosen.has(i));
    chip.classList.toggle("corrupted", changed.has(i));
    chip.title = `position ${i}: ${JSON.stringify(token)}${corrupt.special[i] ? " (special)" : ""}${changed.has(i) ? " — differs from the clean prompt" : ""}`;
    const idx = document.createElement("small");
    idx.textContent = String(i);
    chip.append(idx, document.createTextNode(token.replace(/ /g, "·")));
    chip.addEventListener("click", () => toggleChip(i, corrupt.count));
    box.appendChild(chip);
  });
}

/** Clicking a token adds its index to the positions or removes it. */
function toggleChip(i, n) {
  let parts;
  const value = $("positions").value.trim();
  if (value === "" || value === "all" || value === "all_prompt") parts = [];
  else parts = value.match(/"[^"]*"|'[^']*'|[^,]+/g).map((s) => s.trim()).filter(Boolean);
  const hit = parts.findIndex((p) => /^-?\d+$/.test(p) && ((Number(p) + n) % n) === i);
  if (hit >= 0) parts.splice(hit, 1);
  else {
    parts.push(String(i));
    const num = parts.filter((p) => /^-?\d+$/.test(p)).map((p) => (Number(p) + n) % n).sort((a, b) => a - b);
    parts = [...num.map(String), ...parts.filter((p) => !/^-?\d+$/.test(p))];
  }
  $("positions").value = parts.length ? parts.join(", ") : "all";
  drawChips();
}

function scheduleTokenize() {
  clearTimeout(tokenizeTimer);
  tokenizeTimer = setTimeout(async () => {
    try {
      const [corrupt, clean] = await Promise.all([tokenize($("corrupt").value), $("clean").value ? tokenize($("clean").value) : null]);
      chipTokens = { corrupt, clean };
      drawChips();
    } catch (error) {
      showError(error);
    }
  }, 200);
}

// ---------------------------------------------------------------- stored runs

async function refreshRuns() {
  const list = $("runs");
  try {
    const { data } = await json("/v1/patch_source");
    list.replaceChildren();
    if (!data.length) {
      const li = document.createElement("li");
      li.className = "hint";
      li.textContent = "No stored runs (tick “keep the captured clean run”, or POST /v1/patch_source).";
      list.appendChild(li);
    }
    for (const run of data) {
      const li = document.createElement("li");
      li.dataset.run = run.run;
      const name = document.createElement("b");
      name.textContent = run.run;
      const info = document.createElement("span");
      info.className = "run-info";
      info.textContent = [
        JSON.stringify(run.prompt),
        `${run.num_tokens} tokens`,
        `${Object.keys(run.hooks).length} hooks`,
        `${(run.bytes / 1024).toFixed(0)} KiB`,
        new Date(run.created * 1000).toLocaleTimeString(),
      ].join(" · ");
      const use = document.createElement("button");
      use.type = "button";
      use.className = "small";
      use.textContent = "use";
      use.title = "patch from this run";
      use.addEventListener("click", () => {
        $("source_run").value = run.run;
        form.querySelector("details").open = true;
      });
      const drop = document.createElement("button");
      drop.type = "button";
      drop.className = "small danger";
      drop.textContent = "delete";
      drop.dataset.testid = "delete-run";
      drop.addEventListener("click", async () => {
        try {
          await call(`/v1/patch_source/${encodeURIComponent(run.run)}`, { method: "DELETE" });
        } catch (error) {
          showError(error);
        }
        refreshRuns();
      });
      li.append(name, use, drop, info);
      list.appendChild(li);
    }
  } catch (error) {
    showError(error);
  }
}

// ---------------------------------------------------------------- exports

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function stem() {
  const b = study.summary ?? study.start;
  return `patchserve-${b.metric}-${b.hooks.join("+")}`;
}

/** One SVG of the figure: title, every heatmap, the legend. */
function figureSVG() {
  const parts = [...study.maps.values()].map((m) => m.svg);
  parts.push($("legend").querySelector("svg"));
  const title = $("figure-title").textContent;
  let y = 28;
  let width = 0;
  const inner = [];
  const serializer = new XMLSerializer();
  const perRow = Math.min(3, parts.length - 1); // heatmaps side by side, the legend below
  let x = 0;
  let rowH = 0;
  parts.forEach((svg, i) => {
    const w = Number(svg.getAttribute("width"));
    const h = Number(svg.getAttribute("height"));
    const isLegend = i === parts.length - 1;
    if (isLegend || (i > 0 && i % perRow === 0)) {
      y += rowH;
      x = 0;
      rowH = 0;
    }
    const copy = svg.cloneNode(true);
    copy.setAttribute("x", String(x));
    copy.setAttribute("y", String(y));
    inner.push(serializer.serializeToString(copy));
    x += w + 12;
    rowH = Math.max(rowH, h + 8);
    width = Math.max(width, x);
  });
  const height = y + rowH;
  width = Math.max(width, Math.ceil(title.length * 7.2) + 24); // the title's line (13 px)
  const head = `<text x="12" y="18" font-size="13" font-family="${FONT}" fill="#1d2733">${esc(title)}</text>`;
  const text = `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" `
    + `viewBox="0 0 ${width} ${height}"><rect width="100%" height="100%" fill="#fff"/>`
    + `${head}${inner.join("")}</svg>`;
  return { text, width, height };
}

async function exportPNG() {
  const { text, width, height } = figureSVG();
  const image = new Image();
  image.src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(text)}`;
  await image.decode();
  const canvas = document.createElement("canvas");
  const scale = 2;
  canvas.width = width * scale;
  canvas.height = height * scale;
  const ctx = canvas.getContext("2d");
  ctx.scale(scale, scale);
  ctx.drawImage(image, 0, 0);
  canvas.toBlob((blob) => download(blob, `${stem()}.png`), "image/png");
}

function exportJSON() {
  const out = study.summary
    ? { request: study.body, response: study.summary }
    : {
        request: study.body,
        start: study.start,
        // A cancelled sweep: the cells it received.
        partial: [...study.maps.values()].flatMap((m) => [...m.cells.values()]
          .filter((c) => c.state !== "pending")
          .map((c) => ({ hook: m.hook, layer: c.layer, position: c.position, head: c.head ?? undefined, value: c.value }))),
      };
  download(new Blob([JSON.stringify(out, null, 2)], { type: "application/json" }), `${stem()}.json`);
}

// ---------------------------------------------------------------- start-up

// Hooks the served model does not give (the transformers runtime's, e.g. post_attn) stay in
// the list, disabled and unselected, with the reason as their tooltip.
function offerHooks(offered, runtime) {
  for (const option of $("hooks").options) {
    const missing = !offered.includes(option.value);
    option.disabled = missing;
    option.title = missing ? `not available on the ${runtime ?? "served"} runtime of this model` : "";
    if (missing) option.selected = false;
  }
  showHeadsField();
}

async function showModel() {
  try {
    const { data } = await json("/v1/models");
    const m = data[0];
    const runtime = m.runtime ? ` · ${m.runtime} runtime` : "";
    $("model").textContent = `${m.id} · ${m.architecture} · ${m.num_layers} layers · ${m.num_heads} heads · ${m.dtype} on ${m.device}${runtime}`;
    offerHooks(m.hooks ?? HOOKS, m.runtime);
  } catch (error) {
    showError(error);
  }
}

async function main() {
  for (const hook of HOOKS) $("hooks").append(new Option(hook, hook));
  for (const metric of METRICS) $("metric").append(new Option(metric, metric));
  const { params, given } = fromURL();
  fill(params);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    runStudy();
  });
  $("cancel").addEventListener("click", () => controller?.abort());
  $("hooks").addEventListener("change", showHeadsField);
  $("corrupt").addEventListener("input", scheduleTokenize);
  $("clean").addEventListener("input", scheduleTokenize);
  $("positions").addEventListener("input", drawChips);
  $("refresh-runs").addEventListener("click", refreshRuns);
  $("export-png").addEventListener("click", () => exportPNG().catch(showError));
  $("export-json").addEventListener("click", exportJSON);
  await showModel(); // first, alone: with --api-key it is what asks for the key
  scheduleTokenize();
  await refreshRuns();
  document.body.dataset.ready = "true";
  if (given) runStudy(); // a shared link runs its study
}

main();
