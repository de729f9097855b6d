// Building the page without innerHTML: text from the daemon (payloads, messages, user names)
// always lands as text, never as markup.

/** An element: h("a", {href: "#/jobs", class: "x"}, "text", child, ...). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : String(child));
  }
}

/** Replace what `node` holds with `children`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A table: headers, then one row of cells per item; cells may be nodes or text. */
export function table(caption, headers, rows) {
  return h("div", { class: "scroll" },
    h("table", {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows.length
        ? rows.map((cells) => h("tr", {}, cells.map((cell) => h("td", {}, cell))))
        : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, "none")))));
}

export function money(usd) {
  if (usd === null || usd === undefined) return "–";
  // Cents, or up to four decimals for what a single call costs ($0.0035).
  return `$${usd.toFixed(4).replace(/0{1,2}$/, "")}`;
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "–";
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(epochSeconds * 1000).toLocaleString();
}

export function when(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "–";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}
