"""One registry that turns settings URLs into backends; backend modules are imported lazily."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from dlforge.common.bus import EventBus
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import ConfigError
from dlforge.common.objects import ObjectStore


def optional_import(module: str, *, install: str, purpose: str) -> Any:
    """Import a heavy or optional dependency, or fail saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the '{module}' module: install it with `{install}` ({exc})") from exc


def _bus_memory(url: str) -> EventBus:
    from dlforge.common.bus.memory import MemoryBus

    return MemoryBus()


def _bus_kafka(url: str) -> EventBus:
    from dlforge.common.bus.kafka import KafkaBus, KafkaOptions

    parts = urlsplit(url)
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    ints: dict[str, Any] = {k: int(q[k]) for k in ("partitions", "replication_factor", "session_timeout_ms",
                                    "heartbeat_interval_ms", "max_poll_interval_ms", "fetch_max_wait_ms") if k in q}
    extra: dict[str, Any] = {k: q[k] for k in ("client_id", "topic_prefix") if k in q}
    return KafkaBus(KafkaOptions(bootstrap_servers=parts.netloc, **ints, **extra))


def _bus_sqlite(url: str) -> EventBus:
    from dlforge.common.bus.sqlite import SqliteBus, SqliteBusOptions

    return SqliteBus(SqliteBusOptions.from_url(url))


def _objects_file(url: str) -> ObjectStore:
    from dlforge.common.objects.fs import FsObjectStore

    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)  # file://./rel and file:///abs both work
    return FsObjectStore(Path(path))


def _objects_s3(url: str) -> ObjectStore:
    from dlforge.common.objects.s3 import S3ObjectStore

    parts = urlsplit(url)
    bucket, _, prefix = parts.path.strip("/").partition("/")
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return S3ObjectStore(
        endpoint=f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname),
        access_key=unquote(parts.username) if parts.username else os.environ.get("AWS_ACCESS_KEY_ID", ""),
        secret_key=unquote(parts.password) if parts.password else os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        bucket=bucket,
        prefix=prefix,
        secure=parts.scheme == "s3s",
        region=q.get("region"),
    )


def _docs_sqlite(url: str) -> DocumentStore:
    from dlforge.common.docs.sqlite import SqliteDocumentStore

    path = urlsplit(url).path
    # sqlite:///rel.db -> "rel.db"; sqlite:////abs.db -> "/abs.db"; sqlite:///:memory:
    return SqliteDocumentStore(path[1:] if path.startswith("/") else path)


def _docs_mongo(url: str) -> DocumentStore:
    optional_import("motor", install="pip install motor", purpose="the mongodb document store")
    from dlforge.common.docs.mongo import MongoDocumentStore

    database = urlsplit(url).path.strip("/") or "dlforge"
    return MongoDocumentStore(url, database)


_REGISTRY: dict[str, dict[str, Callable[[str], Any]]] = {
    "bus": {"memory": _bus_memory, "kafka": _bus_kafka, "sqlite": _bus_sqlite},
    "objects": {"file": _objects_file, "s3": _objects_s3, "s3s": _objects_s3},
    "docs": {"sqlite": _docs_sqlite, "mongodb": _docs_mongo, "mongodb+srv": _docs_mongo},
}


def _open(kind: str, url: str) -> Any:
    scheme = urlsplit(url).scheme
    factory = _REGISTRY[kind].get(scheme)
    if factory is None:
        raise ConfigError(f"DLFORGE_{kind.upper()}: no {kind} backend for scheme {scheme!r}")
    try:
        return factory(url)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # a malformed URL part: name the variable, not a stack trace
        raise ConfigError(f"DLFORGE_{kind.upper()}: {exc}") from exc


def open_bus(url: str) -> EventBus:
    return _open("bus", url)  # type: ignore[no-any-return]


def open_objects(url: str) -> ObjectStore:
    return _open("objects", url)  # type: ignore[no-any-return]


def open_docs(url: str) -> DocumentStore:
    return _open("docs", url)  # type: ignore[no-any-return]
