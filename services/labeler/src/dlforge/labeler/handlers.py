"""The labeler's pure logic: splits, the first batch, one active-learning round, the labeled manifest.

Everything here takes arrays and pydantic models and returns values; the worker loads the inputs
and persists the outputs. Ingestion lives in :mod:`dlforge.labeler.ingest`, the classifier in
:mod:`dlforge.labeler.classifier`, the query strategies in :mod:`dlforge.labeler.strategies`.

The loop, per dataset of N items:

1. splits: a random ``test`` share (10 %, capped by the label budget), ``val`` 15 % of the rest,
   ``train`` the rest;
2. the first batch asks people for every test item without a given label, plus ``seed_fraction * N``
   items: half drawn at random from the val split, half a representative seed from the train split
   (the item nearest each k-means centroid);
3. after each completed batch a calibrated classifier is fitted on every human and given label;
   a confidence threshold is chosen on the held-out predictions of the labeled items of the random
   test split and the random val sample (:func:`random_sample`) so that the auto-labels' error stays <=
   ``max_auto_label_error`` with 95 % confidence, or in expectation with ``guarantee="expected"``
   (``DLFORGE_LABELER_GUARANTEE``; :mod:`dlforge.labeler.guarantee`); the items that clear it (and the deprecated
   ``target_confidence`` floor, if set) count as auto-labeled; the loop stops when the human labels
   reach ``label_budget * N`` or every other item is auto-labeled, otherwise the query strategy
   picks the next ``batch_fraction * N`` items;
4. at the stop the items that clear the threshold get the classifier's label and confidence; the
   rest are left without a label, "needs review", for people (all are auto-labeled only with
   ``auto_label_all``). Per predicted class the expected auto-label accuracy is reported and a class
   below ``1 - max_auto_label_error`` is named.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import numpy as np

from dlforge.common.blas import small_blas
from dlforge.common.events import ClassCount, PipelineOptions
from dlforge.labeler.classifier import (
    CalibratedClassifier,
    FittedClassifier,
    LabelClassifier,
    LinearProbe,
)
from dlforge.labeler.guarantee import (
    Guarantee,
    SelectiveThreshold,
    choose_threshold,
    choose_threshold_expected,
    class_warnings,
    error_bound_at,
    per_class_evidence,
)
from dlforge.labeler.strategies import QueryStrategy, k_center_greedy, representative_seed
from dlforge.vision.manifest import Item, Manifest, Split

TEST_FRACTION = 0.10
VAL_FRACTION = 0.15
AskReason = Literal["test", "val", "seed", "uncertain"]
StopReason = Literal["budget", "confident", "exhausted"]


def budget_of(n_items: int, options: PipelineOptions) -> int:
    """How many items people may label in total."""
    return math.floor(options.label_budget * n_items + 1e-9)


def batch_size_of(n_items: int, options: PipelineOptions) -> int:
    return max(1, round(options.batch_fraction * n_items))


def assign_splits(
    n_items: int,
    *,
    budget: int,
    rng: np.random.Generator,
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
) -> list[Split]:
    """A split per item: random test (at most ``budget`` items: people label them), val, train."""
    order = rng.permutation(n_items)
    n_test = min(round(test_fraction * n_items), budget) if n_items >= 10 else 0
    n_val = round(val_fraction * (n_items - n_test)) if n_items >= 10 else 0
    splits: list[Split] = ["train"] * n_items
    for i in order[:n_test]:
        splits[int(i)] = "test"
    for i in order[n_test:n_test + n_val]:
        splits[int(i)] = "val"
    return splits


@dataclass(frozen=True)
class Batch:
    """Items to ask people, and why each is asked."""

    rows: np.ndarray
    reasons: list[AskReason]

    @property
    def reason(self) -> Literal["seed", "uncertain"]:
        return "uncertain" if self.reasons and all(r == "uncertain" for r in self.reasons) else "seed"


@small_blas
def first_batch(
    embeddings: np.ndarray,
    *,
    splits: Sequence[Split],
    known: np.ndarray,
    options: PipelineOptions,
    rng: np.random.Generator,
) -> Batch:
    """The untested test items, a random sample of the val split and a representative k-means seed.

    The seed's share (``seed_fraction``) is split in two: half are val items drawn at random, so the
    trainer's validation, the optimizer's recall threshold and the auto-label guarantee rest on
    people's labels of a random sample rather than on what active learning picked; the other half
    is the item nearest each k-means centroid among the rest. Items with a label are not asked.
    """
    n = len(splits)
    budget = budget_of(n, options)
    known = np.asarray(known, dtype=bool)
    test = np.array([s == "test" for s in splits], dtype=bool)
    val = np.array([s == "val" for s in splits], dtype=bool)
    test_rows = np.flatnonzero(test & ~known)[:budget]
    n_seed = max(0, min(round(options.seed_fraction * n), budget - len(test_rows)))
    val_pool = np.flatnonzero(val & ~known)
    n_val = min(len(val_pool), n_seed // 2)
    val_rows = np.sort(rng.choice(val_pool, size=n_val, replace=False)) if n_val else np.zeros(0, dtype=np.int64)
    # the k-means half comes from the train split: the val items people label first stay a random sample
    candidates = np.flatnonzero(~test & ~val & ~known)
    seed_rows = representative_seed(embeddings, candidates=candidates, k=n_seed - n_val, rng=rng)
    rows = np.concatenate([test_rows, val_rows, seed_rows]).astype(np.int64)
    reasons: list[AskReason] = []
    for reason, picked in (("test", test_rows), ("val", val_rows), ("seed", seed_rows)):
        reasons += [cast(AskReason, reason)] * len(picked)
    return Batch(rows=rows, reasons=reasons)


def random_sample(labels: np.ndarray, splits: Sequence[Split], asked_val: np.ndarray | None = None) -> np.ndarray:
    """The labeled items of the test split and the val items asked at random (``asked_val``, reason
    ``val`` in :func:`first_batch`): drawn at random and all asked in the first batch, the sample
    of people's labels that stands for the unlabeled items.

    The threshold that auto-labels rests on it alone: the k-means seed is representative for
    training but not a random sample (the items nearest the centroids are the easy ones), and
    calibrating the guarantee on it too let the realized auto-label error exceed a 5 % target in
    5 of 20 runs of a synthetic mixture (1 of 20 on the test split alone).
    """
    chosen = np.array([s == "test" for s in splits], dtype=bool)
    if asked_val is not None:
        chosen |= np.asarray(asked_val, dtype=bool) & np.array([s == "val" for s in splits], dtype=bool)
    return (np.asarray(labels) >= 0) & chosen


@dataclass(frozen=True)
class HeldoutEvidence:
    """Held-out (out-of-fold) predictions of the people-labeled random sample: what the
    auto-labeling threshold and the per-class figures are decided on."""

    confidence: np.ndarray
    predicted: np.ndarray
    correct: np.ndarray
    label: np.ndarray | None = None  # the people's class index of each item, when known

    @classmethod
    def empty(cls) -> HeldoutEvidence:
        return cls(np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.confidence)


class HeldOut(Protocol):
    """What the threshold needs of a fitted classifier: calibrated out-of-fold probabilities of the
    labeled rows it was fitted on (labeled rows x classes; NaN where no fold held a row out)."""

    heldout_proba: np.ndarray


def heldout_evidence(clf: HeldOut, *, y: np.ndarray, sample: np.ndarray) -> HeldoutEvidence:
    """The classifier's held-out predictions of the labeled rows in ``sample``.

    ``y`` and ``sample`` (the random sample, see :func:`random_sample`) are aligned with the labeled
    rows the classifier was fitted on; rows no fold held out are left out.
    """
    proba = np.asarray(clf.heldout_proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if proba.ndim != 2 or proba.shape[0] != len(y) or len(y) == 0:
        return HeldoutEvidence.empty()
    finite = np.isfinite(proba)
    rows = finite.any(axis=1) & np.asarray(sample, dtype=bool)
    p = np.where(finite, proba, 0.0)[rows]
    predicted = p.argmax(axis=1)
    return HeldoutEvidence(confidence=p.max(axis=1), predicted=predicted, correct=predicted == y[rows], label=y[rows])


@dataclass
class RoundResult:
    """What one round decided.

    ``selective`` is the guaranteed threshold (None: no calibrated classifier yet), ``threshold``
    the one applied (the guaranteed one, raised to the deprecated ``target_confidence`` floor if
    set; None: nothing may be auto-labeled), ``confident`` the unlabeled items that clear it.
    """

    probabilities: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    confident: np.ndarray
    next_batch: Batch | None
    stop_reason: StopReason | None
    classifier: dict[str, float | int | bool | str | None]
    human_labels: int
    auto_confident: int
    selective: SelectiveThreshold | None = None
    threshold: float | None = None
    evidence: HeldoutEvidence = field(default_factory=HeldoutEvidence.empty)
    predicts: bool = False  # a classifier of two or more classes made ``predicted`` (else it means nothing)
    # at the stop, with the linear probe: (human labels, held-out accuracy) of the probe trained on nested
    # shares of this round's labels (classifier.subsample_curve), the learning curve's points from one round
    subsample_points: list[tuple[int, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def guesses(self, rows: np.ndarray, *, ids: Sequence[str], classes: Sequence[str]) -> dict[str, Guess]:
        """The round's prediction for ``rows``, by item id (what people see next to each item they are
        asked about); empty without a classifier (the seed round, or fewer than two classes known)."""
        if not self.predicts:
            return {}
        return {ids[int(r)]: Guess(label=classes[int(self.predicted[int(r)])],
                                   confidence=round(float(self.confidence[int(r)]), 6)) for r in rows}


@dataclass(frozen=True)
class Guess:
    """The round's classifier's prediction for one item: its class and the calibrated probability of it."""

    label: str
    confidence: float


@small_blas
def run_round(
    embeddings: np.ndarray,
    *,
    labels: np.ndarray,
    human: np.ndarray,
    representative: np.ndarray,
    calibration: np.ndarray,
    n_classes: int,
    options: PipelineOptions,
    strategy: QueryStrategy,
    rng: np.random.Generator,
    seed: int = 0,
    classifier: LabelClassifier | None = None,
    pixels: np.ndarray | None = None,
    guarantee: Guarantee = "bound",
    activations: np.ndarray | None = None,
) -> RoundResult:
    """Fit the calibrated classifier on every known label, auto-label, and pick the next batch or stop.

    A classifier whose ``inputs`` is ``"pixels"`` (:class:`dlforge.labeler.pixelnet.PixelSSL`) is fitted on
    ``pixels`` (uint8 N x H x W x C, aligned with ``embeddings``), one whose ``inputs`` is ``"both"``
    (:class:`dlforge.labeler.pixelnet.Blend`) on both, one whose ``inputs`` is ``"activations"``
    (:class:`dlforge.labeler.tailnet.TailFinetune`) on ``activations`` (the trunk's activations at its
    shared boundary, N x C x H x W); the query strategy always works on the embeddings.

    ``labels`` holds a class index per item (-1: unknown), ``human`` marks labels given by people
    (they count against the budget), ``representative`` marks labels that may calibrate the
    confidence, ``calibration`` the random sample of labels the auto-labeling threshold is chosen on
    (:func:`random_sample`).
    """
    n = len(labels)
    labels = np.asarray(labels, dtype=np.int64)
    known = labels >= 0
    human_count = int(np.asarray(human, dtype=bool).sum())
    budget = budget_of(n, options)
    clf: FittedClassifier | None = None
    representative = np.asarray(representative, dtype=bool)
    if known.any():
        plugin = classifier if classifier is not None else LinearProbe()
        x: Any = embeddings
        inputs = getattr(plugin, "inputs", "embeddings")
        if inputs in ("pixels", "both"):
            if pixels is None or len(pixels) != n:
                raise ValueError(f"classifier {plugin.name!r} needs the items' pixels")
            if inputs == "pixels":
                x = pixels
            else:
                from dlforge.labeler.pixelnet import Both

                x = Both(embeddings, pixels)
        elif inputs == "activations":
            if activations is None or len(activations) != n:
                raise ValueError(f"classifier {plugin.name!r} needs the items' trunk activations")
            x = activations
        clf = plugin.fit(x, np.flatnonzero(known), labels[known], n_classes=n_classes,
                         representative=representative[known], seed=seed)
        probs = clf.predict_proba(x)
    else:
        probs = np.full((n, max(n_classes, 1)), 1.0 / max(n_classes, 1))
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    evidence = HeldoutEvidence.empty()
    selective: SelectiveThreshold | None = None
    threshold: float | None = None
    if clf is not None:  # no held-out predictions (too few labels for folds): no evidence, no threshold
        evidence = heldout_evidence(clf, y=labels[known], sample=np.asarray(calibration, dtype=bool)[known])
        if guarantee == "expected":
            selective = choose_threshold_expected(evidence.confidence, evidence.correct, confidence[~known],
                                                  target=options.max_auto_label_error)
        else:
            selective = choose_threshold(evidence.confidence, evidence.correct, target=options.max_auto_label_error)
        threshold = selective.threshold
        if threshold is not None and options.target_confidence is not None:
            threshold = max(threshold, options.target_confidence)
    confident = ~known & (confidence >= threshold) if threshold is not None else np.zeros(n, dtype=bool)
    open_rows = np.flatnonzero(~known & ~confident)

    stop: StopReason | None = None
    nxt: Batch | None = None
    if not (~known).any():
        stop = "exhausted"
    elif human_count >= budget:
        stop = "budget"
    elif len(open_rows) == 0:
        stop = "confident"
    else:
        k = min(batch_size_of(n, options), budget - human_count)
        if clf is None or clf.model is None:  # fewer than two classes known: ask for diversity
            rows = k_center_greedy(embeddings, pool=open_rows, k=k, centers=np.flatnonzero(known))
        else:
            rows = strategy.select(probabilities=probs, embeddings=embeddings, candidates=open_rows, k=k, rng=rng)
        nxt = Batch(rows=np.asarray(rows, dtype=np.int64), reasons=["uncertain"] * len(rows))
    subsample: list[tuple[int, float]] = []
    if stop is not None and human_count > 0 and isinstance(clf, CalibratedClassifier) and clf.model is not None:
        # shares of people's labels; the labels given with the upload stay in every share (they are no budget)
        subsample = [(max(1, round(share * human_count)), acc) for share, acc, _ in clf.subsample_curve(
            embeddings[known], labels[known], representative=representative[known],
            always=~np.asarray(human, dtype=bool)[known], seed=seed)]
    return RoundResult(
        probabilities=probs, predicted=predicted, confidence=confidence, confident=confident, next_batch=nxt,
        stop_reason=stop, classifier=clf.summary() if clf is not None else {}, human_labels=human_count,
        auto_confident=int(confident.sum()), selective=selective, threshold=threshold, evidence=evidence,
        predicts=clf is not None and clf.model is not None, subsample_points=subsample,
    )


@dataclass
class AutoLabeling:
    """Which unlabeled items get the classifier's label at the stop, which wait for people, and the
    evidence for it (``summary`` goes into the labeler record's ``result``)."""

    auto: np.ndarray
    review: np.ndarray
    summary: dict[str, object]
    warnings: list[str]


def decide_auto_labels(
    result: RoundResult, *, known: np.ndarray, classes: Sequence[str], options: PipelineOptions
) -> AutoLabeling:
    """Auto-label the items that clear the round's threshold (every unlabeled item with
    ``auto_label_all``), leave the rest for review, and report coverage, the bound and per-class
    expected accuracy, naming any class below ``1 - max_auto_label_error``.

    ``auto_label_error_bound`` is the exact 95 % upper bound on the error rate of what was
    auto-labeled: at the chosen threshold, or over every held-out item with ``auto_label_all``;
    ``guaranteed_error_bound`` and ``guaranteed_coverage`` are the threshold's in either mode (with
    ``auto_label_all`` the items at or above ``auto_label_threshold`` are the guaranteed part).
    """
    known = np.asarray(known, dtype=bool)
    pool = ~known
    auto = pool.copy() if options.auto_label_all else (result.confident & pool)
    review = pool & ~auto
    ev = result.evidence
    target = options.max_auto_label_error
    sel = result.selective
    guaranteed_bound: float | None = None
    g_items = g_errors = 0
    if result.threshold is not None:
        if sel is not None and sel.threshold == result.threshold:
            g_items, g_errors, guaranteed_bound = sel.selected, sel.errors, sel.error_bound
        else:  # raised to the target_confidence floor: the bound of the items at the floor
            g_items, g_errors, guaranteed_bound = error_bound_at(ev.confidence, ev.correct,
                                                                 threshold=result.threshold)
    bound, bound_items, bound_errors = guaranteed_bound, g_items, g_errors
    if options.auto_label_all:
        cal_selected = np.ones(len(ev), dtype=bool)
        bound = None
        if len(ev):
            bound_items, bound_errors, bound = error_bound_at(ev.confidence, ev.correct, threshold=-np.inf)
    elif result.threshold is not None:
        cal_selected = ev.confidence >= result.threshold
    else:
        cal_selected = np.zeros(len(ev), dtype=bool)
    per_class = per_class_evidence(
        classes=classes, calibration_predicted=ev.predicted, calibration_correct=ev.correct,
        calibration_selected=cal_selected, pool_predicted=result.predicted, pool_auto=auto, pool_review=review,
        target=target,
    )
    warnings = class_warnings(per_class, target=target)
    n_pool = int(pool.sum())
    guaranteed = result.threshold is not None
    summary: dict[str, object] = {
        "auto_label_target_error": target,
        "auto_label_all": options.auto_label_all,
        "auto_label_threshold": result.threshold,
        "auto_label_coverage": round(int(auto.sum()) / n_pool, 4) if n_pool else None,
        "guaranteed_coverage": round(int((result.confident & pool).sum()) / n_pool, 4) if n_pool else None,
        "auto_label_error_bound": round(bound, 6) if bound is not None else None,
        "guaranteed_error_bound": round(guaranteed_bound, 6) if guaranteed_bound is not None else None,
        "bound_items": bound_items,
        "bound_errors": bound_errors,
        "calibration_items": len(ev),
        "calibration_per_class": (
            {c: int((ev.label == k).sum()) for k, c in enumerate(classes)} if ev.label is not None else None
        ),
        "auto_label_guarantee": sel.method if sel is not None else None,
        # the estimate is of the set the rule selected: not of a set cut higher by the target_confidence
        # floor, nor of every item (auto_label_all)
        "expected_error_estimate": (round(sel.estimate, 6) if sel is not None and sel.estimate is not None
                                    and sel.threshold == result.threshold and not options.auto_label_all
                                    else None),
        "thresholds_tested": (sel.tested if sel.method == "bound" else None) if sel is not None else 0,
        "needs_review": int(review.sum()),
        "per_class": [e.as_dict() for e in per_class],
        "weak_classes": [e.label for e in per_class if e.below_target],
        "warnings": warnings,
    }
    if not guaranteed and not options.auto_label_all and n_pool:
        keeps = ("keeps the expected auto-label error" if sel is not None and sel.method == "expected"
                 else "keeps the auto-label error")
        confidence = "" if sel is not None and sel.method == "expected" else " with 95 % confidence"
        warnings.append(f"no threshold {keeps} <= {target:.1%}{confidence} on the "
                        f"{len(ev)} held-out people-labeled items of the random sample: {n_pool} item(s) need "
                        f"review")
    return AutoLabeling(auto=auto, review=review, summary=summary, warnings=warnings)


@dataclass
class LabelingView:
    """The dataset's labels as arrays aligned with the manifest's items."""

    classes: list[str]
    labels: np.ndarray
    human: np.ndarray
    given: np.ndarray
    representative: np.ndarray
    index: dict[str, int] = field(default_factory=dict)


def labeling_view(
    manifest: Manifest,
    *,
    classes: Sequence[str],
    human_labels: Mapping[str, str],
    asked: Mapping[str, str],
) -> LabelingView:
    """Arrays of class indices (-1 unknown), human/given masks and calibration-eligible labels."""
    cls = list(classes)
    pos = {c: i for i, c in enumerate(cls)}
    n = len(manifest.items)
    labels = np.full(n, -1, dtype=np.int64)
    human = np.zeros(n, dtype=bool)
    given = np.zeros(n, dtype=bool)
    representative = np.zeros(n, dtype=bool)
    index = {}
    for i, item in enumerate(manifest.items):
        index[item.item_id] = i
        if item.item_id in human_labels:
            labels[i] = pos[human_labels[item.item_id]]
            human[i] = True
            representative[i] = asked.get(item.item_id) in ("test", "val", "seed")
        elif item.label is not None:
            labels[i] = pos[item.label]
            given[i] = True
            representative[i] = True
    return LabelingView(classes=cls, labels=labels, human=human, given=given, representative=representative,
                        index=index)


def labeled_manifest(
    manifest: Manifest,
    *,
    view: LabelingView,
    splits: Sequence[Split],
    result: RoundResult,
    auto: np.ndarray,
) -> Manifest:
    """Every item with source (given/human/auto/needs_review), confidence and split; a label unless
    it needs review (an unlabeled item not in ``auto``: label None, the classifier's confidence)."""
    items: list[Item] = []
    for i, item in enumerate(manifest.items):
        label: str | None
        if view.given[i] or view.human[i]:
            label = view.classes[int(view.labels[i])]
            source = "given" if view.given[i] else "human"
            conf = 1.0
        elif auto[i]:
            label = view.classes[int(result.predicted[i])]
            source = "auto"
            conf = float(result.confidence[i])
        else:
            label = None
            source = "needs_review"
            conf = float(result.confidence[i])
        items.append(item.model_copy(update={"label": label, "label_source": source, "confidence": conf,
                                             "split": splits[i]}))
    return manifest.model_copy(update={"items": items, "classes": list(view.classes)})


def people_label_counts(
    view: LabelingView, *, splits: Sequence[Split], asked: Mapping[str, str], ids: Sequence[str]
) -> dict[str, dict[str, object]]:
    """Per split, the evidence people gave: how many items they labeled, why each was asked
    (``test``, ``val``: random samples, ``seed``: the k-means seed, ``uncertain``: picked by active learning,
    ``given``: labeled with the upload), how many may stand for the rest (all but ``uncertain``) and
    how many per class."""
    out: dict[str, dict[str, object]] = {}
    for split in ("train", "val", "test"):
        rows = [i for i in range(len(ids)) if splits[i] == split and view.labels[i] >= 0]
        reasons = Counter("given" if view.given[i] else asked.get(ids[i], "unknown") for i in rows)
        per_class = Counter(view.classes[int(view.labels[i])] for i in rows)
        out[split] = {
            "people_labeled": len(rows),
            "representative": int(sum(bool(view.representative[i]) for i in rows)),
            "by_reason": dict(sorted(reasons.items())),
            "per_class": {c: per_class.get(c, 0) for c in view.classes},
        }
    return out


def class_counts(manifest: Manifest) -> list[ClassCount]:
    counts = Counter(i.label for i in manifest.items if i.label is not None)
    return [ClassCount(label=c, count=counts.get(c, 0)) for c in manifest.classes]


def check_labels(
    labels: Mapping[str, str],
    *,
    classes: Sequence[str],
    allow_new_classes: bool,
) -> tuple[dict[str, str], list[str]]:
    """Validate submitted label strings (the ingestion's rule, :func:`dlforge.labeler.ingest.valid_label`)
    and their classes: (clean labels, new classes). Which items may be labeled is the caller's check.

    Raises InvalidInput (422) naming the bad label or the unknown classes.
    """
    from dlforge.common.errors import InvalidInput
    from dlforge.labeler.ingest import MAX_LABEL_CHARS, valid_label

    if not labels:
        raise InvalidInput("no labels were given")
    clean: dict[str, str] = {}
    for item_id, raw in labels.items():
        label = raw.strip() if isinstance(raw, str) else ""
        if not valid_label(label):
            raise InvalidInput(f"item {item_id}: {str(raw)[:40]!r} is not a valid class name (1-{MAX_LABEL_CHARS} "
                               "printable characters, no slashes)")
        clean[item_id] = label
    known = set(classes)
    new = sorted({v for v in clean.values() if v not in known})
    if new and not allow_new_classes:
        raise InvalidInput(f"unknown class(es) {', '.join(repr(c) for c in new)}; known: "
                           f"{', '.join(repr(c) for c in classes)} (this dataset does not allow new classes)",
                           details={"unknown_classes": new})
    return clean, new
