// Small SVG charts for the report and run pages: bar, line (also scatter/curve), heatmap.
// Every label is a text node (dom.js s()), long labels wrap onto several lines instead of being cut,
// and every mark carries a <title> with its exact value (the browser shows it on hover).
import { h, s } from "./dom.js";

export const PALETTE = ["#2457c5", "#dd8452", "#1f7a3a", "#b3261e", "#8172b2", "#937860", "#da8bc3", "#8c8c8c"];

const FONT = 11;
const LINE = 13;

/** Split text into lines of at most `width` characters, at spaces where possible (never dropping text). */
export function wrapLines(text, width) {
  const out = [];
  let line = "";
  for (const word of String(text).split(/(\s+)/)) {
    if (!word) continue;
    if ((line + word).length <= width) { line += word; continue; }
    if (line.trim()) out.push(line.trim());
    line = "";
    let rest = word.trim();
    while (rest.length > width) { out.push(rest.slice(0, width)); rest = rest.slice(width); }
    line = rest;
  }
  if (line.trim()) out.push(line.trim());
  return out.length ? out : [""];
}

/** An SVG <text> whose lines are <tspan>s; `anchor` start|middle|end, `valign` top|middle|bottom. */
function label(text, { x, y, width = 18, anchor = "middle", valign = "top", cls = "", size = FONT, rotate = 0 }) {
  const lines = wrapLines(text, width);
  const shift = valign === "middle" ? -((lines.length - 1) * LINE) / 2 : valign === "bottom" ? -(lines.length - 1) * LINE : 0;
  const attrs = { x, y: y + shift, "text-anchor": anchor, "font-size": size, class: cls, fill: "currentColor" };
  if (rotate) attrs.transform = `rotate(${rotate} ${x} ${y})`;
  return s("text", attrs, lines.map((ln, i) => s("tspan", { x, dy: i === 0 ? 0 : LINE }, ln)));
}

function fmtNum(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1e5)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return a < 10 ? v.toFixed(3).replace(/0+$/, "").replace(/\.$/, "") : v.toFixed(1);
}

/** [lo, hi] of the values with 5 % room on each side (a single value gets room too). */
function padded(values) {
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const pad = hi > lo ? (hi - lo) * 0.05 : Math.abs(lo) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

/** Round tick values covering [lo, hi]. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

function figure(title, svg, legend, note) {
  return h("figure", { class: "chart" },
    h("figcaption", {}, title),
    svg,
    legend && legend.length ? h("ul", { class: "legend" }, legend.map(([color, text, dashed]) =>
      h("li", {}, s("svg", { width: 18, height: 10, "aria-hidden": "true" },
        s("line", { x1: 0, y1: 5, x2: 18, y2: 5, stroke: color, "stroke-width": 3, "stroke-dasharray": dashed ? "4 3" : null })),
      " ", text))) : null,
    note ? h("p", { class: "muted small wrap" }, note) : null);
}

function axes({ x0, y0, w, ht, yTicks, yScale, xLabel, yLabel, yFmt = fmtNum }) {
  const g = s("g", { class: "axes" });
  g.append(s("line", { x1: x0, y1: y0 + ht, x2: x0 + w, y2: y0 + ht, stroke: "#5d6677" }),
    s("line", { x1: x0, y1: y0, x2: x0, y2: y0 + ht, stroke: "#5d6677" }));
  for (const t of yTicks) {
    const y = yScale(t);
    g.append(s("line", { x1: x0, y1: y, x2: x0 + w, y2: y, stroke: "#e6e8ec" }),
      s("text", { x: x0 - 4, y: y + 4, "text-anchor": "end", "font-size": FONT, fill: "currentColor" }, yFmt(t)));
  }
  if (yLabel) g.append(label(yLabel, { x: 12, y: y0 + ht / 2, width: 40, rotate: -90, valign: "middle" }));
  if (xLabel) g.append(label(xLabel, { x: x0 + w / 2, y: y0 + ht + 36, width: 80 }));
  return g;
}

/**
 * Grouped bars: categories along x, one bar per series in each group.
 * series: [{name, values: [number|null], color?}]; yMax optional; yFmt for tick text.
 */
export function barChart({ title, categories, series, xLabel, yLabel, yMax, yFmt = fmtNum, valueFmt = fmtNum,
  width = 560, height = 260, note, colors }) {
  const catWidth = Math.max(6, Math.floor((width - 68) / Math.max(1, categories.length) / 6.5));
  const longest = Math.max(0, ...categories.map((c) => String(c).length));
  const labelLines = Math.min(10, Math.ceil(longest / catWidth));
  const m = { l: 56, r: 12, t: 10, b: 30 + LINE * labelLines + (xLabel ? 18 : 0) };
  const w = width - m.l - m.r;
  const ht = height - m.t - m.b;
  const all = series.flatMap((sr) => sr.values).filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  const top = yMax ?? Math.max(1e-9, ...all) * 1.08;
  const yScale = (v) => m.t + ht - (Math.max(0, Math.min(v, top)) / top) * ht;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", class: "chart-svg" });
  svg.append(axes({ x0: m.l, y0: m.t, w, ht, yTicks: ticks(0, top), yScale, xLabel, yLabel, yFmt }));
  const group = w / Math.max(1, categories.length);
  const barW = Math.max(2, (group * 0.8) / Math.max(1, series.length));
  categories.forEach((cat, i) => {
    const gx = m.l + i * group + group * 0.1;
    series.forEach((sr, j) => {
      const v = sr.values[i];
      if (v === null || v === undefined || !Number.isFinite(v)) return;
      const color = (colors && colors[i]) || sr.color || PALETTE[j % PALETTE.length];
      const y = yScale(v);
      svg.append(s("rect", { x: gx + j * barW, y, width: barW - 1, height: m.t + ht - y, fill: color, class: "bar",
        "data-category": String(cat), "data-series": sr.name, "data-value": v },
      s("title", {}, `${cat}${series.length > 1 ? ` · ${sr.name}` : ""}: ${valueFmt(v)}`)));
    });
    svg.append(label(cat, { x: gx + group * 0.4, y: m.t + ht + 14, width: catWidth }));
  });
  const legend = series.length > 1 ? series.map((sr, j) => [sr.color || PALETTE[j % PALETTE.length], sr.name]) : null;
  return figure(title, svg, legend, note);
}

/**
 * Lines and points in x/y: series [{name, points: [[x, y]], color?, dashed?, markers?: bool, line?: bool}];
 * hLines/vLines [{value, name, color}] (e.g. a spec's targets); points [{x, y, name, color, shape}] stand alone.
 */
export function lineChart({ title, series, xLabel, yLabel, xDomain, yDomain, hLines = [], vLines = [], marks = [],
  width = 560, height = 300, note, xFmt = fmtNum, yFmt = fmtNum }) {
  const m = { l: 56, r: 14, t: 10, b: 56 };
  const w = width - m.l - m.r;
  const ht = height - m.t - m.b;
  const xs = [...series.flatMap((sr) => sr.points.map((p) => p[0])), ...vLines.map((l) => l.value), ...marks.map((p) => p.x)]
    .filter(Number.isFinite);
  const ys = [...series.flatMap((sr) => sr.points.map((p) => p[1])), ...hLines.map((l) => l.value), ...marks.map((p) => p.y)]
    .filter(Number.isFinite);
  const [xlo, xhi] = xDomain || padded(xs);
  const [ylo, yhi] = yDomain || padded(ys);
  const xspan = xhi > xlo ? xhi - xlo : 1;
  const yspan = yhi > ylo ? yhi - ylo : 1;
  const X = (v) => m.l + ((v - xlo) / xspan) * w;
  const Y = (v) => m.t + ht - ((v - ylo) / yspan) * ht;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", class: "chart-svg" });
  svg.append(axes({ x0: m.l, y0: m.t, w, ht, yTicks: ticks(ylo, yhi), yScale: Y, xLabel, yLabel, yFmt }));
  for (const t of ticks(xlo, xhi)) {
    svg.append(s("text", { x: X(t), y: m.t + ht + 14, "text-anchor": "middle", "font-size": FONT, fill: "currentColor" }, xFmt(t)));
  }
  const legend = [];
  for (const l of hLines) {
    svg.append(s("line", { x1: m.l, x2: m.l + w, y1: Y(l.value), y2: Y(l.value), stroke: l.color, "stroke-dasharray": "5 4", class: "hline" },
      s("title", {}, `${l.name}: ${yFmt(l.value)}`)));
    legend.push([l.color, l.name, true]);
  }
  for (const l of vLines) {
    svg.append(s("line", { y1: m.t, y2: m.t + ht, x1: X(l.value), x2: X(l.value), stroke: l.color, "stroke-dasharray": "5 4", class: "vline" },
      s("title", {}, `${l.name}: ${xFmt(l.value)}`)));
    legend.push([l.color, l.name, true]);
  }
  series.forEach((sr, j) => {
    const color = sr.color || PALETTE[j % PALETTE.length];
    const pts = sr.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (sr.line !== false && pts.length > 1) {
      svg.append(s("polyline", { points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 1.6, "stroke-dasharray": sr.dashed ? "5 4" : null, class: "series" }));
    }
    if (sr.markers || pts.length === 1 || sr.line === false) {
      for (const p of pts) {
        svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: color, class: "point" },
          s("title", {}, `${sr.name}: ${xFmt(p[0])}, ${yFmt(p[1])}${p[2] !== undefined ? ` (${p[2]})` : ""}`)));
      }
    }
    legend.push([color, sr.name, sr.dashed]);
  });
  for (const p of marks) {
    if (!Number.isFinite(p.x) || !Number.isFinite(p.y)) continue;
    const shape = p.shape === "square"
      ? s("rect", { x: X(p.x) - 5, y: Y(p.y) - 5, width: 10, height: 10, fill: p.color, class: "mark" })
      : s("circle", { cx: X(p.x), cy: Y(p.y), r: 6, fill: p.color, stroke: "#fff", class: "mark" });
    shape.append(s("title", {}, `${p.name}: ${xFmt(p.x)}, ${yFmt(p.y)}`));
    svg.append(shape);
    legend.push([p.color, p.name]);
  }
  return figure(title, svg, legend, note);
}

/** A matrix of counts: rows and columns named; each cell shaded by its share of the row. */
export function heatmap({ title, rows, columns, matrix, rowTitle, columnTitle, note }) {
  const cell = 56;
  const rowLabelW = 120;
  const colLines = Math.min(4, Math.max(1, ...columns.map((c) => wrapLines(c, 9).length)));
  const top = 24 + colLines * LINE;
  const width = rowLabelW + cell * columns.length + 10;
  const height = top + cell * rows.length + 10;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width: Math.min(width * 1.2, 640), role: "img", class: "chart-svg heatmap" });
  if (columnTitle) svg.append(label(columnTitle, { x: rowLabelW + (cell * columns.length) / 2, y: 12, width: 60 }));
  columns.forEach((c, j) => svg.append(label(c, { x: rowLabelW + j * cell + cell / 2, y: 26, width: 9 })));
  rows.forEach((r, i) => {
    const total = (matrix[i] || []).reduce((a, b) => a + b, 0);
    svg.append(label(r, { x: rowLabelW - 6, y: top + i * cell + cell / 2 + 4, width: 16, anchor: "end", valign: "middle" }));
    columns.forEach((c, j) => {
      const v = (matrix[i] || [])[j] ?? 0;
      const share = total ? v / total : 0;
      const diag = i === j;
      const fill = diag ? `rgba(31,122,58,${0.12 + 0.78 * share})` : `rgba(179,38,30,${v ? 0.12 + 0.78 * share : 0.03})`;
      svg.append(s("g", { class: "cell", "data-row": r, "data-column": c, "data-value": v },
        s("rect", { x: rowLabelW + j * cell, y: top + i * cell, width: cell - 2, height: cell - 2, fill }),
        s("text", { x: rowLabelW + j * cell + cell / 2 - 1, y: top + i * cell + cell / 2 + 4, "text-anchor": "middle",
          "font-size": 13, fill: share > 0.55 ? "#fff" : "currentColor" }, String(v)),
        s("title", {}, `${rowTitle || "row"} ${r}, ${columnTitle || "column"} ${c}: ${v}${total ? ` (${(100 * share).toFixed(1)} % of the row)` : ""}`)));
    });
  });
  return figure(title, svg, null, note);
}

export { fmtNum };
