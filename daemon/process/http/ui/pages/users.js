// Users: credits, limits and today's usage.

import { get } from "../api.js";
import { fill, h, table } from "../dom.js";

export const title = "Users";
export const operatorOnly = true;

export async function mount(page, _route, app) {
  const load = async () => {
    const { users } = await get("/v1/users");
    fill(page, h("h1", {}, "Users"), render(users));
  };
  await load();
  // Credits and the day's counts change as jobs are submitted and finish.
  app.reloadOnEvents(load, { everyMs: 2000, wanted: (event) => event.type === "status" });
}

const orDefault = (value) => (value === null || value === undefined ? "default" : value);

function render(users) {
  return table(`${users.length} users`, ["User", "Credits", "Reserved", "Spent", "Jobs today", "Daily limit", "Rate", "Running at most", "State"],
    users.map((user) => [
      h("a", { href: `#/jobs?user=${encodeURIComponent(user.name)}` }, user.name),
      user.credits === null || user.credits === undefined ? "unlimited" : user.credits,
      // Left out of the answer when 0.
      user.reserved ?? 0,
      user.spent,
      user.jobs_today ?? 0,
      orDefault(user.daily_limit),
      orDefault(user.rate),
      orDefault(user.max_running),
      user.disabled ? "disabled" : "enabled",
    ]));
}
