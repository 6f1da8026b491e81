"""Fixtures shared by every test: real-service URLs, per-test isolation, in-memory tracing.

Real services come from the environment (``make test`` starts them with scripts/services.py):

* ``DLFORGE_TEST_KAFKA``     host:port of a Kafka-protocol broker (tansu)
* ``DLFORGE_TEST_S3``        s3://KEY:SECRET@host:port/bucket (SeaweedFS, MinIO, ...)
* ``DLFORGE_TEST_MONGO_URL`` mongodb://host:port (optional: no MongoDB server on the dev machines)

Unset, their tests are skipped with the reason, except on CI (``CI=true``), where a missing
Kafka or S3 fails the test: CI must run them, not quietly skip them.

Isolation: every test gets its own Kafka topic namespace (``topic_prefix``) and consumer groups,
its own S3 key prefix and its own MongoDB database, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dlforge.common.bus import EventBus
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.common.tracing import configure_telemetry

# The suites of the services test their behaviour, not access: auth is off unless a test turns it on
# (the auth tests pass settings with auth="required"; subprocesses inherit this default).
os.environ.setdefault("DLFORGE_AUTH", "off")

KAFKA_ENV = "DLFORGE_TEST_KAFKA"
S3_ENV = "DLFORGE_TEST_S3"
MONGO_ENV = "DLFORGE_TEST_MONGO_URL"
REQUIRED_ON_CI = frozenset({KAFKA_ENV, S3_ENV})

# Kafka consumers in tests: a dead member is noticed within a second. fetch_max_wait_ms is the
# product's default (100): every idle consumer sends a fetch per wait, and at 10 ms 13 idle
# consumers (a run in one process has at least as many) and the broker took 26 % of a 2-core
# machine; the end-to-end pipeline test ran 1.6-1.7x slower (DEVELOPERS.md, benchmarks/bus_idle.py).
KAFKA_TEST_QUERY = "session_timeout_ms=1000&heartbeat_interval_ms=250&partitions=3&fetch_max_wait_ms=100"


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "kafka: needs the Kafka-protocol broker (DLFORGE_TEST_KAFKA)",
        "s3: needs the S3 server (DLFORGE_TEST_S3)",
        "mongo: needs a MongoDB server (DLFORGE_TEST_MONGO_URL)",
        "slow: takes more than a few seconds",
    ):
        config.addinivalue_line("markers", line)


_HOW = {
    KAFKA_ENV: "`make test` starts one; by hand: python scripts/services.py start --state .services "
               "&& set -a && . .services/env && set +a",
    S3_ENV: "`make test` starts one; by hand: python scripts/services.py start --state .services "
            "&& set -a && . .services/env && set +a",
    MONGO_ENV: "no MongoDB server is started here: set DLFORGE_TEST_MONGO_URL=mongodb://host:port to run them",
}


def require_service(var: str, what: str) -> str:
    """The value of ``var``; skip without it (fail on CI for the services CI must have)."""
    value = os.environ.get(var, "").strip()
    if value:
        return value
    if os.environ.get("CI", "").lower() == "true" and var in REQUIRED_ON_CI:
        pytest.fail(f"{var} is not set on CI, but CI must run the {what} tests ({_HOW[var]})")
    pytest.skip(f"{var} is not set: no {what} to test against ({_HOW[var]})")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------


_METRICS = InMemoryMetricReader()


@pytest.fixture(scope="session", autouse=True)
def span_exporter() -> InMemorySpanExporter:
    """One in-memory exporter (and metric reader) for the whole session, installed before any span is made."""
    exporter = InMemorySpanExporter()
    configure_telemetry("dlforge-tests", span_exporter=exporter, metric_reader=_METRICS)
    return exporter


@pytest.fixture
def metric_reader(span_exporter: InMemorySpanExporter) -> InMemoryMetricReader:
    """The session's metric reader (counters are cumulative: compare before and after)."""
    return _METRICS


@pytest.fixture(autouse=True)
def _fresh_spans(span_exporter: InMemorySpanExporter) -> Iterator[None]:
    """Every test starts with no finished spans (and leaves none behind)."""
    span_exporter.clear()
    yield
    span_exporter.clear()


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The exporter of the spans this test finished."""
    return span_exporter


# ------------------------------------------------------------------------------------------------
# real services
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def kafka_url() -> str:
    """A kafka:// bus URL with topics of its own (a fresh ``topic_prefix``) for this test."""
    bootstrap = require_service(KAFKA_ENV, "Kafka broker")
    return f"kafka://{bootstrap}?{KAFKA_TEST_QUERY}&topic_prefix={unique('t')}."


@pytest.fixture
def s3_url() -> str:
    """An s3:// objects URL whose keys live under a fresh prefix of the test bucket."""
    base = require_service(S3_ENV, "S3 server").rstrip("/")
    return f"{base}/{unique('t')}"


@pytest.fixture
def mongo_url() -> Iterator[str]:
    """A mongodb:// URL of a fresh database, dropped afterwards."""
    base = require_service(MONGO_ENV, "MongoDB server")
    parts = urlsplit(base)
    database = unique("dlforge_test").replace("-", "_")
    yield urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))
    from pymongo import MongoClient

    client: MongoClient[Any] = MongoClient(base, serverSelectionTimeoutMS=5000)
    try:
        client.drop_database(database)
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------
# backends for runtime tests, parametrized over the bus
# ------------------------------------------------------------------------------------------------

BUS_PARAMS = [pytest.param("memory", id="memory"), pytest.param("sqlite", id="sqlite"),
              pytest.param("kafka", id="kafka", marks=pytest.mark.kafka)]


@pytest.fixture(params=BUS_PARAMS)
def bus_url(request: pytest.FixtureRequest) -> str:
    """memory://, a sqlite:// file of the test's own, or a test-private kafka:// URL."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        tmp: Path = request.getfixturevalue("tmp_path")
        return f"sqlite:///{tmp}/bus.db"
    return str(request.getfixturevalue("kafka_url"))


@dataclass
class BackendsFactory:
    """Makes Backends as separate processes of one deployment would have them.

    Each call is a new "process": its own bus client (Kafka, or the SQLite bus on one file) and
    document-store connection, on the same broker topics or bus file, the same SQLite document file
    and the same object folder. An in-process memory bus cannot span processes, so all calls share
    one memory bus.
    """

    bus_url: str
    tmp: Path
    created: list[Backends] = field(default_factory=list)
    _memory_bus: EventBus | None = None

    @property
    def is_kafka(self) -> bool:
        return self.bus_url.startswith("kafka")

    @property
    def spans_processes(self) -> bool:
        """Whether separate processes share this bus (Kafka and the SQLite file do, memory:// does not)."""
        return not self.bus_url.startswith("memory")

    def settings_env(self) -> dict[str, str]:
        return {"DLFORGE_BUS": self.bus_url, "DLFORGE_OBJECTS": f"file://{self.tmp}/objects",
                "DLFORGE_DOCS": f"sqlite:///{self.tmp}/docs.db"}

    async def __call__(self, **overrides: Any) -> Backends:
        values: dict[str, Any] = {"bus": self.bus_url, "objects": f"file://{self.tmp}/objects",
                                  "docs": f"sqlite:///{self.tmp}/docs.db", "poll_seconds": 0.05,
                                  "retry_base_seconds": 0.01, "retry_max_seconds": 0.05}
        backends = Backends.from_settings(load_settings(**{**values, **overrides}))
        if not self.spans_processes:
            if self._memory_bus is None:
                self._memory_bus = backends.bus
            backends.bus = self._memory_bus
        await backends.start()
        self.created.append(backends)
        return backends

    async def close(self) -> None:
        for backends in reversed(self.created):
            await backends.stop()
        self.created.clear()


@pytest.fixture
async def make_backends(bus_url: str, tmp_path: Path) -> AsyncIterator[BackendsFactory]:
    factory = BackendsFactory(bus_url, tmp_path)
    yield factory
    await factory.close()
