import { api } from "../api.js";
import { fmtSeconds, fmtTime, h } from "../dom.js";

const STAGES = ["labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer"];

function seconds(run) {
  const end = run.state === "running" ? Date.now() : Date.parse(run.updated_at);
  return (end - Date.parse(run.started_at)) / 1000;
}

function currentStage(run) {
  const running = STAGES.filter((s) => run.stages?.[s]?.state === "running");
  return running.length ? running.join(", ") : "";
}

export async function render(root) {
  const runs = await api("/runs?limit=200");
  const rows = runs.map((run) => h("tr", { "data-run": run.run_id },
    h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.run_id)}` }, run.run_id.slice(0, 12))),
    h("td", {}, run.project ?? ""),
    h("td", {}, run.dataset_id ?? ""),
    h("td", {}, h("span", { class: `state ${run.state}` }, run.state)),
    h("td", {}, currentStage(run)),
    h("td", {}, fmtTime(run.started_at)),
    h("td", { class: "num" }, fmtSeconds(seconds(run))),
    h("td", {}, run.spec_met === true ? "met" : run.spec_met === false ? "not met" : "")));
  root.append(
    h("h1", {}, "Runs"),
    h("p", {}, h("a", { href: "#/runs/new" }, "Start a run")),
    runs.length ? h("table", { id: "runs" },
      h("thead", {}, h("tr", {}, ["Run", "Project", "Dataset", "State", "Stage", "Started", "Time", "Spec"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)) : h("p", { class: "muted" }, "No runs yet."));
}
