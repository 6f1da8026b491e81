// The console's router: #/path -> a page module's render(root, params, query). A page may return a
// function that undoes what it started (streams, key handlers); it runs when the page is left.
import { currentUser, signOut, token } from "./api.js";
import { clear, h } from "./dom.js";

const ROUTES = [
  [/^\/signin$/, "signin", []],
  [/^\/runs$/, "runs", []],
  [/^\/runs\/new$/, "start", []],
  [/^\/runs\/([^/]+)$/, "run", ["runId"]],
  [/^\/runs\/([^/]+)\/report$/, "report", ["runId"]],
  [/^\/label\/([^/]+)$/, "label", ["datasetId"]],
  [/^\/model\/([^/]+)$/, "model", ["datasetId"]],
];

let leave = null;

function parse(hash) {
  const raw = hash.replace(/^#/, "") || "/runs";
  const [path, queryString] = raw.split("?");
  return { path, query: new URLSearchParams(queryString || "") };
}

function renderNav() {
  const nav = clear(document.getElementById("nav"));
  const who = clear(document.getElementById("who"));
  const user = currentUser();
  if (!user) return;
  nav.append(h("a", { href: "#/runs" }, "Runs"), h("a", { href: "#/runs/new" }, "Start a run"));
  who.append(h("span", { class: "user" }, user.name), " ",
    h("button", { type: "button", class: "link", id: "signout", onclick: () => { signOut(); location.hash = "#/signin"; } }, "Sign out"));
}

async function route() {
  if (leave) { try { leave(); } catch (err) { console.error(err); } leave = null; }
  const { path, query } = parse(location.hash);
  const root = clear(document.getElementById("page"));
  if (!token() && path !== "/signin") {
    location.hash = `#/signin?next=${encodeURIComponent(location.hash || "#/runs")}`;
    return;
  }
  renderNav();
  for (const [pattern, name, keys] of ROUTES) {
    const m = path.match(pattern);
    if (!m) continue;
    const params = Object.fromEntries(keys.map((k, i) => [k, decodeURIComponent(m[i + 1])]));
    document.body.dataset.page = name;
    try {
      const module = await import(`./pages/${name}.js`);
      leave = (await module.render(root, params, query)) || null;
    } catch (err) {
      root.append(h("p", { class: "error" }, `This page failed: ${err.message}`));
      console.error(err);
    }
    return;
  }
  root.append(h("p", { class: "error" }, `No page ${path}`));
}

window.addEventListener("hashchange", route);
route();
