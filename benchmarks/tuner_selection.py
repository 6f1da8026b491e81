"""Which configuration should a short study hand to the final training: its highest val value, or the baseline
unless the val items resolve the difference?

The demo's study scores four trials (the baseline configuration first, then three the sampler draws) on about
110 people's val labels; the trial with the highest val accuracy used to win, even by one item. This benchmark
trains, with the trainer's own code (``build_data``, ``fit``) on the pipeline's kind of labels (``--labels
mixed`` as in ``trainer_learning.py``: 20 % people's, half of them the val split, the rest auto-labeled by a
logistic regression on frozen ImageNet features, weighted by their confidence), the tuner's baseline and
``--challengers`` configurations drawn at random from the tuner's default space, each as a trial trains
(``--trial-epochs`` epochs on a stratified half of the train rows, no views, no early stopping). Each trained
model keeps its per-item results on the val split and its test figures (20 % of the images, true labels).

Then ``--draws`` studies are simulated from them: each draws ``--study-challengers`` of the challengers and
``--val-items`` of the val items (without replacement, as a smaller val split would be), and each rule picks:

* ``highest``: the highest val accuracy, ties by the lower mean val loss (the tuner before this rule);
* ``baseline unless p <= a``: the highest, unless its lead over the baseline on the items where exactly one
  of the two is right fails the one-sided exact sign test at level ``a`` (``dlforge.hpo.selection``, what the
  tuner does with ``DLFORGE_TUNER_BASELINE_ALPHA=a``);
* ``baseline``: always the baseline; ``oracle``: the best test accuracy of the draw's configurations.

Reported per rule: the mean test accuracy of the picked configuration (and for two classes the accuracy at
the threshold giving recall 0.95 on test), its regret against the oracle, how often it left the baseline,
and its weakest class's recall. The picked configuration's *trial* model is what is scored, a proxy for the
final training with those parameters.

    python benchmarks/tuner_selection.py --dataset elpv --limit 2624 --seeds 0,1,2
    python benchmarks/tuner_selection.py --dataset digits --limit 1797 --seeds 0,1

Prints a table and writes benchmarks/results/tuner-selection-<dataset>-<images>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from machine import cpu_name
from trainer_learning import ARCH, Quiet, prepare, probabilities, scores

from dlforge.hpo.selection import replaces
from dlforge.trainer.cache import ActivationCache, CachedActivations, OnnxPrefixRunner, SplitArrays
from dlforge.trainer.handlers import build_data
from dlforge.trainer.params import TrainParams
from dlforge.trainer.training import fit
from dlforge.tuner.settings import TunerSettings
from dlforge.tuner.space import default_space
from dlforge.vision.networks import spec_of

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0.05, 0.1, 0.2, 0.5)


def draw_configs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` configurations drawn at random from the tuner's default space."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    dists = default_space().distributions()
    out = []
    for _ in range(n):
        t = study.ask(dists)
        out.append(dict(t.params))
        study.tell(t, 0.0)
    return out


def train_configs(dataset: str, limit: int, seed: int, configs: list[dict[str, Any]], *, epochs: int,
                  threads: int, work: Path, final_seconds: float) -> dict[str, Any]:
    """Each configuration trained as a trial: its val per-item results and losses, and its test figures; with
    ``final_seconds`` > 0 also trained as the final training would be (every train row, up to 30 epochs, early
    stopping on val after 5 without a better one, that time cap; no views), with its test figures."""
    prep = prepare(dataset, limit, seed=seed, unfreeze=3, views=("identity",), labels="mixed", threads=threads,
                   work=work)
    classes, pool, lab_idx, conf, tr, va = prep.classes, prep.pool, prep.lab_idx, prep.conf, prep.tr, prep.va
    positive = "defect" if dataset == "elpv" else None
    net0 = prep.fresh_net()
    spec = spec_of(ARCH)
    cache = ActivationCache(prep.objects, work_dir=work / "trainer", runner=OnnxPrefixRunner(threads=threads))
    digest = hashlib.sha256(prep.manifest.model_dump_json().encode()).hexdigest()
    acts_at: dict[int, CachedActivations] = {3: prep.acts}

    def acts_for(unfreeze: int) -> CachedActivations:
        if unfreeze not in acts_at:
            acts_at[unfreeze] = cache.get(net=net0, spec=spec, manifest=prep.manifest, manifest_digest=digest,
                                          weights_digest="imagenet", input_size=spec.input_size,
                                          boundary=net0.boundary(unfreeze), from_boundary=net0.boundary(3))
        return acts_at[unfreeze]

    def part(arr: SplitArrays, rows: np.ndarray, lab: np.ndarray) -> SplitArrays:
        return SplitArrays(np.asarray(arr.x[rows]), [classes[i] for i in lab[rows]], [arr.item_ids[i] for i in rows])

    index = prep.index
    rows = []
    for k, params in enumerate(configs):
        acts = acts_for(int(params["unfreeze"]))
        splits = {"train": part(acts.splits["train"], tr, lab_idx), "val": part(acts.splits["train"], va, prep.y_pool),
                  "test": acts.splits["test"]}
        cached = CachedActivations(acts.boundary, splits, acts.source, 0.0)
        weights = {pool.item_ids[i]: float(conf[i]) for i in tr}
        data, _, _ = build_data(cached, classes, sample_fraction=0.5, sample_seed=seed, weights=weights)
        data = replace(data, train_views=[], val_views={})
        hp = TrainParams.model_validate({**params, "epochs": epochs, "seed": seed})
        tail = prep.fresh_net().tail(int(params["unfreeze"]))
        t0 = time.perf_counter()
        result = fit(tail, data, hp, listener=Quiet())
        seconds = time.perf_counter() - t0
        p_val = probabilities(tail, [data.val_x])
        val_y = data.val_y
        test_y = np.array([index[lab] for lab in acts.splits["test"].labels])
        s = scores(probabilities(tail, [acts.splits["test"].x]), test_y, classes, positive)
        row = {"config": k, "baseline": k == 0, "params": params, "diverged": bool(result.diverged),
               "val_accuracy": float((p_val.argmax(1) == val_y).mean()),
               "val_correct": (p_val.argmax(1) == val_y).tolist(),
               "val_nll": (-np.log(np.clip(p_val[np.arange(len(val_y)), val_y], 1e-12, 1.0))).tolist(),
               "seconds": round(seconds, 1), **{f"test_{k2}": v for k2, v in s.items()}}
        if final_seconds > 0:
            full, _, _ = build_data(cached, classes, sample_fraction=1.0, sample_seed=seed, weights=weights)
            full = replace(full, train_views=[], val_views={})
            hp_final = TrainParams.model_validate({**params, "epochs": 30, "patience": 5, "max_seconds": final_seconds,
                                                   "seed": seed})
            tail = prep.fresh_net().tail(int(params["unfreeze"]))
            t0 = time.perf_counter()
            final = fit(tail, full, hp_final, listener=Quiet())
            row["final_seconds"] = round(time.perf_counter() - t0, 1)
            row["final_epochs"], row["final_best_epoch"] = len(final.epochs), final.best_epoch
            f = scores(probabilities(tail, [acts.splits["test"].x]), test_y, classes, positive)
            row.update({f"final_test_{k2}": v for k2, v in f.items()})
        rows.append(row)
        shown = f" final {row['final_test_accuracy']:.3f} ({row['final_seconds']:.0f} s)" if final_seconds > 0 else ""
        print(f"  {dataset} s{seed} config {k}{' (baseline)' if k == 0 else ''}: val {row['val_accuracy']:.3f} "
              f"test {s['accuracy']:.3f}{shown} unfreeze {params['unfreeze']} {params['optimizer']} "
              f"lr {params['lr']:.2g} ({seconds:.0f} s)", flush=True)
    return {"seed": seed, "classes": classes, "val": len(va), "test": len(prep.acts.splits["test"].labels),
            "train": len(tr), "auto_label_accuracy": prep.auto_acc, "configs": rows}


def pick(rule: str, idx: list[int], right: np.ndarray, nll: np.ndarray) -> int:
    """The configuration ``rule`` picks among ``idx`` (``idx[0]`` the baseline) from their val results."""
    acc = right[idx].mean(1)
    loss = nll[idx].mean(1)
    order = sorted(range(len(idx)), key=lambda i: (-acc[i], loss[i], i))
    top = idx[order[0]]
    if rule == "highest" or top == idx[0]:
        return top
    if rule == "baseline":
        return idx[0]
    better, _ = replaces(right[top], right[idx[0]], float(rule.split("<= ")[1]))  # the tuner's rule
    return top if better else idx[0]


def simulate(run: dict[str, Any], *, draws: int, study_challengers: int, val_items: int, seed: int,
             two_class: bool, scored: str = "test") -> dict[str, dict[str, float]]:
    """The rules over ``draws`` simulated studies, the picked configuration scored by its ``scored`` figures
    (``test``: the trial's model, ``final_test``: the final training's)."""
    rows = run["configs"]
    right = np.array([r["val_correct"] for r in rows], dtype=bool)
    nll = np.array([r["val_nll"] for r in rows])
    test = np.array([r[f"{scored}_accuracy"] for r in rows])
    at95 = np.array([r.get(f"{scored}_accuracy_at_recall_95", np.nan) for r in rows])
    weakest = np.array([min(r[f"{scored}_recall"].values()) for r in rows])
    rng = np.random.default_rng(seed)
    rules = ["highest", *(f"baseline unless p <= {a:g}" for a in ALPHAS), "baseline", "oracle"]
    got: dict[str, list[tuple[float, float, float, float, bool]]] = {r: [] for r in rules}
    m = min(val_items, right.shape[1])
    for _ in range(draws):
        chal = rng.choice(np.arange(1, len(rows)), size=min(study_challengers, len(rows) - 1), replace=False)
        idx = [0, *chal.tolist()]
        items = rng.choice(right.shape[1], size=m, replace=False)
        best_test = max(test[i] for i in idx)
        for rule in rules:
            k = max(idx, key=lambda i: (test[i], -i)) if rule == "oracle" else pick(rule, idx, right[:, items],
                                                                                     nll[:, items])
            got[rule].append((test[k], at95[k], best_test - test[k], weakest[k], k != 0))
    out = {}
    for rule, vals in got.items():
        a = np.array(vals, dtype=float)
        out[rule] = {"test_accuracy": float(a[:, 0].mean()), "regret_points": float(100 * a[:, 2].mean()),
                     "weakest_class_recall": float(a[:, 3].mean()), "left_baseline": float(a[:, 4].mean())}
        if two_class:
            out[rule]["test_accuracy_at_recall_95"] = float(np.nanmean(a[:, 1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["elpv", "digits", "fashion-mnist"], default="elpv")
    parser.add_argument("--limit", type=int, default=1000, help="class-stratified subset size")
    parser.add_argument("--seeds", default="0", help="comma list: each a split, labels and draw of configurations")
    parser.add_argument("--challengers", type=int, default=7, help="configurations drawn besides the baseline")
    parser.add_argument("--trial-epochs", type=int, default=3, help="epochs of a trial (the demo's train_epochs)")
    parser.add_argument("--study-challengers", type=int, default=3, help="trials of a study besides the baseline")
    parser.add_argument("--val-items", type=int, default=108, help="val items of a simulated study (the demo's)")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--final-seconds", type=float, default=0.0,
                        help="also train every configuration as the final training would, with this time cap (the "
                        "trainer's default is 420), and score the rules by those models too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dlforge-bench-selection-"))
    baseline = json.loads(TunerSettings().tuner_baseline)
    scored = ["test", *(["final_test"] if args.final_seconds > 0 else [])]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        configs = [baseline, *draw_configs(args.challengers, seed)]
        run = train_configs(args.dataset, args.limit, seed, configs, epochs=args.trial_epochs, threads=args.threads,
                            work=work / f"s{seed}", final_seconds=args.final_seconds)
        two = len(run["classes"]) == 2
        sizes = sorted({min(args.val_items, run["val"]), run["val"]})
        run["rules"] = {f"{by}, {m} val items": simulate(run, draws=args.draws, val_items=m, seed=seed,
                                                         study_challengers=args.study_challengers, two_class=two,
                                                         scored=by)
                        for by in scored for m in sizes}
        runs.append(run)
    result = {"dataset": args.dataset, "limit": args.limit, "seeds": args.seeds, "challengers": args.challengers,
              "trial_epochs": args.trial_epochs, "study_challengers": args.study_challengers,
              "val_items": args.val_items, "draws": args.draws, "final_seconds": args.final_seconds,
              "baseline": baseline, "cpu": cpu_name(), "threads": args.threads,
              "load_average": os.getloadavg()[0], "python": platform.python_version(),
              "seconds": round(time.perf_counter() - started, 1), "mean_over_seeds": {}, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-final{args.final_seconds:g}" if args.final_seconds > 0 else ""
    out = RESULTS / f"tuner-selection-{args.dataset}-{args.limit}{suffix}.json"
    print(f"\n{args.dataset} ({args.limit} images; seeds {args.seeds}; {args.draws} studies each of the baseline and "
          f"{args.study_challengers} of {args.challengers} challengers; CPU {cpu_name()})")
    for run in runs:
        for by in scored:
            print(f"seed {run['seed']}: val {run['val']}, test {run['test']}; the configurations' {by} accuracy "
                  + " ".join(f"{c[f'{by}_accuracy']:.3f}{'*' if c['baseline'] else ''}" for c in run["configs"]))
    for setting in runs[0]["rules"]:
        rules = list(runs[0]["rules"][setting])
        mean = {r: {k: float(np.mean([run["rules"][setting][r][k] for run in runs]))
                    for k in runs[0]["rules"][setting][r]} for r in rules}
        result["mean_over_seeds"][setting] = mean
        two = "test_accuracy_at_recall_95" in mean["highest"]
        print(f"\nscored by {setting}")
        head = (f"{'rule':<28} {'test acc':>8} {'acc@R95':>8} {'regret':>7} {'weakest':>8} {'left base':>9}"
                f"   per seed (test acc)")
        print(head)
        print("-" * len(head))
        for r in rules:
            m = mean[r]
            a95 = f"{m['test_accuracy_at_recall_95']:.4f}" if two else "-"
            per = " ".join(f"{run['rules'][setting][r]['test_accuracy']:.4f}" for run in runs)
            print(f"{r:<28} {m['test_accuracy']:>8.4f} {a95:>8} {m['regret_points']:>7.2f} "
                  f"{m['weakest_class_recall']:>8.3f} {m['left_baseline']:>9.2f}   {per}")
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {out}")

if __name__ == "__main__":
    main()
