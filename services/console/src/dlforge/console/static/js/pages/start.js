// Start a run: a zip upload or a folder on the server, the project, the spec and every pipeline
// option. The spec and option fields are built from the API's own schema (/openapi.json
// components Spec and PipelineOptions): defaults, bounds and help texts cannot drift from the code.
import { api } from "../api.js";
import { h } from "../dom.js";
import { roleIn } from "../roles.js";

/** The schema of a field without its null branch, and whether null is allowed. */
function plain(prop) {
  if (!prop.anyOf) return { schema: prop, nullable: false };
  const nonNull = prop.anyOf.filter((x) => x.type !== "null");
  return { schema: { ...prop, ...nonNull[0] }, nullable: nonNull.length < prop.anyOf.length };
}

function boundsText(schema) {
  const parts = [];
  if (schema.minimum !== undefined) parts.push(`≥ ${schema.minimum}`);
  if (schema.exclusiveMinimum !== undefined) parts.push(`> ${schema.exclusiveMinimum}`);
  if (schema.maximum !== undefined) parts.push(`≤ ${schema.maximum}`);
  if (schema.exclusiveMaximum !== undefined) parts.push(`< ${schema.exclusiveMaximum}`);
  if (schema.maxLength !== undefined) parts.push(`at most ${schema.maxLength} characters`);
  return parts.join(", ");
}

/**
 * One input per property of a JSON schema object; returns {element, read(), showErrors(map)}.
 * read() gives the values that differ from "empty" (numbers as numbers, booleans, null when cleared).
 */
export function schemaFields(schemaObj, prefix, { overrides = {} } = {}) {
  const rows = [];
  const inputs = {};
  const errs = {};
  for (const [name, raw] of Object.entries(schemaObj.properties || {})) {
    const { schema, nullable } = plain(raw);
    const id = `${prefix}-${name}`;
    const title = raw.title || schema.title || name;
    const value = overrides[name] !== undefined ? overrides[name] : raw.default;
    let input;
    if (schema.type === "boolean") {
      input = h("input", { id, name, type: "checkbox", checked: value === true });
    } else if (schema.type === "integer" || schema.type === "number") {
      const min = schema.minimum ?? schema.exclusiveMinimum;
      input = h("input", {
        id, name, type: "number", inputmode: schema.type === "integer" ? "numeric" : "decimal",
        min, max: schema.maximum ?? schema.exclusiveMaximum,
        step: schema.type === "integer" ? 1 : "any",
        value: value === null || value === undefined ? "" : value,
        required: !nullable,
        placeholder: nullable ? "none" : null,
      });
    } else {
      input = h("input", { id, name, type: "text", value: value ?? "", maxlength: schema.maxLength,
        placeholder: nullable ? "none" : null });
    }
    input.dataset.kind = schema.type;
    input.dataset.nullable = String(nullable);
    inputs[name] = input;
    errs[name] = h("span", { class: "error field-error", id: `${id}-error`, role: "alert" });
    const bounds = boundsText(schema);
    const shownDefault = raw.default === null || raw.default === undefined ? "none" : raw.default;
    const help = [raw.description, `(${bounds ? `${bounds}; ` : ""}default ${shownDefault})`]
      .filter(Boolean).join(" ");
    rows.push(h("div", { class: "field" },
      h("label", { for: id }, title),
      input,
      h("small", { class: "muted help wrap", id: `${id}-help` }, help),
      errs[name]));
    input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
  }
  return {
    element: h("div", { class: "fields" }, rows),
    inputs,
    read() {
      const out = {};
      for (const [name, input] of Object.entries(inputs)) {
        const kind = input.dataset.kind;
        if (kind === "boolean") { out[name] = input.checked; continue; }
        const text = input.value.trim();
        if (text === "") { if (input.dataset.nullable === "true") out[name] = null; continue; }
        out[name] = kind === "integer" || kind === "number" ? Number(text) : text;
      }
      return out;
    },
    showErrors(byField) {
      for (const [name, span] of Object.entries(errs)) span.textContent = byField[name] || "";
    },
  };
}

/** The API's schemas of the spec and the options (/openapi.json components). */
export async function runSchemas() {
  const doc = await api("/openapi.json");
  const schemas = doc?.components?.schemas || {};
  if (!schemas.Spec || !schemas.PipelineOptions) throw new Error("the API's schema has no Spec or PipelineOptions");
  return { spec: schemas.Spec, options: schemas.PipelineOptions };
}

/** Server errors (ErrorBody) split by field: {spec: {name: msg}, options: {...}, other: [msg]}. */
export function fieldErrors(body) {
  const out = { spec: {}, options: {}, other: [] };
  for (const e of body?.errors || []) {
    const loc = (e.loc || []).filter((x) => x !== "body");
    if ((loc[0] === "spec" || loc[0] === "options") && loc.length > 1) out[loc[0]][loc[1]] = e.msg;
    else out.other.push(`${loc.join(".") || "request"}: ${e.msg}`);
  }
  return out;
}

export async function render(root) {
  const { spec, options } = await runSchemas();
  const error = h("div", { class: "error", id: "start-error", role: "alert" });
  const status = h("p", { class: "muted", id: "start-status", role: "status" });
  const specFields = schemaFields(spec, "spec");
  const optionFields = schemaFields(options, "opt");

  const zipRadio = h("input", { type: "radio", name: "source", id: "source-zip", value: "zip", checked: true });
  const folderRadio = h("input", { type: "radio", name: "source", id: "source-folder", value: "folder" });
  const file = h("input", { type: "file", id: "zip", name: "file", accept: ".zip,application/zip" });
  const folder = h("input", { type: "text", id: "folder", name: "folder", placeholder: "/data/images/line-3",
    maxlength: 4096, disabled: true });
  const project = h("input", { type: "text", id: "project", name: "project", value: "default", required: true,
    maxlength: 64, pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" });
  const name = h("input", { type: "text", id: "name", name: "name", maxlength: 200, placeholder: "(the zip's or folder's name)" });
  const classes = h("input", { type: "text", id: "classes", name: "classes", maxlength: 20000, placeholder: "defect, good" });
  const roleNote = h("small", { class: "muted help", id: "project-role" });
  const showRole = () => {
    const role = roleIn(project.value.trim());
    roleNote.textContent = role === "operator" || role === "admin" ? ""
      : `You are ${role ? `${role}` : "not a member"} in this project; starting a run needs the operator role.`;
  };
  project.addEventListener("input", showRole);
  showRole();
  const sync = () => { file.disabled = !zipRadio.checked; folder.disabled = !folderRadio.checked; };
  zipRadio.addEventListener("change", sync);
  folderRadio.addEventListener("change", sync);
  const submit = h("button", { type: "submit", id: "start" }, "Start the run");

  const form = h("form", { id: "start-form", class: "card" },
    h("fieldset", {},
      h("legend", {}, "Images"),
      h("div", { class: "field" }, h("label", { for: "source-zip" }, zipRadio, " Upload a zip"), file),
      h("div", { class: "field" }, h("label", { for: "source-folder" }, folderRadio, " A folder on the server"), folder,
        h("small", { class: "muted help" },
          "Only folders inside the server's import roots (setting DLFORGE_LABELER_IMPORT_ROOTS) can be read."))),
    h("fieldset", {},
      h("legend", {}, "Run"),
      h("div", { class: "field" }, h("label", { for: "project" }, "Project"), project,
        h("small", { class: "muted help" }, "The project the data set and the run belong to."), roleNote),
      h("div", { class: "field" }, h("label", { for: "name" }, "Name"), name),
      h("div", { class: "field" }, h("label", { for: "classes" }, "Classes"), classes,
        h("small", { class: "muted help" }, "The class names, comma-separated, when the images do not name them "
          + "(class folders or a labels.csv do); people label with these."))),
    h("fieldset", {}, h("legend", {}, "Spec: what the model must do"), specFields.element),
    h("details", {}, h("summary", {}, "Pipeline options (defaults suit most runs)"), optionFields.element),
    h("div", { class: "actions" }, submit, status),
    error);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.replaceChildren();
    specFields.showErrors({});
    optionFields.showErrors({});
    const specValue = specFields.read();
    const optionValue = optionFields.read();
    const fd = new FormData();
    if (zipRadio.checked) {
      if (!file.files.length) { error.textContent = "Choose a zip file to upload (or pick a folder on the server)."; return; }
      fd.append("file", file.files[0], file.files[0].name);
    } else {
      if (!folder.value.trim()) { error.textContent = "Give the folder's path on the server."; return; }
      fd.append("folder", folder.value.trim());
    }
    fd.append("project", project.value.trim());
    if (name.value.trim()) fd.append("name", name.value.trim());
    const classList = classes.value.split(",").map((c) => c.trim()).filter(Boolean);
    if (classList.length) fd.append("classes", JSON.stringify(classList));
    fd.append("spec", JSON.stringify(specValue));
    fd.append("options", JSON.stringify(optionValue));
    submit.disabled = true;
    status.textContent = zipRadio.checked ? "Uploading…" : "Reading the folder…";
    try {
      const out = await api("/labeler/datasets", { method: "POST", form: fd });
      status.textContent = `Started run ${out.run_id}`;
      location.hash = `#/runs/${encodeURIComponent(out.run_id)}`;
    } catch (err) {
      status.textContent = "";
      const byField = fieldErrors(err.body);
      specFields.showErrors(byField.spec);
      optionFields.showErrors(byField.options);
      if (Object.keys(byField.options).length) form.querySelector("details").open = true;
      // through h(): a missing part is skipped (Element.append would write "null")
      error.append(h("div", {}, h("p", { class: "status-code" }, `${err.status ? `${err.status}: ` : ""}${err.message}`),
        byField.other.length ? h("ul", {}, byField.other.map((m) => h("li", {}, m))) : null));
    } finally {
      submit.disabled = false;
    }
  });

  root.append(h("h1", {}, "Start a run"), form);
}
