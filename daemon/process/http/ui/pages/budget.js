// Budget and spend: today and this month, by service and by user, with the month's projection.

import { get } from "../api.js";
import { fill, h, money, table } from "../dom.js";
import { gauge } from "../charts.js";

export const title = "Budget";
export const operatorOnly = true;

export async function mount(page, _route, app) {
  const load = async () => {
    const budget = await get("/v1/budget");
    const reports = await Promise.all([
      ["day", "service"], ["day", "user"], ["month", "service"], ["month", "user"],
    ].map(([period, by]) => get(`/v1/ledger?${period}=${period === "day" ? budget.day : budget.month}&by=${by}`)));
    fill(page, ...render(budget, reports));
  };
  await load();
  app.reloadOnEvents(load, { everyMs: 2000, wanted: (event) => event.type === "cost" });
}

function render(budget, [dayService, dayUser, monthService, monthUser]) {
  const period = (name, spent, limit) => h("section", { class: "card" },
    h("h2", {}, name),
    limit ? gauge({ label: `${money(spent)} of ${money(limit)} spent`, value: spent, limit, text: `${money(spent)} of ${money(limit)}` })
      : h("p", {}, `${money(spent)} spent, no limit`));
  return [
    h("h1", {}, "Budget and spend"),
    budget.stopped ? h("p", { class: "error", role: "alert" }, `Spending is stopped: ${budget.stop_reason || "limit reached"}`) : null,
    h("div", { class: "grid" },
      period(`Today (${budget.day})`, budget.spent_today, budget.daily_usd),
      period(`This month (${budget.month})`, budget.spent_month, budget.monthly_usd),
      h("section", { class: "card" }, h("h2", {}, "Projection"),
        h("p", { class: "tile-value", id: "projection" }, money(budget.month_projection_usd)),
        h("p", { class: "muted" }, "This month's spend so far, scaled to the whole month."),
        h("p", {}, `Reserved by calls in flight: ${money(budget.reserved)}`))),
    h("div", { class: "grid pairs" },
      spendTable("Today by service", "service", dayService),
      spendTable("Today by user", "user", dayUser),
      spendTable("This month by service", "service", monthService),
      spendTable("This month by user", "user", monthUser)),
  ];
}

function spendTable(caption, by, report) {
  const heading = by === "service" ? "Service" : "User";
  return table(`${caption}: ${money(report.usd)}`, [heading, "Calls", "Failed", "Spend"],
    report.groups.map((group) => [group[by], group.calls, group.failed, money(group.usd)]));
}
