// The console's only way to the server: the same /v1 API every client uses, with the API key in
// the Authorization header. The key lives in sessionStorage (this tab only, gone when it closes),
// never in a URL, a cookie or a log; requests carry no cookies and no referrer.

const KEY_NAME = "raydb.apiKey";
// The console is served at <prefix>/ui/, the API at <prefix>/v1/…: resolve API paths from there.
const API_ROOT = new URL("../", document.baseURI);
const MAX_RETRIES = 3; // for 429/503 with Retry-After: the request was not carried out

export const session = {
  get key() { return sessionStorage.getItem(KEY_NAME); },
  set key(value) { sessionStorage.setItem(KEY_NAME, value); },
  clear() { sessionStorage.removeItem(KEY_NAME); },
};

let onUnauthorized = () => {};
/** Called (once per 401) when the server no longer accepts the key: the app signs out. */
export function whenUnauthorized(callback) { onUnauthorized = callback; }

/**
 * FastAPI's error detail as text: a string, or a list of {loc: ["body", field], msg}.
 * Returns {message, fields: {field: msg}}.
 */
export function describe(detail) {
  if (typeof detail === "string") return {message: detail, fields: {}};
  if (Array.isArray(detail)) {
    const fields = {};
    const parts = detail.map((d) => {
      const loc = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body") : [];
      const name = loc.length ? String(loc[0]) : "";
      if (name) fields[name] = fields[name] ? `${fields[name]}; ${d.msg}` : String(d.msg);
      return name ? `${loc.join(".")}: ${d.msg}` : String(d.msg);
    });
    return {message: parts.join("; "), fields};
  }
  return {message: detail === undefined ? "" : JSON.stringify(detail), fields: {}};
}

export class ApiError extends Error {
  constructor(status, detail) {
    const {message, fields} = describe(detail);
    super(message || `HTTP ${status}`);
    this.status = status;
    this.fields = fields;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * fetch() against the API: path relative to the API root ("v1/subjects"). `json` or `form` is the
 * body. 429 and 503 with Retry-After are retried (the server did not carry them out); any other
 * non-2xx becomes an ApiError with the server's message.
 */
export async function request(method, path, {json, form, headers = {}, signal} = {}) {
  const init = {method, signal, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
    headers: {...headers}};
  if (session.key) init.headers.Authorization = `Bearer ${session.key}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets multipart/form-data with its boundary
  }
  for (let attempt = 0; ; attempt++) {
    const resp = await fetch(new URL(path, API_ROOT), init);
    const retryAfter = Number(resp.headers.get("Retry-After"));
    if ((resp.status === 429 || resp.status === 503) && retryAfter > 0 && attempt < MAX_RETRIES) {
      await sleep(Math.min(retryAfter, 10) * 1000);
      continue;
    }
    if (resp.ok) return resp;
    let detail;
    try { detail = (await resp.json()).detail; } catch { detail = resp.statusText; }
    if (resp.status === 401) onUnauthorized();
    throw new ApiError(resp.status, detail);
  }
}

export async function getJSON(path, options) {
  return (await request("GET", path, options)).json();
}

/** A binary resource (an image, an adapter file) as a Blob. */
export async function getBlob(path, options) {
  return (await request("GET", path, options)).blob();
}

/** 16 random bytes as hex: an Idempotency-Key (crypto.randomUUID needs a secure context). */
export function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A random seed in [0, 2^31): the same for every model of one comparison. */
export function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0] >>> 1;
}

/** Base64 PNG bytes from a JSON response as a Blob. */
export function pngBlob(base64) {
  const raw = atob(base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], {type: "image/png"});
}

/** Path segment for an id (ids are [A-Za-z0-9_.-], but never trust that here). */
export const seg = (value) => encodeURIComponent(String(value));
