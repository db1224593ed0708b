// Building the page from data. Every string a tenant or the server supplies (subject ids, prompts,
// error messages) enters the document as text — a text node or an attribute value — never as HTML:
// no module of the console parses a string as markup (tests/serving/test_console.py greps for the
// APIs that would), and the Content-Security-Policy forbids inline script besides.

const URL_ATTRIBUTES = new Set(["href", "src"]);

/** A safe URL for href/src: an in-page route ("#/…") or an object URL we made ("blob:…"). */
function checkedUrl(name, value) {
  const text = String(value);
  if (name === "href" && text.startsWith("#")) return text;
  if (text.startsWith("blob:")) return text;
  throw new Error(`refusing ${name}=${JSON.stringify(text)}: only #routes and blob: URLs`);
}

/**
 * el("p", {class: "hint", id: "x"}, "text", otherNode) -> <p class="hint" id="x">text…</p>.
 * Attributes: null/undefined/false are left out, true sets an empty attribute. Children: nodes, or
 * anything else as text. Event handlers are added with addEventListener, never as attributes.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (/^on/i.test(name)) throw new Error(`event handler attribute ${name}: use addEventListener`);
    if (name === "class") node.className = value;
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, URL_ATTRIBUTES.has(name) ? checkedUrl(name, value) : String(value));
  }
  append(node, children);
  return node;
}

/** Append children (nodes, or text for anything else; null/false skipped). */
export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace a node's children. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** A definition list from [term, value] pairs (values that are null/undefined are left out). */
export function facts(pairs, attrs = {}) {
  const dl = el("dl", {class: "facts", ...attrs});
  for (const [term, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    dl.append(el("dt", {}, term), el("dd", {}, value));
  }
  return dl;
}

/**
 * A labelled form control with a hint and an error line, wired for assistive technology:
 * <label for=id>, aria-describedby -> hint and error. Returns {row, input, error}.
 */
export function field({id, label, input, hint}) {
  input.id = id;
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  input.setAttribute("aria-describedby", hint ? `${hintId} ${errorId}` : errorId);
  const error = el("p", {class: "field-error", id: errorId});
  const row = el("div", {class: "field"},
    el("label", {for: id}, label), input, hint ? el("p", {class: "hint", id: hintId}, hint) : null, error);
  return {row, input, error};
}

/** Show (or clear with "") a field's error and mark the control invalid. */
export function setFieldError(f, message) {
  f.error.textContent = message || "";
  if (message) f.input.setAttribute("aria-invalid", "true");
  else f.input.removeAttribute("aria-invalid");
}

/** Object URLs made for one view, revoked together when the view goes away. */
export class UrlBag {
  constructor() { this.urls = []; }
  add(blob) { const url = URL.createObjectURL(blob); this.urls.push(url); return url; }
  revokeAll() { for (const url of this.urls) URL.revokeObjectURL(url); this.urls = []; }
}

/** "12.3 s" / "4 min 05 s" / "1 h 02 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return null;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

/** A number for people: up to 4 significant digits, no exponent for ordinary values. */
export function num(value) {
  if (value === null || value === undefined || value === "") return null;
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e-3 && Math.abs(value) < 1e6 ? String(Number(value.toPrecision(4)))
    : value.toExponential(3);
}

/** "1.2 MB" */
export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}
