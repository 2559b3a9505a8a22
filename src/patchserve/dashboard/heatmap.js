// Heatmaps drawn by hand in SVG: one per hook, layers on y (layer 0 at the bottom), token
// positions (× heads for attn_head) on x, one colour scale shared by every hook of a study.
// The scale follows patchserve.client.figures.scale_bounds: `recovered` fixed −1…1, `kl`
// 0…max (dark = lower = more restored), other metrics diverging around the corrupt
// baseline and wide enough to hold the clean one.

const SVG = "http://www.w3.org/2000/svg";
export const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif";
const PENDING = "#eef0f3";
const SKIPPED = "#c8c8c8";
const CORRUPTED = "#b2182b";
// matplotlib's RdBu_r (low = blue, high = red) and Reds_r (low = dark red).
const RDBU_R = [
  "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
  "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f",
];
const REDS_R = [
  "#67000d", "#a50f15", "#cb181d", "#ef3b2c", "#fb6a4a", "#fc9272", "#fcbba1", "#fee0d2",
  "#fff5f0",
];
export const LOWER_IS_BETTER = new Set(["kl"]);

export function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function maxOf(values, start) {
  return values.reduce((a, b) => (b > a ? b : a), start);
}

/**
 * {low, mid, high} of the colour scale (mid NaN: sequential). `corrupt`/`clean` are the raw
 * baselines of the summary; before the summary arrives they are unknown and a diverging
 * scale is centred on the middle of the data so far (then redrawn on the exact rule).
 */
export function scaleBounds(metric, values, clean, corrupt) {
  const data = values.filter(Number.isFinite);
  if (metric === "recovered") return { low: -1, mid: 0, high: 1 };
  if (LOWER_IS_BETTER.has(metric)) {
    return { low: 0, mid: NaN, high: Math.max(maxOf(data, 0), corrupt ?? 0, 1e-9) };
  }
  let mid = corrupt;
  if (mid == null) mid = data.length ? (maxOf(data, -Infinity) - maxOf(data.map((v) => -v), -Infinity)) / 2 : 0;
  let half = maxOf(data.map((v) => Math.abs(v - mid)), 0);
  if (clean != null) half = Math.max(half, Math.abs(clean - mid));
  if (!(half > 0)) half = 1e-6;
  return { low: mid - half, mid, high: mid + half };
}

function hex(c) {
  return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
}

function ramp(stops, t) {
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const a = hex(stops[i]);
  const b = hex(stops[i + 1]);
  const f = x - i;
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}

/** Position of `value` on the scale, 0…1 (two slopes around mid when diverging). */
export function fraction(value, s) {
  if (Number.isNaN(s.mid)) return (value - s.low) / (s.high - s.low);
  return value < s.mid ? 0.5 * (value - s.low) / (s.mid - s.low) : 0.5 + 0.5 * (value - s.mid) / (s.high - s.mid);
}

export function colour(value, s) {
  return ramp(Number.isNaN(s.mid) ? REDS_R : RDBU_R, fraction(value, s));
}

/** Text colour readable on `value`'s cell. */
function ink(value, s) {
  const t = fraction(value, s);
  return Number.isNaN(s.mid) ? (t < 0.45 ? "#fff" : "#222") : t < 0.2 || t > 0.8 ? "#fff" : "#222";
}

export function fmt(v, digits = 3) {
  if (v == null || !Number.isFinite(v)) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return v.toFixed(a >= 100 ? 1 : digits);
}

function short(v) {
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
}

/** A token as an axis label: its text without surrounding spaces ("␣" if only spaces). */
export function tokenLabel(token, max = 12) {
  const t = token.replace(/\n/g, "⏎").trim();
  return t === "" ? "␣" : t.length > max ? `${t.slice(0, max - 1)}…` : t;
}

function hatch(defs, id) {
  const p = el("pattern", { id, width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" }, defs);
  el("rect", { width: 6, height: 6, fill: SKIPPED }, p);
  el("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#8a8a8a", "stroke-width": 2 }, p);
}

/** One hook's grid as an SVG, filled cell by cell. */
export class Heatmap {
  /** `start`: the stream's start event (layers, positions, heads, tokens). */
  constructor(hook, start, onHover) {
    this.hook = hook;
    this.layers = start.layers;
    this.positions = start.positions;
    this.tokens = start.tokens;
    this.heads = hook === "attn_head" && start.heads ? start.heads : null;
    this.byHead = this.heads !== null && start.per_position === false; // [layer][head]
    this.columns = [];
    if (this.byHead) this.heads.forEach((head, k) => this.columns.push({ position: null, head, j: 0, k }));
    else this.positions.forEach((position, j) => {
      if (this.heads) this.heads.forEach((head, k) => this.columns.push({ position, head, j, k }));
      else this.columns.push({ position, head: null, j });
    });
    this.total = this.layers.length * this.columns.length;
    this.filled = 0;
    this.cells = new Map(); // "layer/position/head" -> {rect, text, value, state}
    this.corrupted = new Set();
    this.onHover = onHover;

    this.root = document.createElement("figure");
    this.root.className = "heatmap";
    this.root.setAttribute("data-testid", `heatmap-${hook}`);
    this.root.dataset.hook = hook;
    this.root.dataset.filled = "0";
    this.root.dataset.total = String(this.total);
    this.draw();
  }

  key(layer, position, head) {
    return `${layer}/${position ?? ""}/${head ?? ""}`;
  }

  draw() {
    const cw = this.heads ? Math.max(22, Math.min(40, 640 / this.columns.length)) : this.columns.length > 24 ? 30 : 48;
    const ch = this.layers.length > 16 ? 18 : 30;
    this.cw = cw;
    this.ch = ch;
    this.showText = !this.heads && cw >= 44 && ch >= 24;
    const left = 62;
    const top = 30;
    const plotW = cw * this.columns.length;
    const plotH = ch * this.layers.length;
    const bottom = this.heads ? 84 : 70;
    const width = left + plotW + 16;
    const height = top + plotH + bottom;
    const svg = el("svg", { xmlns: SVG, width, height, viewBox: `0 0 ${width} ${height}`, "font-family": FONT, class: "heatmap-svg" });
    this.svg = svg;
    el("rect", { width, height, fill: "#fff" }, svg);
    const defs = el("defs", {}, svg);
    this.hatchId = `hatch-${this.hook}`;
    hatch(defs, this.hatchId);
    const title = el("text", { x: left, y: 19, "font-size": 14, "font-weight": 600, fill: "#1d2733" }, svg);
    title.textContent = this.hook;
    this.titleNote = el("tspan", { "font-weight": 400, fill: "#5b6675", dx: 8 }, title);

    // y axis: layer 0 at the bottom (matplotlib's origin="lower" in the client's figures).
    this.layers.forEach((layer, i) => {
      const y = top + (this.layers.length - 1 - i) * ch;
      const t = el("text", { x: left - 8, y: y + ch / 2 + 4, "font-size": 11, fill: "#3a4452", "text-anchor": "end" }, svg);
      t.textContent = `L${layer}`;
    });
    const mid = top + plotH / 2;
    const ylab = el("text", {
      x: 12, y: mid, "font-size": 11, fill: "#5b6675", "text-anchor": "middle", transform: `rotate(-90 12 ${mid})`,
    }, svg);
    ylab.textContent = "layer";

    this.xLabels = [];
    this.columns.forEach((col, c) => {
      const x = left + c * cw;
      this.layers.forEach((layer, i) => {
        const y = top + (this.layers.length - 1 - i) * ch;
        const rect = el("rect", {
          x: x + 0.5, y: y + 0.5, width: cw - 1, height: ch - 1, fill: PENDING, class: "cell",
          "data-layer": layer, "data-position": col.position, "data-state": "pending",
        }, svg);
        if (col.head != null) rect.setAttribute("data-head", col.head);
        const text = this.showText
          ? el("text", {
            x: x + cw / 2, y: y + ch / 2 + 4, "font-size": 11, "text-anchor": "middle", "pointer-events": "none", fill: "#222",
          }, svg)
          : null;
        const cell = { rect, text, value: null, state: "pending", layer, position: col.position, head: col.head };
        this.cells.set(this.key(layer, col.position, col.head), cell);
        rect.addEventListener("mousemove", (e) => this.onHover?.(e, this, cell));
        rect.addEventListener("mouseleave", () => this.onHover?.(null));
      });
    });

    // x axis: one label per column (heads: "h0", "h1"... under a token label per position).
    const axisY = top + plotH;
    if (this.heads) {
      this.columns.forEach((col, c) => {
        const t = el("text", { x: left + c * cw + cw / 2, y: axisY + 13, "font-size": 9, fill: "#5b6675", "text-anchor": "middle" }, svg);
        t.textContent = `h${col.head}`;
      });
      (this.byHead ? [] : this.positions).forEach((position, j) => {
        const x0 = left + j * this.heads.length * cw;
        const w = this.heads.length * cw;
        el("line", { x1: x0 + 2, x2: x0 + w - 2, y1: axisY + 19, y2: axisY + 19, stroke: "#9aa4b1" }, svg);
        const t = el("text", { x: x0 + w / 2, y: axisY + 33, "font-size": 11, fill: "#1d2733", "text-anchor": "middle" }, svg);
        this.xLabels.push({ position, node: t });
        const p = el("text", { x: x0 + w / 2, y: axisY + 46, "font-size": 9, fill: "#7a8594", "text-anchor": "middle" }, svg);
        p.textContent = `pos ${position}`;
      });
    } else {
      this.columns.forEach((col, c) => {
        const cx = left + c * cw + cw / 2;
        const rotate = cw < 44;
        const t = el("text", rotate
          ? {
            x: cx + 3, y: axisY + 10, "font-size": 11, fill: "#1d2733", "text-anchor": "end",
            transform: `rotate(-55 ${cx + 3} ${axisY + 10})`,
          }
          : { x: cx, y: axisY + 16, "font-size": 11, fill: "#1d2733", "text-anchor": "middle" }, svg);
        this.xLabels.push({ position: col.position, node: t });
        if (!rotate) {
          const p = el("text", { x: cx, y: axisY + 29, "font-size": 9, fill: "#7a8594", "text-anchor": "middle" }, svg);
          p.textContent = String(col.position);
        }
      });
    }
    // Rotated labels have room for a long token; level ones as much as their column.
    this.labelChars = this.heads ? Math.max(6, Math.floor((this.heads.length * cw) / 7)) : cw < 44 ? 14 : Math.floor(cw / 6.5);
    this.xTitle = el("text", { x: left + plotW / 2, y: height - 8, "font-size": 11, fill: "#5b6675", "text-anchor": "middle" }, svg);
    this.labelTokens();
    this.root.appendChild(svg);
  }

  labelTokens() {
    for (const { position, node } of this.xLabels) {
      const bad = this.corrupted.has(position);
      const token = this.tokens[position] ?? `#${position}`;
      const title = el("title");
      title.textContent = `position ${position}: ${JSON.stringify(token)}${bad ? " (corrupted)" : ""}`;
      node.replaceChildren(`${bad ? "*" : ""}${tokenLabel(token, this.labelChars)}`, title);
      node.setAttribute("fill", bad ? CORRUPTED : "#1d2733");
      node.setAttribute("font-weight", bad ? 700 : 400);
      node.setAttribute("data-token", token);
    }
    this.xTitle.textContent = this.byHead ? `head (patched at all ${this.positions.length} selected positions)`
      : this.corrupted.size ? "position (token; * = corrupted)" : "position (token)";
  }

  /** The corrupt positions whose token differs from the clean one (alignment.differing_positions). */
  markCorrupted(positions) {
    this.corrupted = new Set(positions);
    this.labelTokens();
  }

  /** One cell event; `value` null = skipped. Returns the cell (for recolouring). */
  set(layer, position, head, value, reason = null) {
    const cell = this.cells.get(this.key(layer, position, head));
    if (!cell) return null;
    if (cell.state === "pending") {
      this.filled += 1;
      this.root.dataset.filled = String(this.filled);
    }
    cell.value = value;
    cell.state = value == null ? "skipped" : "value";
    cell.reason = reason;
    cell.rect.setAttribute("data-state", cell.state);
    if (value == null) cell.rect.removeAttribute("data-value");
    else cell.rect.setAttribute("data-value", String(value));
    return cell;
  }

  values() {
    const out = [];
    for (const cell of this.cells.values()) if (cell.value != null) out.push(cell.value);
    return out;
  }

  paint(cell, scale) {
    if (cell.state === "pending") return;
    if (cell.state === "skipped") {
      cell.rect.setAttribute("fill", `url(#${this.hatchId})`);
      return;
    }
    cell.rect.setAttribute("fill", colour(cell.value, scale));
    if (cell.text) {
      cell.text.textContent = short(cell.value);
      cell.text.setAttribute("fill", ink(cell.value, scale));
    }
  }

  paintAll(scale) {
    for (const cell of this.cells.values()) this.paint(cell, scale);
  }

  /** Outline the most restored cell. */
  markArgmax(argmax) {
    this.svg.querySelector(".argmax")?.remove();
    if (!argmax) return;
    const cell = this.cells.get(this.key(argmax.layer, argmax.position, argmax.head ?? null));
    if (!cell) return;
    const r = cell.rect;
    el("rect", {
      x: r.getAttribute("x"), y: r.getAttribute("y"), width: r.getAttribute("width"), height: r.getAttribute("height"),
      fill: "none", stroke: "#111", "stroke-width": 2, class: "argmax", "pointer-events": "none",
    }, this.svg);
  }

  note(text) {
    this.titleNote.textContent = text;
    // A narrow grid widens its SVG to hold the title.
    const title = this.titleNote.parentNode;
    const need = Math.ceil(Number(title.getAttribute("x")) + title.getComputedTextLength() + 12);
    const width = Number(this.svg.getAttribute("width"));
    if (need > width) {
      const height = this.svg.getAttribute("height");
      this.svg.setAttribute("width", need);
      this.svg.setAttribute("viewBox", `0 0 ${need} ${height}`);
      this.svg.querySelector("rect").setAttribute("width", need);
    }
  }
}

/** The colour bar of a study, with the baselines, skipped cells and corrupted tokens. */
export function legend(metric, scale, { clean = null, corrupt = null, skipped = false, corrupted = false } = {}) {
  const width = 580;
  const height = 86;
  const svg = el("svg", { xmlns: SVG, width, height, viewBox: `0 0 ${width} ${height}`, "font-family": FONT, class: "legend-svg" });
  el("rect", { width, height, fill: "#fff" }, svg);
  const defs = el("defs", {}, svg);
  const grad = el("linearGradient", { id: "legend-gradient", x1: 0, x2: 1, y1: 0, y2: 0 }, defs);
  for (let i = 0; i <= 20; i += 1) {
    const t = i / 20;
    // The gradient is linear in the bar's x; its colour is the value's at that x.
    const stops = Number.isNaN(scale.mid) ? REDS_R : RDBU_R;
    el("stop", { offset: t, "stop-color": ramp(stops, t) }, grad);
  }
  hatch(defs, "hatch-legend");
  const x0 = 16;
  const barW = 300;
  const y0 = 26;
  const caption = el("text", { x: x0, y: 16, "font-size": 12, fill: "#1d2733", "font-weight": 600 }, svg);
  caption.textContent = metric === "recovered"
    ? "recovered (1 = clean, 0 = corrupt)"
    : LOWER_IS_BETTER.has(metric)
      ? `${metric}: lower = more restored (dark)`
      : `${metric}, centred on the corrupt baseline`;
  el("rect", { x: x0, y: y0, width: barW, height: 14, fill: "url(#legend-gradient)", stroke: "#9aa4b1", "stroke-width": 0.5 }, svg);
  // Ticks: x is linear in the bar's colour fraction (two slopes when diverging).
  const at = (v) => x0 + barW * Math.min(1, Math.max(0, fraction(v, scale)));
  const ticks = Number.isNaN(scale.mid) ? [scale.low, (scale.low + scale.high) / 2, scale.high] : [scale.low, scale.mid, scale.high];
  for (const v of ticks) {
    el("line", { x1: at(v), x2: at(v), y1: y0 + 14, y2: y0 + 18, stroke: "#3a4452" }, svg);
    const t = el("text", { x: at(v), y: y0 + 29, "font-size": 10, fill: "#3a4452", "text-anchor": "middle" }, svg);
    t.textContent = fmt(v, 2);
  }
  const marks = metric === "recovered" ? [] : [["corrupt", corrupt], ["clean", clean]];
  for (const [name, v] of marks) {
    if (v == null) continue;
    const x = at(v);
    el("path", { d: `M${x - 4},${y0 - 6} L${x + 4},${y0 - 6} L${x},${y0} Z`, fill: "#1d2733" }, svg);
    const anchor = x < x0 + 40 ? "start" : x > x0 + barW - 40 ? "end" : "middle";
    const t = el("text", { x, y: y0 + 42, "font-size": 10, fill: "#1d2733", "text-anchor": anchor }, svg);
    t.textContent = `${name} ${fmt(v, 2)}`;
  }
  let x = x0 + barW + 40;
  el("rect", { x, y: y0, width: 14, height: 14, fill: `url(#hatch-legend)`, stroke: "#9aa4b1", "stroke-width": 0.5 }, svg);
  const s = el("text", { x: x + 20, y: y0 + 11, "font-size": 11, fill: skipped ? "#1d2733" : "#7a8594" }, svg);
  s.textContent = "skipped (no aligned clean token)";
  const c = el("text", { x, y: y0 + 33, "font-size": 11, fill: CORRUPTED, "font-weight": 700 }, svg);
  c.textContent = "*token";
  const c2 = el("text", { x: x + 44, y: y0 + 33, "font-size": 11, fill: corrupted ? "#1d2733" : "#7a8594" }, svg);
  c2.textContent = "corrupted position";
  const a = el("rect", { x, y: y0 + 42, width: 14, height: 12, fill: "none", stroke: "#111", "stroke-width": 2 }, svg);
  a.setAttribute("class", "legend-argmax");
  const a2 = el("text", { x: x + 20, y: y0 + 52, "font-size": 11, fill: "#1d2733" }, svg);
  a2.textContent = "most restored cell";
  return svg;
}
