"""The final report of one run, built from the run view's document alone (:mod:`dlforge.common.runs` keeps
the last payload of each stage-finishing event), and its text and HTML forms.

Both the run view (``GET /runs/{run_id}/report``) and the CLI (``dlforge run``) build it here. The
report starts with ``verdict``: ``{"met": bool, "status": "met" | "met_point_estimate" | "not_met" |
"failed" | "cancelled", "reasons": [str]}`` — each requirement of the spec in words (measured against
asked, with the 95 % interval and the sample size the optimizer's report has), or the stage and reason
of a failed run. :func:`format_text` prints the same things in the same order as the console's report
page: the verdict, labeling, model, training, variants, evidence.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from dlforge.common.errors import PoisonMessage
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
    Spec,
    Topic,
    decode,
)
from dlforge.common.learning_curve import labels_to_reach
from dlforge.common.runs import LAST_EVENTS, STAGES

P = TypeVar("P", bound=Payload)
log = logging.getLogger(__name__)
SAMPLES_GRID_TITLE = "Generated samples: kept and rejected by the filter (its confidence under each)"


def last_events(run: Mapping[str, Any]) -> dict[Topic, Event]:
    """The run document's last event of each stage-finishing topic, decoded (and upcast) as the bus would."""
    out: dict[Topic, Event] = {}
    for topic, stored in (run.get(LAST_EVENTS) or {}).items():
        raw = {"event_id": stored["event_id"], "event_type": topic, "schema_version": stored["schema_version"],
               "occurred_at": stored["occurred_at"], "run_id": run["run_id"], "payload": stored["payload"]}
        try:
            event = decode(json.dumps(raw).encode())
        except PoisonMessage:
            continue  # a payload this code cannot read any more: the report goes without it
        out[event.event_type] = event
    return out


def _last(events: Mapping[Topic, Event], cls: type[P]) -> P | None:
    event = events.get(cls.TOPIC)
    return event.payload if event is not None and isinstance(event.payload, cls) else None


def _rounds_of(labeled: DatasetLabeled) -> list[dict[str, Any]]:
    """The labeling rounds in the form :func:`dlforge.common.learning_curve.round_points` reads."""
    return [{"round": r.round, "human_labels": r.human_labels,
             "classifier": {"heldout_accuracy": r.heldout_accuracy, "cv_accuracy": r.cv_accuracy}}
            for r in labeled.rounds_figures]


def build_report(run: Mapping[str, Any]) -> dict[str, Any]:
    """The report of a finished (succeeded, failed or cancelled) run from its run-view document.

    ``auto_label_accuracy`` is None here: it needs the truth, which only the CLI's answers give
    (:func:`dlforge.cli.report.add_truth`).
    """
    events = last_events(run)
    uploaded = _last(events, DatasetUploaded)
    labeled = _last(events, DatasetLabeled)
    augmented = _last(events, DatasetAugmented)
    proposed = _last(events, ModelProposed)
    tuned = _last(events, HpoCompleted)
    trained = _last(events, ModelTrained)
    optimized = _last(events, ModelOptimized)
    opt: dict[str, Any] = optimized.report if optimized else {}
    spec = optimized.spec if optimized else (uploaded.spec if uploaded else None)
    report: dict[str, Any] = {
        "verdict": None,  # first in the JSON; set at the end
        "run_id": run.get("run_id"),
        "state": run.get("state"),
        "failure": run.get("failure"),
        "cancelled": run.get("cancelled"),
        "trace_id": run.get("trace_id"),
        "stages": {s: {"state": run["stages"][s]["state"], "seconds": run["stages"][s].get("seconds")}
                   for s in STAGES},
        "spec": spec.model_dump() if spec else None,
        "options": uploaded.options.model_dump() if uploaded else None,
    }
    if uploaded:
        report["dataset"] = {
            "dataset_id": uploaded.dataset_id, "name": uploaded.name, "items": uploaded.item_count,
            # an upload without labels names only the spec's positive class; labeling found the others
            "classes": labeled.classes if labeled else uploaded.classes, "given_labels": uploaded.labeled_count,
            "rejected": uploaded.rejected_count,
            "duplicates": uploaded.duplicate_count,
        }
    if labeled and uploaded:
        report["human_labels"] = labeled.human_labels
        report["human_label_fraction"] = round(labeled.human_labels / uploaded.item_count, 4) \
            if uploaded.item_count else None
        report["labeling_rounds"] = labeled.rounds
        report["auto_labels"] = labeled.auto_labels
        report["needs_review"] = labeled.needs_review
        report["class_counts"] = {c.label: c.count for c in labeled.counts}
        report["labeling_round_figures"] = [r.model_dump() for r in labeled.rounds_figures]
        report["domains_standardized"] = dict(labeled.domains_standardized)
    report["auto_label_accuracy"] = None
    if augmented:
        report["augmentation"] = [a.model_dump() for a in augmented.augmentation]
        report["augmentation_gain"] = None if augmented.gain is None else augmented.gain.model_dump()
        report["samples_grid_key"] = augmented.samples_grid_key
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
        if tuned.choice:
            report["tuner_choice"] = tuned.choice
        report["trials"] = [t.model_dump() for t in tuned.trials]
    if trained:
        report["training"] = {"metrics": trained.metrics, "no_of_workers": trained.no_of_workers,
                              "params": trained.params}
    if optimized:
        report["model_download"] = {"variant": optimized.chosen_variant,
                                    "key": optimized.artifacts.get(optimized.chosen_variant)}
    if opt:
        report["test_accuracy"] = opt.get("test_accuracy")
        report["defect_recall"] = opt.get("test_positive_recall")
        report["threshold"] = opt.get("threshold")
        report["chosen_variant"] = opt.get("chosen_variant")
        chosen_threshold = (opt.get("variants", {}).get(opt.get("chosen_variant"), {}) or {}).get("threshold") or {}
        report["threshold_rule"] = chosen_threshold.get("rule")
        report["threshold_views"] = chosen_threshold.get("views")
        report["test_views"] = opt.get("test_views")
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
        report.update(_spec_evidence(opt))
        for name, v in opt.get("variants", {}).items():
            report["variants"][name]["test_agreement_vs_onnx_fp32"] = v.get("test_agreement_vs_onnx_fp32")
            report["variants"][name]["verdict"] = (v.get("verdict") or {}).get("verdict")
    report["auto_label_coverage"] = labeled.auto_label_coverage if labeled else None
    report["auto_label_error_bound"] = labeled.auto_label_error_bound if labeled else None
    report["auto_label_guarantee"] = labeled.auto_label_guarantee if labeled else None
    report["expected_error_estimate"] = labeled.expected_error_estimate if labeled else None
    if labeled is not None and spec is not None:
        report["learning_curve"] = labels_to_reach(
            _rounds_of(labeled), target=spec.min_accuracy, current_labels=labeled.human_labels,
            subsamples=[f.model_dump() for f in labeled.subsample_figures],
            items=uploaded.item_count if uploaded else None)
    else:
        report["learning_curve"] = None
    report["spec_met"] = bool(optimized.spec_met) if optimized else False
    report["verdict"] = verdict(report, spec=spec)
    return report


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _requirement(what: str, iv: Mapping[str, Any] | None, target: float, *, sample: str) -> tuple[bool, bool, str]:
    """``(met on the point, met with 95 % confidence, the reason in words)`` of one rate the spec asks for."""
    if not iv or iv.get("point") is None:
        return False, False, f"{what}: asked at least {_pct(target)}, cannot be measured: no test {sample}"
    measured = (f"{what} {_pct(iv['point'])} (95 % interval {_pct(iv['low'])} to {_pct(iv['high'])}, "
                f"{iv['k']} of {iv['n']} test {sample}) against at least {_pct(target)} asked")
    eps = 1e-12
    if iv["low"] + eps >= target:
        return True, True, f"{measured}: met with 95 % confidence"
    if iv["point"] + eps >= target:
        return True, False, (f"{measured}: met on the point estimate only, the interval reaches down to "
                             f"{_pct(iv['low'])}")
    return False, False, f"{measured}: NOT met"


def verdict(report: Mapping[str, Any], *, spec: Spec | None) -> dict[str, Any]:
    """``{"met", "status", "reasons"}``: whether the run's model meets the spec and why, in words."""
    state = report.get("state")
    if state == "failed":
        failure = report.get("failure") or {}
        return {"met": False, "status": "failed",
                "reasons": [f"the run failed in the {failure.get('stage', '?')} stage: "
                            f"{failure.get('reason', 'no reason given')}"]}
    if state == "cancelled":
        why = (report.get("cancelled") or {}).get("reason", "no reason given")
        return {"met": False, "status": "cancelled", "reasons": [f"the run was cancelled: {why}"]}
    detail = report.get("spec_verdict_detail")
    if state != "succeeded" or spec is None:
        return {"met": False, "status": "not_met", "reasons": [f"the run is {state}: no model to check"]}
    if not detail:  # an optimizer report without intervals: its point-estimate decision is all there is
        met = bool(report.get("spec_met"))
        return {"met": met, "status": "met_point_estimate" if met else "not_met",
                "reasons": [f"the optimizer reports the spec {'met' if met else 'NOT met'} on its point estimates; "
                            "its report has no intervals"]}
    reasons: list[str] = []
    point_ok = confident = True
    if spec.min_recall > 0:
        recalls = detail.get("recall") or {}
        if not recalls:
            point_ok = confident = False
            reasons.append(f"recall: asked at least {_pct(spec.min_recall)}, no class to measure it on")
        for name, iv in recalls.items():
            p_ok, c_ok, why = _requirement(f"recall of {name!r}", iv, spec.min_recall,
                                           sample=f"items of class {name!r} labeled by people")
            point_ok, confident = point_ok and p_ok, confident and c_ok
            reasons.append(why)
    else:
        reasons.append("recall: none asked")
    if spec.min_accuracy > 0:
        p_ok, c_ok, why = _requirement("accuracy", detail.get("accuracy"), spec.min_accuracy,
                                       sample="items labeled by people")
        point_ok, confident = point_ok and p_ok, confident and c_ok
        reasons.append(why)
    else:
        reasons.append("accuracy: none asked")
    fps = detail.get("fps")
    variant = report.get("chosen_variant") or "the chosen variant"
    if fps is None:
        fps_ok = spec.min_fps <= 0
        reasons.append(f"speed: not measured; asked at least {spec.min_fps:g} FPS")
    else:
        fps_ok = bool(detail.get("fps_ok", fps >= spec.min_fps))
        reasons.append(f"speed: {fps:.1f} FPS at {spec.input_size}x{spec.input_size} with {variant} against at "
                       f"least {spec.min_fps:g} asked: {'met' if fps_ok else 'NOT met'} (a measurement, no interval)")
    # what the optimizer found beyond the three figures (e.g. no test item labeled by people)
    others = _other_reasons(detail)
    reasons.extend(others)
    recomputed = ("not_met" if others or not (point_ok and fps_ok) else "met" if confident else "met_point_estimate")
    status = recomputed
    given = detail.get("verdict")
    if given and given != recomputed:  # both are shown; the status is the more cautious of the two
        status = min(str(given), recomputed, key=lambda s: _CAUTION.get(s, 0))
        reasons.append(f"the optimizer's verdict is {given!r} but the figures above give {recomputed!r}: they "
                       f"differ, so the status is the more cautious, {status!r}")
    return {"met": status == "met", "status": status, "reasons": reasons}


_CAUTION = {"not_met": 0, "met_point_estimate": 1, "met": 2}
# the reasons the optimizer words from the accuracy, recall and FPS figures (of a report from before it listed
# its other reasons apart): anchored at their start, so another reason mentioning them is kept
_FIGURE_REASON = re.compile(r"^(recall of '|recall cannot be measured: |accuracy [0-9c]|[0-9]+(\.[0-9]+)? FPS at )")


def _other_reasons(detail: Mapping[str, Any]) -> list[str]:
    """The optimizer's reasons beyond the three figures the verdict words itself."""
    if "other_reasons" in detail:
        return [str(r) for r in detail["other_reasons"]]
    return [str(r) for r in detail.get("reasons", []) if not _FIGURE_REASON.match(str(r))]


def _spec_evidence(opt: Mapping[str, Any]) -> dict[str, Any]:
    """The honest spec check of the optimizer's report: intervals, per-class figures, curve, verdict."""
    verdict = opt.get("spec_verdict") or {}
    at_recall = opt.get("accuracy_at_spec_recall") or {}
    figures = opt.get("test_figures") or {}
    curve = opt.get("operating_curve") or {}
    spec = opt.get("spec") or {}
    chosen = (opt.get("variants") or {}).get(opt.get("chosen_variant")) or {}
    out: dict[str, Any] = {
        "test_split": opt.get("test_split"),
        "test_accuracy_argmax": opt.get("test_accuracy_argmax"),
        "test_accuracy_argmax_interval": opt.get("test_accuracy_argmax_interval"),
        "accuracy_at_spec_recall": at_recall.get("accuracy"),
        "accuracy_at_spec_recall_detail": at_recall or None,
        "test_accuracy_interval": opt.get("test_accuracy_interval"),
        "defect_recall_interval": opt.get("positive_recall_interval"),
        "spec_verdict": verdict.get("verdict"),
        "spec_verdict_detail": verdict or None,
        "threshold_evidence": {
            "validation_positives": verdict.get("threshold_positives"),
            "recall_lower_bound_95": verdict.get("threshold_recall_lower_bound"),
        } if verdict else None,
        "test_per_class": {
            c: {"items": f["items"], "predicted": f["predicted"], "recall": f["recall"], "precision": f["precision"]}
            for c, f in (figures.get("per_class") or {}).items()
        } or None,
        "test_confusion": {"classes": figures["classes"], "matrix": figures["confusion"],
                           "rows": "true class", "columns": "decided class"} if figures else None,
        "variant_rejections": (opt.get("choice") or {}).get("rejected"),
        "int8_test_agreement": opt.get("int8_test_agreement"),
        "operating_curve": {
            "positive_class": curve["positive_class"], "items": curve["items"], "positives": curve["positives"],
            "thinned": curve.get("thinned", False), "columns": ["threshold", "recall", "accuracy"],
            "points": [[p["threshold"], p["recall"], p["accuracy"]] for p in curve["points"]],
            "spec_recall": spec.get("min_recall"), "spec_accuracy": spec.get("min_accuracy"),
            "shipped": {"threshold": opt.get("threshold"), "recall": chosen.get("test_positive_recall"),
                        "accuracy": chosen.get("test_accuracy")},
        } if curve else None,
    }
    return out


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
        if norm is not None and weight > 0:  # a sub-score weighing 0 is no reason for the choice
            parts.append(f"{name} {norm:.2f} (weight {weight:g})")
    runner = f"; runner-up {ranking[1].arch}/{ranking[1].source_dataset} at {ranking[1].total:.3f}" \
        if len(ranking) > 1 else ""
    return f"highest combined score {winner.total:.3f}: " + ", ".join(parts) + runner


def format_text(report: dict[str, Any]) -> str:
    """The report as the lines a person reads at the end of ``dlforge run``/``demo``: the verdict and its
    reasons first, then labeling, model, training, variants and evidence (the report page's order)."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    def num(v: Any, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v, fmt)

    def points(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:+.2f}"

    v = report.get("verdict") or {}
    headline = {"met": "spec MET", "met_point_estimate": "spec met on the POINT ESTIMATE ONLY",
                "not_met": "spec NOT met", "failed": "FAILED", "cancelled": "CANCELLED"}.get(
                    str(v.get("status")), "spec MET" if v.get("met") else "spec NOT met") if v else None
    lines = [f"run {report.get('run_id')}: {report.get('state')}" + (f" — {headline}" if headline else "")]
    lines.extend(f"  - {reason}" for reason in v.get("reasons", []))
    lines.extend(f"  note: {note}" for note in report.get("notes", []))
    if report.get("failure"):
        lines.append(f"  FAILED in {report['failure']['stage']}: {report['failure']['reason']}")
    lines.append(f"spec: {_spec_text(report.get('spec'))}")
    lines.append("stages: " + ", ".join(
        f"{s} {st['state']} {num(st['seconds'], '.0f')} s" for s, st in report["stages"].items()))
    # labeling
    if "dataset" in report:
        d = report["dataset"]
        lines.append(f"dataset: {d['items']} images ({d['rejected']} rejected, {d['duplicates']} duplicates), "
                     f"classes {', '.join(d['classes'])}")
    if "human_labels" in report:
        lines.append(f"labels: {report['human_labels']} by humans ({pct(report['human_label_fraction'])}) in "
                     f"{report['labeling_rounds']} rounds, {report['auto_labels']} auto-labeled; "
                     f"auto-label accuracy {pct(report.get('auto_label_accuracy'))}")
    lines.extend(_labeling_lines(report, pct=pct))
    if report.get("domains_standardized"):
        lines.append("domain adaptation: each domain's embeddings given the whole set's moments before labeling ("
                     + ", ".join(f"{d} {n:,} items" for d, n in report["domains_standardized"].items()) + ")")
    for a in report.get("augmentation", []):
        lines.append(f"augmentation {a['label']}: {a['real']} real, {a['generated']} generated, {a['kept']} kept")
    lines.extend(_gain_lines(report.get("augmentation_gain"), pct=pct))
    # model
    if "chosen_model" in report:
        c = report["chosen_model"]
        lines.append(f"chosen model: {c['arch']} pretrained on {c['source_dataset']} — {c['why']}")
    # training
    if "best_params" in report:
        # with a reason, the tuner's pick may not be the highest value (its baseline kept): "chosen", and why
        lines.append(f"{'chosen' if report.get('tuner_choice') else 'best'} parameters (val accuracy "
                     f"{num(report['best_value'], '.3f')}): " + json.dumps(report["best_params"], sort_keys=True))
        if report.get("tuner_choice"):
            lines.append(f"  {report['tuner_choice']}")
    if report.get("trials"):
        states = [str(t["state"]).lower() for t in report["trials"]]
        shares = sorted({t["fidelity"] for t in report["trials"] if t.get("fidelity") is not None})
        on = "; trained on " + ", ".join(
            f"{sum(t.get('fidelity') == f for t in report['trials'])} at {100 * f:g} %" for f in shares
        ) + " of the train split" if shares else ""
        lines.append(f"trials: {len(states)} ({states.count('complete')} complete, {states.count('pruned')} pruned, "
                     f"{states.count('failed')} failed){on}")
    tm = (report.get("training") or {}).get("metrics") or {}
    if "epochs" in tm:
        best = f" (weights of epoch {int(tm['best_epoch'])})" if tm.get("best_epoch") else ""
        line = f"final training: {int(tm['epochs'])} epochs{best} in {num(tm.get('train_seconds'), '.0f')} s"
        n_views = int(tm.get("views", 1))
        line += f"; trained on {n_views} views, the identity included" if n_views > 1 else ""
        checks = {k.removeprefix("view_check_"): v for k, v in tm.items() if k.startswith("view_check_")}
        if checks:
            probe = "a head on the frozen units" if tm.get("view_probe_frozen") else "the model itself"
            line += (f"; view check (probe: {probe}, trained without views), val accuracy: "
                     + ", ".join(f"{k} {num(v, '.3f')}" for k, v in checks.items())
                     + f" (a view may cost {num(tm.get('view_allowed_cost'), '.3f')})")
            if tm.get("view_probe_kept"):
                line += "; the check's probe, trained without views, is the model kept"
        lines.append(line)
    # variants
    if "test_accuracy" in report:
        lines.append(f"test: accuracy {pct(report['test_accuracy'])}, defect recall {pct(report['defect_recall'])} "
                     f"at threshold {num(report['threshold'], '.3f')} ({report['chosen_variant']})")
        if report.get("threshold_rule"):
            lines.append(f"threshold: {report['threshold_rule']}")
        tv = report.get("test_views")
        if tv and len(tv.get("trained_views") or []) > 1:
            lines.append(f"test-time views: {'' if tv['used'] else 'not used: '}{tv['reason']}")
        lines.append("variant                 b1 img/s  p50 ms  p99 ms  b32 img/s  size MB  RSS MB  "
                     "acc argmax  acc@thr")
        for name, var in report.get("variants", {}).items():
            lines.append(f"{name:<22} {num(var['throughput_b1_ips'], '9.1f')} "
                         f"{num(var['latency_b1_p50_ms'], '7.1f')} "
                         f"{num(var['latency_b1_p99_ms'], '7.1f')} {num(var['throughput_b32_ips'], '10.1f')} "
                         f"{num(var['size_mb'], '8.2f')} {num(var['peak_rss_mb'], '7.0f')} "
                         f"{pct(var.get('test_accuracy_argmax')):>11} {pct(var['test_accuracy']):>8}")
        lines.append(f"INT8 speed-up at batch 1: {num(report['int8_speedup_vs_onnx_fp32'])}x vs ONNX Runtime FP32, "
                     f"{num(report['int8_speedup_vs_torch_eager'])}x vs PyTorch eager; accuracy drop "
                     f"{points(report['int8_accuracy_drop'])} points at the argmax "
                     f"({points(report.get('int8_accuracy_drop_at_threshold'))} at each variant's threshold)")
    for name, why in (report.get("variant_rejections") or {}).items():
        lines.append(f"not chosen: {name}: {'; '.join(why)}")
    bundle = report.get("bundle")  # written by dlforge demo/run beside their JSON report
    if bundle and bundle.get("error"):
        lines.append(f"model bundle: NOT written: {bundle['error']}")
    elif bundle:
        lines.append(f"model bundle: {bundle['file']} ({bundle['variant']}, {bundle['bytes'] / 2**20:.1f} MiB, sha256 "
                     f"{str(bundle['sha256'])[:16]}…); run it anywhere: dlforge-edge predict {bundle['file']} IMAGE...")
    # evidence
    lines.extend(_evidence_lines(report, pct=pct, num=num))
    return "\n".join(lines)


def _gain_lines(gain: Mapping[str, Any] | None, *, pct: Any) -> list[str]:
    """What the kept samples changed on the real validation images (the seed's second classifier)."""
    if not gain:
        return []
    lines = [f"kept samples on {gain['val_items']} real validation images ({gain['classifier']}, real only -> "
             f"real + {gain['kept_samples']} kept): accuracy {pct(gain['accuracy_real'])} -> "
             f"{pct(gain['accuracy_with_kept'])}, {gain['changed']} predictions changed"]
    lines.extend(f"  {c['label']} ({c['val_items']} images): recall {pct(c['recall_real'])} -> "
                 f"{pct(c['recall_with_kept'])}, precision {pct(c['precision_real'])} -> "
                 f"{pct(c['precision_with_kept'])}" for c in gain["per_class"])
    return lines


def _spec_text(spec: Mapping[str, Any] | None) -> str:
    if not spec:
        return "n/a"
    parts = []
    if spec.get("min_recall"):
        parts.append(f"recall of {spec.get('positive_class') or 'every class'!r} >= {spec['min_recall']:g}"
                     if spec.get("positive_class") else f"recall of every class >= {spec['min_recall']:g}")
    if spec.get("min_accuracy"):
        parts.append(f"accuracy >= {spec['min_accuracy']:g}")
    if spec.get("min_fps"):
        parts.append(f">= {spec['min_fps']:g} FPS at {spec.get('input_size')}x{spec.get('input_size')}")
    return ", ".join(parts) or "nothing asked"


VERDICT_TEXT = {"met": "MET with 95 % confidence (interval lower bounds clear the targets)",
                "met_point_estimate": "met on the POINT ESTIMATE ONLY (the 95 % intervals reach below the targets)",
                "not_met": "NOT met"}


def _ci(iv: Mapping[str, Any] | None) -> str:
    if not iv or iv.get("point") is None:
        return "n/a"
    return f"{100 * iv['point']:.1f} % [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}] ({iv['k']}/{iv['n']})"


def _evidence_lines(report: Mapping[str, Any], *, pct: Any, num: Any) -> list[str]:
    lines: list[str] = []
    split = report.get("test_split")
    if split:
        lines.append(f"test split: figures on {split['used']} of {split['items']} test items "
                     f"({split['labeled_by_people']} labeled by people; {split['evidence']})"
                     + (f", {split['positives']} positives" if split.get("positives") is not None else ""))
    if report.get("test_accuracy_interval"):
        lines.append("test accuracy (95 % exact intervals): at the argmax "
                     f"{_ci(report.get('test_accuracy_argmax_interval'))}; "
                     f"at the shipped threshold {_ci(report['test_accuracy_interval'])}; defect recall there "
                     f"{_ci(report.get('defect_recall_interval'))}")
    at = report.get("accuracy_at_spec_recall_detail")
    if at:
        lines.append(f"accuracy at the spec's recall {at['target_recall']:g}: {_ci(at['accuracy_interval'])} "
                     f"at threshold {num(at['threshold'], '.4f')} (test recall {pct(at['recall'])}) — read off "
                     "the TEST operating curve, not the shipped threshold")
    ev = report.get("threshold_evidence")
    if ev and ev.get("validation_positives") is not None:
        lines.append(f"threshold evidence: rests on {ev['validation_positives']} validation positives; recall there "
                     f">= {num(ev.get('recall_lower_bound_95'), '.3f')} with 95 % confidence (one-sided)")
    per_class = report.get("test_per_class")
    if per_class:
        lines.append("class            items  recall (95 % interval)                precision (95 % interval)")
        for c, f in per_class.items():
            lines.append(f"{c:<16} {f['items']:>5}  {_ci(f['recall']):<37} {_ci(f['precision'])}")
    conf = report.get("test_confusion")
    if conf:
        width = max(8, *(len(c) + 1 for c in conf["classes"]))
        lines.append("confusion (rows true, columns decided): " + "".join(f"{c:>{width}}" for c in conf["classes"]))
        for c, row in zip(conf["classes"], conf["matrix"], strict=True):
            lines.append(f"  {c:<37} " + "".join(f"{v:>{width}}" for v in row))
    detail = report.get("spec_verdict_detail")
    if detail:
        lines.append(f"spec verdict: {VERDICT_TEXT.get(detail['verdict'], detail['verdict'])}")
        lines.extend(f"  - {r}" for r in detail.get("reasons", []))
        lines.extend(f"  note: {n}" for n in detail.get("notes", []))
    return lines


def _labeling_lines(report: Mapping[str, Any], *, pct: Any) -> list[str]:
    lines: list[str] = []
    if report.get("auto_label_coverage") is not None or report.get("auto_label_error_bound") is not None:
        estimate = report.get("expected_error_estimate")
        if report.get("auto_label_guarantee") == "expected" and estimate is not None:
            target = (report.get("options") or {}).get("max_auto_label_error")
            lines.append(f"auto-labels: coverage {pct(report.get('auto_label_coverage'))}; expected error <= "
                         f"{pct(target)} by conformal selection (estimate {pct(estimate)}); the held-out people's "
                         f"labels above the threshold give error <= {pct(report.get('auto_label_error_bound'))} "
                         "at 95 % (evidence only: the threshold was chosen on them)")
        else:
            lines.append(f"auto-labels: coverage {pct(report.get('auto_label_coverage'))}, error <= "
                         f"{pct(report.get('auto_label_error_bound'))} (the labeler's bound)")
    lc = report.get("learning_curve")
    if lc:
        what = "shares of the last round's labels" if _from_shares(lc) else "rounds"
        fit = (f" (a={lc['a']:.3f}, b={lc['b']:.3g}, c={lc['c']:.3f}, rmse {lc['rmse']:.4f} on "
               f"{len(lc['points'])} {what})" if lc.get("a") is not None else "")
        lines.append(f"learning curve {lc['model']}{fit}: {lc['status']}: {lc['note']}")
    return lines


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
    curve = report.get("operating_curve")
    if curve and curve.get("points"):
        plots.append(("Operating curve: test accuracy against test recall", _operating_curve_png(plt, curve, report)))
    lc = report.get("learning_curve")
    if lc and lc.get("points"):
        plots.append(("Learning curve (estimate)", _learning_curve_png(plt, lc)))
    return plots


def _operating_curve_png(plt: Any, curve: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """Accuracy against recall of the positive class over thresholds, the spec's targets as lines."""
    recall = [p[1] for p in curve["points"]]
    accuracy = [p[2] for p in curve["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(recall, accuracy, color="#4c72b0", marker=".", markersize=3, linewidth=1, label="test, each threshold")
    if curve.get("spec_recall"):
        ax.axvline(curve["spec_recall"], color="#c44e52", linestyle="--", linewidth=1,
                   label=f"spec recall {curve['spec_recall']:g}")
    if curve.get("spec_accuracy"):
        ax.axhline(curve["spec_accuracy"], color="#dd8452", linestyle="--", linewidth=1,
                   label=f"spec accuracy {curve['spec_accuracy']:g}")
    shipped = curve.get("shipped") or {}
    if shipped.get("recall") is not None and shipped.get("accuracy") is not None:
        ax.plot([shipped["recall"]], [shipped["accuracy"]], "o", color="#55a868", markersize=7,
                label=f"shipped threshold {shipped['threshold']:.3f} (set on validation)")
    at = report.get("accuracy_at_spec_recall_detail")
    if at:
        ax.plot([at["recall"]], [at["accuracy"]], "s", color="#8172b2", markersize=6,
                label=f"highest threshold reaching the spec's recall on test ({at['threshold']:.3f})")
    ax.set_xlabel(f"recall of {curve['positive_class']!r} (test, {curve['positives']} positives)")
    ax.set_ylabel(f"accuracy (test, {curve['items']} items)")
    ax.set_title("operating curve on the test items people labeled")
    ax.legend(fontsize=7, loc="lower left")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _from_shares(lc: Mapping[str, Any]) -> bool:
    """The learning curve was fitted to shares of the last round's labels, not to the rounds."""
    return lc.get("source") == "subsamples"


def _learning_curve_png(plt: Any, lc: Mapping[str, Any]) -> str:
    """The labeler's accuracy per round, the fitted power law (if any) and the spec's accuracy."""
    import numpy as np

    n = [p[0] for p in lc["points"]]
    acc = [p[1] for p in lc["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    what = ("the probe on shares of the last round's labels" if _from_shares(lc)
            else "labeler held-out accuracy per round")
    ax.plot(n, acc, "o", color="#4c72b0", label=f"{what} (representative labels)")
    if lc.get("a") is not None:
        top = max(max(n), lc.get("labels_needed") or 0) * 1.1
        xs = np.linspace(min(n), top, 200)
        ax.plot(xs, lc["a"] - lc["b"] * xs ** (-lc["c"]), color="#55a868",
                label=f"fit {lc['model']} (estimate)")
    if lc.get("target_accuracy"):
        ax.axhline(lc["target_accuracy"], color="#dd8452", linestyle="--", linewidth=1,
                   label=f"spec accuracy {lc['target_accuracy']:g}")
    if lc.get("labels_needed"):
        ax.axvline(lc["labels_needed"], color="#8172b2", linestyle=":", linewidth=1,
                   label=f"~{lc['labels_needed']} labels (estimate)")
    ax.set_xlabel("human labels")
    ax.set_ylabel("accuracy")
    ax.set_title(f"learning curve: {lc['status']}")
    ax.legend(fontsize=7, loc="lower right")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def report_images(report: Mapping[str, Any], objects: Any) -> dict[str, bytes]:
    """The stored pictures the report names, by title, read from ``objects`` (an ObjectStore): the generated
    samples' grid. One that cannot be read is left out (the page says so) rather than failing the report."""
    images: dict[str, bytes] = {}
    key = report.get("samples_grid_key")
    if key:
        try:
            images[SAMPLES_GRID_TITLE] = objects.get_bytes(key)
        except Exception as exc:  # any store error (S3's own included): a picture must not cost the report
            log.warning("report of run %s: the samples grid %r cannot be read: %s", report.get("run_id"), key, exc)
    return images


def render_html(report: dict[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The report as one self-contained HTML page: the verdict and its reasons, the text, the plots (when
    matplotlib is installed: the CLI has it; a service without it says so instead), the stored ``images``
    (:func:`report_images`) and the JSON."""
    v = report.get("verdict") or {}
    status = ""
    if report.get("spec_verdict"):
        text = VERDICT_TEXT.get(str(report["spec_verdict"]), str(report["spec_verdict"]))
        status = f"; verdict: <b>{html.escape(text)}</b>"
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in v.get("reasons", []))
    try:
        plots = "".join(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'/>"
            for title, png in _plots(report)
        )
    except ImportError:
        plots = "<p>Plots need matplotlib, which this server does not have (<code>pip install matplotlib</code>).</p>"
    for title, png in (images or {}).items():
        plots += (f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                  f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
    if report.get("samples_grid_key") and SAMPLES_GRID_TITLE not in (images or {}):
        key = html.escape(str(report["samples_grid_key"]))
        plots += f"<h2>{html.escape(SAMPLES_GRID_TITLE)}</h2><p>stored at <code>{key}"
        plots += "</code>; not read for this page.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>dlforge run report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:1em;"
        "white-space:pre-wrap;overflow-wrap:anywhere}</style></head><body>"
        f"<h1>dlforge run {html.escape(str(report.get('run_id')))}</h1>"
        f"<p>spec met: <b>{'yes' if v.get('met') else 'no'}</b>{status}</p><ul>{reasons}</ul>"
        f"<pre>{html.escape(format_text(report))}</pre>{plots}"
        f"<h2>Full report (JSON)</h2><pre>{html.escape(json.dumps(report, indent=2, default=str))}</pre>"
        "</body></html>"
    )


def write_html(report: dict[str, Any], path: Path, images: Mapping[str, bytes] | None = None) -> None:
    """:func:`render_html` written to ``path`` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, images))
