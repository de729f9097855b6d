// Jobs: filter by status, kind and (operators) user, find one by id, page through older ones.
// Any event of the caller's jobs reloads the list, at most once a second.

import { get, query } from "../api.js";
import { ago, badge, fill, h, table } from "../dom.js";
import { progressBar } from "./job.js";

export const title = "Jobs";
export const operatorOnly = false;
const STATUSES = ["queued", "running", "done", "failed", "canceled"];
const PAGE_SIZE = 50;

export async function mount(page, { params }, app) {
  const list = h("div", { id: "jobs-list" });
  fill(page, h("h1", {}, "Jobs"), filters(params, app), list);

  const load = async () => {
    const found = await get(`/v1/jobs${query({ ...params, limit: PAGE_SIZE })}`);
    fill(list, jobsTable(found.jobs, app), pager(params, found.next_cursor));
  };
  await load();
  app.reloadOnEvents(load);
}

function filters(params, app) {
  const status = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"),
    STATUSES.map((name) => h("option", { value: name, selected: params.status === name }, name)));
  const kind = h("input", { id: "filter-kind", name: "kind", value: params.kind || "", size: 12 });
  const user = app.operator
    ? h("input", { id: "filter-user", name: "user", value: params.user || "", size: 12 })
    : null;
  const apply = (event) => {
    event.preventDefault();
    location.hash = `#/jobs${query({ status: status.value, kind: kind.value.trim(), user: user?.value.trim() })}`;
  };
  const id = h("input", { id: "find-id", name: "id", inputmode: "numeric", pattern: "[0-9]+", size: 8, required: true });
  const find = (event) => {
    event.preventDefault();
    location.hash = `#/jobs/${id.value.trim()}`;
  };
  return h("div", { class: "toolbar" },
    h("form", { class: "filters", onsubmit: apply, "aria-label": "Filter jobs" },
      h("label", { for: "filter-status" }, "Status"), status,
      h("label", { for: "filter-kind" }, "Kind"), kind,
      user && [h("label", { for: "filter-user" }, "User"), user],
      h("button", { type: "submit" }, "Filter")),
    h("form", { class: "filters", onsubmit: find, role: "search", "aria-label": "Find a job" },
      h("label", { for: "find-id" }, "Job id"), id,
      h("button", { type: "submit" }, "Open")));
}

function jobsTable(jobs, app) {
  const headers = ["Id", "Kind", ...(app.operator ? ["User"] : []), "Status", "Progress", "Attempt", "Created"];
  return table(`${jobs.length} jobs, newest first`, headers, jobs.map((job) => [
    h("a", { href: `#/jobs/${job.id}` }, `#${job.id}`),
    job.kind,
    ...(app.operator ? [job.user] : []),
    badge(job.status),
    progressBar(job),
    `${job.attempt}/${job.max_attempts}`,
    ago(job.created_at),
  ]));
}

function pager(params, nextCursor) {
  const links = [];
  if (params.cursor) links.push(h("a", { href: `#/jobs${query({ ...params, cursor: "" })}` }, "← Newest"));
  if (nextCursor) links.push(h("a", { href: `#/jobs${query({ ...params, cursor: nextCursor })}`, rel: "next" }, "Older →"));
  return h("nav", { class: "pager", "aria-label": "Pages of jobs" }, links);
}
