// Breakers: each service's circuit, its failures and when it may recover; trip and reset.

import { get, post } from "../api.js";
import { fill, h, table, when } from "../dom.js";

export const title = "Breakers";
export const operatorOnly = true;

export async function mount(page, _route, app) {
  const load = async () => {
    const circuits = await get("/v1/breakers");
    fill(page, h("h1", {}, "Breakers"), render(circuits, app, load));
  };
  await load();
  app.reloadOnEvents(load, { wanted: (event) => event.type === "breaker" });
}

function render(circuits, app, reload) {
  const action = (service, verb) => {
    const button = h("button", { type: "button", id: `${verb}-${service}`, class: verb === "trip" ? "danger" : "" },
      `${verb === "trip" ? "Trip" : "Reset"} ${service}`);
    button.addEventListener("click", () => app.act(button, () => post(`/v1/breakers/${encodeURIComponent(service)}/${verb}`), reload));
    return button;
  };
  const rows = Object.entries(circuits).sort(([a], [b]) => a.localeCompare(b));
  return table("Circuits by service", ["Service", "State", "Failures in a row", "Calls", "Failed calls", "In flight", "Waiting", "Recovers", "Action"],
    rows.map(([service, c]) => [
      service,
      h("span", { class: `badge ${c.state}`, id: `state-${service}` }, c.state),
      c.consecutive_failures,
      c.calls,
      c.failures,
      c.in_flight,
      c.waiting,
      c.state === "open" ? when(c.open_until) : "–",
      c.state === "closed" ? action(service, "trip") : action(service, "reset"),
    ]));
}
