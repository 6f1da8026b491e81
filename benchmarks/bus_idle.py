#!/usr/bin/env python
"""What idle Kafka consumers cost in CPU, against how long an event waits, per ``fetch_max_wait_ms``.

tansu holds an empty fetch for the whole ``fetch_max_wait_ms`` instead of answering when data
arrives (DEVELOPERS.md), so a short wait buys latency, and every idle consumer then sends a fetch
per wait: CPU in the consumers' process and in the broker, taken from the work beside them. This
measures both sides on one broker, one setting after another, interleaved over ``--rounds``:

* idle: ``--consumers`` subscriptions in one process (a pipeline run in one process has at least
  13: a worker and a cancellation follower per service, and the run's follower; the run view adds more), each waiting in
  ``get_batch`` as the Worker does, for ``--seconds``; CPU seconds per wall second of this process
  (``time.process_time``) and of the broker (``/proc/<pid>/stat``).
* latency: then one more consumer joins; events are published one at a time, ``--events`` of them,
  each at a random moment (over at least four fetch waits) after the previous arrived; the time from
  publish to arrival (median, p90).

Session timeout and heartbeat default to the tests' (1000 / 250 ms): heartbeats are idle traffic too.

    python benchmarks/bus_idle.py                      # starts a tansu of its own
    python benchmarks/bus_idle.py --waits 10 100 --rounds 3

Prints a table and writes benchmarks/results/bus-idle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bus import percentile, start_tansu  # benchmarks/bus.py
from machine import cpu_name

from dlforge.common.backends import open_bus
from dlforge.common.events import Topic

RESULTS = Path(__file__).resolve().parent / "results" / "bus-idle.json"
TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def measure(bootstrap: str, broker_pid: int | None, wait_ms: int, round_no: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"idle-{uuid.uuid4().hex[:8]}."
    url = (f"kafka://{bootstrap}?partitions=3&fetch_max_wait_ms={wait_ms}&topic_prefix={prefix}"
           f"&session_timeout_ms={args.session_ms}&heartbeat_interval_ms={args.heartbeat_ms}")
    bus = open_bus(url)
    await bus.start()
    stop = asyncio.Event()
    # joined together, as the services of a process join (a consumer's start takes seconds on tansu)
    subs = list(await asyncio.gather(*(bus.subscribe(group=f"g{i}", topics=[Topic.LABELS_SUBMITTED])
                                       for i in range(args.consumers))))

    async def idle(sub: Any) -> None:
        while not stop.is_set():
            await sub.get_batch(16, timeout=1.0)

    tasks = [asyncio.create_task(idle(s)) for s in subs]
    await asyncio.sleep(2.0)  # the joins settle before the idle window (a setup wait, not a check)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    broker0 = proc_cpu_seconds(broker_pid) if broker_pid else None
    await asyncio.sleep(args.seconds)
    wall = time.perf_counter() - wall0
    cpu = (time.process_time() - cpu0) / wall
    broker = (proc_cpu_seconds(broker_pid) - broker0) / wall if broker_pid and broker0 is not None else None

    async def arrival(sub: Any, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not await sub.get_batch(1, timeout=1.0):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the probe consumer received nothing in {seconds:.0f} s")

    # the probe joins after the idle window (its join takes seconds on tansu): a first event comes through
    probe = await bus.subscribe(group="probe", topics=[Topic.DATASET_UPLOADED])
    await bus.publish(Topic.DATASET_UPLOADED, key="warm", value=b"warm")
    await arrival(probe, 30)
    latencies = []
    rng = random.Random(f"{wait_ms}-{round_no}")
    span = max(0.3, 4 * wait_ms / 1000)
    for i in range(args.events):
        # published at a random moment of the consumers' fetch cycle (spread over at least four
        # cycles), as events come in a pipeline; right after the previous arrival, the probe's next
        # fetch would not be at the broker yet
        await asyncio.sleep(rng.uniform(0.0, span))
        sent = time.perf_counter()
        await bus.publish(Topic.DATASET_UPLOADED, key=f"k{i}", value=b"x")
        await arrival(probe, 10)
        latencies.append((time.perf_counter() - sent) * 1000)
    stop.set()
    await asyncio.gather(*tasks)
    for s in [*subs, probe]:
        await s.close()
    await bus.stop()
    lat = sorted(latencies)
    return {"fetch_max_wait_ms": wait_ms, "consumers": args.consumers, "process_cpu_per_s": cpu,
            "broker_cpu_per_s": broker, "latency_ms_p50": statistics.median(lat),
            "latency_ms_p90": percentile(lat, 90), "events": len(lat), "latencies_ms": latencies}


async def measure_all(bootstrap: str, broker_pid: int | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for r in range(args.rounds):
        for wait in args.waits:
            row = await measure(bootstrap, broker_pid, wait, r, args)
            row["round"] = r
            rows.append(row)
            broker = row["broker_cpu_per_s"]
            print(f"  round {r} wait {wait} ms: process {row['process_cpu_per_s']:.3f} CPU-s/s, broker "
                  f"{'-' if broker is None else f'{broker:.3f}'} CPU-s/s, "
                  f"latency p50 {row['latency_ms_p50']:.1f} ms", flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dlforge-bench-idle-") as tmp:
        if args.kafka:
            bootstrap, proc = args.kafka, None
        else:
            bootstrap, proc = start_tansu(Path(tmp))  # before the event loop: it runs one of its own
        try:
            broker_pid = args.broker_pid or (proc.pid if proc is not None else None)
            rows = asyncio.run(measure_all(bootstrap, broker_pid, args))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    summary = []
    print(f"\n{args.consumers} idle consumers, {args.seconds:.0f} s a window, {args.rounds} rounds (median); "
          f"CPU {cpu_name()}, {os.cpu_count()} cores")
    print("| fetch_max_wait_ms | process CPU-s/s | broker CPU-s/s | both, share of the machine | "
          "latency p50 / p90 ms |\n|---|---|---|---|---|")
    for wait in args.waits:
        mine = [r for r in rows if r["fetch_max_wait_ms"] == wait]
        proc_cpu = statistics.median(r["process_cpu_per_s"] for r in mine)
        brokers = [r["broker_cpu_per_s"] for r in mine if r["broker_cpu_per_s"] is not None]
        broker = statistics.median(brokers) if brokers else None
        p50 = statistics.median(r["latency_ms_p50"] for r in mine)
        p90 = statistics.median(r["latency_ms_p90"] for r in mine)
        both = proc_cpu + (broker or 0.0)
        summary.append({"fetch_max_wait_ms": wait, "process_cpu_per_s": proc_cpu, "broker_cpu_per_s": broker,
                        "machine_share": both / (os.cpu_count() or 1), "latency_ms_p50": p50,
                        "latency_ms_p90": p90})
        print(f"| {wait} | {proc_cpu:.3f} | {'-' if broker is None else f'{broker:.3f}'} | "
              f"{100 * both / (os.cpu_count() or 1):.1f} % | {p50:.1f} / {p90:.1f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(),
                                   "consumers": args.consumers, "seconds": args.seconds,
                                   "session_timeout_ms": args.session_ms,
                                   "heartbeat_interval_ms": args.heartbeat_ms, "load_average_before": load_before,
                                   "measurements": rows,
                                   "summary": summary}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kafka", help="bootstrap host:port of a running broker (default: start tansu)")
    parser.add_argument("--broker-pid", type=int, help="the running broker's pid, to measure its CPU")
    parser.add_argument("--waits", type=int, nargs="+", default=[10, 50, 100, 250])
    parser.add_argument("--consumers", type=int, default=13)
    parser.add_argument("--session-ms", type=int, default=1000, help="session timeout (the tests': 1000)")
    parser.add_argument("--heartbeat-ms", type=int, default=250, help="heartbeat interval (the tests': 250)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
