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
    recall = float((scores >= t).mean())
    return ThresholdChoice(threshold=t, target_recall=target, val_recall=recall, val_positives=n,
                           met_on_val=recall + _EPS >= target,
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


class VariantChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chosen: str
    spec_met: bool
    reference: str
    reference_accuracy: float
    max_accuracy_drop: float
    why: str
    rejected: dict[str, list[str]] = Field(description="variant -> why it was not eligible")


def choose_variant(
    candidates: Sequence[Candidate], *, reference: str, max_accuracy_drop: float = 0.01
) -> VariantChoice:
    """The fastest variant that meets the spec and loses at most ``max_accuracy_drop`` vs ``reference``.

    If none qualifies, the fastest variant within the accuracy tolerance is chosen (the reference
    always is) and ``spec_met`` is False; ``rejected`` says why each variant did not qualify.
    """
    by_name = {c.name: c for c in candidates}
    if reference not in by_name:
        raise ValueError(f"reference variant {reference!r} is not among the candidates {sorted(by_name)}")
    ref_acc = by_name[reference].accuracy
    rejected: dict[str, list[str]] = {}
    eligible: list[Candidate] = []
    accurate: list[Candidate] = []
    for c in candidates:
        why = list(c.spec.reasons)
        drop = ref_acc - c.accuracy
        if drop > max_accuracy_drop + _EPS:
            why.append(f"loses {drop * 100:.2f} accuracy points vs {reference} (max {max_accuracy_drop * 100:.2f})")
        else:
            accurate.append(c)
        if why:
            rejected[c.name] = why
        else:
            eligible.append(c)
    if eligible:
        best = max(eligible, key=lambda c: c.fps)
        why_text = (f"fastest of the variants that meet the spec and lose <= {max_accuracy_drop * 100:.2f} "
                    f"accuracy points vs {reference} ({best.fps:.1f} FPS)")
        return VariantChoice(chosen=best.name, spec_met=True, reference=reference, reference_accuracy=ref_acc,
                             max_accuracy_drop=max_accuracy_drop, why=why_text, rejected=rejected)
    best = max(accurate, key=lambda c: c.fps)
    why_text = ("no variant meets the spec: "
                + "; ".join(f"{name}: {', '.join(r)}" for name, r in rejected.items())
                + f". Chose the fastest variant within the accuracy tolerance ({best.name}).")
    return VariantChoice(chosen=best.name, spec_met=False, reference=reference, reference_accuracy=ref_acc,
                         max_accuracy_drop=max_accuracy_drop, why=why_text, rejected=rejected)
