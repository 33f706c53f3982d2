// The operator port's API as the console calls it: same origin, the session cookie, and the
// X-JT808-Console header on every state-changing request (the server refuses a cookie-borne
// write without it, so another site cannot forge one).

// The console is served at <base>/console/: the API lives at <base>/.
const BASE = new URL("../", new URL(".", location.href));

export function apiUrl(path, params) {
  const url = new URL(path.replace(/^\//, ""), BASE);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  return url.toString();
}

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body === "object" ? body.detail || body.error : body;
    super(`${status}${detail ? `: ${detail}` : ""}`);
    this.status = status;
    this.body = body;
  }

  /** The server's list of problems (400 invalid), or the message. */
  get problems() {
    const problems = this.body && this.body.problems;
    return Array.isArray(problems) && problems.length ? problems.map(String) : [this.message];
  }
}

let onUnauthorized = null;

/** Called once the server answers 401 to anything but the session probe. */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export async function api(path, { method = "GET", body, params, quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-JT808-Console"] = "1";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl(path, params), {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    if (response.status === 401 && !quiet401 && onUnauthorized) onUnauthorized();
    throw new ApiError(response.status, data);
  }
  return data;
}

/**
 * An EventSource on the API with named-event handlers; reconnects on its own (EventSource
 * does, sending Last-Event-ID), and reports its state to onState("live" | "connecting").
 */
export function eventStream(path, params, handlers, onState) {
  const source = new EventSource(apiUrl(path, params), { withCredentials: true });
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch {
        return; // a comment or a malformed event: nothing to show
      }
      fn(data, event);
    });
  }
  if (onState) {
    source.addEventListener("open", () => onState("live"));
    source.addEventListener("error", () => onState(source.readyState === EventSource.CLOSED ? "closed" : "connecting"));
  }
  return source;
}
