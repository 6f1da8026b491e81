import { api } from "../api.js";
import { clear, fmtSeconds, fmtTime, h, s } from "../dom.js";

const STAGES = ["labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer"];
const STATE_FILL = { pending: "#eef0f3", running: "#2457c5", succeeded: "#1f7a3a", failed: "#b3261e", cancelled: "#8c8c8c" };

function seconds(run) {
  const end = run.state === "running" ? Date.now() : Date.parse(run.updated_at);
  return (end - Date.parse(run.started_at)) / 1000;
}

function currentStage(run) {
  const running = STAGES.filter((st) => run.stages?.[st]?.state === "running");
  return running.length ? running.join(", ") : "";
}

/** Six small squares, one per stage, colored by its state (each with its name, state and seconds). */
function stageStrip(run) {
  const svg = s("svg", { width: 6 * 16, height: 14, class: "strip", role: "img", "aria-label": "stages" });
  STAGES.forEach((name, i) => {
    const st = run.stages?.[name] || { state: "pending" };
    svg.append(s("rect", { x: i * 16, y: 1, width: 13, height: 12, rx: 2, fill: STATE_FILL[st.state] || STATE_FILL.pending,
      stroke: "#b8bec9", "data-stage": name, "data-state": st.state },
    s("title", {}, `${name}: ${st.state}${typeof st.seconds === "number" ? `, ${fmtSeconds(st.seconds)}` : ""}`)));
  });
  return svg;
}

function table(runs) {
  const rows = runs.map((run) => h("tr", { "data-run": run.run_id },
    h("td", { class: "mono" }, h("a", { href: `#/runs/${encodeURIComponent(run.run_id)}` }, run.run_id.slice(0, 12))),
    h("td", {}, run.project ?? ""),
    h("td", { class: "mono" }, run.dataset_id ?? ""),
    h("td", {}, h("span", { class: `state ${run.state}` }, run.state)),
    h("td", {}, stageStrip(run), " ", currentStage(run)),
    h("td", {}, fmtTime(run.started_at)),
    h("td", { class: "num" }, fmtSeconds(seconds(run))),
    h("td", {}, run.spec_met === true ? "met" : run.spec_met === false ? "not met" : "")));
  return h("table", { id: "runs" },
    h("thead", {}, h("tr", {}, ["Run", "Project", "Dataset", "State", "Stages", "Started", "Time", "Spec"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

export async function render(root, _params, query) {
  const filter = h("select", { id: "state-filter", "aria-label": "state" },
    ["", "running", "succeeded", "failed", "cancelled"].map((st) =>
      h("option", { value: st, selected: (query.get("state") || "") === st }, st || "every state")));
  const list = h("div", { id: "runs-list" });
  const error = h("p", { class: "error", role: "alert" });
  let timer = null;

  async function load() {
    const state = filter.value;
    try {
      const runs = await api(`/runs?limit=200${state ? `&state=${encodeURIComponent(state)}` : ""}`);
      error.textContent = "";
      clear(list).append(runs.length ? table(runs) : h("p", { class: "muted" }, state ? `No ${state} runs.` : "No runs yet."));
      // while a run is running its row changes: refresh the list until none is
      clearTimeout(timer);
      if (runs.some((r) => r.state === "running")) timer = setTimeout(load, 5000);
    } catch (err) {
      error.textContent = `${err.status ? `${err.status}: ` : ""}${err.message}`;
    }
  }
  filter.addEventListener("change", () => {
    history.replaceState(null, "", filter.value ? `#/runs?state=${filter.value}` : "#/runs");
    load();
  });
  root.append(
    h("h1", {}, "Runs"),
    h("div", { class: "actions" }, h("a", { href: "#/runs/new", class: "button" }, "Start a run"), h("label", {}, "Show ", filter)),
    error, list);
  await load();
  return () => clearTimeout(timer);
}
