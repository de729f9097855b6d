// Charts as inline SVG, drawn from numbers: no library, nothing fetched from elsewhere. Each
// chart carries a text alternative (role="img" and a label) for screen readers.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

function titled(node, text) {
  node.append(svg("title", {}, text));
  return node;
}

/** Stacked columns, one per bucket: `series` is [{name, cls, values}], values per bucket.
 * The labels are HTML beside the drawing, so they keep their size however wide it is drawn. */
export function columns({ label, buckets, series, height = 120 }) {
  const width = 600;
  const totals = buckets.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const top = Math.max(1, ...totals);
  const step = width / buckets.length;
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart",
    preserveAspectRatio: "none",
  });
  buckets.forEach((bucket, i) => {
    let y = height;
    for (const s of series) {
      const value = s.values[i];
      if (!value) continue;
      const tall = (value / top) * (height - 4);
      y -= tall;
      chart.append(titled(svg("rect", {
        x: i * step + 2, y, width: Math.max(1, step - 4), height: tall, class: s.cls,
      }), `${bucket}: ${value} ${s.name}`));
    }
  });
  chart.append(svg("line", { x1: 0, y1: height, x2: width, y2: height, class: "axis" }));
  const figure = document.createElement("figure");
  figure.className = "columns";
  const most = document.createElement("span");
  most.className = "tick";
  most.textContent = `${top} at most`;
  const axis = document.createElement("div");
  axis.className = "ticks";
  for (const text of [buckets[0] || "", "now"]) {
    const tick = document.createElement("span");
    tick.className = "tick";
    tick.textContent = text;
    axis.append(tick);
  }
  figure.append(most, chart, axis);
  return figure;
}

/** A bar of `parts` ([{cls, value, label}]) out of `top`, with no text: its row says it. */
export function bar({ parts, top }) {
  const chart = svg("svg", { viewBox: "0 0 100 10", preserveAspectRatio: "none", class: "bar", "aria-hidden": "true" });
  let x = 0;
  for (const part of parts) {
    const wide = top > 0 ? (part.value / top) * 100 : 0;
    if (part.value) chart.append(svg("rect", { x, y: 0, width: wide, height: 10, class: part.cls }));
    x += wide;
  }
  return chart;
}

/** A half-circle gauge of `value` out of `limit`, coloured by how full it is. */
export function gauge({ label, value, limit, text }) {
  const fraction = limit > 0 ? Math.min(1, value / limit) : 0;
  const level = fraction >= 1 ? "over" : fraction >= 0.8 ? "high" : "ok";
  const r = 80;
  const angle = Math.PI * (1 - fraction);
  const x = 100 + r * Math.cos(angle);
  const y = 100 - r * Math.sin(angle);
  const chart = svg("svg", { viewBox: "0 0 200 115", role: "img", "aria-label": label, class: "gauge" });
  chart.append(svg("path", { d: `M 20 100 A ${r} ${r} 0 0 1 180 100`, class: "track" }));
  if (fraction > 0) {
    chart.append(svg("path", { d: `M 20 100 A ${r} ${r} 0 0 1 ${x.toFixed(2)} ${y.toFixed(2)}`, class: `fill ${level}` }));
  }
  chart.append(svg("text", { x: 100, y: 95, class: "big" }, `${Math.round(fraction * 100)}%`));
  chart.append(svg("text", { x: 100, y: 112, class: "small" }, text));
  return chart;
}
