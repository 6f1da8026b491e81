import { api, signedIn } from "../api.js";
import { h } from "../dom.js";

export async function render(root, _params, query) {
  const error = h("p", { class: "error", role: "alert" });
  const name = h("input", { id: "username", name: "username", autocomplete: "username", required: true });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const form = h("form", { class: "card narrow", id: "signin" },
    h("h1", {}, "Sign in"),
    h("label", { for: "username" }, "User"), name,
    h("label", { for: "password" }, "Password"), password,
    h("button", { type: "submit" }, "Sign in"), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    try {
      const out = await api("/auth/login", { method: "POST", json: { username: name.value, password: password.value } });
      signedIn(out.token, out.user);
      const next = query.get("next");
      location.hash = next && next.startsWith("#/") && !next.startsWith("#/signin") ? next : "#/runs";
    } catch (err) {
      error.textContent = err.message;
    }
  });
  root.append(form);
  name.focus();
}
