"""Threshold selection, decision rule, metrics, spec check and variant choice on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.events import Spec
from dlforge.optimizer.evaluation import (
    Candidate,
    check_spec,
    choose_threshold,
    choose_threshold_views,
    choose_variant,
    decide,
    metrics,
    softmax,
)


def test_softmax_rows_sum_to_one_and_are_stable() -> None:
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[0], [0.5, 0.5])
    assert np.allclose(p[1], [0.25, 0.75])


def test_threshold_is_the_highest_that_meets_the_recall() -> None:
    # 10 positives; recall 0.8 needs 8 of them above the threshold -> the 8th largest score.
    scores = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.3, 0.1])
    choice = choose_threshold(scores, min_recall=0.8)
    assert choice.threshold == pytest.approx(0.55)
    assert choice.val_recall == pytest.approx(0.8)
    assert choice.met_on_val
    # any higher threshold loses a positive, and recall falls under 0.8
    assert (scores >= np.nextafter(choice.threshold, 1)).mean() < 0.8


def test_threshold_rounds_the_needed_count_up() -> None:
    scores = np.array([0.9, 0.8, 0.7])  # recall 0.9 of 3 positives -> all 3 (2 would be 0.667)
    choice = choose_threshold(scores, min_recall=0.9)
    assert choice.threshold == pytest.approx(0.7)
    assert choice.val_recall == pytest.approx(1.0)
    # exactly representable fractions do not round up: 0.5 of 4 -> 2 positives
    assert choose_threshold(np.array([0.9, 0.8, 0.7, 0.6]), min_recall=0.5).threshold == pytest.approx(0.8)


def test_threshold_with_ties_keeps_the_recall() -> None:
    scores = np.array([0.9, 0.6, 0.6, 0.6, 0.2])
    choice = choose_threshold(scores, min_recall=0.4)  # 2 needed: the 2nd largest is 0.6 (tied)
    assert choice.threshold == pytest.approx(0.6)
    assert choice.val_recall == pytest.approx(0.8)


def test_threshold_margin_asks_more_recall() -> None:
    scores = np.linspace(1.0, 0.05, 20)
    plain = choose_threshold(scores, min_recall=0.8)
    safer = choose_threshold(scores, min_recall=0.8, margin=0.1)
    assert safer.threshold < plain.threshold
    assert safer.target_recall == pytest.approx(0.9)
    assert safer.val_recall is not None and safer.val_recall >= 0.9


def test_threshold_full_recall_takes_the_lowest_positive_score() -> None:
    scores = np.array([0.7, 0.02, 0.4])
    assert choose_threshold(scores, min_recall=1.0).threshold == pytest.approx(0.02)


def test_threshold_without_constraint_or_positives() -> None:
    free = choose_threshold(np.array([0.9, 0.2]), min_recall=0.0)
    assert free.threshold == 0.5 and free.met_on_val and free.val_recall == pytest.approx(0.5)
    none = choose_threshold(np.array([]), min_recall=0.9)
    assert none.threshold == 0.5 and not none.met_on_val and none.val_recall is None


def test_threshold_views_take_the_lowest_trusted_threshold() -> None:
    # auto-labeled positives the model agrees with score high; the ones people labeled score lower
    everyone = np.concatenate([np.linspace(0.95, 0.6, 30), np.linspace(0.7, 0.2, 12)])
    people = np.linspace(0.7, 0.2, 12)
    choice = choose_threshold_views({"all": everyone, "people": people}, min_recall=0.9, min_positives=10)
    alone = choose_threshold(people, min_recall=0.9)
    assert choice.threshold == pytest.approx(alone.threshold)
    assert choice.threshold < choose_threshold(everyone, min_recall=0.9).threshold
    # the recall holds on both views at the chosen threshold
    assert (everyone >= choice.threshold).mean() >= 0.9 and (people >= choice.threshold).mean() >= 0.9
    assert set(choice.views) == {"all", "people"} and all(v.used for v in choice.views.values())
    assert "'people'" in choice.rule


def test_threshold_views_ignore_a_view_with_too_few_positives() -> None:
    everyone = np.linspace(0.95, 0.5, 40)
    people = np.array([0.1, 0.9])  # two positives say little; they do not drag the threshold down
    choice = choose_threshold_views({"all": everyone, "people": people}, min_recall=0.9, min_positives=10)
    assert choice.threshold == pytest.approx(choose_threshold(everyone, min_recall=0.9).threshold)
    assert not choice.views["people"].used and choice.views["all"].used
    # with no view trusted, the first stands in
    few = choose_threshold_views({"all": people}, min_recall=0.5, min_positives=10)
    assert few.threshold == pytest.approx(0.9) and few.views["all"].used
    with pytest.raises(ValueError):
        choose_threshold_views({}, min_recall=0.9)


def test_decide_applies_the_threshold_to_the_positive_class_only() -> None:
    probs = np.array([[0.3, 0.7], [0.6, 0.4], [0.25, 0.75]])
    assert decide(probs).tolist() == [1, 0, 1]
    assert decide(probs, positive=0, threshold=0.28).tolist() == [0, 0, 1]
    three = np.array([[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
    # below the threshold, the best of the *other* classes wins
    assert decide(three, positive=1, threshold=0.55).tolist() == [2, 2]
    assert decide(three, positive=1, threshold=0.3).tolist() == [1, 1]


def test_metrics_confusion_recall_precision() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    m = metrics(labels, pred, ["defect", "good"])
    assert m.n == 10
    assert m.accuracy == pytest.approx(0.7)
    assert m.confusion == [[3, 1], [2, 4]]
    assert m.recall == {"defect": pytest.approx(0.75), "good": pytest.approx(4 / 6)}
    assert m.precision == {"defect": pytest.approx(3 / 5), "good": pytest.approx(4 / 5)}


SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)


def test_spec_check_passes_and_fails_each_criterion() -> None:
    ok = check_spec(SPEC, recall=0.95, accuracy=0.91, fps=12.0)
    assert ok.met and ok.reasons == []
    low_recall = check_spec(SPEC, recall=0.85, accuracy=0.99, fps=12.0)
    assert not low_recall.met and not low_recall.recall_ok and low_recall.accuracy_ok and low_recall.fps_ok
    assert "recall of 'defect' 0.8500 < 0.9" in low_recall.reasons[0]
    slow = check_spec(SPEC, recall=0.95, accuracy=0.95, fps=0.5)
    assert not slow.met and slow.reasons == ["0.50 FPS at 256x256 < 1.0"]
    bad = check_spec(SPEC, recall=0.5, accuracy=0.5, fps=0.1)
    assert len(bad.reasons) == 3
    # the limits themselves pass (>=), float noise included
    assert check_spec(SPEC, recall=0.9, accuracy=0.9 - 1e-12, fps=1.0).met
    # an unmeasurable recall fails a recall constraint
    assert not check_spec(SPEC, recall=None, accuracy=1.0, fps=10).recall_ok
    assert check_spec(Spec(), recall=None, accuracy=0.0, fps=0.0).met


def _cand(name: str, fps: float, acc: float, recall: float = 0.95) -> Candidate:
    return Candidate(name=name, fps=fps, accuracy=acc, spec=check_spec(SPEC, recall=recall, accuracy=acc, fps=fps))


def test_choose_fastest_that_meets_spec_within_one_point() -> None:
    choice = choose_variant([_cand("onnx_fp32", 40, 0.95), _cand("onnx_int8", 110, 0.945)], reference="onnx_fp32")
    assert choice.chosen == "onnx_int8" and choice.spec_met
    assert choice.rejected == {}


def test_choose_rejects_a_fast_variant_that_loses_accuracy() -> None:
    choice = choose_variant([_cand("onnx_fp32", 40, 0.95), _cand("onnx_int8", 110, 0.93)], reference="onnx_fp32")
    assert choice.chosen == "onnx_fp32" and choice.spec_met
    assert "loses 2.00 accuracy points" in choice.rejected["onnx_int8"][0]


def test_choose_rejects_a_fast_variant_that_misses_recall() -> None:
    choice = choose_variant([_cand("onnx_fp32", 40, 0.95), _cand("onnx_int8", 110, 0.95, recall=0.8)],
                            reference="onnx_fp32")
    assert choice.chosen == "onnx_fp32"
    assert "recall" in choice.rejected["onnx_int8"][0]


def test_choose_when_nothing_meets_the_spec_says_why() -> None:
    cands = [_cand("onnx_fp32", 0.5, 0.95), _cand("onnx_int8", 0.9, 0.95), _cand("bad", 9.0, 0.5)]
    choice = choose_variant(cands, reference="onnx_fp32")
    assert not choice.spec_met
    assert choice.chosen == "onnx_int8"  # fastest within the accuracy tolerance, not 'bad'
    assert set(choice.rejected) == {"onnx_fp32", "onnx_int8", "bad"}
    assert "no variant meets the spec" in choice.why


def test_choose_needs_the_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        choose_variant([_cand("onnx_int8", 1, 1)], reference="onnx_fp32")


def test_validation_views_split_people_from_auto_labels() -> None:
    from dlforge.optimizer.handlers import LabeledImages

    images = np.zeros((5, 4, 4, 3), np.uint8)
    labels = np.array([0, 0, 1, 0, 1])
    scores = np.array([0.9, 0.4, 0.2, 0.7, 0.1])
    mixed = LabeledImages(images, labels, people=np.array([True, False, True, True, False]))
    views = mixed.positive_views(scores, 0)
    assert views["all"].tolist() == [0.9, 0.4, 0.7] and views["people"].tolist() == [0.9, 0.7]
    # every label a person's (or no mask): one view
    assert set(LabeledImages(images, labels).positive_views(scores, 0)) == {"all"}
    assert set(LabeledImages(images, labels, people=np.ones(5, bool)).positive_views(scores, 0)) == {"all"}
    with pytest.raises(ValueError, match="people mask"):
        LabeledImages(images, labels, people=np.ones(4, bool))


def _full(name: str, *, fps: float, acc: float, recall: float, precision: str = "fp32",
          agreement: float | None = None, confident: bool = False) -> Candidate:
    return Candidate(name=name, fps=fps, accuracy=acc, spec=check_spec(SPEC, recall=recall, accuracy=acc, fps=fps),
                     precision=precision, agreement=agreement, confident=confident)


def test_a_variant_missing_a_recall_another_meets_is_never_chosen() -> None:
    # nothing meets the spec; INT8 misses only the recall (barely), FP32 meets the recall but misses
    # accuracy and speed: FP32 is kept, because INT8 drops defects that FP32 catches
    fp32 = _full("onnx_fp32", fps=0.5, acc=0.85, recall=0.95)
    int8 = _full("onnx_int8", fps=3.0, acc=0.85, recall=0.89, precision="int8", agreement=0.99)
    for order in ([fp32, int8], [int8, fp32]):
        choice = choose_variant(order, reference="onnx_fp32", spec=SPEC)
        assert choice.chosen == "onnx_fp32" and not choice.spec_met
        assert "onnx_int8 left out: they miss the recall another variant meets" in choice.why
    # when every variant misses the recall, the closest one is kept
    both = choose_variant([_full("onnx_fp32", fps=3.0, acc=0.95, recall=0.80),
                           _full("onnx_int8", fps=3.0, acc=0.95, recall=0.88, precision="int8", agreement=1.0)],
                          reference="onnx_fp32", spec=SPEC)
    assert both.chosen == "onnx_int8"


def test_an_int8_variant_disagreeing_on_more_than_2_percent_is_rejected() -> None:
    fp32 = _full("onnx_fp32", fps=40, acc=0.95, recall=0.95)
    int8 = _full("onnx_int8", fps=110, acc=0.95, recall=0.95, precision="int8", agreement=0.97)
    choice = choose_variant([fp32, int8], reference="onnx_fp32")
    assert choice.chosen == "onnx_fp32" and choice.spec_met
    assert choice.excluded["onnx_int8"] == ("INT8 argmax disagrees with onnx_fp32 on 3.00 % of test images "
                                            "(max 2.00 %)")
    assert choice.excluded["onnx_int8"] in choice.rejected["onnx_int8"]
    # also when nothing meets the spec (the INT8 variant would be the closest: it alone is fast enough)
    slow = _full("onnx_fp32", fps=0.5, acc=0.95, recall=0.95)
    fast = _full("onnx_int8", fps=2.0, acc=0.95, recall=0.95, precision="int8", agreement=0.97)
    assert choose_variant([slow, fast], reference="onnx_fp32", spec=SPEC).chosen == "onnx_fp32"
    # at exactly 2 % it stays a candidate; an unmeasured agreement does not
    ok = _full("onnx_int8", fps=110, acc=0.95, recall=0.95, precision="int8", agreement=0.98)
    assert choose_variant([fp32, ok], reference="onnx_fp32").chosen == "onnx_int8"
    blind = _full("onnx_int8", fps=110, acc=0.95, recall=0.95, precision="int8", agreement=None)
    assert "unmeasured" in choose_variant([fp32, blind], reference="onnx_fp32").excluded["onnx_int8"]


def test_when_nothing_meets_the_spec_the_closest_variant_is_kept() -> None:
    # every variant meets the recall; a: accuracy 0.85 (5.6 % short of 0.9), b: 0.5 FPS (50 % short),
    # c: misses both; a is closest although b and c are faster
    cands = [_full("onnx_fp32", fps=1.5, acc=0.85, recall=0.95), _full("b", fps=0.5, acc=0.95, recall=0.95),
             _full("c", fps=0.9, acc=0.85, recall=0.95)]
    choice = choose_variant(cands, reference="onnx_fp32", max_accuracy_drop=0.2, spec=SPEC)
    assert choice.chosen == "onnx_fp32" and "closest to the spec" in choice.why


def test_among_variants_meeting_the_spec_a_confident_one_comes_first() -> None:
    cands = [_full("onnx_fp32", fps=40, acc=0.95, recall=0.95, confident=True),
             _full("onnx_int8", fps=110, acc=0.95, recall=0.95, precision="int8", agreement=1.0)]
    choice = choose_variant(cands, reference="onnx_fp32")
    assert choice.chosen == "onnx_fp32" and "95 % confidence" in choice.why
    cands[1] = cands[1].model_copy(update={"confident": True})
    assert choose_variant(cands, reference="onnx_fp32").chosen == "onnx_int8"
