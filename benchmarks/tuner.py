"""Hyperparameter search at half the compute? Vanilla TPE against each of issue 12's components and combinations.

Every arm searches the same space for the same number of configurations on cached features (a frozen
"encoder": standardised pixels of sklearn's digits, a 64-component PCA of Fashion-MNIST pixels, the
standardised breast-cancer measurements zero-padded to 64) with the trainer's own training loop
(:func:`dlforge.trainer.training.fit`) on a two-layer tail. A trial's compute is the wall time of its
``fit`` (trainer-seconds, one thread) and, deterministic, the train rows times the epochs it ran.

Arms (each alone against vanilla, then combined):

* ``vanilla``: TPE, no pruning, all of the train split (the baseline);
* ``old default``: TPE, median pruner, a stratified random 50 % (the tuner's defaults before issue 12);
* ``sampling``: trials on class-stratified k-center coresets, fidelity 25 % -> 50 % -> 100 %, asynchronous
  successive halving on data: before each new configuration the rungs are ranked again (highest first) and a
  trial among the best third of its rung that was not promoted yet is trained again on the next (nested)
  coreset (:func:`dlforge.hpo.coreset.promotable`, the tuner's rule);
* ``stop rule``: the seeds' rule (``TrendPruner``: mean of the last 3 epochs vs the top 20 % at that epoch);
* ``asha``: Optuna's asynchronous successive halving (for reference);
* ``basin hopping``: the basin-hopping sampler;
* ``warm start``: TPE, the 2 best configurations of each of the 2 nearest past studies first; the past studies ran
  (vanilla) on *related* data (disjoint rows of the same source) and on the other sources (their compute
  is not counted: it was spent before);
* ``combined``: coreset fidelities + stop rule + warm start (TPE); ``stop rule + warm``; ``sampling + warm``
  (the tuner's default: k-center coresets on the ladder, no pruner, and the warm start it makes by itself
  when past studies exist; ``DEFAULT_ARM``, whose figures are also the JSON's top-level ones);
* ``stop rule from ep. 3``: the stop rule once its 3-epoch window is full (added after a first run showed
  the rule, judging single first-epoch values, saving nothing).

Measured per data set and seed: vanilla runs ``--trials`` configurations; every other arm runs until it has
spent vanilla's compute (or ``--trials x --trial-cap`` configurations). The target is vanilla's final best val
accuracy minus 0.5 point; an arm's compute to reach it (the first training whose val accuracy reaches it),
divided by vanilla's, is ``compute_ratio_vs_tpe`` (an arm that never reaches it is "not reached"). The best
configuration each arm had found after **half** of vanilla's compute is retrained on the whole train split
(same seed) and scored on the test split: ``final_accuracy_delta`` is its test accuracy minus that of
vanilla's final best, in points (so an arm at half the compute must also deliver the same model quality);
``final_accuracy_delta_at_full`` is the same after all of vanilla's compute.
Arms run interleaved (their order rotates with the seed) in one process.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/tuner.py --seeds 5 --trials 24

Prints a table and writes benchmarks/results/tuner.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from machine import cpu_name
from torch import nn

from dlforge.hpo.coreset import Coreset, build_coreset, next_fidelity, promotable
from dlforge.hpo.pruners import TrendPruner
from dlforge.hpo.samplers import BasinHoppingSampler
from dlforge.hpo.warmstart import PastStudy, StudyIndex, fingerprint, warm_start_params
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.training import TrainData, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"
FASHION = Path("/usr/share/datasets/fashion-mnist")
WIDTH = 64
LADDER = (0.25, 0.5, 1.0)
DEFAULT_ARM = "sampling + warm"  # what the tuner does by default (services/tuner/settings.py)
HALF = 0.5  # the final accuracy is the one each arm delivers with half of vanilla's compute

SPACE: dict[str, optuna.distributions.BaseDistribution] = {
    "lr": optuna.distributions.FloatDistribution(1e-4, 0.3, log=True),
    "momentum": optuna.distributions.FloatDistribution(0.5, 0.99),
    "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True),
    "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
    "hidden": optuna.distributions.IntDistribution(16, 256, log=True),
    "batch_size": optuna.distributions.CategoricalDistribution([16, 32, 64, 128]),
    "optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adam", "adamw"]),
}


# -- data --------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One data source's cached features: the target rows and, disjoint from them, a related set."""

    name: str
    x: np.ndarray
    y: np.ndarray
    related_x: np.ndarray
    related_y: np.ndarray


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mu, sd = ref.mean(axis=0), ref.std(axis=0)
    return ((x - mu) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def _pad(x: np.ndarray) -> np.ndarray:
    out = np.zeros((len(x), WIDTH), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


def _split_rows(y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n stratified rows, the rest)."""
    take = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        take.append(rng.choice(members, size=round(n * len(members) / len(y)), replace=False))
    chosen = np.sort(np.concatenate(take))
    return chosen, np.setdiff1d(np.arange(len(y)), chosen)


def load_sources(fashion_rows: int) -> list[Source]:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(12)
    out = []
    d = load_digits()
    x = _standardise(d.data.astype(np.float32), d.data)
    target, related = _split_rows(d.target, 1100, rng)
    out.append(Source("digits", x[target], d.target[target], x[related], d.target[related]))

    def idx(name: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION / name) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    test_x = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255
    test_y = idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)
    train_x = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255
    train_y = idx("train-labels-idx1-ubyte.gz", 8).astype(np.int64)
    enc_rows = rng.choice(len(train_x), size=5000, replace=False)
    pca = PCA(n_components=WIDTH, random_state=0).fit(train_x[enc_rows])  # the frozen "encoder"
    rel_rows = rng.choice(np.setdiff1d(np.arange(len(train_x)), enc_rows), size=fashion_rows, replace=False)
    tgt_rows, _ = _split_rows(test_y, fashion_rows, rng)
    fx, rx = pca.transform(test_x[tgt_rows]), pca.transform(train_x[rel_rows])
    out.append(Source("fashion-mnist", _standardise(fx, rx), test_y[tgt_rows], _standardise(rx, rx),
                      train_y[rel_rows]))
    b = load_breast_cancer()
    x = _pad(_standardise(b.data.astype(np.float32), b.data))
    target, related = _split_rows(b.target, 380, rng)
    out.append(Source("breast-cancer", x[target], b.target[target], x[related], b.target[related]))
    return out


@dataclass
class Task:
    """Train / val / test splits (60 / 20 / 20, stratified) of a source for one seed, and its coreset."""

    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    coresets: dict[str, Coreset] = field(default_factory=dict)
    coreset_seconds: dict[str, float] = field(default_factory=dict)


def make_task(name: str, x: np.ndarray, y: np.ndarray, seed: int, *, with_coreset: bool) -> Task:
    rng = np.random.default_rng(seed)
    test, rest = _split_rows(y, round(0.2 * len(y)), rng)
    val_local, train_local = _split_rows(y[rest], round(0.25 * len(rest)), rng)
    val, train = rest[val_local], rest[train_local]
    task = Task(name, [str(c) for c in np.unique(y)], x[train], y[train], x[val], y[val], x[test], y[test])
    if with_coreset:
        for method in ("k_center", "herding"):
            t0 = time.process_time()
            task.coresets[method] = build_coreset(task.train_x, task.train_y, method=method)  # type: ignore[arg-type]
            task.coreset_seconds[method] = time.process_time() - t0
    return task


# -- one trial ---------------------------------------------------------------------------------------


def tail_for(params: dict[str, Any], width: int, classes: int) -> nn.Module:
    h = int(params["hidden"])
    return nn.Sequential(nn.Dropout(float(params["dropout"])), nn.Linear(width, h), nn.ReLU(),
                         nn.Dropout(float(params["dropout"])), nn.Linear(h, classes))


class Reporter:
    """The trainer's listener: each epoch's val accuracy to the Optuna trial; stop when it is pruned."""

    def __init__(self, trial: optuna.Trial | None) -> None:
        self.trial = trial
        self.pruned = False

    def on_step(self, step: int, loss: float) -> None:
        """Not reported."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        if self.trial is None:
            return True
        self.trial.report(metrics.val_accuracy, metrics.epoch)
        self.pruned = bool(self.trial.should_prune())
        return not self.pruned

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """Not saved."""


@dataclass
class Run:
    val_accuracy: float
    seconds: float
    row_epochs: int
    pruned: bool
    model: nn.Module


def train(task: Task, params: dict[str, Any], *, rows: np.ndarray | None, epochs: int, seed: int,
          trial: optuna.Trial | None = None) -> Run:
    tx = task.train_x if rows is None else task.train_x[rows]
    ty = task.train_y if rows is None else task.train_y[rows]
    data = TrainData(tx, ty, task.val_x, task.val_y, task.classes)
    hp = TrainParams(lr=params["lr"], batch_size=int(params["batch_size"]), optimizer=params["optimizer"],
                     momentum=params["momentum"], weight_decay=params["weight_decay"], dropout=params["dropout"],
                     epochs=epochs, seed=seed)
    torch.manual_seed(seed)
    tail = tail_for(params, tx.shape[1], len(task.classes))
    listener = Reporter(trial)
    t0 = time.process_time()  # CPU seconds: less at the mercy of other users of the machine than wall time
    result = fit(tail, data, hp, listener=listener, summary_every_steps=10**9)
    seconds = time.process_time() - t0
    accs = [m.val_accuracy for m in result.epochs]
    return Run(accs[-1] if accs else 0.0, seconds, len(ty) * len(result.epochs), listener.pruned, tail)


# -- one arm -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    sampler: str = "tpe"  # tpe | basin_hopping
    pruner: str = "none"  # none | median | trend | trend3 (from epoch 3: the window full) | asha
    subset: str = "full"  # full | random50 | k_center | herding (the last two: coreset fidelities)
    warm: bool = False


ARMS = [
    Arm("vanilla"),
    Arm("old default", pruner="median", subset="random50"),
    Arm("sampling", subset="k_center"),
    Arm("sampling (herding)", subset="herding"),
    Arm("stop rule", pruner="trend"),
    Arm("asha", pruner="asha"),
    Arm("basin hopping", sampler="basin_hopping"),
    Arm("warm start", warm=True),
    Arm("combined", pruner="trend", subset="k_center", warm=True),
    Arm("stop rule + warm", pruner="trend", warm=True),
    Arm("stop rule from ep. 3", pruner="trend3"),
    Arm("sampling + warm", subset="k_center", warm=True),
]


@dataclass
class Search:
    """An arm's search: every training it ran, in order: (cumulative seconds, row-epochs, val accuracy)."""

    arm: str
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    best_params: dict[str, Any] | None = None
    best_value: float = -1.0
    trainings: int = 0
    pruned: int = 0
    finished: list[tuple[float, dict[str, Any], float]] = field(default_factory=list)  # (val, params, seconds)

    def add(self, run: Run, params: dict[str, Any]) -> None:
        secs, rows = (self.curve[-1][0], self.curve[-1][1]) if self.curve else (0.0, 0)
        self.curve.append((secs + run.seconds, rows + run.row_epochs, run.val_accuracy))
        self.trainings += 1
        self.pruned += run.pruned
        if not run.pruned:
            self.finished.append((run.val_accuracy, dict(params), secs + run.seconds))
        if not run.pruned and run.val_accuracy > self.best_value:
            self.best_value, self.best_params = run.val_accuracy, dict(params)

    def top(self, k: int) -> list[dict[str, Any]]:
        """The parameters of the ``k`` best finished trainings (distinct configurations), best first."""
        out: list[dict[str, Any]] = []
        for _, params, _secs in sorted(self.finished, key=lambda vp: -vp[0]):
            if params not in out:
                out.append(params)
        return out[:k]

    def best_within(self, seconds: float) -> dict[str, Any] | None:
        """The best finished training's parameters among those done within ``seconds`` of compute (the first
        of equals): what the search would deliver had it been stopped there."""
        done = [(v, p) for v, p, t in self.finished if t <= seconds + 1e-12]
        return max(done, key=lambda vp: vp[0])[1] if done else None

    def reach(self, target: float) -> tuple[float, int] | None:
        """Compute spent when a finished training first reached ``target`` (None: never)."""
        return next(((s, r) for s, r, v in self.curve if v >= target - 1e-12), None)


def make_sampler(arm: Arm, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    if arm.sampler == "basin_hopping":
        return BasinHoppingSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def make_pruner(arm: Arm, startup: int) -> optuna.pruners.BasePruner:
    if arm.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, startup // 2), n_warmup_steps=0)
    if arm.pruner in ("trend", "trend3"):
        return TrendPruner(top_fraction=0.2, window=3, statistic="mean", min_trials=max(2, startup),
                           warmup_steps=3 if arm.pruner == "trend3" else 0)
    if arm.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def search(arm: Arm, task: Task, *, seed: int, trials: int, epochs: int, startup: int,
           warm: list[dict[str, Any]], budget: float | None = None) -> Search:
    """Up to ``trials`` new configurations, or until ``budget`` trainer-seconds are spent (a cheaper arm tries
    more configurations in the same compute).

    With coreset fidelities the search is asynchronous successive halving on data
    (:func:`dlforge.hpo.coreset.promotable`, the rule the tuner applies): before a new configuration is
    started at the lowest rung, the rungs are ranked again from the top down, and a trial among the best
    third of its rung that was not promoted yet trains again on the next (nested) coreset.
    """
    out = Search(arm.name)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(arm, seed, startup),
                                pruner=make_pruner(arm, startup))
    if arm.warm:
        for params in warm:
            study.enqueue_trial(params, skip_if_exists=True)
    rungs: dict[float, list[tuple[int, float]]] = {f: [] for f in LADDER}  # (configuration, val accuracy)
    promoted: dict[float, set[int]] = {f: set() for f in LADDER}
    configs: list[dict[str, Any]] = []
    random_rows = _split_rows(task.train_y, round(0.5 * len(task.train_y)), np.random.default_rng(seed))[0]
    coreset = task.coresets.get(arm.subset)

    def spent() -> bool:
        return budget is not None and bool(out.curve) and out.curve[-1][0] >= budget

    def next_promotion() -> tuple[int, float] | None:
        for rung in reversed(LADDER[:-1]):  # the highest rung first, as ASHA's get_job
            ready = promotable(rungs[rung], promoted[rung])
            if ready:
                return ready[0], rung
        return None

    while len(configs) < trials and not spent():
        found = next_promotion() if coreset is not None else None
        if found is not None:
            number, rung = found
            promoted[rung].add(number)
            higher = next_fidelity(rung, LADDER)
            assert coreset is not None and higher is not None
            run = train(task, configs[number], rows=coreset.rows(higher), epochs=epochs, seed=seed)
            out.add(run, configs[number])
            rungs[higher].append((number, run.val_accuracy))
            continue
        trial = study.ask(SPACE)
        configs.append(dict(trial.params))
        if coreset is not None:
            rows: np.ndarray | None = coreset.rows(LADDER[0])
        else:
            rows = random_rows if arm.subset == "random50" else None
        run = train(task, configs[-1], rows=rows, epochs=epochs, seed=seed, trial=trial)
        out.add(run, configs[-1])
        if run.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, run.val_accuracy)
            rungs[LADDER[0]].append((len(configs) - 1, run.val_accuracy))
    return out


def test_accuracy(task: Task, params: dict[str, Any], *, epochs: int, seed: int) -> float:
    run = train(task, params, rows=None, epochs=epochs, seed=seed)
    return evaluate(run.model, task.test_x, task.test_y, task.classes, split="test").accuracy


# -- past studies for warm starts --------------------------------------------------------------------


def past_studies(sources: list[Source], *, seed: int, trials: int, epochs: int, startup: int) -> StudyIndex:
    """A vanilla study on each source's related rows: its fingerprint and its 3 best configurations."""
    past = []
    for s in sources:
        task = make_task(f"{s.name}-related", s.related_x, s.related_y, seed + 1000, with_coreset=False)
        found = search(ARMS[0], task, seed=seed + 1000, trials=trials, epochs=epochs, startup=startup, warm=[])
        past.append(PastStudy(study_name=task.name, fingerprint=fingerprint(task.train_x), best_params=found.top(3)))
    return StudyIndex(past)


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=24, help="configurations per search")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--startup", type=int, default=5, help="random trials before TPE / the pruners act")
    parser.add_argument("--fashion-rows", type=int, default=2000)
    parser.add_argument("--trial-cap", type=int, default=6, help="an arm stops after trials x this many "
                        "configurations if vanilla's compute has not stopped it by then")
    parser.add_argument("--arms", default="all", help="comma-separated arm names (vanilla is always run)")
    parser.add_argument("--sources", default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    started = time.perf_counter()
    sources = load_sources(args.fashion_rows)
    if args.sources != "all":
        sources = [s for s in sources if s.name in args.sources.split(",")]
    arms = ARMS if args.arms == "all" else [ARMS[0], *[a for a in ARMS[1:] if a.name in args.arms.split(",")]]
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        index = past_studies(sources, seed=seed, trials=args.trials, epochs=args.epochs, startup=args.startup)
        for s in sources:
            task = make_task(s.name, s.x, s.y, seed, with_coreset=True)
            warm = warm_start_params(index, fingerprint(task.train_x), studies=2, per_study=2)
            nearest = index.nearest(fingerprint(task.train_x), 1)[0][0].study_name
            vanilla = search(arms[0], task, seed=seed, trials=args.trials, epochs=args.epochs,
                             startup=args.startup, warm=warm)
            target = vanilla.best_value - 0.005
            base = vanilla.reach(target)
            assert base is not None
            budget = vanilla.curve[-1][0]
            others = arms[1:]
            order = others[seed % len(others):] + others[: seed % len(others)]  # interleaved: the order rotates
            found = {"vanilla": vanilla}
            for a in order:
                found[a.name] = search(a, task, seed=seed, trials=args.trials * args.trial_cap, epochs=args.epochs,
                                       startup=args.startup, warm=warm, budget=budget)
            vanilla_test = test_accuracy(task, vanilla.best_params, epochs=args.epochs, seed=seed)
            for a in arms:
                f = found[a.name]
                got = f.reach(target)
                half, full = f.best_within(HALF * budget), f.best_within(budget)
                test_half = (vanilla_test if a.name == "vanilla" else
                             None if half is None else test_accuracy(task, half, epochs=args.epochs, seed=seed))
                test_full = (vanilla_test if a.name == "vanilla" else
                             None if full is None else test_accuracy(task, full, epochs=args.epochs, seed=seed))
                rows.append({
                    "dataset": s.name, "seed": seed, "arm": a.name, "reached": got is not None,
                    "compute_ratio_vs_tpe": None if got is None else got[0] / base[0],
                    "row_epoch_ratio_vs_tpe": None if got is None else got[1] / base[1],
                    "seconds_to_target": None if got is None else got[0], "vanilla_seconds_to_target": base[0],
                    "total_seconds": f.curve[-1][0], "budget_seconds": budget, "best_val_accuracy": f.best_value,
                    "target": target, "test_accuracy_at_half": test_half, "test_accuracy_at_full": test_full,
                    "final_accuracy_delta": None if test_half is None else 100 * (test_half - vanilla_test),
                    "final_accuracy_delta_at_full": None if test_full is None else 100 * (test_full - vanilla_test),
                    "trainings": f.trainings, "pruned": f.pruned, "nearest_past_study": nearest if a.warm else None,
                    "coreset_seconds": task.coreset_seconds.get(a.subset, 0.0),
                })
                print(json.dumps(rows[-1]), flush=True)

    def median(values: list[float | None]) -> float | None:
        """The median, an unreached target counting as infinitely expensive (None if that is the median)."""
        m = float(np.median([math.inf if v is None else v for v in values]))
        return None if math.isinf(m) else m

    summary = []
    for a in arms:
        mine = [r for r in rows if r["arm"] == a.name]
        deltas = [r["final_accuracy_delta"] for r in mine if r["final_accuracy_delta"] is not None]
        summary.append({
            "arm": a.name, "runs": len(mine), "reached": sum(r["reached"] for r in mine),
            "compute_ratio_vs_tpe": median([r["compute_ratio_vs_tpe"] for r in mine]),
            "row_epoch_ratio_vs_tpe": median([r["row_epoch_ratio_vs_tpe"] for r in mine]),
            "final_accuracy_delta": float(np.mean(deltas)) if deltas else None,
            "final_accuracy_delta_sd": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None,
            "final_accuracy_delta_at_full": (float(np.mean(full)) if (full := [
                r["final_accuracy_delta_at_full"] for r in mine if r["final_accuracy_delta_at_full"] is not None])
                else None),
            "per_dataset": {s.name: median([r["compute_ratio_vs_tpe"] for r in mine if r["dataset"] == s.name])
                            for s in sources},
        })
    result = {"cpu": cpu_name(), "threads": 1, "python": platform.python_version(), "torch": torch.__version__,
              "optuna": optuna.__version__, "load_average": os.getloadavg()[0], "seeds": args.seeds,
              "trials": args.trials, "epochs": args.epochs, "startup": args.startup,
              "datasets": [s.name for s in sources], "ladder": list(LADDER),
              "seconds": round(time.perf_counter() - started, 1), "default_arm": DEFAULT_ARM,
              **{k: v for row in summary if row["arm"] == DEFAULT_ARM
                 for k, v in row.items() if k in ("compute_ratio_vs_tpe", "final_accuracy_delta")},
              "summary": summary, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tuner.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{len(sources)} data sets x {args.seeds} seeds, {args.trials} configurations of {args.epochs} epochs "
          f"per search; CPU {result['cpu']}, 1 thread")
    head = (f"{'arm':<20} {'reached':>7} {'compute/TPE':>11} {'row-epochs/TPE':>14} {'test delta, half (pt)':>21}"
            f" {'same compute':>12}  per data set (median compute/TPE)")
    print(head)
    print("-" * len(head))

    def num(v: float | None, sign: bool = False) -> str:
        return "n/r" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")

    for row in summary:
        per = "  ".join(f"{k}:{num(v)}" for k, v in row["per_dataset"].items())
        sd = row["final_accuracy_delta_sd"]
        delta = num(row["final_accuracy_delta"], sign=True) + ("" if sd is None else f" ±{sd:.1f}")
        print(f"{row['arm']:<20} {row['reached']:>3}/{row['runs']:<3} {num(row['compute_ratio_vs_tpe']):>11} "
              f"{num(row['row_epoch_ratio_vs_tpe']):>14} {delta:>21} "
              f"{num(row['final_accuracy_delta_at_full'], True):>12}  {per}")
    print("(compute: medians over data sets x seeds; n/r: the target was not reached in most runs within vanilla's "
          "compute; test delta: mean ± sd, in points, of the best configuration found with half of vanilla's compute "
          "(half) or all of it (same compute), retrained on the whole train split, against vanilla's)")
    print(f"\nwritten {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
