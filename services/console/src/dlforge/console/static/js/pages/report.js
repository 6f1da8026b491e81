// A run's report: the verdict first with its reasons, then the figures as plots (labels per round,
// the learning curve, the operating curve with the spec's lines, per-class recall and precision, the
// confusion matrix, speed and size per variant, the trials) and the downloads.
import { api } from "../api.js";
import { barChart, heatmap, lineChart } from "../charts.js";
import { clear, fmtPct, fmtSeconds, h } from "../dom.js";

const VERDICT_TEXT = {
  met: "met with 95 % confidence: the intervals' lower bounds clear the targets",
  met_point_estimate: "met on the point estimates only: the 95 % intervals reach below the targets",
  not_met: "not met",
  failed: "the run failed: there is no model to check",
  cancelled: "the run was cancelled: there is no model to check",
};

function ci(iv) {
  if (!iv || iv.point === null || iv.point === undefined) return "—";
  const bounds = iv.low !== undefined && iv.high !== undefined ? ` [${(100 * iv.low).toFixed(1)}, ${(100 * iv.high).toFixed(1)}]` : "";
  const count = iv.k !== undefined && iv.n !== undefined ? ` (${iv.k}/${iv.n})` : "";
  return `${(100 * iv.point).toFixed(1)} %${bounds}${count}`;
}

function num(v, digits = 1) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "—";
}

/** The verdict: {met, reasons} from the server; older reports without it fall back to their spec check. */
export function verdictOf(report) {
  if (report.verdict && typeof report.verdict.met === "boolean") return report.verdict;
  const detail = report.spec_verdict_detail || {};
  return { met: Boolean(report.spec_met), reasons: detail.reasons || (report.failure ? [`${report.failure.stage}: ${report.failure.reason}`] : []) };
}

// the head line by the server's status: met on the point estimates alone is not "not met" (the optimizer's
// spec_met says met) nor "met" (the intervals do not all clear the spec)
const HEAD_TEXT = {
  met: "The spec is met with 95 % confidence",
  met_point_estimate: "The spec is met on the point estimates only",
  not_met: "The spec is not met",
};
const HEAD_CLASS = { met: "met", met_point_estimate: "partial", not_met: "unmet" };

function verdictBlock(report) {
  const v = verdictOf(report);
  const detail = report.spec_verdict_detail;
  const spec = report.spec || {};
  const specText = [
    spec.positive_class ? `recall of ${spec.positive_class} ≥ ${spec.min_recall}` : null,
    spec.min_accuracy ? `accuracy ≥ ${spec.min_accuracy}` : null,
    spec.min_fps ? `≥ ${spec.min_fps} images/s at ${spec.input_size} px` : null,
  ].filter(Boolean).join(", ");
  return h("section", { id: "verdict" },
    h("div", { class: `verdict ${HEAD_CLASS[v.status] || (v.met ? "met" : "unmet")}`, id: "verdict-head" },
      HEAD_TEXT[v.status] || (v.met ? "The spec is met" : "The spec is not met"),
      report.state && report.state !== "succeeded" ? ` — the run ${report.state}` : ""),
    specText ? h("p", {}, "Spec: ", specText) : null,
    (v.status || detail?.verdict) ? h("p", { id: "verdict-detail" }, "Verdict: ",
      VERDICT_TEXT[v.status || detail.verdict] || v.status || detail.verdict) : null,
    v.reasons?.length ? h("ul", { id: "verdict-reasons", class: "wrap" }, v.reasons.map((r) => h("li", {}, r))) : null,
    detail?.notes?.length ? h("ul", { class: "muted wrap" }, detail.notes.map((n) => h("li", {}, n))) : null,
    report.failure ? h("p", { class: "error wrap" }, `Failed in ${report.failure.stage}: ${report.failure.reason}`) : null);
}

function autoLabelText(report) {
  if (report.auto_label_coverage === null || report.auto_label_coverage === undefined) return null;
  if (report.auto_label_guarantee === "expected" && report.expected_error_estimate !== null
      && report.expected_error_estimate !== undefined) {
    const target = (report.options || {}).max_auto_label_error;
    return `coverage ${fmtPct(report.auto_label_coverage)}; expected error ≤ ${fmtPct(target)} by conformal selection `
      + `(estimate ${fmtPct(report.expected_error_estimate)}); the held-out people's labels above the threshold give `
      + `error ≤ ${fmtPct(report.auto_label_error_bound)} at 95 % (evidence only: the threshold was chosen on them)`;
  }
  return `coverage ${fmtPct(report.auto_label_coverage)}, error ≤ ${fmtPct(report.auto_label_error_bound)} (the labeler's 95 % bound)`;
}

function summaryBlock(report) {
  const d = report.dataset || {};
  const rows = [
    ["Run", report.run_id],
    ["Data set", d.dataset_id ? `${d.dataset_id}: ${d.items} images (${d.rejected} rejected, ${d.duplicates} duplicates); classes ${(d.classes || []).join(", ")}` : null],
    ["Labels", report.human_labels !== undefined ? `${report.human_labels} by people (${fmtPct(report.human_label_fraction)}) in ${report.labeling_rounds} rounds, ${report.auto_labels} auto-labeled, ${report.needs_review ?? 0} need review` : null],
    ["Auto-labels", autoLabelText(report)],
    ["Chosen model", report.chosen_model ? `${report.chosen_model.arch} pretrained on ${report.chosen_model.source_dataset} — ${report.chosen_model.why}` : null],
    ["Best parameters", report.best_params ? `${JSON.stringify(report.best_params)} (val accuracy ${num(report.best_value, 3)})` : null],
    ["Test", report.test_accuracy !== undefined ? `accuracy ${fmtPct(report.test_accuracy)}, recall ${fmtPct(report.defect_recall)} at threshold ${num(report.threshold, 3)} (${report.chosen_variant})` : null],
    ["Test intervals", report.test_accuracy_interval ? `accuracy at the argmax ${ci(report.test_accuracy_argmax_interval)}; at the shipped threshold ${ci(report.test_accuracy_interval)}; recall there ${ci(report.defect_recall_interval)}` : null],
    ["Test split", report.test_split ? `${report.test_split.used} of ${report.test_split.items} test items (${report.test_split.labeled_by_people} labeled by people; ${report.test_split.evidence})` : null],
    ["Threshold", report.threshold_rule],
    ["INT8", report.int8_speedup_vs_onnx_fp32 !== undefined && report.int8_speedup_vs_onnx_fp32 !== null
      ? `${num(report.int8_speedup_vs_onnx_fp32, 2)}× vs ONNX FP32, ${num(report.int8_speedup_vs_torch_eager, 2)}× vs PyTorch eager at batch 1; accuracy drop ${num(100 * (report.int8_accuracy_drop ?? NaN), 2)} points` : null],
    ["Learning curve", report.learning_curve ? `${report.learning_curve.status}: ${report.learning_curve.note}` : null],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  return h("dl", { class: "kv card", id: "summary" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: "wrap" }, String(v))]));
}

/** Labels by people in each labeling round (the labeler's round figures; else the learning curve's rounds). */
function labelsPerRound(report) {
  const rounds = report.labeling_round_figures || [];
  const pts = report.learning_curve?.points || [];
  const out = [];
  if (rounds.length) {
    const added = rounds.map((r, i) => r.human_labels - (i ? rounds[i - 1].human_labels : 0));
    out.push(barChart({
      title: "Labels by people per round", categories: rounds.map((r) => `round ${r.round}`),
      series: [{ name: "new in the round", values: added }, { name: "in all after the round", values: rounds.map((r) => r.human_labels) }],
      yLabel: "items labeled by people",
    }));
  } else if (pts.length) {
    out.push(barChart({
      title: "Labels by people after each round", categories: pts.map((_, i) => `round ${i + 1}`),
      series: [{ name: "human labels", values: pts.map((p) => p[0]) }], yLabel: "items labeled by people",
      note: "The rounds with a held-out accuracy of the labeler's classifier.",
    }));
  }
  if (report.class_counts) {
    const classes = Object.keys(report.class_counts);
    const aug = Object.fromEntries((report.augmentation || []).map((a) => [a.label, a]));
    const series = [{ name: "labeled", values: classes.map((c) => report.class_counts[c]) }];
    if (report.augmentation?.length) series.push({ name: "generated and kept", values: classes.map((c) => aug[c]?.kept ?? null) });
    out.push(barChart({ title: "Labels per class", categories: classes, series, yLabel: "items" }));
  }
  return out;
}

function learningCurve(report) {
  const lc = report.learning_curve;
  if (!lc?.points?.length) return null;
  const what = lc.source === "subsamples" ? "the labeler's probe on shares of the last round's labels"
    : "labeler's held-out accuracy per round";
  const series = [{ name: what, points: lc.points, markers: true, line: false }];
  if (typeof lc.a === "number") {
    const lo = Math.min(...lc.points.map((p) => p[0]));
    const hi = Math.max(...lc.points.map((p) => p[0]), lc.labels_needed || 0) * 1.1;
    const fit = [];
    for (let i = 0; i <= 60; i += 1) { const n = lo + ((hi - lo) * i) / 60; fit.push([n, lc.a - lc.b * n ** -lc.c]); }
    series.push({ name: `fit ${lc.model} (estimate)`, points: fit, color: "#1f7a3a" });
  }
  const hLines = lc.target_accuracy ? [{ value: lc.target_accuracy, name: `spec accuracy ${lc.target_accuracy}`, color: "#dd8452" }] : [];
  const vLines = lc.labels_needed ? [{ value: lc.labels_needed, name: `~${lc.labels_needed} labels (estimate)`, color: "#8172b2" }] : [];
  return lineChart({ title: "Accuracy against labels by people (learning curve)", series, hLines, vLines,
    xLabel: "labels by people", yLabel: "accuracy", note: `${lc.status}: ${lc.note}` });
}

function operatingCurve(report) {
  const c = report.operating_curve;
  if (!c?.points?.length) return null;
  const marks = [];
  if (c.shipped?.recall !== null && c.shipped?.recall !== undefined) {
    marks.push({ x: c.shipped.recall, y: c.shipped.accuracy, name: `shipped threshold ${num(c.shipped.threshold, 3)} (set on validation)`, color: "#1f7a3a" });
  }
  const at = report.accuracy_at_spec_recall_detail;
  if (at && typeof at.recall === "number") {
    marks.push({ x: at.recall, y: at.accuracy, name: `highest threshold reaching the spec's recall on test (${num(at.threshold, 3)})`, color: "#8172b2", shape: "square" });
  }
  return lineChart({
    title: "Operating curve: test accuracy against test recall",
    series: [{ name: "test, each threshold", points: c.points.map((p) => [p[1], p[2], `threshold ${num(p[0], 3)}`]), markers: c.points.length < 80 }],
    vLines: c.spec_recall ? [{ value: c.spec_recall, name: `spec recall ${c.spec_recall}`, color: "#b3261e" }] : [],
    hLines: c.spec_accuracy ? [{ value: c.spec_accuracy, name: `spec accuracy ${c.spec_accuracy}`, color: "#dd8452" }] : [],
    marks, xDomain: [0, 1], yDomain: [0, 1],
    xLabel: `recall of ${c.positive_class} (test, ${c.positives} positives)`, yLabel: `accuracy (test, ${c.items} items)`,
    note: c.thinned ? "The curve is thinned to fewer points; the marked points are exact." : null,
  });
}

function perClass(report) {
  const pc = report.test_per_class;
  if (!pc) return [];
  const classes = Object.keys(pc);
  const chart = barChart({
    title: "Per-class recall and precision (test)", categories: classes, yMax: 1, yFmt: (v) => `${Math.round(100 * v)} %`,
    valueFmt: (v) => `${(100 * v).toFixed(1)} %`,
    series: [{ name: "recall", values: classes.map((c) => pc[c].recall?.point ?? null) },
      { name: "precision", values: classes.map((c) => pc[c].precision?.point ?? null) }],
  });
  const table = h("table", { id: "per-class" },
    h("thead", {}, h("tr", {}, ["Class", "Items", "Decided", "Recall (95 % interval)", "Precision (95 % interval)"].map((t) => h("th", {}, t)))),
    h("tbody", {}, classes.map((c) => h("tr", {}, h("td", {}, c), h("td", { class: "num" }, pc[c].items),
      h("td", { class: "num" }, pc[c].predicted), h("td", {}, ci(pc[c].recall)), h("td", {}, ci(pc[c].precision))))));
  return [chart, table];
}

function confusion(report) {
  const c = report.test_confusion;
  if (!c) return null;
  return heatmap({ title: "Confusion matrix (test): rows the true class, columns the decided class", rows: c.classes,
    columns: c.classes, matrix: c.matrix, rowTitle: "true", columnTitle: "decided" });
}

function variants(report) {
  const v = report.variants;
  if (!v || !Object.keys(v).length) return [];
  const names = Object.keys(v);
  const colors = names.map((n) => (n === report.chosen_variant ? "#1f7a3a" : "#2457c5"));
  const speed = barChart({ title: "Images per second at batch 1", categories: names, colors,
    series: [{ name: "images/s", values: names.map((n) => v[n].throughput_b1_ips ?? null) }], yLabel: "images/s",
    note: report.chosen_variant ? `Green: the chosen variant (${report.chosen_variant}).` : null });
  const size = barChart({ title: "Model size", categories: names, colors,
    series: [{ name: "MB", values: names.map((n) => v[n].size_mb ?? null) }], yLabel: "MB" });
  const table = h("table", { id: "variants" },
    h("thead", {}, h("tr", {}, ["Variant", "b1 img/s", "p50 ms", "p99 ms", "b32 img/s", "Size MB", "RSS MB", "Acc argmax", "Acc at threshold", "Recall", "Verdict"]
      .map((t) => h("th", {}, t)))),
    h("tbody", {}, names.map((n) => h("tr", { class: n === report.chosen_variant ? "chosen" : null },
      h("td", {}, n, n === report.chosen_variant ? " (chosen)" : ""),
      h("td", { class: "num" }, num(v[n].throughput_b1_ips)), h("td", { class: "num" }, num(v[n].latency_b1_p50_ms, 2)),
      h("td", { class: "num" }, num(v[n].latency_b1_p99_ms, 2)), h("td", { class: "num" }, num(v[n].throughput_b32_ips)),
      h("td", { class: "num" }, num(v[n].size_mb, 2)), h("td", { class: "num" }, num(v[n].peak_rss_mb, 0)),
      h("td", { class: "num" }, fmtPct(v[n].test_accuracy_argmax)), h("td", { class: "num" }, fmtPct(v[n].test_accuracy)),
      h("td", { class: "num" }, fmtPct(v[n].test_recall)), h("td", {}, v[n].verdict ?? "")))));
  const rejected = report.variant_rejections && Object.keys(report.variant_rejections).length
    ? h("ul", { class: "wrap", id: "rejections" }, Object.entries(report.variant_rejections).map(([n, why]) =>
      h("li", {}, `not chosen: ${n}: ${(Array.isArray(why) ? why : [why]).join("; ")}`))) : null;
  return [h("div", { class: "grid2" }, speed, size), table, rejected];
}

function trials(report) {
  const t = report.trials;
  if (!t?.length) return [];
  const params = [...new Set(t.flatMap((x) => Object.keys(x.params || {})))].sort();
  const colorOf = { complete: "#1f7a3a", pruned: "#dd8452", fail: "#b3261e", failed: "#b3261e" };
  const chart = barChart({ title: "Trials: validation accuracy (green complete, orange pruned, red failed)",
    categories: t.map((x) => `#${x.number}`), colors: t.map((x) => colorOf[String(x.state).toLowerCase()] || "#8c8c8c"),
    series: [{ name: "val accuracy", values: t.map((x) => x.value ?? null) }], yLabel: "val accuracy" });
  const table = h("table", { id: "trials" },
    h("thead", {}, h("tr", {}, ["Trial", "State", "Val accuracy", "Val loss (tie-break)", "Seconds", ...params].map((x) => h("th", {}, x)))),
    h("tbody", {}, t.map((x) => {
      const state = String(x.state).toLowerCase();
      return h("tr", { class: `trial ${state}`, "data-state": state },
        h("td", { class: "num" }, x.number),
        h("td", {}, h("span", { class: `state ${state === "complete" ? "succeeded" : state === "pruned" ? "pruned" : "failed"}` }, state)),
        h("td", { class: "num" }, typeof x.value === "number" ? x.value.toFixed(4) : "—"),
        h("td", { class: "num" }, typeof x.val_loss === "number" ? x.val_loss.toFixed(4) : "—"),
        h("td", { class: "num" }, fmtSeconds(x.seconds)),
        params.map((p) => h("td", { class: "wrap" }, x.params?.[p] === undefined ? "" : typeof x.params[p] === "number" ? String(Number(x.params[p].toPrecision(4))) : String(x.params[p]))));
    })));
  return [chart, table];
}

function stageTimes(report) {
  const st = report.stages || {};
  const names = Object.keys(st);
  if (!names.length) return null;
  return barChart({ title: "Time per stage", categories: names, series: [{ name: "seconds", values: names.map((n) => st[n].seconds ?? null) }],
    yLabel: "seconds", valueFmt: (v) => fmtSeconds(v) });
}

async function download(path, filename, status) {
  status.textContent = "";
  try {
    const response = await api(path, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const a = h("a", { href: url, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    status.textContent = `${filename}: ${err.status ? `${err.status} ` : ""}${err.message}`;
  }
}

export async function render(root, params) {
  const runId = params.runId;
  const base = `/runs/${encodeURIComponent(runId)}`;
  root.append(h("h1", {}, "Report of run ", h("a", { href: `#/runs/${encodeURIComponent(runId)}`, class: "mono" }, runId)));
  let report;
  try {
    report = await api(`${base}/report`);
  } catch (err) {
    root.append(h("p", { class: "error", id: "report-error" }, err.status === 409
      ? `No report yet: ${err.message}` : `${err.status ? `${err.status}: ` : ""}${err.message}`));
    return;
  }
  const status = h("span", { class: "error", id: "download-error", role: "alert" });
  const safe = runId.replace(/[^A-Za-z0-9_.-]/g, "_");
  const downloads = h("div", { class: "actions", id: "downloads" },
    h("button", { type: "button", id: "download-model", onclick: () => download(`${base}/model`, `dlforge-${safe}-model.zip`, status) }, "Download the model"),
    h("button", { type: "button", class: "secondary", id: "download-json", onclick: () => {
      const url = URL.createObjectURL(new Blob([JSON.stringify(report, null, 2)], { type: "application/json" }));
      const a = h("a", { href: url, download: `dlforge-${safe}-report.json` });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } }, "Report (JSON)"),
    h("button", { type: "button", class: "secondary", id: "download-html", onclick: () => download(`${base}/report.html`, `dlforge-${safe}-report.html`, status) }, "Report (HTML)"),
    report.dataset?.dataset_id ? h("a", { class: "button secondary", href: `#/model/${encodeURIComponent(report.dataset.dataset_id)}` }, "Try the model") : null,
    status);
  const plots = h("div", { class: "grid2", id: "plots" },
    ...labelsPerRound(report), learningCurve(report), operatingCurve(report));
  const [classChart, classTable] = perClass(report);
  const [trialChart, trialTable] = trials(report);
  // h() skips a missing part; Element.append would write "null"/"undefined": filter first
  root.append(...[verdictBlock(report), downloads, summaryBlock(report),
    h("h2", {}, "Labels and learning"), plots,
    h("h2", {}, "Per class"), h("div", { class: "grid2" }, classChart, confusion(report)), classTable,
    h("h2", {}, "Variants: speed and size"), ...variants(report).filter(Boolean),
    h("h2", {}, "Hyperparameter trials and time"), h("div", { class: "grid2" }, trialChart, stageTimes(report)), trialTable]
    .filter(Boolean));
  clear(status);
}
