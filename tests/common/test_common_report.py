"""The run report, built from the run view's document: today's keys kept, the honest spec check added,
learning curve and auto-label guarantee (carried by dataset.labeled v3), the verdict first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlforge.common import runs
from dlforge.common.events import (
    ClassCount,
    DatasetLabeled,
    DatasetUploaded,
    Event,
    LabelingRound,
    ModelOptimized,
    RunFailed,
    Spec,
    SubsampleFigure,
)
from dlforge.common.intervals import clopper_pearson
from dlforge.common.report import build_report, format_text, verdict, write_html
from dlforge.optimizer.evidence import (
    accuracy_at_recall,
    operating_curve,
    spec_verdict,
    split_figures,
)

SPEC = Spec(positive_class="defect", min_recall=0.95, min_accuracy=0.9, min_fps=1.0, input_size=256)
CLASSES = ["defect", "good"]
# keys reports/demo.json had before the spec check was added (with an optimized model, no truth)
TODAYS_KEYS = {
    "run_id", "state", "failure", "stages", "spec", "dataset", "human_labels", "human_label_fraction",
    "labeling_rounds", "auto_labels", "class_counts", "auto_label_accuracy", "test_accuracy", "defect_recall",
    "threshold", "chosen_variant", "threshold_rule", "threshold_views", "int8_speedup_vs_onnx_fp32",
    "int8_speedup_vs_torch_eager", "int8_speedup_vs_onnx_fp32_batch32", "int8_accuracy_drop",
    "int8_accuracy_drop_at_threshold", "int8_size_ratio", "fps", "variants", "spec_check", "spec_met",
}


def _optimizer_report() -> dict[str, Any]:
    """The parts of an optimizer report the CLI reads, built with the optimizer's own evidence types."""
    # the hand-worked score list of the optimizer's curve test: at recall >= 0.95, threshold 0.4, accuracy 5/6
    labels = np.array([0, 1, 0, 0, 1, 1])
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    probs = np.stack([p, 1 - p], axis=1)
    curve = operating_curve(labels, probs, positive=0, classes=CLASSES)
    shipped = np.where(p >= 0.3, 0, 1)  # threshold 0.3: defect (0) when p >= 0.3
    figures = split_figures(labels, shipped, CLASSES, positive=0)
    argmax = split_figures(labels, probs.argmax(1), CLASSES, positive=0)
    verdict = spec_verdict(SPEC, accuracy=figures.accuracy, recall={"defect": figures.positive_recall}, fps=30.0,
                           threshold_positives=25, threshold_recall_lower_bound=0.83)
    at = accuracy_at_recall(curve, SPEC.min_recall)
    assert at is not None and figures.positive_recall is not None
    variant = {"throughput_b1_ips": 30.0, "latency_b1_p50_ms": 33.0, "latency_b1_p99_ms": 40.0, "peak_rss_mb": 300.0,
               "size_mb": 4.0, "test_accuracy": figures.accuracy.point, "test_argmax": {"accuracy": 4 / 6},
               "test_positive_recall": 1.0, "fps": 30.0, "test_agreement_vs_onnx_fp32": 0.97,
               "threshold": {"rule": "highest threshold ...", "views": {}}, "verdict": verdict.model_dump(),
               "speed": {"batches": {"32": {"throughput_ips": 80.0}}}}
    return {
        "chosen_variant": "onnx_fp32", "spec": SPEC.model_dump(), "threshold": 0.3,
        "test_accuracy": figures.accuracy.point, "test_positive_recall": 1.0, "fps": 30.0,
        "variants": {"onnx_fp32": variant, "onnx_int8": {**variant, "test_agreement_vs_onnx_fp32": 0.97}},
        "choice": {"chosen": "onnx_fp32", "rejected": {
            "onnx_int8": ["INT8 argmax disagrees with onnx_fp32 on 3.00 % of test images (max 2.00 %)"]}},
        "test_split": {"items": 8, "labeled_by_people": 6, "used": 6, "positives": 3,
                       "evidence": "labels given by people"},
        "test_accuracy_argmax": 4 / 6, "test_accuracy_argmax_interval": argmax.accuracy.model_dump(),
        "test_accuracy_interval": figures.accuracy.model_dump(),
        "positive_recall_interval": figures.positive_recall.model_dump(),
        "test_figures": figures.model_dump(), "operating_curve": curve.model_dump(),
        "accuracy_at_spec_recall": at.model_dump(), "spec_verdict": verdict.model_dump(),
        "int8_test_agreement": 0.97,
    }


def _rounds(ns: list[int]) -> list[LabelingRound]:
    # acc(n) = 0.97 - 1.2 * n^-0.5 reaches 0.9 at n = (1.2 / 0.07)^2 = 293.9 -> 294 labels
    return [LabelingRound(round=i, human_labels=n, cv_accuracy=0.97 - 1.2 * n ** -0.5) for i, n in enumerate(ns)]


def _run(report: dict[str, Any] | None, *, rounds: list[int] = (), coverage: float | None = None,
         bound: float | None = None, subsamples: list[SubsampleFigure] = ()) -> dict[str, Any]:
    """The run view's document after the run's events (folded by the run view itself)."""
    uploaded = DatasetUploaded(dataset_id="ds", name="elpv", item_count=100, classes=CLASSES, labeled_count=0,
                               rejected_count=0, duplicate_count=0, manifest_key="m.json", spec=SPEC)
    labeled = DatasetLabeled(dataset_id="ds", labels_key="l.json", classes=CLASSES,
                             counts=[ClassCount(label="defect", count=30), ClassCount(label="good", count=70)],
                             human_labels=20, auto_labels=80, rounds=5, spec=SPEC, rounds_figures=_rounds(list(rounds)),
                             auto_label_coverage=coverage, auto_label_error_bound=bound,
                             subsample_figures=list(subsamples))
    payloads: list[Any] = [uploaded, labeled]
    if report is not None:
        payloads.append(ModelOptimized(dataset_id="ds", model_id="m", chosen_variant="onnx_fp32",
                                       artifacts={"onnx_fp32": "optimizer/ds/m/onnx_fp32.onnx"},
                                       report_key="r.json", report=report, spec_met=True, spec=SPEC))
    doc = None
    for p in payloads:
        doc = runs.apply(doc, Event.new(p, run_id="r1"), trace_id="ab" * 16)
    assert doc is not None
    return doc


def test_report_keeps_todays_keys_and_adds_the_spec_check(tmp_path: Path) -> None:
    report = build_report(_run(_optimizer_report(), rounds=[20, 40, 60, 80, 100], coverage=0.62, bound=0.018))
    assert set(report) >= TODAYS_KEYS
    assert next(iter(report)) == "verdict" and report["trace_id"] == "ab" * 16
    # the hand-worked figures: shipped threshold 0.3 -> 4 of 6 right, 3 of 3 defects; at the spec's recall 5/6
    assert report["test_accuracy_interval"]["k"] == 4 and report["test_accuracy_interval"]["n"] == 6
    assert report["defect_recall_interval"]["k"] == 3 and report["defect_recall_interval"]["n"] == 3
    assert report["accuracy_at_spec_recall"] == pytest.approx(5 / 6)
    assert report["accuracy_at_spec_recall_detail"]["threshold"] == 0.4
    assert report["test_accuracy_argmax"] == pytest.approx(4 / 6)
    # 4/6 < 0.9: not met
    assert report["spec_verdict"] == "not_met"
    assert report["test_confusion"] == {"classes": CLASSES, "matrix": [[3, 0], [2, 1]], "rows": "true class",
                                        "columns": "decided class"}
    assert report["test_per_class"]["good"]["recall"]["k"] == 1 and report["test_per_class"]["good"]["items"] == 3
    assert report["threshold_evidence"] == {"validation_positives": 25, "recall_lower_bound_95": 0.83}
    curve = report["operating_curve"]
    assert curve["points"][3] == [0.4, 1.0, pytest.approx(5 / 6)] and curve["spec_recall"] == 0.95
    assert curve["shipped"] == {"threshold": 0.3, "recall": 1.0, "accuracy": pytest.approx(4 / 6)}
    assert "3.00 %" in report["variant_rejections"]["onnx_int8"][0]
    assert report["auto_label_coverage"] == 0.62 and report["auto_label_error_bound"] == 0.018
    lc = report["learning_curve"]
    assert lc["status"] == "estimated" and lc["labels_needed"] == pytest.approx(294, abs=3)
    assert lc["current_labels"] == 20 and lc["more_labels"] == lc["labels_needed"] - 20
    json.dumps(report)  # the JSON report is plain data

    text = format_text(report)
    assert "spec verdict: NOT met" in text and "accuracy 0.6667 < 0.9 (4/6)" in text
    assert "read off the TEST operating curve" in text and "rests on 25 validation positives" in text
    assert "defect               3  100.0 %" in text and "coverage 62.0 %" in text
    assert "learning curve acc(n) = a - b * n^(-c)" in text and "estimate" in text
    html_path = tmp_path / "demo.html"
    write_html(report, html_path)
    page = html_path.read_text()
    assert "<h2>Operating curve: test accuracy against test recall</h2><img" in page
    assert "<h2>Learning curve (estimate)</h2><img" in page and "verdict: <b>NOT met</b>" in page


def test_labeler_figures_are_null_when_absent(tmp_path: Path) -> None:
    report = build_report(_run(_optimizer_report(), rounds=[20, 40]))
    assert report["auto_label_coverage"] is None and report["auto_label_error_bound"] is None
    assert report["learning_curve"]["status"] == "too_few_rounds"
    bare = build_report(_run({}))
    assert bare["auto_label_coverage"] is None and bare["learning_curve"]["status"] == "too_few_rounds"
    assert "spec_verdict" not in bare and bare["spec_met"] is True
    # no intervals in the optimizer's report: the verdict says it rests on the point estimates
    assert bare["verdict"] == {"met": True, "status": "met_point_estimate", "reasons": [
        "the optimizer reports the spec met on its point estimates; its report has no intervals"]}
    format_text(bare)


def test_a_met_point_estimate_reads_as_such() -> None:
    v = spec_verdict(SPEC, accuracy=clopper_pearson(95, 100), recall={"defect": clopper_pearson(60, 60)}, fps=5)
    report = {"run_id": "r", "state": "succeeded", "stages": {}, "spec_verdict_detail": v.model_dump()}
    assert "met on the POINT ESTIMATE ONLY" in format_text(report)


def test_the_verdict_gives_each_requirement_in_words_with_its_interval() -> None:
    from scipy.stats import beta

    report = build_report(_run(_optimizer_report()))
    v = report["verdict"]
    assert v["met"] is False and v["status"] == "not_met"
    # 3 of 3 defects: the exact 95 % lower bound is 0.025^(1/3) = 29.2 %; 4 of 6 right: Beta quantiles
    low, high = beta.ppf(0.025, 4, 3), beta.ppf(0.975, 5, 2)
    assert v["reasons"] == [
        "recall of 'defect' 100.0 % (95 % interval 29.2 % to 100.0 %, 3 of 3 test items of class 'defect' labeled "
        "by people) against at least 95.0 % asked: met on the point estimate only, the interval reaches down to "
        "29.2 %",
        f"accuracy 66.7 % (95 % interval {100 * low:.1f} % to {100 * high:.1f} %, 4 of 6 test items labeled by "
        "people) against at least 90.0 % asked: NOT met",
        "speed: 30.0 FPS at 256x256 with onnx_fp32 against at least 1 asked: met (a measurement, no interval)",
    ]


def test_a_failed_or_cancelled_run_says_where_and_why() -> None:
    doc = _run(None)
    doc = runs.apply(doc, Event.new(RunFailed(stage="augmenter", reason="needs two classes"), run_id="r1"))
    report = build_report(doc)
    assert report["verdict"] == {"met": False, "status": "failed",
                                 "reasons": ["the run failed in the augmenter stage: needs two classes"]}
    text = format_text(report)
    assert text.splitlines()[:2] == ["run r1: failed — FAILED", "  - the run failed in the augmenter stage: "
                                     "needs two classes"]


def test_the_text_follows_the_page_order() -> None:
    """verdict, labeling, model, training, variants, evidence: the report page's order."""
    report = build_report(_run(_optimizer_report(), rounds=[20, 40, 60, 80, 100], coverage=0.62, bound=0.018))
    report["chosen_model"] = {"arch": "small_cnn", "source_dataset": "elpv", "why": "highest score"}
    report["best_params"], report["best_value"] = {"lr": 0.01}, 0.8
    lines = format_text(report).splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert lines[0] == "run r1: succeeded — spec NOT met" and lines[1].startswith("  - recall of 'defect'")
    order = [first("labels:"), first("auto-labels:"), first("chosen model:"), first("best parameters"),
             first("variant "), first("not chosen:"), first("test split:"), first("spec verdict:")]
    assert order == sorted(order)


def test_reasons_beyond_the_figures_are_kept_whatever_words_they_use() -> None:
    """The optimizer's other reasons are kept even when they mention recall, accuracy or FPS (a report listing
    them apart, and an older one with only its reasons list); its figure reasons are not repeated."""
    v = spec_verdict(SPEC, accuracy=clopper_pearson(99, 100), recall={"defect": clopper_pearson(60, 60)}, fps=0.5,
                     evidence_from_people=False)
    detail = v.model_dump()
    assert detail["other_reasons"] == [detail["reasons"][-1]]
    other = "the recall and accuracy are of auto-labels, not people's; FPS measured on 1 core"
    for given in ({**detail, "other_reasons": [other]},
                  {**{k: x for k, x in detail.items() if k != "other_reasons"}, "reasons": [*detail["reasons"][:-1],
                                                                                          other]}):
        report = {"run_id": "r", "state": "succeeded", "stages": {}, "spec_verdict_detail": given,
                  "chosen_variant": "onnx_int8"}
        reasons = verdict(report, spec=SPEC)["reasons"]
        assert reasons[-1] == other and len(reasons) == 4, reasons  # recall, accuracy, speed, the other
        assert not any(r.startswith("0.50 FPS") for r in reasons)


def test_a_verdict_the_figures_disagree_with_shows_both() -> None:
    """The optimizer says met; its own intervals say the accuracy is not: both are said, the status is not_met."""
    v = spec_verdict(SPEC, accuracy=clopper_pearson(99, 100), recall={"defect": clopper_pearson(200, 200)}, fps=5)
    assert v.verdict == "met"
    detail = {**v.model_dump(), "accuracy": clopper_pearson(80, 100).model_dump()}  # 80 of 100 against 90 %
    report = {"run_id": "r", "state": "succeeded", "stages": {}, "spec_verdict_detail": detail}
    out = verdict(report, spec=SPEC)
    assert out["status"] == "not_met" and out["met"] is False
    assert out["reasons"][-1] == ("the optimizer's verdict is 'met' but the figures above give 'not_met': they "
                                  "differ, so the status is the more cautious, 'not_met'")
    agreeing = verdict({**report, "spec_verdict_detail": v.model_dump()}, spec=SPEC)
    assert agreeing["status"] == "met" and not any("differ" in r for r in agreeing["reasons"])


def test_the_kept_samples_gain_and_their_grid_reach_the_text_and_the_page(tmp_path: Path) -> None:
    import base64

    from dlforge.common.events import AugmentationCount, AugmentationGain, ClassGain, DatasetAugmented
    from dlforge.common.objects.fs import FsObjectStore
    from dlforge.common.report import render_html, report_images

    gain = AugmentationGain(
        classifier="lr", val_items=40, kept_samples=9, accuracy_real=0.8, accuracy_with_kept=0.825, changed=3,
        per_class=[ClassGain(label="defect", val_items=10, recall_real=0.5, recall_with_kept=0.6, precision_real=1.0,
                             precision_with_kept=0.75),
                   ClassGain(label="good", val_items=30, recall_real=0.9, recall_with_kept=0.9, precision_real=None,
                             precision_with_kept=0.9)])
    augmented = DatasetAugmented(
        dataset_id="ds", manifest_key="a.json", classes=CLASSES, spec=SPEC, gain=gain,
        samples_grid_key="augmenter/ds/samples-grid.png",
        augmentation=[AugmentationCount(label="defect", real=30, generated=12, kept=9),
                      AugmentationCount(label="good", real=70, generated=0, kept=0)])
    doc = runs.apply(_run(None), Event.new(augmented, run_id="r1"), trace_id="ab" * 16)
    report = build_report(doc)
    assert report["augmentation_gain"] == gain.model_dump()
    text = format_text(report)
    assert ("kept samples on 40 real validation images (lr, real only -> real + 9 kept): accuracy 80.0 % -> 82.5 %, "
            "3 predictions changed") in text
    assert "  defect (10 images): recall 50.0 % -> 60.0 %, precision 100.0 % -> 75.0 %" in text
    assert "  good (30 images): recall 90.0 % -> 90.0 %, precision n/a -> 90.0 %" in text

    objects = FsObjectStore(tmp_path / "o")
    assert report_images(report, objects) == {}  # not stored (yet): left out, the page says where it would be
    assert "augmenter/ds/samples-grid.png</code>; not read for this page" in render_html(report)
    png = b"\x89PNG\r\n\x1a\n grid bytes"
    objects.put_bytes("augmenter/ds/samples-grid.png", png, content_type="image/png")
    images = report_images(report, objects)
    assert list(images.values()) == [png]
    page = render_html(report, images)
    assert f"src='data:image/png;base64,{base64.b64encode(png).decode()}'" in page and "not read" not in page
    # a run without augmentation names no grid
    assert report_images(build_report(_run(None)), objects) == {}

    class Denied:
        def get_bytes(self, key: str) -> bytes:
            raise RuntimeError(f"S3 AccessDenied on {key}")  # not an OSError, as minio's S3Error is not

    assert report_images(report, Denied()) == {}


def test_the_standardized_domains_are_reported() -> None:
    doc = _run(None)
    assert build_report(doc)["domains_standardized"] == {} and "domain adaptation" not in format_text(build_report(doc))
    labeled = DatasetLabeled(dataset_id="ds", labels_key="l.json", classes=CLASSES,
                             counts=[ClassCount(label="defect", count=30), ClassCount(label="good", count=70)],
                             human_labels=20, auto_labels=80, rounds=5, spec=SPEC,
                             domains_standardized={"mono": 1074, "poly": 1550})
    report = build_report(runs.apply(doc, Event.new(labeled, run_id="r1"), trace_id="ab" * 16))
    assert report["domains_standardized"] == {"mono": 1074, "poly": 1550}
    assert ("domain adaptation: each domain's embeddings given the whole set's moments before labeling (mono 1,074 "
            "items, poly 1,550 items)") in format_text(report)


def test_the_trials_line_says_on_how_much_of_the_data_they_trained() -> None:
    from dlforge.common.events import HpoCompleted, TrialRecord

    trials = [TrialRecord(number=n, state="complete", value=0.8, params={}, fidelity=f, promoted_from=p)
              for n, (f, p) in enumerate([(0.25, None), (0.25, None), (0.25, None), (0.5, 2), (None, None)])]
    done = HpoCompleted(study_name="s", dataset_id="ds", model_id="m", arch="a", weights_key="w.pt",
                        best_params={"lr": 0.1}, best_value=0.8, trials=trials,
                        manifest_key="m.json", classes=CLASSES, spec=SPEC)
    report = build_report(runs.apply(_run(None), Event.new(done, run_id="r1"), trace_id="ab" * 16))
    assert ("trials: 5 (5 complete, 0 pruned, 0 failed); trained on 3 at 25 %, 1 at 50 % of the train split"
            in format_text(report))
    assert "tuner_choice" not in report
    why = "kept the baseline: trial 1 (0.810) was right on 3 of the 4 val items it and the baseline disagree on"
    kept = done.model_copy(update={"choice": why})
    report = build_report(runs.apply(_run(None), Event.new(kept, run_id="r1"), trace_id="ab" * 16))
    lines = format_text(report).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("chosen parameters (val accuracy 0.800): "))
    assert report["tuner_choice"] == why and lines[at + 1] == f"  {why}"
    assert not any(line.startswith("best parameters") for line in lines)


def test_the_auto_label_line_says_which_rule_chose_the_threshold() -> None:
    doc = _run(None, coverage=0.62, bound=0.018)
    report = build_report(doc)
    assert (report["auto_label_guarantee"], report["expected_error_estimate"]) == (None, None)
    assert "auto-labels: coverage 62.0 %, error <= 1.8 % (the labeler's bound)" in format_text(report)
    labeled = DatasetLabeled(dataset_id="ds", labels_key="l.json", classes=CLASSES,
                             counts=[ClassCount(label="defect", count=30), ClassCount(label="good", count=70)],
                             human_labels=20, auto_labels=80, rounds=5, spec=SPEC, auto_label_coverage=0.7,
                             auto_label_error_bound=0.0248, auto_label_guarantee="expected",
                             expected_error_estimate=0.0087)
    report = build_report(runs.apply(doc, Event.new(labeled, run_id="r1"), trace_id="ab" * 16))
    assert (report["auto_label_guarantee"], report["expected_error_estimate"]) == ("expected", 0.0087)
    text = format_text(report)
    # the run's target comes from its options (the upload's: PipelineOptions' default 2 %)
    assert ("auto-labels: coverage 70.0 %; expected error <= 2.0 % by conformal selection (estimate 0.9 %); the "
            "held-out people's labels above the threshold give error <= 2.5 % at 95 % (evidence only: the "
            "threshold was chosen on them)") in text
    assert "the labeler's bound" not in text


def test_test_time_views_are_reported_when_the_model_was_trained_on_views() -> None:
    used = {"trained_views": ["identity", "hflip"], "used": True, "views": ["identity", "hflip"], "val_items": 9,
            "val_accuracy_plain": 0.8, "val_accuracy_averaged": 0.9, "torch_fps_averaged": 30.0,
            "reason": "averaged over identity, hflip: accuracy on 9 people-labeled validation items 0.800 -> 0.900"}
    report = build_report(_run({**_optimizer_report(), "test_views": used}))
    assert report["test_views"] == used
    assert "test-time views: averaged over identity, hflip: accuracy on 9" in format_text(report)
    off = {**used, "used": False, "views": ["identity"], "reason": "off (test_views=none)"}
    assert "test-time views: not used: off (test_views=none)" in format_text(
        build_report(_run({**_optimizer_report(), "test_views": off})))
    # a model trained on no view but the identity: no line (nothing to average over)
    plain = {**off, "trained_views": ["identity"]}
    assert "test-time views" not in format_text(build_report(_run({**_optimizer_report(), "test_views": plain})))


def test_with_two_rounds_the_learning_curve_comes_from_the_last_rounds_shares(tmp_path: Path) -> None:
    # the shares on acc(n) = 0.97 - 1.2 * n^-0.5, which reaches 0.9 at n = (1.2 / 0.07)^2 = 293.9 -> 294 labels
    shares = [SubsampleFigure(human_labels=n, heldout_accuracy=0.97 - 1.2 * n ** -0.5) for n in (3, 5, 8, 10, 15, 20)]
    report = build_report(_run(_optimizer_report(), rounds=[10, 20], subsamples=shares))
    lc = report["learning_curve"]
    assert lc["status"] == "estimated" and lc["source"] == "subsamples"
    assert lc["labels_needed"] == pytest.approx(294, abs=3) and lc["current_labels"] == 20
    assert lc["beyond_items"] is True  # the data set has 100 items
    text = format_text(report)
    assert "on 6 shares of the last round's labels" in text and "more than the data set's 100 items" in text
    write_html(report, tmp_path / "demo.html")
    assert "<h2>Learning curve (estimate)</h2><img" in (tmp_path / "demo.html").read_text()


def test_the_choice_is_explained_by_the_weighted_sub_scores_only() -> None:
    from types import SimpleNamespace

    from dlforge.common.report import _why

    winner = SimpleNamespace(scores={"logme": 2.5, "logme_norm": 1.0, "fps_b1": 40.0, "fps_b1_norm": 0.25,
                                     "knn_bacc_norm": 0.5}, total=0.8)
    runner = SimpleNamespace(arch="small_cnn", source_dataset="mnist", total=0.3)
    text = _why(winner, [winner, runner], {"logme": 0.6, "knn_bacc": 0.4, "fps_b1": 0.0})
    assert text == ("highest combined score 0.800: logme 1.00 (weight 0.6), knn_bacc 0.50 (weight 0.4); "
                    "runner-up small_cnn/mnist at 0.300")


def test_the_final_training_line_gives_its_epochs_and_the_view_check() -> None:
    from dlforge.common.events import ModelTrained

    metrics = {"epochs": 15.0, "best_epoch": 10.0, "train_seconds": 339.8, "views": 3.0,
               "view_check_identity": 0.9, "view_check_hflip": 0.875, "view_check_vflip": 0.5,
               "view_allowed_cost": 0.05, "view_probe_frozen": 1.0, "view_probe_kept": 0.0, "val_accuracy": 0.9}
    trained = ModelTrained(dataset_id="ds", model_id="m", arch="a", checkpoint_key="c.pt", manifest_key="m.json",
                           classes=CLASSES, params={"lr": 0.001}, metrics=metrics, no_of_workers=1, spec=SPEC)

    def text_of(m: dict[str, float]) -> str:
        event = Event.new(trained.model_copy(update={"metrics": m}), run_id="r1")
        return format_text(build_report(runs.apply(_run(None), event, trace_id="ab" * 16))) + "\n"

    assert ("final training: 15 epochs (weights of epoch 10) in 340 s; trained on 3 views, the identity included; "
            "view check (probe: a head on the frozen units, trained without views), val accuracy: identity 0.900, "
            "hflip 0.875, vflip 0.500 (a view may cost 0.050)\n") in text_of(metrics)
    kept = {**metrics, "views": 1.0, "view_probe_frozen": 0.0, "view_probe_kept": 1.0}
    assert ("final training: 15 epochs (weights of epoch 10) in 340 s; view check (probe: the model itself, trained "
            "without views), val accuracy: identity 0.900, hflip 0.875, vflip 0.500 (a view may cost 0.050); the "
            "check's probe, trained without views, is the model kept\n") in text_of(kept)
    text = text_of({"epochs": 3.0, "train_seconds": 12.0, "views": 1.0})
    assert "final training: 3 epochs in 12 s\n" in text and "view check" not in text
