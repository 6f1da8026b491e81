"""What the test split shows, and how surely: intervals, per-class figures, the operating curve, the verdict.

Everything here is arithmetic on labels, predictions and probabilities of the test items people
labeled (auto-labels are the labeler's guesses, not evidence), so it is tested with hand-made numbers.

- :func:`split_figures`: accuracy and the positive class's recall with exact (Clopper-Pearson) 95 %
  intervals, per-class recall and precision with theirs, and the confusion matrix.
- :func:`operating_curve`: accuracy against recall of the positive class for every threshold on its
  probability (the decision rule of :func:`~dlforge.optimizer.evaluation.decide`), and
  :func:`accuracy_at_recall`, the accuracy at the highest threshold whose recall reaches a target.
- :func:`spec_verdict`: ``met`` (the interval's lower bounds clear the spec's targets), ``met_point_estimate``
  (only the point estimates do) or ``not_met``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.events import Spec
from dlforge.common.intervals import Interval, clopper_pearson

# Float noise guard when comparing rates against limits (the same as evaluation._EPS).
_EPS = 1e-9
LEVEL = 0.95

Verdict = Literal["met", "met_point_estimate", "not_met"]


class ClassFigures(BaseModel):
    """One class on the test split: recall (of its true items) and precision (of the items decided as it)."""

    model_config = ConfigDict(extra="forbid")

    items: int = Field(description="test items truly of this class")
    predicted: int = Field(description="test items decided as this class")
    recall: Interval
    precision: Interval


class SplitFigures(BaseModel):
    """Quality on the test items people labeled, at one decision rule, with 95 % intervals."""

    model_config = ConfigDict(extra="forbid")

    items: int = Field(description="test items the figures rest on (labeled by people)")
    positive_class: str | None
    positives: int | None = Field(description="of them, items truly of the positive class")
    accuracy: Interval
    positive_recall: Interval | None = Field(description="recall of the positive class (None without one)")
    per_class: dict[str, ClassFigures]
    classes: list[str]
    confusion: list[list[int]] = Field(description="rows: true class, columns: decided class")


def split_figures(
    labels: np.ndarray, pred: np.ndarray, classes: Sequence[str], *, positive: int | None, level: float = LEVEL
) -> SplitFigures:
    """Exact intervals for accuracy, every class's recall and precision; the confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if labels.shape != pred.shape:
        raise ValueError(f"{labels.shape} labels but {pred.shape} predictions")
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (labels, pred), 1)
    diag = np.diag(conf)
    per_class = {
        c: ClassFigures(items=int(conf[i].sum()), predicted=int(conf[:, i].sum()),
                        recall=clopper_pearson(int(diag[i]), int(conf[i].sum()), level=level),
                        precision=clopper_pearson(int(diag[i]), int(conf[:, i].sum()), level=level))
        for i, c in enumerate(classes)
    }
    pos_name = classes[positive] if positive is not None else None
    return SplitFigures(
        items=int(labels.size), positive_class=pos_name,
        positives=per_class[pos_name].items if pos_name is not None else None,
        accuracy=clopper_pearson(int(diag.sum()), int(labels.size), level=level),
        positive_recall=per_class[pos_name].recall if pos_name is not None else None,
        per_class=per_class, classes=list(classes), confusion=conf.tolist(),
    )


# ----------------------------------------------------------------------------------------------
# The operating curve
# ----------------------------------------------------------------------------------------------


class CurvePoint(BaseModel):
    """The decision at one threshold: positive when ``p(positive) >= threshold``."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    detected: int = Field(description="true positives decided positive")
    correct: int = Field(description="items decided as their true class")
    recall: float
    accuracy: float


class OperatingCurve(BaseModel):
    """Accuracy against the positive class's recall on the test items people labeled, highest threshold first.

    Recall never falls as the threshold falls. ``points`` may be thinned (``thinned`` True) for the report;
    the figures read off it (:func:`accuracy_at_recall`) are taken from the full curve.
    """

    model_config = ConfigDict(extra="forbid")

    positive_class: str
    items: int
    positives: int
    points: list[CurvePoint]
    thinned: bool = False

    def thin(self, max_points: int = 300, *, keep: Sequence[float] = ()) -> OperatingCurve:
        """At most about ``max_points`` points, evenly spread over the curve; thresholds in ``keep`` stay."""
        if len(self.points) <= max_points:
            return self
        idx = set(np.linspace(0, len(self.points) - 1, max_points).round().astype(int).tolist())
        idx |= {i for i, p in enumerate(self.points) if p.threshold in set(keep)}
        return self.model_copy(update={"points": [self.points[i] for i in sorted(idx)], "thinned": True})


def operating_curve(labels: np.ndarray, probs: np.ndarray, *, positive: int, classes: Sequence[str]) -> OperatingCurve:
    """Recall and accuracy at every distinct positive-class probability taken as the threshold.

    At threshold ``t`` an item is the positive class when ``p(positive) >= t``, otherwise the most
    probable other class; accuracy counts the positives above ``t`` plus the items below it whose
    best other class is their label.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(labels)} labels")
    n = len(labels)
    scores = probs[:, positive]
    others = probs.copy()
    others[:, positive] = -np.inf
    right_if_negative = others.argmax(axis=1) == labels  # never true for a true positive
    is_pos = labels == positive
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    cum_pos = np.cumsum(is_pos[order])
    cum_right_neg = np.cumsum(right_if_negative[order])
    total_right_neg = int(right_if_negative.sum())
    positives = int(is_pos.sum())
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if n else np.zeros(0, dtype=np.int64)
    points = []
    for e in ends:
        detected = int(cum_pos[e])
        correct = detected + total_right_neg - int(cum_right_neg[e])
        points.append(CurvePoint(threshold=float(s[e]), detected=detected, correct=correct,
                                 recall=detected / positives if positives else 0.0, accuracy=correct / n))
    return OperatingCurve(positive_class=classes[positive], items=n, positives=positives, points=points)


class AtRecall(BaseModel):
    """The test accuracy at the highest threshold whose test recall reaches ``target_recall``."""

    model_config = ConfigDict(extra="forbid")

    target_recall: float
    threshold: float
    recall: float
    accuracy: float
    accuracy_interval: Interval
    rule: str


def accuracy_at_recall(curve: OperatingCurve, target_recall: float, *, level: float = LEVEL) -> AtRecall | None:
    """Read the accuracy off the (full) test curve at the highest threshold reaching ``target_recall``.

    None when the test split has no positive items. This threshold is chosen on test, so the figure
    says what the model can do at the spec's recall, not what the shipped threshold does.
    """
    if curve.positives == 0 or not curve.points:
        return None
    point = next(p for p in curve.points if p.recall + _EPS >= target_recall or p is curve.points[-1])
    return AtRecall(
        target_recall=target_recall, threshold=point.threshold, recall=point.recall, accuracy=point.accuracy,
        accuracy_interval=clopper_pearson(point.correct, curve.items, level=level),
        rule=(f"test accuracy at the highest threshold whose TEST recall of {curve.positive_class!r} reaches "
              f"{target_recall:g} ({point.detected} of {curve.positives} positives, {curve.items} test items "
              "labeled by people); read off the test operating curve, not the shipped threshold"),
    )


# ----------------------------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------------------------


class SpecVerdict(BaseModel):
    """Whether the spec is met with 95 % confidence, on the point estimate only, or not at all."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    level: float
    test_items: int = Field(description="test items labeled by people the verdict rests on")
    test_positives: int | None
    accuracy: Interval
    recall: dict[str, Interval] = Field(description="recall interval of each class the spec constrains")
    fps: float
    fps_ok: bool
    point_estimate_ok: bool
    lower_bounds_ok: bool
    threshold_positives: int | None = Field(
        default=None, description="validation positives (of the view that set it) the recall threshold rests on")
    threshold_recall_lower_bound: float | None = Field(
        default=None, description="one-sided 95 % lower bound of the recall the threshold reaches on them")
    reasons: list[str] = Field(description="what keeps the verdict from 'met'")
    other_reasons: list[str] = Field(default_factory=list, description="those of ``reasons`` not about the "
                                     "accuracy, recall or FPS figures (which the fields above give)")
    notes: list[str] = Field(default_factory=list)


def spec_verdict(
    spec: Spec,
    *,
    accuracy: Interval,
    recall: Mapping[str, Interval],
    fps: float,
    threshold_positives: int | None = None,
    threshold_recall_lower_bound: float | None = None,
    evidence_from_people: bool = True,
) -> SpecVerdict:
    """The three-way verdict from test intervals (accuracy, the constrained recalls) and the measured FPS.

    ``recall`` maps each class the spec constrains (the positive class, or every class without one)
    to its test recall interval; a recall with no test items cannot be checked and fails. Speed is a
    measurement, not a rate, so it is compared as it is. ``evidence_from_people`` False (no test
    item labeled by people: the figures would score the model against auto-labels) makes the verdict
    ``not_met`` whatever the figures say.
    """
    level = accuracy.level
    reasons: list[str] = []
    notes: list[str] = []
    point_ok = lower_ok = True

    def check(what: str, iv: Interval, target: float) -> None:
        nonlocal point_ok, lower_ok
        if iv.point is None:
            point_ok = lower_ok = False
            reasons.append(f"{what} cannot be measured: no test items")
            return
        if iv.point + _EPS < target:
            point_ok = lower_ok = False
            reasons.append(f"{what} {iv.point:.4f} < {target:g} ({iv.k}/{iv.n})")
        elif iv.low + _EPS < target:
            lower_ok = False
            reasons.append(f"{what} {iv.point:.4f} >= {target:g} but its {level:.0%} interval reaches down to "
                           f"{iv.low:.4f} ({iv.k}/{iv.n})")

    if spec.min_recall > 0:
        if not recall:
            point_ok = lower_ok = False
            reasons.append("recall cannot be measured: no class to measure it on")
        for name, iv in recall.items():
            check(f"recall of {name!r}", iv, spec.min_recall)
    if spec.min_accuracy > 0:
        check("accuracy", accuracy, spec.min_accuracy)
    fps_ok = fps + _EPS >= spec.min_fps
    if not fps_ok:
        reasons.append(f"{fps:.2f} FPS at {spec.input_size}x{spec.input_size} < {spec.min_fps:g}")
    other: list[str] = []
    if not evidence_from_people:
        point_ok = lower_ok = False
        other.append("no test item is labeled by people: the figures compare the model with auto-labels, "
                       "which cannot show the spec is met")
    reasons.extend(other)
    if threshold_positives is not None and spec.min_recall > 0:
        bound = "n/a" if threshold_recall_lower_bound is None else f"{threshold_recall_lower_bound:.3f}"
        notes.append(f"the recall threshold rests on {threshold_positives} validation positives; the recall it "
                     f"reaches on them is >= {bound} with {level:.0%} confidence (one-sided)")
    if point_ok and lower_ok and fps_ok:
        verdict: Verdict = "met"
    elif point_ok and fps_ok:
        verdict = "met_point_estimate"
    else:
        verdict = "not_met"
    return SpecVerdict(
        verdict=verdict, level=level, test_items=accuracy.n,
        test_positives=(next(iter(recall.values())).n if spec.positive_class is not None and recall else None),
        accuracy=accuracy, recall=dict(recall), fps=fps, fps_ok=fps_ok, point_estimate_ok=point_ok,
        lower_bounds_ok=lower_ok, threshold_positives=threshold_positives,
        threshold_recall_lower_bound=threshold_recall_lower_bound, reasons=reasons, other_reasons=other,
        notes=notes,
    )
