"""What the last round's learning curve predicts, against what more labels measured.

    python benchmarks/learning_curve_check.py results/labeler-elpv-0.2.json results/labeler-elpv-0.4.json [...]

Each file is a ``benchmarks/labeler.py`` result of the same data set and seed at a larger budget than the
one before it. The power law ``acc(n) = a - b * n^(-c)`` is fitted to the FIRST file's subsample points
(the labeler's linear probe trained on nested shares of its last round's labels, each share's accuracy on
the representative items people labeled, held out by folds: what the report fits when the rounds are too
few) and evaluated at the human labels of every file, next to the accuracy that file's last round measured the
same way (``heldout_accuracy_representative``: out-of-fold on the representative items, which the seed
fixes before any batch) and the final classifier's accuracy on the benchmark's held-out split. Prints a
table and writes ``benchmarks/results/learning-curve-check-<dataset>-s<seed>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dlforge.common.learning_curve import fit_power_law, subsample_points

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="labeler.py results, smallest budget first")
    args = parser.parse_args()
    runs = [json.loads(f.read_text()) for f in args.files]
    first = runs[0]
    if {(r["dataset"], r["seed"], r["items"]) for r in runs} != {(first["dataset"], first["seed"], first["items"])}:
        raise SystemExit("the files must be one data set, seed and item count")
    budgets = [r["budget"] for r in runs]
    if budgets != sorted(budgets) or len(set(budgets)) != len(budgets):
        raise SystemExit(f"give the files smallest budget first, each budget once (got {budgets})")
    points = subsample_points({"human_labels": n, "heldout_accuracy": acc}
                              for n, acc in first.get("subsample_points") or [])
    if len(points) < 4:
        raise SystemExit(f"{args.files[0]}: {len(points)} subsample points (4 needed; the labeler records them with "
                         "the linear probe at the stop)")
    a, b, c, rmse = fit_power_law(points)
    rows = []
    for r in runs:
        last = r["per_round"][-1]
        n = int(r["human_labels"])
        predicted = a - b * n ** (-c)
        measured = last["heldout_accuracy_representative"]
        rows.append({"budget": r["budget"], "human_labels": n, "rounds": r["rounds"], "in_sample": r is first,
                     "predicted": round(predicted, 4), "measured": measured,
                     "error_points": None if measured is None else round(100 * (predicted - measured), 2),
                     "heldout_split_accuracy": r["heldout_accuracy"]})
    out = {"dataset": first["dataset"], "seed": first["seed"], "items": first["items"],
           "fitted_on": {"budget": first["budget"], "points": points},
           "fit": {"a": a, "b": b, "c": c, "rmse": rmse}, "rows": rows,
           "cpu": first.get("machine", {}).get("cpu")}
    print(f"{first['dataset']} seed {first['seed']}: acc(n) = {a:.4f} - {b:.4g} n^-{c:.3f} (rmse {rmse:.4f}) "
          f"fitted on the shares of budget {first['budget']} ({points[-1][0]} labels)")
    print(f"{'budget':>7} {'labels':>7} {'rounds':>6} {'predicted':>9} {'measured':>9} {'error pts':>9} "
          f"{'held-out split':>14}")
    for row in rows:
        m = "-" if row["measured"] is None else f"{row['measured']:.4f}"
        e = "-" if row["error_points"] is None else f"{row['error_points']:+.2f}"
        print(f"{row['budget']:>7} {row['human_labels']:>7} {row['rounds']:>6} {row['predicted']:>9.4f} {m:>9} "
              f"{e:>9} {row['heldout_split_accuracy']:>14.4f}" + ("  (fitted here: in-sample)" if row["in_sample"]
                                                                  else ""))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"learning-curve-check-{first['dataset']}-s{first['seed']}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
