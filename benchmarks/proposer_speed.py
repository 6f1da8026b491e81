"""How steady the proposer's speed figures are: the window's mean against the median of stretches.

    python benchmarks/proposer_speed.py [--repeats 5] [--seconds 0.5] [--threads 2]

The proposer's speed sub-scores and its ``min_fps`` gate come from
:func:`dlforge.proposer.scoring.measure_throughput`. It takes the median of up to 5 stretches of
at least 0.1 s (the default); with ``groups=1`` the same function gives the plain mean over the
whole window, which is what it gave before. Both are measured here, interleaved (one of each in
turn), on the repository's architectures at batch 1, ``--repeats`` times, under three conditions:

- ``idle``: nothing else running;
- ``bursts``: two other processes each take a core for 0.3 s of every second (stalls);
- ``steady``: two other processes take both cores all the time.

A good estimator agrees with the other when idle (no bias), and under ``bursts`` stays near its
idle figure (the stalls left out); under ``steady`` every figure drops, as it should: the machine
is slower. Prints a table and writes ``benchmarks/results/proposer-speed.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_name

from dlforge.proposer.scoring import measure_throughput
from dlforge.vision.networks import build_network

RESULTS = Path(__file__).resolve().parent / "results" / "proposer-speed.json"
CASES = (  # (label, arch, input size, channels): the gate's 64 px spec size and the candidates' own
    ("small_cnn b1 at 28 px", "small_cnn", 28, 1),
    ("efficientnet_lite0 b1 at 64 px", "efficientnet_lite0", 64, 3),
    ("efficientnet_lite0 b1 at 224 px", "efficientnet_lite0", 224, 3),
)
ESTIMATORS = {"window mean": {"groups": 1}, "median of stretches": {}}


def _spin(busy: float, period: float, stop: Any) -> None:
    """Keep one core busy for ``busy`` seconds of every ``period`` until ``stop`` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < busy:
            pass
        if period > busy:
            stop.wait(period - busy)


def measure(condition: str, *, repeats: int, seconds: float, models: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = []
    if condition != "idle":
        busy, period = (0.3, 1.0) if condition == "bursts" else (1.0, 1.0)
        procs = [ctx.Process(target=_spin, args=(busy, period, stop), daemon=True) for _ in range(2)]
        for p in procs:
            p.start()
        time.sleep(0.5)  # let the load start before measuring
    rows = []
    try:
        for label, arch, size, channels in CASES:
            figures: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
            for _ in range(repeats):
                for name, extra in ESTIMATORS.items():  # interleaved
                    figures[name].append(measure_throughput(models[arch], batch=1, size=size, channels=channels,
                                                            seconds=seconds, **extra))
            for name, values in figures.items():
                rows.append({"condition": condition, "case": label, "estimator": name,
                             "images_per_s": [round(v, 1) for v in values],
                             "median": round(float(np.median(values)), 1),
                             "min": round(min(values), 1), "max": round(max(values), 1)})
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="the window (the gate's at the default settings)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.repeats < 1 or args.seconds <= 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --seconds > 0")
    torch.set_num_threads(args.threads)
    models = {"small_cnn": build_network("small_cnn", 2, pretrained=False),
              "efficientnet_lite0": build_network("efficientnet_lite0", 2, pretrained=False)}
    rows = [r for condition in ("idle", "bursts", "steady")
            for r in measure(condition, repeats=args.repeats, seconds=args.seconds, models=models)]
    idle = {(r["case"], r["estimator"]): r["median"] for r in rows if r["condition"] == "idle"}
    print(f"\nproposer speed, batch 1, {args.seconds} s windows, {args.repeats} repeats ({cpu_name()})")
    print(f"{'condition':>9} {'case':>32} {'estimator':>20} {'median':>8} {'min':>8} {'max':>8} {'/ idle':>7}")
    for r in rows:
        r["median_over_idle"] = round(r["median"] / idle[(r["case"], r["estimator"])], 3)
        print(f"{r['condition']:>9} {r['case']:>32} {r['estimator']:>20} {r['median']:>8.1f} {r['min']:>8.1f} "
              f"{r['max']:>8.1f} {r['median_over_idle']:>7.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_name(), "machine": platform.machine(), "threads": args.threads,
                                   "seconds": args.seconds, "repeats": args.repeats,
                                   "date": datetime.now().isoformat(timespec="seconds"), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
