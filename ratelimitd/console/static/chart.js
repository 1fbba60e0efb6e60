// Stacked bar charts in SVG, drawn here (no library, nothing from elsewhere). Each chart says
// its totals in its accessible name, and each bar its values in a tooltip.

import { count } from "./format.js";

const NS = "http://www.w3.org/2000/svg";
// Drawn for the screen at hand: half as wide on a phone, so the chart keeps its height there.
const W = window.matchMedia("(max-width: 700px)").matches ? 480 : 960;
const H = 220;
const PAD = { left: 52, right: 12, top: 12, bottom: 36 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// The smallest of 2, 4, 5 or 10 times a power of ten at or above n: the axis's middle line is a round number.
function niceCeiling(n) {
  if (n <= 2) return 2;
  const power = 10 ** Math.floor(Math.log10(n));
  return [1, 2, 4, 5, 10].map((f) => f * power).find((c) => c >= n);
}

// The plot's area, inside the axis labels.
const plotW = W - PAD.left - PAD.right;
const plotH = H - PAD.top - PAD.bottom;

// Grid lines at 0, half and the top of the scale, each with its value on the axis.
function drawGrid(chart, top) {
  for (const f of [0, 0.5, 1]) {
    const y = PAD.top + plotH * (1 - f);
    chart.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, count(Math.round(top * f))));
  }
}

// buckets: [{ start: ms, values: { series name: number } }]; series: [{ name, cls }];
// label(ms) names a bucket on the axis.
export function stackedBars({ title, buckets, series, label, id }) {
  const totals = Object.fromEntries(series.map((s) => [s.name, 0]));
  let top = 0;
  for (const b of buckets) {
    let sum = 0;
    for (const s of series) { const v = Number(b.values[s.name] || 0); totals[s.name] += v; sum += v; }
    top = Math.max(top, sum);
  }
  top = niceCeiling(top);
  const summary = series.map((s) => `${count(totals[s.name])} ${s.name}`).join(", ");
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${summary}`, class: "chart" });
  chart.dataset.totals = JSON.stringify(totals);
  if (id) chart.id = id;
  drawGrid(chart, top);
  const step = plotW / Math.max(buckets.length, 1);
  const barW = Math.max(step * 0.8, 1);
  const every = Math.ceil(buckets.length / 8);
  buckets.forEach((b, i) => {
    const x = PAD.left + i * step + (step - barW) / 2;
    let y = PAD.top + plotH;
    const g = svg("g", { class: "bar" });
    const tip = series.map((s) => `${count(b.values[s.name] || 0)} ${s.name}`).join(", ");
    g.append(svg("title", {}, `${label(b.start)}: ${tip}`));
    for (const s of series) {
      const v = Number(b.values[s.name] || 0);
      if (!v) continue;
      const hgt = (v / top) * plotH;
      y -= hgt;
      g.append(svg("rect", { x, y, width: barW, height: hgt, class: s.cls }));
    }
    chart.append(g);
    if (i % every === 0) {
      chart.append(svg("text", { x: x + barW / 2, y: H - 8, "text-anchor": "middle", class: (i / every) % 2 ? "axis x minor" : "axis x" }, label(b.start)));
    }
  });
  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const s of series) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch ${s.cls}`;
    li.append(swatch, `${s.name}: ${count(totals[s.name])}`);
    legend.append(li);
  }
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, chart, legend);
  return figure;
}

// Lines over time (latency percentiles): points: [{ start: ms, values: { series: number } }];
// a bucket without a value leaves a gap. The accessible name gives each series' highest value.
export function lines({ title, points, series, label, unit, id }) {
  let top = 0;
  for (const p of points) for (const s of series) top = Math.max(top, Number(p.values[s.name] || 0));
  top = niceCeiling(top);
  const peaks = series.map((s) => `${s.name} up to ${count(Math.max(0, ...points.map((p) => Number(p.values[s.name] || 0))))} ${unit}`);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${peaks.join(", ")}`, class: "chart" });
  if (id) chart.id = id;
  drawGrid(chart, top);
  const step = plotW / Math.max(points.length, 1);
  const xOf = (i) => PAD.left + i * step + step / 2;
  const yOf = (v) => PAD.top + plotH * (1 - v / top);
  for (const s of series) {
    let d = "";
    points.forEach((p, i) => {
      const v = p.values[s.name];
      if (v === undefined) { d += " "; return; }
      d += `${d.endsWith(" ") || d === "" ? "M" : "L"}${xOf(i).toFixed(1)},${yOf(Number(v)).toFixed(1)}`;
      const dot = svg("circle", { cx: xOf(i), cy: yOf(Number(v)), r: 3, class: s.cls });
      dot.append(svg("title", {}, `${label(p.start)}: ${s.name} ${count(v)} ${unit}`));
      chart.append(dot);
    });
    chart.append(svg("path", { d: d.trim(), class: `line ${s.cls}` }));
  }
  const every = Math.ceil(points.length / 8);
  points.forEach((p, i) => {
    if (i % every === 0) {
      const cls = (i / every) % 2 ? "axis x minor" : "axis x";
      chart.append(svg("text", { x: xOf(i), y: H - 8, "text-anchor": "middle", class: cls }, label(p.start)));
    }
  });
  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const s of series) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch ${s.cls}`;
    li.append(swatch, s.name);
    legend.append(li);
  }
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, chart, legend);
  return figure;
}
