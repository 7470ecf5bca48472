// Draws /dashboard/data as SVG line charts and polls it every `interval` seconds.
// Each chart card carries data-points (non-empty values drawn) and <body> data-updates,
// so a test (or a curious user) can see from the DOM that data arrived.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const SVG_NS = "http://www.w3.org/2000/svg";
const H = 150, LEFT = 52, RIGHT = 6, TOP = 8, BOTTOM = 18;
let updates = 0;

// `axis` drops rate units (the legend and title carry them) so tick labels stay narrow.
function fmt(v, unit, axis = false) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  if (unit === "ratio") return (100 * v).toFixed(v >= 0.1 ? 0 : 1) + " %";
  if (unit === "s") {
    const [x, u] = v >= 1 ? [v, "s"] : v >= 1e-3 ? [1e3 * v, "ms"] : [1e6 * v, "µs"];
    return x.toFixed(x >= 100 ? 0 : 1) + " " + u;
  }
  if (unit === "B/s" || unit === "B") {
    const k = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < k.length - 1) { v /= 1000; i++; }
    return v.toFixed(v >= 100 || i === 0 ? 0 : 1) + " " + k[i] + (unit === "B/s" && !axis ? "/s" : "");
  }
  const s = Math.abs(v) >= 1000 ? (v / 1000).toFixed(1) + "k" : Math.abs(v) >= 10 || v === 0 ? v.toFixed(0) : v.toPrecision(2);
  return unit && !axis ? s + " " + unit : s;
}

function el(tag, attrs, ns) {
  const e = ns ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function card(chart) {
  let c = document.getElementById("chart-" + chart.id);
  if (!c) {
    c = el("div", { class: "chart", id: "chart-" + chart.id, "data-points": "0" });
    c.append(el("h3"), el("svg", {}, true), el("div", { class: "legend" }));
    c.querySelector("h3").textContent = chart.title + (chart.unit && chart.unit !== "ratio" ? ` (${chart.unit})` : "");
    document.getElementById("group-" + chart.group).append(c);
  }
  return c;
}

function draw(chart, times) {
  const c = card(chart), svg = c.querySelector("svg"), legend = c.querySelector(".legend");
  const W = svg.clientWidth || 360;  // user units = pixels, so text is not stretched
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  legend.replaceChildren();
  const values = chart.series.flatMap(s => s.values).filter(v => v !== null);
  const top = Math.max(chart.unit === "ratio" ? 0.01 : 1e-9, ...values) * 1.05;
  const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 1);
  const x = t => LEFT + (W - LEFT - RIGHT) * (t - t0) / (t1 - t0);
  const y = v => TOP + (H - TOP - BOTTOM) * (1 - v / top);
  for (const f of [0, 0.5, 1]) {
    svg.append(el("line", { x1: LEFT, x2: W - RIGHT, y1: y(f * top), y2: y(f * top), stroke: "#e5e7eb" }, true));
    const label = el("text", { x: LEFT - 4, y: y(f * top) + 3, "text-anchor": "end" }, true);
    label.textContent = fmt(f * top, chart.unit, true);
    svg.append(label);
  }
  const span = el("text", { x: LEFT, y: H - 4 }, true);
  span.textContent = `-${Math.round(t1 - t0)} s`;
  const now = el("text", { x: W - RIGHT, y: H - 4, "text-anchor": "end" }, true);
  now.textContent = "now";
  svg.append(span, now);
  chart.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", pen = false;
    s.values.forEach((v, j) => {
      if (v === null) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(times[j]).toFixed(1)},${y(v).toFixed(1)}`;
      if (!pen && (j + 1 >= s.values.length || s.values[j + 1] === null)) {  // a lone point: a dot
        svg.append(el("circle", { cx: x(times[j]), cy: y(v), r: 2, fill: color }, true));
      }
      pen = true;
    });
    svg.append(el("path", { d, fill: "none", stroke: color, "stroke-width": 1.5 }, true));
    const last = [...s.values].reverse().find(v => v !== null);
    const item = el("span");
    item.append(el("i", { style: `background:${color}` }), `${s.name} ${fmt(last ?? null, chart.unit)}`);
    legend.append(item);
  });
  c.dataset.points = String(values.length);
}

function tiles(data) {
  const byId = id => data.charts.find(c => c.id === id);
  const latest = (id, name) => {
    const s = (byId(id)?.series || []).find(s => s.name === name);
    return s ? [...s.values].reverse().find(v => v !== null) ?? null : null;
  };
  const items = [
    ["generation", fmt(latest("throughput", "generation"), "tok/s")],
    ["running", fmt(latest("running", "running"), "")],
    ["waiting", fmt(latest("running", "waiting"), "")],
    ["KV cache", fmt(latest("kv", "KV cache"), "ratio")],
    ...Object.entries(data.table_bytes).map(([placement, bytes]) => [`tables · ${placement}`, fmt(bytes, "B")]),
  ];
  const box = document.getElementById("tiles");
  box.replaceChildren(...items.map(([label, value]) => {
    const t = el("div", { class: "tile" });
    t.append(el("div", { class: "label" }), el("div", { class: "value" }));
    t.firstChild.textContent = label;
    t.lastChild.textContent = value;
    return t;
  }));
}

async function refresh() {
  let interval = 2;
  const status = document.getElementById("status");
  try {
    const response = await fetch("/dashboard/data", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    interval = data.interval;
    document.getElementById("model").textContent = data.model ?? "(loading)";
    document.getElementById("state").textContent = data.state;
    document.getElementById("empty").hidden = data.charts.length > 0;
    if (data.charts.length) {
      data.charts.forEach(chart => draw(chart, data.times));
      tiles(data);
    }
    document.body.dataset.updates = String(++updates);
    status.className = "";
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.className = "error";
    status.textContent = `no data: ${err.message}`;
  } finally {
    setTimeout(refresh, 1000 * interval);
  }
}

refresh();
