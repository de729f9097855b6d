// The dashboard: log in with a token, then one page at a time, chosen by the URL's hash
// (#/jobs, #/jobs/42, ...). Each page reads the HTTP API and follows its live streams; while
// the tab is hidden the streams stop, and the page catches up when it is shown again.

import { ApiError, get, token } from "./api.js";
import { fill, h } from "./dom.js";
import { LiveStream } from "./live.js";
import * as breakers from "./pages/breakers.js";
import * as budget from "./pages/budget.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as overview from "./pages/overview.js";
import * as users from "./pages/users.js";

const TOKEN_GONE = "Your token is no longer valid: replaced, revoked, or its user disabled.";
const PAGES = { overview, jobs, job, breakers, budget, users };
const view = document.getElementById("view");
const nav = document.getElementById("nav");
const liveState = document.getElementById("live");

/** What the page in view may use: who is logged in, live streams, actions. */
class App {
  constructor(session) {
    this.session = session;
    this.streams = [];
    this.refreshers = [];
  }

  get operator() {
    return this.session.operator;
  }

  /** Follow an SSE stream while this page is shown (and the tab visible). */
  live(path, onEvent, options = {}) {
    const stream = new LiveStream(path, onEvent, {
      onState: (state) => showLiveState(state),
      ...options,
    });
    this.streams.push(stream);
    if (!document.hidden) stream.start();
    return stream;
  }

  /** Call `load` again after events of every job (those `wanted` keeps), at most once in
   * `everyMs`, and when the tab is shown again: for pages that show figures, not events. */
  reloadOnEvents(load, { everyMs = 1000, wanted = () => true } = {}) {
    let timer = null;
    const reloadSoon = () => {
      timer ??= setTimeout(() => { timer = null; load().catch(() => {}); }, everyMs);
    };
    this.live("/v1/events", (_name, event) => { if (wanted(event)) reloadSoon(); });
    this.onShown(reloadSoon);
  }

  /** Call `refresh` when the tab is shown again, to catch up what changed meanwhile. */
  onShown(refresh) {
    this.refreshers.push(refresh);
  }

  pause() {
    for (const stream of this.streams) stream.stop();
  }

  resume() {
    for (const stream of this.streams) stream.start();
    for (const refresh of this.refreshers) refresh();
  }

  close() {
    for (const stream of this.streams) stream.close();
    this.streams = [];
    this.refreshers = [];
  }

  /** Run an operator's action from a button; its refusal is shown, not thrown. */
  async act(button, action, done) {
    button.disabled = true;
    try {
      await action();
      say(`${button.textContent}: done`);
      await done?.();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) say(describe(error), true);
    } finally {
      button.disabled = false;
    }
  }
}

let app = null;

/** An error as a person reads it, with the error_id that finds it in the log. */
export function describe(error) {
  if (error instanceof ApiError) {
    return `${error.message} (${error.code}${error.errorId ? `, error ${error.errorId}` : ""})`;
  }
  return `Cannot reach the daemon: ${error.message}`;
}

/** A short message in the page's notice area, read out by screen readers. */
export function say(message, isError = false) {
  const notice = document.getElementById("notice");
  if (notice) fill(notice, h("p", { class: isError ? "error" : "ok" }, message));
}

function showLiveState(state) {
  const words = { live: "● live", reconnecting: "reconnecting…", paused: "paused", ended: "" };
  liveState.textContent = words[state] || "";
  liveState.dataset.state = state;
}

function route() {
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = Object.fromEntries(new URLSearchParams(search));
  if (parts[0] === "jobs" && parts[1]) return { page: "job", id: parts[1], params };
  if (parts[0] in PAGES) return { page: parts[0], params };
  return { page: "overview", params };
}

async function show() {
  app?.close();
  const session = app?.session;
  app = new App(session);
  let { page, id, params } = route();
  if (!session.operator && PAGES[page].operatorOnly) page = "jobs";
  for (const link of nav.querySelectorAll("a")) {
    const current = link.dataset.page === page || (page === "job" && link.dataset.page === "jobs");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const module = PAGES[page];
  document.title = `${module.title} · jobwarden`;
  const body = h("div", { class: "page" });
  fill(view, h("div", { id: "notice", role: "status", "aria-live": "polite" }), body);
  try {
    await module.mount(body, { id, params }, app);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      fill(body, h("p", { class: "error" }, describe(error)));
    }
  }
}

function login(message = "") {
  app?.close();
  app = null;
  nav.hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  showLiveState("");
  document.title = "Log in · jobwarden";
  const input = h("input", {
    id: "token", name: "token", type: "password", autocomplete: "current-password",
    required: true, "aria-describedby": "token-help",
  });
  const problem = h("p", { id: "login-problem", class: "error", role: "alert" }, message);
  const form = h("form", { class: "login", onsubmit: async (event) => {
    event.preventDefault();
    token.set(input.value.trim());
    try {
      await start();
    } catch (error) {
      token.clear();
      problem.textContent = error instanceof ApiError && error.status === 401
        ? "That token is not valid: unknown, replaced, or its user is disabled."
        : describe(error);
    }
  } },
  h("h1", {}, "Log in"),
  h("label", { for: "token" }, "Token"),
  input,
  h("p", { id: "token-help", class: "help" },
    "A user token (from `jobwarden users add`) shows your own jobs; an operator token ",
    "(from `jobwarden tokens add --operator NAME`) shows everything. It is kept in this tab only."),
  h("button", { type: "submit" }, "Log in"),
  problem);
  fill(view, form);
  input.focus();
}

function logout(message) {
  token.clear();
  login(message);
}

async function start() {
  const session = await get("/ui/api/session");
  app = new App(session);
  nav.hidden = false;
  for (const link of nav.querySelectorAll("[data-operator]")) link.hidden = !session.operator;
  document.getElementById("who").textContent = session.operator ? "operator" : `user ${session.name}`;
  document.getElementById("logout").hidden = false;
  await show();
}

document.getElementById("logout").addEventListener("click", () => logout("Logged out."));
window.addEventListener("hashchange", () => { if (app) show(); });
// A token refused anywhere once logged in (replaced, revoked, its user disabled): log in again.
window.addEventListener("jobwarden:token-refused", () => { if (app) logout(TOKEN_GONE); });
document.addEventListener("visibilitychange", () => {
  if (!app) return;
  if (document.hidden) app.pause();
  else app.resume();
});

if (token.get()) {
  start().catch((error) => {
    if (error instanceof ApiError && error.status === 401) logout(TOKEN_GONE);
    else login(describe(error));
  });
} else {
  login();
}
