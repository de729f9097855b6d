// One job: its status, a live progress bar, where it stands in the queue and why it waits,
// its events, checkpoint, result or error (with the error_id that finds it in the log), what
// it has cost so far; cancel and (operators) retry.

import { get, post } from "../api.js";
import { badge, duration, fill, h, json, money, when } from "../dom.js";

export const title = "Job";
export const operatorOnly = false;
const ACTIVE = new Set(["queued", "running"]);
const FINAL = new Set(["done", "failed", "canceled"]);
const EVENTS_SHOWN = 50;

/** A progress bar for a job, with its fraction as text for screen readers. */
export function progressBar(job) {
  const fraction = job.status === "done" ? 1 : job.progress ?? 0;
  const percent = Math.round(fraction * 100);
  return h("span", { class: "progress-cell" },
    h("progress", { max: 100, value: percent, "aria-label": `job ${job.id} progress` }, `${percent}%`),
    h("span", { class: "percent" }, `${percent}%`));
}

export async function mount(page, { id }, app) {
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  const costPath = `/ui/api/jobs/${encodeURIComponent(id)}/cost`;
  let [shown, { usd: cost }] = await Promise.all([get(path), get(costPath)]);
  const events = shown.events;
  // Whether the job is final: its stream then ends, and is followed again on a retry.
  let final = !ACTIVE.has(shown.job.status);
  const draw = () => fill(page, ...render(shown, events, cost, app, reload));
  const reload = async () => {
    [shown, { usd: cost }] = await Promise.all([get(path), get(costPath)]);
    final = !ACTIVE.has(shown.job.status);
    if (!final) stream.start();
    draw();
  };
  draw();

  // Events after the newest one shown: the page already has the ones before.
  const since = events.length ? events[events.length - 1].seq : 0;
  const stream = app.live(`${path}/events?since=${since}`, (_type, event) => {
    if (events.some((seen) => seen.seq === event.seq)) return;
    events.push(event);
    if (events.length > EVENTS_SHOWN) events.shift();
    switch (event.type) {
      case "progress":
        shown.job = { ...shown.job, progress: event.data.fraction, message: event.data.message ?? shown.job.message };
        draw();
        break;
      case "position":
        shown.waiting = event.data;
        draw();
        break;
      case "cost":
        cost = event.data.job_usd ?? cost;
        draw();
        break;
      default:
        // A status change: the job's row has its result or error, read it whole.
        final = FINAL.has(event.data.status);
        reload().catch(() => draw());
    }
  }, { resumes: () => !final });
  app.onShown(() => reload().catch(() => {}));
}

function render(shown, events, cost, app, reload) {
  const { job, waiting } = shown;
  const actions = [];
  if (ACTIVE.has(job.status)) {
    const cancel = h("button", { type: "button", id: "cancel", class: "danger" }, "Cancel");
    cancel.addEventListener("click", () => {
      if (confirm(`Cancel job ${job.id}?`)) app.act(cancel, () => post(`/v1/jobs/${job.id}/cancel`), reload);
    });
    actions.push(cancel);
  }
  if (app.operator && (job.status === "failed" || job.status === "canceled")) {
    const retry = h("button", { type: "button", id: "retry" }, "Retry");
    retry.addEventListener("click", () => app.act(retry, () => post(`/v1/jobs/${job.id}/retry`), reload));
    actions.push(retry);
  }
  const facts = [
    ["Status", h("span", { id: "job-status" }, badge(job.status), job.reason ? ` (${job.reason})` : "")],
    ["Kind", job.kind],
    ["User", job.user],
    ["Priority", job.priority],
    ["Attempt", `${job.attempt} of ${job.max_attempts}`],
    ["Created", when(job.created_at)],
    ["Started", when(job.started_at)],
    ["Finished", when(job.finished_at)],
    ["Ran for", job.started_at ? duration((job.finished_at || Date.now() / 1000) - job.started_at) : "–"],
    ["Cost so far", h("span", { id: "job-cost" }, money(cost))],
    // What it waits for besides its turn, and where it came from: only when it has them.
    ...[
      ["Tags", job.tags?.length ? h("span", { id: "job-tags" }, job.tags.join(", ")) : null],
      ["Starts at", job.run_at ? when(job.run_at) : null],
      ["Runs after", job.after?.length ? job.after.map((id) => `#${id}`).join(", ") + (job.after_any ? " (however they end)" : "") : null],
      ["Held", job.held ? "by an operator" : null],
      ["Schedule", job.schedule || null],
    ].filter(([, value]) => value !== null),
  ];
  return [
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h1", {}, `Job #${job.id}`),
    h("div", { class: "actions" }, actions),
    h("section", { "aria-labelledby": "progress-title", class: "card" },
      h("h2", { id: "progress-title" }, "Progress"),
      h("div", { id: "job-progress" }, progressBar(job)),
      h("p", { id: "job-message" }, job.message || ""),
      job.status === "queued" && waiting ? whyItWaits(waiting) : null),
    h("dl", { class: "facts" }, facts.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)])),
    job.error ? errorCard(job.error) : null,
    job.status === "done" ? h("section", { class: "card" }, h("h2", {}, "Result"), json(job.result)) : null,
    job.checkpoint !== undefined && job.checkpoint !== null
      ? h("section", { class: "card" }, h("h2", {}, "Checkpoint"), json(job.checkpoint)) : null,
    job.payload !== undefined ? h("details", {}, h("summary", {}, "Payload"), json(job.payload)) : null,
    h("section", { "aria-labelledby": "events-title" },
      h("h2", { id: "events-title" }, "Events"),
      h("ol", { class: "events", id: "job-events", reversed: true },
        [...events].reverse().map((event) => h("li", {},
          h("time", {}, when(event.at)), " ", h("strong", {}, event.type), " ", describeEvent(event))))),
  ];
}

function whyItWaits(waiting) {
  return h("p", { id: "job-waiting", class: "waiting" },
    waiting.position ? `Position ${waiting.position} of ${waiting.queued} in the queue` : "In the queue",
    waiting.kind_position ? ` (${waiting.kind_position} of ${waiting.kind_queued} of its kind)` : "",
    waiting.reason ? `; waiting because: ${waiting.reason}` : "");
}

function errorCard(error) {
  return h("section", { class: "card error-card", id: "job-error" },
    h("h2", {}, "Error"),
    h("p", {}, h("strong", {}, error.code), `: ${error.message}`),
    error.error_id ? h("p", {}, "error_id ", h("code", {}, error.error_id)) : null,
    error.technical_message ? h("details", {}, h("summary", {}, "Technical detail"), h("pre", {}, error.technical_message)) : null);
}

function describeEvent(event) {
  const data = event.data || {};
  switch (event.type) {
    case "status":
      return `${data.status}${data.reason ? ` (${data.reason})` : ""}, attempt ${data.attempt ?? "–"}`;
    case "progress":
      return `${Math.round((data.fraction ?? 0) * 100)}%${data.message ? ` ${data.message}` : ""}`;
    case "position":
      return `position ${data.position} of ${data.queued}${data.reason ? `: ${data.reason}` : ""}`;
    case "cost":
      return `${data.service}: ${money(data.usd)} (${data.ok ? "ok" : "failed"}), job total ${money(data.job_usd)}`;
    default:
      return JSON.stringify(data);
  }
}
