"""The numbers behind the decisions: metrics, the recall-first threshold, the spec check, the choice.

Everything here is pure arithmetic on arrays and values, so it is tested with hand-made numbers.

Decision rule with a threshold ``t`` on the positive class's probability: an image is the positive
class when ``p(positive) >= t``, otherwise the most probable of the other classes. Without a positive
class (or without a threshold) the decision is the argmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.events import Spec
from dlforge.common.intervals import lower_bound

# Float noise guard when comparing accuracies/recalls against limits.
_EPS = 1e-9


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def decide(probs: np.ndarray, *, positive: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Predicted class indices for ``(N, C)`` probabilities under the decision rule above."""
    probs = np.asarray(probs)
    if positive is None or threshold is None:
        out: np.ndarray = probs.argmax(axis=1)
        return out
    others = probs.copy()
    others[:, positive] = -np.inf
    pred = others.argmax(axis=1)
    pred[probs[:, positive] >= threshold] = positive
    return pred


class Metrics(BaseModel):
    """Classification quality of one variant on one split at one decision rule."""

    model_config = ConfigDict(extra="forbid")

    n: int
    accuracy: float
    recall: dict[str, float] = Field(description="per-class recall (NaN-free: classes without items are left out)")
    precision: dict[str, float]
    confusion: list[list[int]] = Field(description="rows: true class, columns: predicted class")


def metrics(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> Metrics:
    """Accuracy, per-class recall/precision and the confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (labels, pred), 1)
    recall = {c: float(conf[i, i] / conf[i].sum()) for i, c in enumerate(classes) if conf[i].sum() > 0}
    precision = {c: float(conf[i, i] / conf[:, i].sum()) for i, c in enumerate(classes) if conf[:, i].sum() > 0}
    n = int(labels.size)
    return Metrics(
        n=n,
        accuracy=float((labels == pred).mean()) if n else 0.0,
        recall=recall,
        precision=precision,
        confusion=conf.tolist(),
    )


class ThresholdView(BaseModel):
    """The recall-first threshold of one view of the validation split."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    positives: int
    used: bool = Field(description="False when the view had too few positives to be trusted")


class ThresholdChoice(BaseModel):
    """The decision threshold on the positive class's probability and how it was found."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    target_recall: float = Field(description="recall the threshold had to reach on the validation split")
    val_recall: float | None = Field(description="positive-class recall on validation at the threshold")
    val_positives: int
    met_on_val: bool
    rule: str
    val_detected: int | None = Field(default=None, description="validation positives at or above the threshold")
    val_recall_lower_bound: float | None = Field(
        default=None, description="one-sided 95 % exact lower bound of the recall the threshold reaches, from "
                                  "val_detected of val_positives: how much the threshold's recall rests on")
    views: dict[str, ThresholdView] = Field(
        default_factory=dict,
        description="every validation view the threshold was checked on (all items; items labeled by people)")


def choose_threshold(positive_scores: np.ndarray, *, min_recall: float, margin: float = 0.0) -> ThresholdChoice:
    """The highest threshold whose recall on ``positive_scores`` is at least ``min_recall + margin``.

    ``positive_scores`` are the positive class's probabilities of the validation items that truly are
    the positive class. Recall at ``t`` is the share of them with score ``>= t``; it only falls as ``t``
    rises, so the highest admissible ``t`` is the ``k``-th largest score with ``k = ceil(target * n)``.
    Any higher threshold keeps at most ``k - 1`` of them. The highest threshold is taken because it
    trades the fewest negatives for the recall asked (keeping accuracy).
    Without a recall constraint the threshold is 0.5 (the argmax for two classes).
    """
    scores = np.sort(np.asarray(positive_scores, dtype=np.float64))[::-1]
    n = int(scores.size)
    target = min(1.0, max(0.0, min_recall + margin)) if min_recall > 0 else 0.0
    if target <= 0.0:
        recall = float((scores >= 0.5).mean()) if n else None
        return ThresholdChoice(threshold=0.5, target_recall=0.0, val_recall=recall, val_positives=n,
                               met_on_val=True, rule="no recall constraint: default threshold 0.5")
    if n == 0:
        return ThresholdChoice(threshold=0.5, target_recall=target, val_recall=None, val_positives=0,
                               met_on_val=False,
                               rule="no positive items in the validation split: default threshold 0.5")
    k = max(1, math.ceil(target * n - _EPS))
    t = float(scores[k - 1])
    detected = int((scores >= t).sum())
    recall = detected / n
    return ThresholdChoice(threshold=t, target_recall=target, val_recall=recall, val_positives=n,
                           met_on_val=recall + _EPS >= target, val_detected=detected,
                           val_recall_lower_bound=lower_bound(detected, n, level=0.95),
                           rule=f"highest threshold keeping >= {k} of {n} validation positives "
                                f"(recall >= {target:.3f})")


def choose_threshold_views(
    views: Mapping[str, np.ndarray], *, min_recall: float, margin: float = 0.0, min_positives: int = 10,
) -> ThresholdChoice:
    """The recall-first threshold that meets the recall on every trusted view of the validation split.

    ``views`` maps a view's name (e.g. ``"all"``, ``"people"``) to the positive-class scores of its
    true positives. The validation split of an actively labeled dataset mixes labels from people with
    labels the labeler's classifier gave; a threshold tuned only on the latter inherits their mistakes
    (the trained model agrees with the auto-labels it learned from, so recall looks higher than it is).
    Each view with at least ``min_positives`` positives is used; the lowest of their thresholds is
    taken, so the recall target holds on each of them. The first view stands in when none has enough.
    """
    if not views:
        raise ValueError("choose_threshold_views needs at least one view")
    choices = {name: choose_threshold(scores, min_recall=min_recall, margin=margin) for name, scores in views.items()}
    trusted = [name for name, c in choices.items() if c.val_positives >= min_positives]
    if not trusted:
        trusted = [next(iter(choices))]
    name = min(trusted, key=lambda n: (choices[n].threshold, list(choices).index(n)))
    chosen = choices[name]
    table = {n: ThresholdView(threshold=c.threshold, positives=c.val_positives, used=n in trusted)
             for n, c in choices.items()}
    rule = chosen.rule
    if len(choices) > 1:
        ignored = [n for n in choices if n not in trusted]
        rule = (f"{rule} of the {name!r} view: the lowest threshold of the views {', '.join(trusted)}, so the "
                f"recall holds on each"
                + (f" ({', '.join(ignored)} ignored: fewer than {min_positives} positives)" if ignored else ""))
    return chosen.model_copy(update={"rule": rule, "views": table})


class SpecCheck(BaseModel):
    """Whether one variant meets the spec: recall first, then accuracy, then speed."""

    model_config = ConfigDict(extra="forbid")

    recall: float | None
    accuracy: float
    fps: float
    recall_ok: bool
    accuracy_ok: bool
    fps_ok: bool
    met: bool
    reasons: list[str] = Field(description="why the spec is not met (empty when it is)")


def check_spec(spec: Spec, *, recall: float | None, accuracy: float, fps: float) -> SpecCheck:
    """Compare measured test recall (of ``spec.positive_class``), test accuracy and FPS with the spec.

    ``recall`` None means it could not be measured (no positive items in the test split): that fails
    a recall constraint rather than passing it silently.
    """
    reasons: list[str] = []
    if spec.min_recall > 0:
        recall_ok = recall is not None and recall + _EPS >= spec.min_recall
        if not recall_ok:
            shown = "unmeasured" if recall is None else f"{recall:.4f}"
            reasons.append(f"recall of {spec.positive_class!r} {shown} < {spec.min_recall}")
    else:
        recall_ok = True
    accuracy_ok = accuracy + _EPS >= spec.min_accuracy
    if not accuracy_ok:
        reasons.append(f"accuracy {accuracy:.4f} < {spec.min_accuracy}")
    fps_ok = fps + _EPS >= spec.min_fps
    if not fps_ok:
        reasons.append(f"{fps:.2f} FPS at {spec.input_size}x{spec.input_size} < {spec.min_fps}")
    return SpecCheck(recall=recall, accuracy=accuracy, fps=fps, recall_ok=recall_ok, accuracy_ok=accuracy_ok,
                     fps_ok=fps_ok, met=recall_ok and accuracy_ok and fps_ok, reasons=reasons)


class Candidate(BaseModel):
    """What the variant choice looks at for one deployable variant."""

    model_config = ConfigDict(extra="forbid")

    name: str
    fps: float = Field(description="pipeline images/s at the spec's input size, batch 1")
    accuracy: float = Field(description="test accuracy at the argmax — what the variant loses vs the reference")
    spec: SpecCheck
    precision: str = Field(default="fp32", description="numeric precision (int8 variants face the agreement rule)")
    agreement: float | None = Field(
        default=None, description="share of test images whose argmax equals the reference's (None: not measured)")
    confident: bool = Field(default=False, description="the spec is met with 95 % confidence (interval lower bounds)")


class VariantChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chosen: str
    spec_met: bool
    reference: str
    reference_accuracy: float
    max_accuracy_drop: float
    max_int8_disagreement: float = 0.02
    why: str
    rejected: dict[str, list[str]] = Field(description="variant -> why it was not eligible")
    excluded: dict[str, str] = Field(
        default_factory=dict,
        description="variant -> why it could not be chosen at all, not even when no variant meets the spec")


def _shortfall(spec: SpecCheck, target: Spec | None) -> tuple[int, float]:
    """How far a variant is from the spec: criteria missed, then the sum of their relative shortfalls."""
    missed = [not spec.recall_ok, not spec.accuracy_ok, not spec.fps_ok]
    if target is None:
        return sum(missed), 0.0
    gap = 0.0
    if not spec.recall_ok:
        gap += 1.0 if spec.recall is None else max(0.0, target.min_recall - spec.recall) / target.min_recall
    if not spec.accuracy_ok and target.min_accuracy > 0:
        gap += max(0.0, target.min_accuracy - spec.accuracy) / target.min_accuracy
    if not spec.fps_ok and target.min_fps > 0:
        gap += max(0.0, target.min_fps - spec.fps) / target.min_fps
    return sum(missed), gap


def choose_variant(
    candidates: Sequence[Candidate],
    *,
    reference: str,
    max_accuracy_drop: float = 0.01,
    max_int8_disagreement: float = 0.02,
    spec: Spec | None = None,
) -> VariantChoice:
    """The fastest variant that meets the spec and loses at most ``max_accuracy_drop`` vs ``reference``.

    Rules, in order:

    1. an INT8 variant whose argmax disagrees with the reference on more than ``max_int8_disagreement``
       of the test images is excluded outright (its decisions are not the model's any more);
    2. of the variants that meet the spec and keep the accuracy, those that meet it with 95 %
       confidence (``confident``) come first, then the fastest;
    3. when none qualifies (``spec_met`` False), a variant that misses the recall is never kept when
       another meets it; of the rest, those within the accuracy tolerance come first, then the one
       closest to the spec (fewest criteria missed, then the smallest sum of relative shortfalls, with
       ``spec`` given), then the fastest.

    ``rejected`` says why each variant did not qualify, ``excluded`` why one could not be chosen at all.
    """
    by_name = {c.name: c for c in candidates}
    if reference not in by_name:
        raise ValueError(f"reference variant {reference!r} is not among the candidates {sorted(by_name)}")
    ref_acc = by_name[reference].accuracy
    rejected: dict[str, list[str]] = {}
    excluded: dict[str, str] = {}
    eligible: list[Candidate] = []
    admissible: list[Candidate] = []
    within: set[str] = set()
    for c in candidates:
        why = list(c.spec.reasons)
        if c.precision == "int8" and c.name != reference:
            disagreement = 1.0 - c.agreement if c.agreement is not None else None
            if disagreement is None or disagreement > max_int8_disagreement + _EPS:
                shown = "unmeasured" if disagreement is None else f"{disagreement * 100:.2f} %"
                reason = (f"INT8 argmax disagrees with {reference} on {shown} of test images "
                          f"(max {max_int8_disagreement * 100:.2f} %)")
                why.append(reason)
                excluded[c.name] = reason
        drop = ref_acc - c.accuracy
        if drop > max_accuracy_drop + _EPS:
            why.append(f"loses {drop * 100:.2f} accuracy points vs {reference} (max {max_accuracy_drop * 100:.2f})")
        else:
            within.add(c.name)
        if c.name not in excluded:
            admissible.append(c)
        if why:
            rejected[c.name] = why
        else:
            eligible.append(c)
    common = dict(reference=reference, reference_accuracy=ref_acc, max_accuracy_drop=max_accuracy_drop,
                  max_int8_disagreement=max_int8_disagreement, rejected=rejected, excluded=excluded)
    if eligible:
        best = max(eligible, key=lambda c: (c.confident, c.fps))
        sure = " and meet it with 95 % confidence" if best.confident else ""
        why_text = (f"fastest of the variants that meet the spec{sure} and lose <= {max_accuracy_drop * 100:.2f} "
                    f"accuracy points vs {reference} ({best.fps:.1f} FPS)")
        return VariantChoice(chosen=best.name, spec_met=True, why=why_text, **common)  # type: ignore[arg-type]
    pool = admissible
    notes: list[str] = []
    if any(c.spec.recall_ok for c in pool):
        missing = [c.name for c in pool if not c.spec.recall_ok]
        pool = [c for c in pool if c.spec.recall_ok]
        if missing:
            notes.append(f"{', '.join(missing)} left out: they miss the recall another variant meets")
    if any(c.name in within for c in pool):
        pool = [c for c in pool if c.name in within]
    best = min(pool, key=lambda c: (*_shortfall(c.spec, spec), -c.fps))
    missed, gap = _shortfall(best.spec, spec)
    why_text = ("no variant meets the spec: "
                + "; ".join(f"{name}: {', '.join(r)}" for name, r in rejected.items())
                + (". " + "; ".join(notes) if notes else "")
                + f". Chose the variant closest to the spec ({best.name}: {missed} of 3 criteria missed"
                + (f", relative shortfall {gap:.3f}" if spec is not None else "") + ").")
    return VariantChoice(chosen=best.name, spec_met=False, why=why_text, **common)  # type: ignore[arg-type]
