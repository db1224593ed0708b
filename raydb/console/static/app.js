// The console's entry point: sign-in, navigation between the four pages, and the shared context
// (the caller's tenant and the server's limits from GET /v1/limits).
//
// Routes live in the URL fragment, so the server only ever serves /ui/ and the API:
//   #/subjects, #/subjects/<id>[/<version>], #/train[/<training id>], #/generate[/<subject id>],
//   #/export[/<id>[/<version>]]
// On every navigation the page's heading takes the focus, so keyboard and screen-reader users land
// at the top of the new page and Tab continues into it.

import {ApiError, getJSON, session, whenUnauthorized} from "./api.js";
import {el, field, replace, setFieldError} from "./dom.js";
import * as exportPage from "./export.js";
import * as generatePage from "./generate.js";
import * as subjectsPage from "./subjects.js";
import * as trainPage from "./train.js";

const PAGES = {
  subjects: {module: subjectsPage, title: "Subjects"},
  train: {module: trainPage, title: "Train"},
  generate: {module: generatePage, title: "Generate"},
  export: {module: exportPage, title: "Export"},
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let current = null; // {dispose()} of the page on screen
let limits = null; // GET /v1/limits of the signed-in key

function focusHeading() {
  const heading = main.querySelector("h2");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
}

function signOut(message) {
  session.clear();
  limits = null;
  showSignIn(message);
}

function showSignIn(message) {
  current?.dispose?.();
  current = null;
  nav.hidden = true;
  who.textContent = "";
  document.title = "Sign in · raydb console";
  const key = field({id: "api-key", label: "API key",
    input: el("input", {type: "password", name: "api-key", autocomplete: "off", spellcheck: "false",
      required: true}),
    hint: "Kept in this browser tab only (sessionStorage) and sent only in the Authorization header."});
  const button = el("button", {type: "submit", id: "sign-in"}, "Sign in");
  // method=post and CSP form-action 'none': even without this script the key never lands in a URL
  const form = el("form", {id: "sign-in-form", method: "post", novalidate: true},
    key.row, button);
  replace(main, el("section", {class: "page", "aria-labelledby": "sign-in-title"},
    el("h2", {id: "sign-in-title"}, "Sign in"),
    el("p", {}, "Paste the API key your operator gave you. Everything you see is your tenant's."),
    form));
  if (message) setFieldError(key, message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = key.input.value.trim();
    if (!value) return setFieldError(key, "Enter your API key.");
    button.disabled = true;
    session.key = value;
    try {
      limits = await getJSON("v1/limits");
    } catch (err) {
      session.clear();
      button.disabled = false;
      setFieldError(key, err instanceof ApiError && err.status === 401
        ? "The server did not accept this key." : `Could not reach the server: ${err.message}`);
      key.input.focus();
      return;
    }
    if (!location.hash || location.hash === "#" || location.hash.startsWith("#/sign-in")) {
      location.hash = "#/subjects"; // the hashchange renders it
    } else {
      route();
    }
  });
  key.input.focus();
}

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
  const name = PAGES[parts[0]] ? parts[0] : "subjects";
  return {name, args: PAGES[parts[0]] ? parts.slice(1) : []};
}

async function route() {
  if (!session.key) return showSignIn();
  if (!limits) {
    try {
      limits = await getJSON("v1/limits");
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return signOut("Please sign in again.");
      const retry = el("button", {type: "button", id: "retry"}, "Try again");
      retry.addEventListener("click", route);
      replace(main, el("section", {class: "page"}, el("h2", {}, "The server did not answer"),
        el("p", {class: "error", role: "alert"}, err.message), retry));
      return focusHeading();
    }
  }
  const {name, args} = parseRoute();
  current?.dispose?.();
  nav.hidden = false;
  who.textContent = limits.tenant ? `tenant ${limits.tenant}` : "no authentication";
  for (const link of nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].title} · raydb console`;
  const section = el("section", {class: "page", id: `page-${name}`});
  replace(main, section);
  const ctx = {limits, navigate: (hash) => { location.hash = hash; }};
  current = PAGES[name].module.render(section, args, ctx) || null;
  focusHeading();
}

whenUnauthorized(() => signOut("The server no longer accepts this key; sign in again."));
document.getElementById("sign-out").addEventListener("click", () => {
  signOut();
  history.replaceState(null, "", "#/sign-in");
});
window.addEventListener("hashchange", route);
route();
