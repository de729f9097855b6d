// The dashboard's one way to the daemon: the HTTP API with the token the person logged in
// with, kept in this tab's sessionStorage (it goes when the tab closes) and sent as a Bearer
// header, never as a cookie, so no other site can make the browser act with it.

const TOKEN_KEY = "jobwarden.token";

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || `HTTP_${status}`;
    this.errorId = body.error_id || "";
    this.retryAfter = body.retry_after;
  }
}

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** Tell the page the token was refused (401): wherever that happens, the person logs in again. */
export function tokenRefused() {
  window.dispatchEvent(new Event("jobwarden:token-refused"));
}

export function headers(extra = {}) {
  return { Authorization: `Bearer ${token.get()}`, ...extra };
}

/** The JSON answer to `method path`, or an ApiError in the common error shape. */
export async function call(method, path, body) {
  const init = { method, headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text.slice(0, 200) };
  }
  if (response.status === 401) tokenRefused();
  if (!response.ok) throw new ApiError(response.status, data.error || data);
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body = {}) => call("POST", path, body);

/** A query string of the parameters that have a value. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
