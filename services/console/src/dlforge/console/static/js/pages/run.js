// One run, live: the six stages as a graph (or a timeline with the events under each stage), driven
// by the run's server-sent events; its artifacts, failure, trace link, and the triggers (cancel,
// retry a failed stage, re-run with changed options, delete).
import { api, stream } from "../api.js";
import { clear, fmtSeconds, fmtTime, h, s } from "../dom.js";
import { wrapLines } from "../charts.js";
import { can } from "../roles.js";
import { fieldErrors, runSchemas, schemaFields } from "./start.js";

export const STAGES = ["labeler", "augmenter", "proposer", "tuner", "trainer", "optimizer"];
const FINISHED = ["succeeded", "failed", "cancelled"];
const COLORS = {
  pending: ["#eef0f3", "#5d6677"], running: ["#dfe8fb", "#2457c5"], succeeded: ["#e4f4e8", "#1f7a3a"],
  failed: ["#fbe9e7", "#b3261e"], cancelled: ["#eef0f3", "#5d6677"],
};
// the stage an event belongs to (run.* events belong to the run itself)
const EVENT_STAGE = {
  "dataset.uploaded": "labeler", "labels.requested": "labeler", "labels.submitted": "labeler", "dataset.labeled": "labeler",
  "dataset.augmented": "augmenter", "model.proposed": "proposer", "hpo.trial": "tuner", "hpo.trial.completed": "tuner",
  "hpo.completed": "tuner", "model.trained": "trainer", "model.optimized": "optimizer",
};

function pct(x) {
  return typeof x === "number" ? `${(100 * x).toFixed(1)} %` : null;
}

/** Elapsed seconds of a stage: its own figure when finished, else since it started. */
export function stageSeconds(st, now = Date.now()) {
  if (!st || !st.started_at) return null;
  if (typeof st.seconds === "number") return st.seconds;
  const end = st.finished_at ? Date.parse(st.finished_at) : now;
  return Math.max(0, (end - Date.parse(st.started_at)) / 1000);
}

/** The few numbers shown under a stage's name (its summary and counters). */
export function stageFacts(name, st) {
  const sum = st?.summary || {};
  const out = [];
  if (name === "labeler") {
    if (sum.item_count !== undefined) out.push(`${sum.item_count} images`);
    if (st?.human_labels !== undefined) out.push(`${st.human_labels} labeled by people`);
    if (sum.auto_labels !== undefined) out.push(`${sum.auto_labels} auto-labeled`);
    if (st?.rounds) out.push(`round ${st.rounds}`);
    if (st?.state === "running" && st?.waiting_for_labels) out.push(`batch of ${st.waiting_for_labels} waits`);
  } else if (name === "augmenter") {
    const aug = Array.isArray(sum.augmentation) ? sum.augmentation : [];
    const generated = aug.reduce((a, x) => a + (x.kept ?? x.generated ?? 0), 0);
    if (aug.length) out.push(`${generated} samples added`);
  } else if (name === "proposer") {
    if (sum.chosen_model_id) out.push(String(sum.chosen_model_id));
  } else if (name === "tuner") {
    if (st?.trials_started !== undefined) out.push(`${st.trials_done ?? 0}/${st.trials_started} trials done`);
    const pruned = Object.values(st?.trial_states || {}).filter((x) => String(x).toLowerCase() === "pruned").length;
    if (pruned) out.push(`${pruned} pruned`);
    if (typeof sum.best_value === "number") out.push(`best val ${pct(sum.best_value)}`);
  } else if (name === "trainer") {
    const m = sum.metrics || {};
    const acc = m.val_accuracy ?? m.accuracy ?? m.test_accuracy;
    if (typeof acc === "number") out.push(`val acc ${pct(acc)}`);
    if (sum.no_of_workers) out.push(`${sum.no_of_workers} worker(s)`);
  } else if (name === "optimizer") {
    if (sum.chosen_variant) out.push(String(sum.chosen_variant));
    if (sum.spec_met !== undefined) out.push(sum.spec_met ? "spec met" : "spec not met");
  }
  return out;
}

/** The six stages as an SVG DAG, left to right, each box colored by its state. */
export function stageGraph(run, now = Date.now()) {
  const boxW = 170;
  const gap = 34;
  const boxH = 118;
  const width = STAGES.length * boxW + (STAGES.length - 1) * gap + 20;
  const svg = s("svg", { viewBox: `0 0 ${width} ${boxH + 20}`, width: "100%", role: "img", id: "stage-graph",
    "aria-label": "the run's stages" },
  s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#5d6677" }))));
  STAGES.forEach((name, i) => {
    const st = run.stages?.[name] || { state: "pending" };
    const [fill, stroke] = COLORS[st.state] || COLORS.pending;
    const x = 10 + i * (boxW + gap);
    const y = 10;
    if (i > 0) {
      svg.append(s("line", { x1: x - gap + 2, y1: y + boxH / 2, x2: x - 3, y2: y + boxH / 2, stroke: "#5d6677",
        "stroke-width": 1.5, "marker-end": "url(#arrow)" }));
    }
    const secs = stageSeconds(st, now);
    const g = s("g", { class: `stage ${st.state}`, "data-stage": name, "data-state": st.state },
      s("title", {}, `${name}: ${st.state}${secs !== null ? `, ${fmtSeconds(secs)}` : ""}${st.reason ? ` — ${st.reason}` : ""}`),
      s("rect", { x, y, width: boxW, height: boxH, rx: 8, fill, stroke, "stroke-width": st.state === "running" ? 3 : 1.5,
        class: st.state === "running" ? "pulse" : null }),
      s("text", { x: x + 10, y: y + 20, "font-weight": 700, "font-size": 14, fill: "#1d2330" }, name),
      s("text", { x: x + 10, y: y + 38, "font-size": 12, fill: stroke },
        s("tspan", { class: "stage-state", "font-weight": 600 }, st.state),
        s("tspan", { class: "stage-seconds", fill: "#5d6677" }, secs !== null ? ` · ${fmtSeconds(secs)}` : "")));
    let line = 0;
    for (const fact of stageFacts(name, st)) {
      for (const part of wrapLines(fact, 24)) {
        if (line >= 5) break;
        g.append(s("text", { x: x + 10, y: y + 56 + 13 * line, "font-size": 11.5, fill: "#1d2330", class: "fact" }, part));
        line += 1;
      }
    }
    svg.append(g);
  });
  return svg;
}

/** Per-stage rows: a time bar from started_at to finished_at (or now) over the run's span; events below. */
export function stageTimeline(run, now = Date.now()) {
  const t0 = Date.parse(run.started_at);
  const ends = STAGES.map((n) => run.stages?.[n]).filter((st) => st?.started_at)
    .map((st) => (st.finished_at ? Date.parse(st.finished_at) : now));
  const t1 = Math.max(t0 + 1000, ...(run.state === "running" ? [now] : []), ...ends, Date.parse(run.updated_at || run.started_at));
  const span = t1 - t0;
  const byStage = Object.fromEntries([...STAGES, "run"].map((n) => [n, []]));
  for (const ev of run.events || []) byStage[EVENT_STAGE[ev.type] || "run"].push(ev);
  const rows = [];
  for (const name of [...STAGES, "run"]) {
    const st = name === "run" ? { state: run.state, started_at: run.started_at } : (run.stages?.[name] || { state: "pending" });
    if (name === "run" && !byStage.run.length) continue;
    const bar = s("svg", { viewBox: "0 0 1000 16", preserveAspectRatio: "none", width: "100%", height: 16, class: "timebar" });
    if (name !== "run" && st.started_at) {
      const a = ((Date.parse(st.started_at) - t0) / span) * 1000;
      const b = (((st.finished_at ? Date.parse(st.finished_at) : now) - t0) / span) * 1000;
      const [fill, stroke] = COLORS[st.state] || COLORS.pending;
      bar.append(s("rect", { x: a, y: 1, width: Math.max(2, b - a), height: 14, fill, stroke, "vector-effect": "non-scaling-stroke" },
        s("title", {}, `${name}: ${fmtTime(st.started_at)} → ${st.finished_at ? fmtTime(st.finished_at) : "now"}`)));
    }
    for (const ev of byStage[name]) {
      const x = ((Date.parse(ev.occurred_at) - t0) / span) * 1000;
      bar.append(s("line", { x1: x, x2: x, y1: 0, y2: 16, stroke: "#1d2330", "stroke-width": 1, "vector-effect": "non-scaling-stroke" },
        s("title", {}, `${ev.type} at ${fmtTime(ev.occurred_at)}`)));
    }
    const secs = name === "run" ? null : stageSeconds(st, now);
    const counts = {};
    for (const ev of byStage[name]) counts[ev.type] = (counts[ev.type] || 0) + 1;
    rows.push(h("details", { class: "tl-row", "data-stage": name, open: st.state === "running" || st.state === "failed" },
      h("summary", {},
        h("span", { class: "tl-name" }, name),
        h("span", { class: `state ${st.state}` }, st.state),
        h("span", { class: "tl-secs num" }, secs !== null ? fmtSeconds(secs) : ""),
        h("span", { class: "tl-count muted small" }, `${byStage[name].length} event${byStage[name].length === 1 ? "" : "s"}`),
        h("span", { class: "tl-bar" }, bar)),
      st.reason ? h("p", { class: "error" }, st.reason) : null,
      byStage[name].length ? h("table", { class: "events" },
        h("tbody", {}, byStage[name].slice(-60).map((ev) => h("tr", {},
          h("td", { class: "num" }, `+${fmtSeconds((Date.parse(ev.occurred_at) - t0) / 1000)}`),
          h("td", {}, ev.type),
          h("td", { class: "muted" }, fmtTime(ev.occurred_at)))))) : h("p", { class: "muted" }, "no events yet"),
      byStage[name].length > 60 ? h("p", { class: "muted" },
        `showing the last 60 of ${byStage[name].length} events: ` +
        Object.entries(counts).map(([k, v]) => `${v} × ${k}`).join(", ")) : null));
  }
  return h("div", { id: "timeline" }, rows);
}

function artifactList(run) {
  const rows = [];
  for (const name of STAGES) {
    for (const [key, value] of Object.entries(run.stages?.[name]?.artifacts || {})) {
      rows.push(h("tr", {}, h("td", {}, name), h("td", {}, key), h("td", { class: "wrap mono" }, String(value))));
    }
  }
  return rows.length ? h("table", { id: "artifacts" }, h("thead", {}, h("tr", {}, h("th", {}, "Stage"), h("th", {}, "Artifact"), h("th", {}, "Key"))),
    h("tbody", {}, rows)) : h("p", { class: "muted" }, "No artifacts yet.");
}

/** The trace viewer's link for a trace id, from the configured template; only http(s) URLs. */
export function traceLink(template, traceId) {
  if (!template || !traceId) return null;
  const href = template.split("{trace_id}").join(encodeURIComponent(traceId));
  try {
    const url = new URL(href, location.href);
    if (url.protocol !== "http:" && url.protocol !== "https:") return null;
    return url.href;
  } catch {
    return null;
  }
}

export async function render(root, params) {
  const runId = params.runId;
  const base = `/runs/${encodeURIComponent(runId)}`;
  const here = location.hash;
  // a run just started (the form, a re-run) reaches the run view a moment after the 201: wait for it
  let run = null;
  const waiting = h("p", { class: "muted", id: "run-waiting" }, `Waiting for run ${runId} to start…`);
  for (let attempt = 0; run === null; attempt += 1) {
    try {
      run = await api(base);
    } catch (err) {
      if (err.status !== 404 || attempt >= 30) throw err;
      if (attempt === 0) root.append(waiting);
      await new Promise((resolve) => { setTimeout(resolve, 1000); });
      if (location.hash !== here) return null; // the person went elsewhere meanwhile
    }
  }
  waiting.remove();
  let config = {};
  try { config = await api("/console-config"); } catch { config = {}; }
  let view = sessionStorage.getItem("dlforge.runview") || "graph";
  let stopStream = null;
  let poll = null;
  let ticker = null;

  const title = h("h1", {}, "Run ", h("span", { class: "mono", id: "run-id" }, runId));
  const head = h("div", { id: "run-head" });
  const actions = h("div", { class: "actions", id: "run-actions" });
  const message = h("div", { class: "error", id: "run-message", role: "alert" });
  const live = h("p", { class: "muted small", id: "live" });
  const viewBox = h("div", { id: "run-view" });
  const graphBtn = h("button", { type: "button", id: "view-graph", class: "secondary", "aria-pressed": "true" }, "Graph");
  const treeBtn = h("button", { type: "button", id: "view-tree", class: "secondary", "aria-pressed": "false" }, "Timeline");
  const failure = h("div", { id: "failure" });
  const artifacts = h("div", {});
  const rerunBox = h("div", { id: "rerun", hidden: true });

  function drawView() {
    graphBtn.setAttribute("aria-pressed", String(view === "graph"));
    treeBtn.setAttribute("aria-pressed", String(view === "tree"));
    const openRows = new Set([...viewBox.querySelectorAll("details.tl-row[open]")].map((d) => d.dataset.stage));
    const closedRows = new Set([...viewBox.querySelectorAll("details.tl-row:not([open])")].map((d) => d.dataset.stage));
    clear(viewBox).append(view === "graph" ? stageGraph(run) : stageTimeline(run));
    for (const d of viewBox.querySelectorAll("details.tl-row")) {
      if (openRows.has(d.dataset.stage)) d.open = true;
      if (closedRows.has(d.dataset.stage)) d.open = false;
    }
  }
  graphBtn.addEventListener("click", () => { view = "graph"; sessionStorage.setItem("dlforge.runview", view); drawView(); });
  treeBtn.addEventListener("click", () => { view = "tree"; sessionStorage.setItem("dlforge.runview", view); drawView(); });

  async function act(label, fn) {
    message.textContent = "";
    try {
      await fn();
    } catch (err) {
      message.textContent = `${label}: ${err.status ? `${err.status} ` : ""}${err.message}`;
    }
  }

  function drawHead() {
    const total = ((run.state === "running" ? Date.now() : Date.parse(run.updated_at)) - Date.parse(run.started_at)) / 1000;
    const trace = traceLink(config.trace_url, run.trace_id);
    const lab = run.stages?.labeler;
    clear(head).append(h("dl", { class: "kv" },
      h("dt", {}, "State"), h("dd", {}, h("span", { class: `state ${run.state}`, id: "run-state" }, run.state),
        run.spec_met === true ? " · spec met" : run.spec_met === false ? " · spec not met" : ""),
      h("dt", {}, "Project"), h("dd", {}, run.project ?? "—"),
      h("dt", {}, "Data set"), h("dd", { class: "mono" }, run.dataset_id ?? "—"),
      h("dt", {}, "Started"), h("dd", {}, fmtTime(run.started_at)),
      h("dt", {}, "Time"), h("dd", { id: "run-time" }, fmtSeconds(total)),
      h("dt", {}, "Trace"), h("dd", { class: "mono" }, run.trace_id
        ? (trace ? h("a", { href: trace, target: "_blank", rel: "noopener noreferrer", id: "trace-link" }, run.trace_id) : run.trace_id)
        : "—"),
      run.cancelled ? [h("dt", {}, "Cancelled"), h("dd", { class: "wrap" }, run.cancelled.reason)] : null));
    const links = [];
    // the labeling page once the labeler has asked people for a batch (before, there is nothing to label)
    if (run.dataset_id && lab?.state === "running" && lab.waiting_for_labels) {
      links.push(h("a", { href: `#/label/${encodeURIComponent(run.dataset_id)}`, id: "label-link", class: "button" },
        `Label (round ${lab.rounds ?? 1})`));
    }
    if (run.stages?.optimizer?.state === "succeeded" || run.state === "succeeded") {
      links.push(h("a", { href: `#/runs/${encodeURIComponent(runId)}/report`, id: "report-link", class: "button" }, "Report"));
      if (run.dataset_id) links.push(h("a", { href: `#/model/${encodeURIComponent(run.dataset_id)}`, id: "model-link", class: "button" }, "Try the model"));
    }
    const buttons = [];
    if (run.state === "running") {
      buttons.push(h("button", { type: "button", id: "cancel", class: "danger", onclick: () => act("Cancel", async () => {
        await api(`${base}/cancel`, { method: "POST", json: { reason: "cancelled in the console" } });
      }) }, "Cancel"));
    }
    if (run.state === "failed") {
      buttons.push(h("button", { type: "button", id: "retry", onclick: () => act("Retry", async () => {
        await api(`${base}/retry`, { method: "POST" });
        restartStream();
      }) }, `Retry ${run.failure?.stage ?? "the failed stage"}`));
    }
    buttons.push(h("button", { type: "button", id: "rerun-open", class: "secondary", onclick: () => openRerun() }, "Re-run with changes…"));
    if (FINISHED.includes(run.state)) {
      buttons.push(h("button", { type: "button", id: "delete", class: "danger", onclick: () => act("Delete", async () => {
        if (!window.confirm(`Delete run ${runId} and everything it made?`)) return;
        await api(base, { method: "DELETE" });
        location.hash = "#/runs";
      }) }, "Delete"));
    }
    if (!can(run.project, "operator")) {
      // the server would answer 403: say why instead of offering the button
      for (const b of buttons) {
        b.disabled = true;
        b.title = `needs the operator role in project ${run.project ?? "default"}`;
      }
    }
    clear(actions).append(...links, ...buttons);
    clear(failure);
    if (run.failure) {
      failure.append(h("div", { class: "card failure" }, h("h2", {}, `Failed in ${run.failure.stage}`),
        h("p", { class: "error wrap", id: "failure-reason" }, run.failure.reason),
        h("p", { class: "muted" }, fmtTime(run.failure.at))));
    }
    clear(artifacts).append(artifactList(run));
  }

  async function openRerun() {
    if (!rerunBox.hidden) { rerunBox.hidden = true; return; }
    const { spec, options } = await runSchemas();
    const specFields = schemaFields(spec, "rerun-spec", { overrides: run.spec || {} });
    const optionFields = schemaFields(options, "rerun-opt", { overrides: run.options || {} });
    const err = h("div", { class: "error", role: "alert", id: "rerun-error" });
    const form = h("form", { class: "card", id: "rerun-form" },
      h("h2", {}, "Re-run on the same images"),
      h("p", { class: "muted" }, "A new run; this one stays as it is."),
      h("fieldset", {}, h("legend", {}, "Spec"), specFields.element),
      h("fieldset", {}, h("legend", {}, "Options"), optionFields.element),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "rerun-submit" }, "Start the new run"),
        h("button", { type: "button", class: "secondary", onclick: () => { rerunBox.hidden = true; } }, "Close")),
      err);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      try {
        const out = await api(`${base}/rerun`, { method: "POST", json: { spec: specFields.read(), options: optionFields.read() } });
        location.hash = `#/runs/${encodeURIComponent(out.run_id)}`;
      } catch (e) {
        const byField = fieldErrors(e.body);
        specFields.showErrors(byField.spec);
        optionFields.showErrors(byField.options);
        err.append(h("div", {}, h("p", {}, `${e.status ? `${e.status}: ` : ""}${e.message}`),
          byField.other.length ? h("ul", {}, byField.other.map((m) => h("li", {}, m))) : null));
      }
    });
    clear(rerunBox).append(form);
    rerunBox.hidden = false;
  }

  function update(doc) {
    run = doc;
    drawHead();
    drawView();
  }

  function startPolling(why) {
    if (poll) return;
    live.textContent = `Live updates stopped (${why}); refreshing every 3 s.`;
    poll = setInterval(async () => {
      try { update(await api(base)); } catch (err) { live.textContent = `Cannot refresh: ${err.message}`; }
      if (FINISHED.includes(run.state)) { clearInterval(poll); poll = null; live.textContent = `The run ${run.state}.`; }
    }, 3000);
  }

  function restartStream() {
    if (stopStream) stopStream();
    live.textContent = "Live";
    live.dataset.live = "true";
    stopStream = stream(`${base}/stream`, (name, data) => {
      if (name === "run") update(data);
      if (name === "end") { live.textContent = `The run ${run.state}.`; live.dataset.live = "false"; }
    }, (err) => startPolling(err.message), () => {
      if (!FINISHED.includes(run.state)) startPolling("the server closed the stream");
    });
  }

  // the running stage's seconds move while nothing else does
  ticker = setInterval(() => {
    if (run.state !== "running") return;
    const time = head.querySelector("#run-time");
    if (time) time.textContent = fmtSeconds((Date.now() - Date.parse(run.started_at)) / 1000);
    // only the running stages' seconds move: update their text, not the whole graph
    for (const g of viewBox.querySelectorAll("#stage-graph g.stage.running")) {
      const secs = stageSeconds(run.stages?.[g.dataset.stage]);
      const el = g.querySelector(".stage-seconds");
      if (el && secs !== null) el.textContent = ` · ${fmtSeconds(secs)}`;
    }
  }, 1000);

  root.append(title, head, actions, message, failure, rerunBox,
    h("div", { class: "toggle", role: "group", "aria-label": "view" }, graphBtn, treeBtn, live),
    h("div", { class: "card" }, viewBox),
    h("h2", {}, "Artifacts"), artifacts);
  update(run);
  restartStream();
  return () => {
    if (stopStream) stopStream();
    if (poll) clearInterval(poll);
    clearInterval(ticker);
  };
}
