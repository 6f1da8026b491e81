"""How many more human labels would reach the spec: a saturating power law fitted to the labeling rounds
(or, with too few rounds, to the labeler's probe trained on nested shares of the last round's labels).

Each labeling round records how many items people had labeled and the labeling classifier's held-out
accuracy on the representative ones among them (:func:`round_points`). ``acc(n) = a - b * n^(-c)``
(``a`` the ceiling, ``b, c > 0``) is fitted to those points by bounded least squares, and solved for the
``n`` where it reaches the spec's accuracy. It is an estimate and says so: the points come from the
labeler's classifier (not the final model), and few rounds leave the power law loosely fixed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

MODEL = "acc(n) = a - b * n^(-c)"
MIN_POINTS = 4  # three parameters: fewer points than four leave nothing to check the fit on
CAVEAT = ("an estimate: a power law fitted to the labeler classifier's held-out accuracy per round on the "
          "representative items people labeled (the random test split and val sample, the k-means seed; the "
          "cross-validated accuracy on every labeled item when a round has no such figure; fold models train on "
          "fewer labels than the round had), extrapolated; the final model's test "
          "accuracy differs, and few rounds fix the curve loosely")


def round_points(rounds: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(human labels, accuracy)`` of the labeler document's rounds that have both (last one per count).

    The accuracy is the classifier's out-of-fold accuracy on the representative labeled items
    (``heldout_accuracy``): active learning's batches are the hard items, and the cross-validated
    accuracy over them falls as they pile up while the classifier gets better. Older rounds without
    it fall back to ``cv_accuracy``.
    """
    def accuracy(r: Mapping[str, Any]) -> Any:
        clf = r.get("classifier") or {}
        acc = clf.get("heldout_accuracy")
        return clf.get("cv_accuracy") if acc is None else acc

    return _by_count((r.get("human_labels"), accuracy(r)) for r in rounds)


def _by_count(pairs: Iterable[tuple[Any, Any]]) -> list[tuple[int, float]]:
    """``(n, accuracy)`` pairs with both, n > 0 and a finite accuracy; the last one per n, sorted by n."""
    by_n: dict[int, float] = {}
    for n, acc in pairs:
        if n is None or acc is None or not math.isfinite(float(acc)) or int(n) <= 0:
            continue
        by_n[int(n)] = float(acc)
    return sorted(by_n.items())


def _curve(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    out: np.ndarray = a - b * np.power(x, -c)
    return out


def fit_power_law(points: Sequence[tuple[int, float]]) -> tuple[float, float, float, float]:
    """``(a, b, c, rmse)`` of the bounded least-squares fit (a in [0, 1], b >= 0, c in [0.05, 3]).

    ``n`` is scaled by its largest value for the fit (so ``b`` is the gap to the ceiling there),
    and several starting exponents are tried; the best fit is returned in the original scale.
    """
    from scipy.optimize import curve_fit

    if len(points) < MIN_POINTS:
        raise ValueError(f"need at least {MIN_POINTS} rounds to fit {MODEL}, got {len(points)}")
    n = np.array([p[0] for p in points], dtype=np.float64)
    acc = np.array([p[1] for p in points], dtype=np.float64)
    scale = float(n.max())
    x = n / scale
    best: tuple[float, float, float, float] | None = None
    for c0 in (0.2, 0.5, 1.0, 2.0):
        a0 = min(1.0, float(acc.max()) + 0.01)
        b0 = max(1e-3, a0 - float(acc.min())) * float(x.min()) ** c0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (a, b, c), _ = curve_fit(_curve, x, acc, p0=(a0, b0, c0),
                                         bounds=([0.0, 0.0, 0.05], [1.0, 100.0, 3.0]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        rmse = float(np.sqrt(np.mean((_curve(x, a, b, c) - acc) ** 2)))
        if best is None or rmse < best[3] - 1e-12:
            best = (float(a), float(b), float(c), rmse)
    if best is None:
        raise RuntimeError(f"{MODEL} did not converge on {len(points)} rounds")
    a, b, c, rmse = best
    return a, b * scale**c, c, rmse  # b * (n / scale)^-c == (b * scale^c) * n^-c


SUBSAMPLE_CAVEAT = ("an estimate: a power law fitted to the labeler's linear probe trained on nested random shares "
                    "of people's labels of the last round (1/8 to all; labels given with the upload in every share), "
                    "each share's accuracy measured on the representative items people labeled (the random test "
                    "split and val sample, the k-means seed), held out by folds (a fold's probe trains on 4/5 of "
                    "the share, with the regularization chosen on all the labels); the shares are random, while "
                    "more rounds would add the hard items active learning asks for, and the final model's test "
                    "accuracy differs")


def subsample_points(figures: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(human labels, accuracy)`` of ``dataset.labeled``'s subsample figures (last one per count)."""
    return _by_count((f.get("human_labels"), f.get("heldout_accuracy")) for f in figures)


def labels_to_reach(
    rounds: Iterable[Mapping[str, Any]], *, target: float, current_labels: int | None = None,
    subsamples: Iterable[Mapping[str, Any]] = (), items: int | None = None,
) -> dict[str, Any]:
    """The learning-curve estimate for the report: fit, and the labels needed to reach ``target``.

    The points are the labeling rounds'; with fewer than :data:`MIN_POINTS` of them, the subsample
    figures of the last round (``subsamples``: the probe trained on shares of its labels) when those are
    enough (``source`` says which). ``items``, the data set's size: an estimate beyond it says that labeling
    every item would not get there (``beyond_items``).

    ``status`` is ``estimated``, ``ceiling_below_spec`` (the fitted ceiling ``a`` does not reach the
    target), ``no_rising_trend`` (the fitted curve rises less over the observed rounds than the points
    scatter around it: no basis to extrapolate), ``too_few_rounds``, ``no_accuracy_target`` or
    ``fit_failed``; ``note`` says what the figure is.
    """
    points = round_points(rounds)
    source, caveat = "rounds", CAVEAT
    shares = subsample_points(subsamples)
    if len(points) < MIN_POINTS <= len(shares):
        points, source, caveat = shares, "subsamples", SUBSAMPLE_CAVEAT
    current = current_labels if current_labels is not None else (points[-1][0] if points else None)
    out: dict[str, Any] = {
        "status": "", "model": MODEL, "source": source, "points": [[n, acc] for n, acc in points],
        "target_accuracy": target, "current_labels": current, "a": None, "b": None, "c": None, "rmse": None,
        "rise": None, "labels_needed": None,
        "more_labels": None, "beyond_items": None, "note": caveat,
    }
    if target <= 0:
        return {**out, "status": "no_accuracy_target", "note": "the spec sets no accuracy to reach"}
    if len(points) < MIN_POINTS:
        return {**out, "status": "too_few_rounds",
                "note": f"too few rounds to fit: {len(points)} with a held-out accuracy, "
                        f"{MIN_POINTS} needed for the three parameters of {MODEL}"}
    try:
        a, b, c, rmse = fit_power_law(points)
    except (RuntimeError, ValueError) as exc:
        return {**out, "status": "fit_failed", "note": f"{exc}; {caveat}"}
    out.update(a=a, b=b, c=c, rmse=rmse)
    lo, hi = points[0][0], points[-1][0]
    rise = float(b * (lo ** -c - hi ** -c))  # what the fitted curve gains over the observed rounds
    out["rise"] = rise
    if rise <= rmse:
        why = ("; active learning asks for harder items each round, which can hold the labeler's accuracy flat or "
               "make it fall") if source == "rounds" else ""
        return {**out, "status": "no_rising_trend",
                "note": f"no estimate: over the observed {source} the accuracy does not rise by more than its "
                        f"scatter (fitted rise {rise:.4f}, rmse {rmse:.4f}){why}"}
    if a <= target:
        return {**out, "status": "ceiling_below_spec",
                "note": f"the fitted ceiling a = {a:.4f} does not reach the spec's accuracy {target:g}: more "
                        f"labels of the same kind are not expected to get there; {caveat}"}
    needed = (b / (a - target)) ** (1.0 / c) if b > 0 else 0.0
    needed_int = max(1, math.ceil(needed))
    more = max(0, needed_int - current) if current is not None else None
    far = points[-1][0] * 10 < needed_int
    beyond = items is not None and needed_int > items
    return {**out, "status": "estimated", "labels_needed": needed_int, "more_labels": more,
            "beyond_items": beyond if items is not None else None,
            "note": (f"about {needed_int} human labels in all" + (f" ({more} more)" if more is not None else "")
                     + f" to reach {target:g}"
                     + (f", more than the data set's {items} items: by this fit, the labeler's classifier would "
                        "not get there even with every item labeled (the final model's accuracy differs)"
                        if beyond else "")
                     + (" — far beyond the observed range, so very uncertain" if far else "")
                     + f"; {caveat}")}
