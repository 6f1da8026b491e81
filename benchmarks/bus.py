#!/usr/bin/env python
"""Event throughput and produce→handled latency through the full service runtime.

Each event goes the whole way a stage's event goes: the Worker's consume loop takes it from the
bus, checks the processed-marker (SQLite document store), runs a handler, records the marker with
the one event the handler emits (outbox), publishes that event, and commits the offset.

Backends: ``memory`` (in-process), ``sqlite`` (the durable embedded default; the producer and the
worker share one bus instance, as the API and the workers of ``dlforge up`` do), ``sqlite-2p`` (the
producer has its own bus instance on the same file, as a second process would: the worker sees its
messages by polling every ``poll_ms``) and ``kafka``.

Two modes per backend:

* ``max``: N events (default 5,000) are published first; the worker drains them; events/s is
  N divided by the time from the first delivery to the last commit.
* ``paced``: events are produced at a fixed rate (default 500/s); the latency of each is the
  time from the producer's publish call to the commit of its offset (p50/p99/max).

    python benchmarks/bus.py                       # memory, sqlite, sqlite-2p, and kafka on a tansu it starts
    python benchmarks/bus.py --kafka 127.0.0.1:9092
    python benchmarks/bus.py --backends memory sqlite

Prints a table and writes benchmarks/results/bus.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import cpu_name  # benchmarks/machine.py (a script's folder is on its path)

from dlforge.common.bus import Delivery, EventBus, Message, Subscription
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, Topic
from dlforge.common.runtime import Backends, HandlerContext, Service, Worker
from dlforge.common.settings import load_settings
from dlforge.common.tracing import configure_telemetry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bus.json"
TARGET_EVENTS_PER_S = 2000.0
TARGET_P99_MS = 50.0


# ------------------------------------------------------------------------------------------------
# a bus wrapper that timestamps commits (the benchmark's only instrumentation)
# ------------------------------------------------------------------------------------------------


class _TimedSubscription(Subscription):
    def __init__(self, inner: Subscription, bus: TimedBus) -> None:
        self._inner = inner
        self._bus = bus
        self._done = bus.done

    async def get(self, timeout: float | None = None) -> Delivery | None:
        return await self._inner.get(timeout)

    async def get_batch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        batch = await self._inner.get_batch(max_count, timeout)
        if batch:
            self._bus.first_delivery = self._bus.first_delivery or time.perf_counter()
        return batch

    async def commit(self, delivery: Delivery) -> None:
        await self.commit_batch([delivery])

    async def commit_batch(self, deliveries: Sequence[Delivery]) -> None:
        await self._inner.commit_batch(deliveries)
        now = time.perf_counter()
        for d in deliveries:
            self._done[d.key] = now

    async def close(self) -> None:
        await self._inner.close()


class TimedBus(EventBus):
    """Delegates to ``inner``; records when each delivery (by key) was committed."""

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await self.inner.publish_batch(messages)

    def __init__(self, inner: EventBus) -> None:
        self.inner = inner
        self.done: dict[str, float] = {}
        self.first_delivery = 0.0

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def publish(
        self, topic: Topic, *, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        await self.inner.publish(topic, key=key, value=value, headers=headers)

    async def subscribe(self, *, group: str, topics: Sequence[Topic]) -> Subscription:
        return _TimedSubscription(await self.inner.subscribe(group=group, topics=topics), self)


# ------------------------------------------------------------------------------------------------
# the service under test
# ------------------------------------------------------------------------------------------------


def bench_service() -> Service:
    service = Service("bench")

    @service.handles(Topic.LABELS_SUBMITTED)
    async def on_submitted(event: Event, ctx: HandlerContext) -> Event:
        p = event.payload
        assert isinstance(p, LabelsSubmitted)
        return event.follow(
            LabelsRequested(dataset_id=p.dataset_id, batch_id=p.batch_id, round=1, item_ids=list(p.labels),
                            reason="uncertain")
        )

    return service


def make_event(i: int) -> Event:
    payload = LabelsSubmitted(dataset_id="bench", batch_id=f"b{i}", labels={f"item-{i}": "good"}, annotator="bench")
    return Event.new(payload, run_id=f"r{i}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Rig:
    """One backend set-up: a producer bus, a worker bus (separate clients unless shared), SQLite docs, fs objects."""

    def __init__(self, bus_url: str, tmp: Path, *, shared_bus: bool) -> None:
        self.bus_url = bus_url
        self.tmp = tmp
        self.shared_bus = shared_bus

    async def __aenter__(self) -> Rig:
        settings = load_settings(bus=self.bus_url, objects=f"file://{self.tmp}/objects",
                                 docs=f"sqlite:///{self.tmp}/docs.db", poll_seconds=0.05)
        worker_backends = Backends.from_settings(settings)
        if self.shared_bus:
            producer_bus = worker_backends.bus  # one process: its producers and consumers share the bus
        else:
            producer_bus = Backends.from_settings(settings).bus
            await producer_bus.start()
        self.timed = TimedBus(worker_backends.bus)
        worker_backends.bus = self.timed
        await worker_backends.start()
        self.backends = worker_backends
        self.producer = producer_bus
        self.worker = Worker(bench_service(), worker_backends)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.producer is not self.backends.bus and self.producer is not self.timed.inner:
            await self.producer.stop()
        await self.backends.stop()

    async def publish(self, event: Event) -> None:
        from dlforge.common.runtime import publish_event

        await publish_event(self.producer, event)

    async def wait_done(self, keys: Sequence[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        last = keys[-1]
        while time.perf_counter() < deadline:
            if last in self.timed.done and all(k in self.timed.done for k in keys):
                return
            await asyncio.sleep(0.01)
        missing = sum(1 for k in keys if k not in self.timed.done)
        raise TimeoutError(f"{missing} of {len(keys)} events not handled within {timeout:.0f}s")


async def run_max(bus_url: str, n: int, tmp: Path, *, shared_bus: bool) -> dict[str, Any]:
    async with Rig(bus_url, tmp, shared_bus=shared_bus) as rig:
        events = [make_event(i) for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, 250):  # producer side: concurrent publishes, not measured below
            await asyncio.gather(*(rig.publish(e) for e in events[start:start + 250]))
        publish_s = time.perf_counter() - t0
        stop = asyncio.Event()
        cpu0 = time.process_time()
        task = asyncio.create_task(rig.worker.run(stop))
        keys = [e.run_id for e in events]
        await rig.wait_done(keys, timeout=300)
        cpu = time.process_time() - cpu0
        t_end = max(rig.timed.done[k] for k in keys)
        stop.set()
        await task
        seconds = t_end - rig.timed.first_delivery
        return {"mode": "max", "events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds, 1),
                "worker_cpu_us_per_event": round(cpu / n * 1e6, 1),
                "publish_events_per_s": round(n / publish_s, 1), "handled": rig.worker.processed["handled"]}


async def run_paced(bus_url: str, rate: float, seconds: float, tmp: Path, *, shared_bus: bool) -> dict[str, Any]:
    async with Rig(bus_url, tmp, shared_bus=shared_bus) as rig:
        stop = asyncio.Event()
        task = asyncio.create_task(rig.worker.run(stop))
        await rig.worker.ready.wait()
        # let the consumer join its group and get its partitions before the clock starts
        warm = make_event(10**9)
        await rig.publish(warm)
        await rig.wait_done([warm.run_id], timeout=60)

        n = int(rate * seconds)
        events = [make_event(i) for i in range(n)]
        sent: dict[str, float] = {}
        pending: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter()
        for i, event in enumerate(events):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[event.run_id] = time.perf_counter()
            t = asyncio.create_task(rig.publish(event))
            pending.add(t)
            t.add_done_callback(pending.discard)
        produce_s = time.perf_counter() - t0
        await asyncio.gather(*pending)
        keys = [e.run_id for e in events]
        await rig.wait_done(keys, timeout=120)
        stop.set()
        await task
        lat = [(rig.timed.done[k] - sent[k]) * 1000 for k in keys]
        return {
            "mode": "paced", "rate": rate, "events": n, "achieved_rate": round(n / produce_s, 1),
            "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2),
            "max_ms": round(max(lat), 2), "mean_ms": round(statistics.fmean(lat), 2),
        }


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def start_tansu(state: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """A tansu of the benchmark's own; SIGTERM then exits through the callers' ``finally`` that stops it."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.path.insert(0, str(ROOT / "scripts"))
    import services  # scripts/services.py

    port = services.pick_port(0, set())
    svc = services.start_tansu(state, port)
    bootstrap = f"{services.HOST}:{port}"
    try:
        services.wait_until("tansu", lambda: services.kafka_answers(bootstrap), svc["_proc"], Path(svc["log"]), 30)
    except BaseException:
        services.stop_pid(svc["pid"])
        raise
    return bootstrap, svc["_proc"]


def kafka_url(bootstrap: str) -> str:
    # a short fetch_max_wait_ms: this measures latency, not what idle fetches cost a neighbour's CPU
    # (benchmarks/bus_idle.py and DEVELOPERS.md weigh the two)
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    return f"kafka://{bootstrap}?partitions=3&fetch_max_wait_ms=5&topic_prefix={prefix}"


async def run_backend(
    name: str, bus_url_factory: Any, args: argparse.Namespace, *, shared_bus: bool = False
) -> list[dict[str, Any]]:
    """Both modes on ``bus_url_factory(folder)``, each in a folder of its own."""
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"dlforge-bench-{name}-") as tmp:
        row = await run_max(bus_url_factory(Path(tmp, "max")), args.events, Path(tmp, "max"), shared_bus=shared_bus)
        rows.append({"backend": name, **row})
        row = await run_paced(bus_url_factory(Path(tmp, "paced")), args.rate, args.seconds, Path(tmp, "paced"),
                              shared_bus=shared_bus)
        rows.append({"backend": name, **row})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'backend':<10} {'mode':<7} {'events':>7} {'events/s':>10} {'cpu us/ev':>10} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'max ms':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["mode"] == "max":
            lines.append(f"{r['backend']:<10} {'max':<7} {r['events']:>7} {r['events_per_s']:>10.0f} "
                         f"{r['worker_cpu_us_per_event']:>10.0f} {'':>8} {'':>8} {'':>8}")
        else:
            lines.append(f"{r['backend']:<10} {'@' + str(int(r['rate'])) + '/s':<7} {r['events']:>7} "
                         f"{r['achieved_rate']:>10.0f} {'':>10} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                         f"{r['max_ms']:>8.1f}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    configure_telemetry("dlforge-bench")  # real SDK providers, as in a service (no exporter: spans not recorded)
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    proc = None
    state = Path(tempfile.mkdtemp(prefix="dlforge-bench-services-"))
    try:
        for backend in args.backends:
            if backend == "memory":
                rows += await run_backend("memory", lambda _: "memory://", args, shared_bus=True)
            elif backend == "sqlite":
                rows += await run_backend("sqlite", lambda d: f"sqlite:///{d}/bus.db", args, shared_bus=True)
            elif backend == "sqlite-2p":
                rows += await run_backend("sqlite-2p", lambda d: f"sqlite:///{d}/bus.db", args)
            elif backend == "kafka":
                bootstrap = args.kafka or os.environ.get("DLFORGE_TEST_KAFKA")
                if not bootstrap:
                    bootstrap, proc = await asyncio.to_thread(start_tansu, state)
                rows += await run_backend("kafka", lambda _, b=bootstrap: kafka_url(b), args)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    kafka_max = [r for r in rows if r["backend"] == "kafka" and r["mode"] == "max"]
    kafka_paced = [r for r in rows if r["backend"] == "kafka" and r["mode"] == "paced"]
    targets = {
        "kafka_events_per_s": {"target": TARGET_EVENTS_PER_S,
                               "measured": kafka_max[0]["events_per_s"] if kafka_max else None},
        "kafka_p99_ms_at_500": {"target": TARGET_P99_MS,
                                "measured": kafka_paced[0]["p99_ms"] if kafka_paced else None},
    }
    targets["kafka_events_per_s"]["met"] = bool(kafka_max) and kafka_max[0]["events_per_s"] >= TARGET_EVENTS_PER_S
    targets["kafka_p99_ms_at_500"]["met"] = bool(kafka_paced) and kafka_paced[0]["p99_ms"] < TARGET_P99_MS
    cpu = cpu_name()
    print(table(rows))
    print(f"CPU: {cpu}")
    print(f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    for name, t in targets.items():
        print(f"target {name}: {t['target']} measured {t['measured']} -> {'met' if t['met'] else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_average_1m_at_start": load_start, "load_average_1m_at_end": os.getloadavg()[0]},
        "path": "bus -> Worker (marker check on SQLite, handler, marker+outbox, emit 1 event) -> commit",
        "results": rows,
        "targets": targets,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kafka", help="bootstrap host:port of a running broker (default: start tansu)")
    backends = ["memory", "sqlite", "sqlite-2p", "kafka"]
    parser.add_argument("--backends", nargs="+", default=backends, choices=backends)
    parser.add_argument("--events", type=int, default=5000, help="events in the max-throughput run")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s in the paced run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
