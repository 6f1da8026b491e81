"""The final report of one run, built from its events and the artifacts they name."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, TypeVar

from dlforge.common.events import (
    DatasetAugmented,
    DatasetLabeled,
    DatasetUploaded,
    Event,
    HpoCompleted,
    ModelOptimized,
    ModelProposed,
    ModelTrained,
    Payload,
)
from dlforge.common.objects import ObjectStore
from dlforge.common.runs import STAGES
from dlforge.vision.manifest import load_manifest

P = TypeVar("P", bound=Payload)


def _last(events: list[Event], cls: type[P]) -> P | None:
    found = [e.payload for e in events if isinstance(e.payload, cls)]
    return found[-1] if found else None


def auto_label_accuracy(objects: ObjectStore, labels_key: str, truth: dict[str, str]) -> dict[str, Any]:
    """Accuracy of the auto-labeled items against known labels (by file name)."""
    manifest = load_manifest(objects, labels_key)
    auto = [i for i in manifest.items if i.label_source == "auto" and i.name in truth]
    human = [i for i in manifest.items if i.label_source == "human" and i.name in truth]
    correct = sum(1 for i in auto if i.label == truth[i.name])
    return {
        "auto_labeled": len(auto),
        "auto_correct": correct,
        "auto_label_accuracy": round(correct / len(auto), 4) if auto else None,
        "human_label_agreement": round(sum(1 for i in human if i.label == truth[i.name]) / len(human), 4)
        if human else None,
    }


def build_report(
    *, run: dict[str, Any], events: list[Event], objects: ObjectStore, truth: dict[str, str] | None
) -> dict[str, Any]:
    uploaded = _last(events, DatasetUploaded)
    labeled = _last(events, DatasetLabeled)
    augmented = _last(events, DatasetAugmented)
    proposed = _last(events, ModelProposed)
    tuned = _last(events, HpoCompleted)
    trained = _last(events, ModelTrained)
    optimized = _last(events, ModelOptimized)
    opt: dict[str, Any] = optimized.report if optimized else {}
    report: dict[str, Any] = {
        "run_id": run.get("run_id"),
        "state": run.get("state"),
        "failure": run.get("failure"),
        "stages": {s: {"state": run["stages"][s]["state"], "seconds": run["stages"][s].get("seconds")}
                   for s in STAGES},
        "spec": optimized.spec.model_dump() if optimized else (uploaded.spec.model_dump() if uploaded else None),
    }
    if uploaded:
        report["dataset"] = {
            "dataset_id": uploaded.dataset_id, "items": uploaded.item_count, "classes": uploaded.classes,
            "given_labels": uploaded.labeled_count, "rejected": uploaded.rejected_count,
            "duplicates": uploaded.duplicate_count,
        }
    if labeled and uploaded:
        report["human_labels"] = labeled.human_labels
        report["human_label_fraction"] = round(labeled.human_labels / uploaded.item_count, 4)
        report["labeling_rounds"] = labeled.rounds
        report["auto_labels"] = labeled.auto_labels
        report["class_counts"] = {c.label: c.count for c in labeled.counts}
        if truth:
            acc = auto_label_accuracy(objects, labeled.labels_key, truth)
            report["auto_label_accuracy"] = acc.pop("auto_label_accuracy")
            report["auto_labeling"] = acc
        else:
            report["auto_label_accuracy"] = None
    if augmented:
        report["augmentation"] = [a.model_dump() for a in augmented.augmentation]
    if proposed:
        ranking = sorted(proposed.ranking, key=lambda c: -c.total)
        winner = ranking[0]
        report["chosen_model"] = {
            "model_id": proposed.chosen_model_id, "arch": winner.arch, "source_dataset": winner.source_dataset,
            "why": _why(winner, ranking, proposed.weights),
        }
        report["candidates"] = [c.model_dump(exclude={"weights_key"}) for c in ranking]
        report["proposal_weights"] = proposed.weights
    if tuned:
        report["best_params"] = tuned.best_params
        report["best_value"] = tuned.best_value
        report["trials"] = [t.model_dump() for t in tuned.trials]
    if trained:
        report["training"] = {"metrics": trained.metrics, "no_of_workers": trained.no_of_workers,
                              "params": trained.params}
    if opt:
        report["test_accuracy"] = opt.get("test_accuracy")
        report["defect_recall"] = opt.get("test_positive_recall")
        report["threshold"] = opt.get("threshold")
        report["chosen_variant"] = opt.get("chosen_variant")
        chosen_threshold = (opt.get("variants", {}).get(opt.get("chosen_variant"), {}) or {}).get("threshold") or {}
        report["threshold_rule"] = chosen_threshold.get("rule")
        report["threshold_views"] = chosen_threshold.get("views")
        for key in ("int8_speedup_vs_onnx_fp32", "int8_speedup_vs_torch_eager", "int8_speedup_vs_onnx_fp32_batch32",
                    "int8_accuracy_drop", "int8_accuracy_drop_at_threshold", "int8_size_ratio", "fps"):
            report[key] = opt.get(key)
        report["variants"] = {
            name: {
                "throughput_b1_ips": v.get("throughput_b1_ips"),
                "latency_b1_p50_ms": v.get("latency_b1_p50_ms"),
                "latency_b1_p99_ms": v.get("latency_b1_p99_ms"),
                "throughput_b32_ips": _b32(v),
                "peak_rss_mb": v.get("peak_rss_mb"),
                "size_mb": v.get("size_mb"),
                "test_accuracy": v.get("test_accuracy"),
                "test_accuracy_argmax": (v.get("test_argmax") or {}).get("accuracy"),
                "test_recall": v.get("test_positive_recall"),
                "fps_at_spec_size": v.get("fps"),
            }
            for name, v in opt.get("variants", {}).items()
        }
        report["spec_check"] = opt.get("choice")
    report["spec_met"] = bool(optimized.spec_met) if optimized else False
    return report


def _b32(variant: dict[str, Any]) -> float | None:
    speed = variant.get("speed") or {}
    for key in ("batches", "by_batch"):
        table = speed.get(key)
        if isinstance(table, dict):
            for bkey, row in table.items():
                if str(bkey) == "32" and isinstance(row, dict):
                    value = row.get("throughput_ips") or row.get("ips")
                    return float(value) if value is not None else None
    return None


def _why(winner: Any, ranking: list[Any], weights: dict[str, float]) -> str:
    parts = []
    for name, weight in sorted(weights.items(), key=lambda kv: -kv[1]):
        norm = winner.scores.get(f"{name}_norm", winner.scores.get(name))
        if norm is not None:
            parts.append(f"{name} {norm:.2f} (weight {weight:g})")
    runner = f"; runner-up {ranking[1].arch}/{ranking[1].source_dataset} at {ranking[1].total:.3f}" \
        if len(ranking) > 1 else ""
    return f"highest combined score {winner.total:.3f}: " + ", ".join(parts) + runner


def format_text(report: dict[str, Any]) -> str:
    """The report as the lines a person reads at the end of ``dlforge demo``."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    def num(v: Any, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v, fmt)

    def points(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:+.2f}"

    lines = [f"run {report.get('run_id')}: {report.get('state')}"]
    if report.get("failure"):
        lines.append(f"  FAILED in {report['failure']['stage']}: {report['failure']['reason']}")
    lines.append("stages: " + ", ".join(
        f"{s} {v['state']} {num(v['seconds'], '.0f')} s" for s, v in report["stages"].items()))
    if "dataset" in report:
        d = report["dataset"]
        lines.append(f"dataset: {d['items']} images ({d['rejected']} rejected, {d['duplicates']} duplicates), "
                     f"classes {', '.join(d['classes'])}")
    if "human_labels" in report:
        lines.append(f"labels: {report['human_labels']} by humans ({pct(report['human_label_fraction'])}) in "
                     f"{report['labeling_rounds']} rounds, {report['auto_labels']} auto-labeled; "
                     f"auto-label accuracy {pct(report.get('auto_label_accuracy'))}")
    for a in report.get("augmentation", []):
        lines.append(f"augmentation {a['label']}: {a['real']} real, {a['generated']} generated, {a['kept']} kept")
    if "chosen_model" in report:
        c = report["chosen_model"]
        lines.append(f"chosen model: {c['arch']} pretrained on {c['source_dataset']} — {c['why']}")
    if "best_params" in report:
        lines.append(f"best parameters (val accuracy {num(report['best_value'], '.3f')}): "
                     + json.dumps(report["best_params"], sort_keys=True))
    if "test_accuracy" in report:
        lines.append(f"test: accuracy {pct(report['test_accuracy'])}, defect recall {pct(report['defect_recall'])} "
                     f"at threshold {num(report['threshold'], '.3f')} ({report['chosen_variant']})")
        if report.get("threshold_rule"):
            lines.append(f"threshold: {report['threshold_rule']}")
        lines.append("variant                 b1 img/s  p50 ms  p99 ms  b32 img/s  size MB  RSS MB  "
                     "acc argmax  acc@thr")
        for name, v in report.get("variants", {}).items():
            lines.append(f"{name:<22} {num(v['throughput_b1_ips'], '9.1f')} {num(v['latency_b1_p50_ms'], '7.1f')} "
                         f"{num(v['latency_b1_p99_ms'], '7.1f')} {num(v['throughput_b32_ips'], '10.1f')} "
                         f"{num(v['size_mb'], '8.2f')} {num(v['peak_rss_mb'], '7.0f')} "
                         f"{pct(v.get('test_accuracy_argmax')):>11} {pct(v['test_accuracy']):>8}")
        lines.append(f"INT8 speed-up at batch 1: {num(report['int8_speedup_vs_onnx_fp32'])}x vs ONNX Runtime FP32, "
                     f"{num(report['int8_speedup_vs_torch_eager'])}x vs PyTorch eager; accuracy drop "
                     f"{points(report['int8_accuracy_drop'])} points at the argmax "
                     f"({points(report.get('int8_accuracy_drop_at_threshold'))} at each variant's threshold)")
    lines.append(f"spec met: {'YES' if report.get('spec_met') else 'NO'}  (spec: {report.get('spec')})")
    return "\n".join(lines)


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: list[tuple[str, str]] = []
    stages = [(s, v["seconds"] or 0.0) for s, v in report["stages"].items()]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh([s for s, _ in stages][::-1], [t for _, t in stages][::-1], color="#4c72b0")
    ax.set_xlabel("seconds")
    ax.set_title("time per stage")
    plots.append(("Time per stage", _figure_png(fig)))
    plt.close(fig)
    if report.get("candidates"):
        cands = report["candidates"]
        names = [f"{c['arch']}\n{c['source_dataset']}" for c in cands]
        keys = sorted({k for c in cands for k in c["scores"] if k.endswith("_norm")})
        fig, ax = plt.subplots(figsize=(6, 3))
        width = 0.8 / max(len(keys), 1)
        for n, key in enumerate(keys):
            ax.bar([i + n * width for i in range(len(cands))], [c["scores"].get(key, 0) for c in cands], width,
                   label=key.removesuffix("_norm"))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cands))], names, fontsize=8)
        ax.set_ylabel("normalized sub-score")
        ax.legend(fontsize=7)
        ax.set_title("model proposal")
        plots.append(("Model proposal: normalized sub-scores", _figure_png(fig)))
        plt.close(fig)
    if report.get("trials"):
        trials = report["trials"]
        fig, ax = plt.subplots(figsize=(6, 2.6))
        colors = {"complete": "#55a868", "pruned": "#dd8452", "failed": "#c44e52"}
        ax.bar([t["number"] for t in trials], [t["value"] or 0 for t in trials],
               color=[colors.get(str(t["state"]).lower(), "#999") for t in trials])
        ax.set_xlabel("trial")
        ax.set_ylabel("val accuracy")
        ax.set_title("hyperparameter trials (green complete, orange pruned)")
        plots.append(("Hyperparameter trials", _figure_png(fig)))
        plt.close(fig)
    if report.get("variants"):
        names = list(report["variants"])
        fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
        axes[0].bar(names, [report["variants"][n]["throughput_b1_ips"] or 0 for n in names], color="#4c72b0")
        axes[0].set_title("images/s at batch 1")
        axes[1].bar(names, [report["variants"][n]["size_mb"] or 0 for n in names], color="#8172b2")
        axes[1].set_title("model size (MB)")
        for a in axes:
            a.tick_params(axis="x", labelrotation=30, labelsize=7)
        plots.append(("Variants: speed and size", _figure_png(fig)))
        plt.close(fig)
    return plots


def write_html(report: dict[str, Any], path: Path) -> None:
    plots = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'/>"
        for title, png in _plots(report)
    )
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dlforge run report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:1em;"
        "overflow-x:auto}</style></head><body>"
        f"<h1>dlforge run {html.escape(str(report.get('run_id')))}</h1>"
        f"<p>spec met: <b>{'yes' if report.get('spec_met') else 'no'}</b></p>"
        f"<pre>{html.escape(format_text(report))}</pre>{plots}"
        f"<h2>Full report (JSON)</h2><pre>{html.escape(json.dumps(report, indent=2, default=str))}</pre>"
        "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
