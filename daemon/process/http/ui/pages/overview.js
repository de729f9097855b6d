// Overview: queued and running jobs by kind (with pause/resume), throughput and failure rate
// over the last hour, alerts, and the day's budget. Any event reloads it, at most every 2 s.

import { get, post } from "../api.js";
import { ago, fill, h, money, table } from "../dom.js";
import { bar, columns, gauge } from "../charts.js";

export const title = "Overview";
export const operatorOnly = true;

export async function mount(page, _route, app) {
  const load = async () => {
    const health = await get("/ui/api/overview");
    fill(page, ...render(health, app, load));
  };
  await load();
  app.reloadOnEvents(load, { everyMs: 2000 });
}

function render(health, app, reload) {
  const spans = health.finished_last_hour.spans;
  const totals = spans.reduce(
    (sum, b) => ({ done: sum.done + b.done, failed: sum.failed + b.failed }), { done: 0, failed: 0 });
  const finished = totals.done + totals.failed;
  const failureRate = finished ? totals.failed / finished : 0;
  const budget = health.budget;
  return [
    h("h1", {}, "Overview"),
    h("div", { class: "tiles" },
      tile("Queued", health.jobs.queued, "tile-queued"),
      tile("Running", `${health.running} of ${health.max_concurrent_jobs}`, "tile-running"),
      tile("Done in the last hour", totals.done, "tile-done"),
      tile("Failure rate, last hour", `${(failureRate * 100).toFixed(1)}%`, "tile-failure-rate",
        failureRate > 0.2 ? "bad" : ""),
      tile("Stuck now", health.stuck.now, "tile-stuck", health.stuck.now ? "bad" : "")),
    alertList(health.alerts, health),
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "throughput-title" },
        h("h2", { id: "throughput-title" }, "Finished jobs, last hour"),
        columns({
          label: `${totals.done} jobs done and ${totals.failed} failed in the last hour`,
          buckets: spans.map((b) => new Date(b.start * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })),
          series: [
            { name: "done", cls: "done", values: spans.map((b) => b.done) },
            { name: "failed", cls: "failed", values: spans.map((b) => b.failed) },
          ],
        }),
        h("p", { class: "legend" }, h("span", { class: "key done" }), " done ", h("span", { class: "key failed" }), " failed")),
      h("section", { class: "card", "aria-labelledby": "budget-title", id: "budget-today" },
        h("h2", { id: "budget-title" }, "Budget today"),
        budget.daily_usd
          ? gauge({
            label: `${money(budget.spent_today)} spent of ${money(budget.daily_usd)} today`,
            value: budget.spent_today, limit: budget.daily_usd,
            text: `${money(budget.spent_today)} of ${money(budget.daily_usd)}`,
          })
          : h("p", {}, `${money(budget.spent_today)} spent; no daily limit`),
        budget.stopped ? h("p", { class: "error" }, `Spending stopped: ${budget.stop_reason || "limit reached"}`) : null,
        h("p", {}, h("a", { href: "#/budget" }, "Spend by service and user →")))),
    h("section", { class: "card", "aria-labelledby": "kinds-title" },
      h("h2", { id: "kinds-title" }, "Jobs by kind"),
      kindsTable(health, app, reload)),
  ];
}

function tile(label, value, id, tone = "") {
  return h("div", { class: `tile ${tone}`, id },
    h("span", { class: "tile-value" }, String(value)),
    h("span", { class: "tile-label" }, label));
}

function alertList(alerts, health) {
  const items = alerts.map((alert) => h("li", {}, h("strong", {}, alert.alert), ` ${alert.message} `, h("span", { class: "muted" }, ago(alert.at))));
  if (health.store.writable === false) {
    items.unshift(h("li", {}, h("strong", {}, "store"), ` takes no writes: ${health.store.code} ${health.store.message || ""}`));
  }
  return h("section", { class: "card alerts", "aria-labelledby": "alerts-title", id: "alerts" },
    h("h2", { id: "alerts-title" }, "Alerts, last hour"),
    items.length ? h("ul", {}, items) : h("p", { class: "muted" }, "No alerts."));
}

function kindRows(health) {
  const kinds = new Map();
  for (const [status, kind, count] of health.by_status_kind) {
    if (status !== "queued" && status !== "running") continue;
    const row = kinds.get(kind) || { queued: 0, running: 0 };
    row[status] = count;
    kinds.set(kind, row);
  }
  for (const kind of health.kinds) if (!kinds.has(kind)) kinds.set(kind, { queued: 0, running: 0 });
  return [...kinds.entries()].sort(([a], [b]) => a.localeCompare(b));
}

function kindsTable(health, app, reload) {
  const paused = new Set(health.paused);
  const rows = kindRows(health);
  const top = Math.max(1, ...rows.map(([, n]) => n.queued + n.running));
  const button = (label, path, id) => {
    const node = h("button", { type: "button", id }, label);
    node.addEventListener("click", () => app.act(node, () => post(path), reload));
    return node;
  };
  const pauseAll = health.paused_all
    ? button("Resume all kinds", "/v1/resume", "resume-all")
    : button("Pause all kinds", "/v1/pause", "pause-all");
  return [
    table("Queued and running jobs by kind", ["Kind", "Running", "Queued", "Jobs", "Dispatch"],
      rows.map(([kind, n]) => [
        h("a", { href: `#/jobs?kind=${encodeURIComponent(kind)}` }, kind),
        n.running,
        n.queued,
        bar({ top, parts: [{ cls: "running", value: n.running }, { cls: "queued", value: n.queued }] }),
        paused.has(kind) || health.paused_all
          ? [h("span", { class: "badge paused" }, "paused"), " ",
            paused.has(kind) ? button(`Resume ${kind}`, `/v1/resume?kind=${encodeURIComponent(kind)}`, `resume-${kind}`) : null]
          : button(`Pause ${kind}`, `/v1/pause?kind=${encodeURIComponent(kind)}`, `pause-${kind}`),
      ])),
    h("p", { class: "legend" }, h("span", { class: "key running" }), " running ", h("span", { class: "key queued" }), " queued ", pauseAll),
  ];
}
