"""The app factory: health and readiness, error mapping, HTTP spans as parents of publish spans."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from dlforge.common.app import ServicePart, backends_of, create_app
from dlforge.common.errors import Conflict, InvalidInput, NotFound
from dlforge.common.events import Event, LabelsSubmitted, Topic
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.common.settings import load_settings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def make_app(bus_url: str, tmp_path: Path) -> Any:
    service = Service("shop")
    router = APIRouter()

    @router.post("/labels/{batch}")
    async def submit(batch: str, backends: Backends = Depends(backends_of)) -> dict[str, str]:
        if batch == "bad":
            raise InvalidInput("batch 'bad' is not a batch", details={"field": "batch"})
        event = Event.new(LabelsSubmitted(dataset_id="d", batch_id=batch, labels={"i": "good"}, annotator="p"),
                          run_id=f"run-{batch}")
        await backends.publish(event)
        return {"event_id": event.event_id}

    @router.get("/missing")
    async def missing() -> None:
        raise NotFound("no dataset 'x'")

    @router.get("/conflict")
    async def conflict() -> None:
        raise Conflict("dataset 'x' is at version 3, not 2")

    @router.get("/labels/{batch}")
    async def seen(batch: str, backends: Backends = Depends(backends_of)) -> dict[str, Any]:
        doc = await backends.docs.get("shop_seen", batch)
        if doc is None:
            raise NotFound(f"batch {batch!r} not handled yet")
        return doc

    @service.handles(Topic.LABELS_SUBMITTED)
    async def handle(event: Event, ctx: HandlerContext) -> None:
        await ctx.docs.upsert("shop_seen", {"_id": event.payload.batch_id, "event_id": event.event_id})  # type: ignore[attr-defined]

    settings = load_settings(bus=bus_url, objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db",
                             poll_seconds=0.05)
    return create_app([ServicePart(service, router=router)], settings=settings)


def wait_ready(client: TestClient, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.json()
            return dict(response.json())
        time.sleep(0.1)


def test_healthz_and_readyz(bus_url: str, tmp_path: Path) -> None:
    with TestClient(make_app(bus_url, tmp_path)) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "services": ["shop"]}
        ready = wait_ready(client)
        assert ready == {"status": "ready", "checks": {"bus": "ok", "docs": "ok", "objects": "ok", "worker:shop": "ok"}}
        assert client.get("/openapi.json").json()["info"]["title"] == "dlforge shop"


def test_readyz_names_the_failing_backend(tmp_path: Path) -> None:
    with TestClient(make_app("memory://", tmp_path)) as client:
        wait_ready(client)
        shutil.rmtree(tmp_path / "objects")  # the object store's folder is gone
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert "is not writable" in body["checks"]["objects"]
        assert body["checks"]["bus"] == "ok" and body["checks"]["docs"] == "ok"

        import asyncio

        asyncio.run(client.app.state.backends.docs.close())  # type: ignore[attr-defined]  # the database is gone too
        body = client.get("/readyz").json()
        assert body["checks"]["docs"].startswith("ProgrammingError") and body["checks"]["bus"] == "ok"


def test_errors_map_to_http_statuses(tmp_path: Path) -> None:
    with TestClient(make_app("memory://", tmp_path)) as client:
        bad = client.post("/labels/bad")
        assert bad.status_code == 422
        assert bad.json() == {"detail": "batch 'bad' is not a batch", "errors": {"field": "batch"}}
        assert client.get("/missing").status_code == 404
        assert client.get("/missing").json() == {"detail": "no dataset 'x'"}
        assert client.get("/conflict").status_code == 409


def test_the_request_span_is_the_parent_of_the_publish_span_and_the_handler(
    bus_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with TestClient(make_app(bus_url, tmp_path)) as client:
        wait_ready(client)
        spans.clear()
        response = client.post("/labels/b1", headers={"traceparent": TRACEPARENT})
        assert response.status_code == 200
        event_id = response.json()["event_id"]
        deadline = time.monotonic() + 30
        while client.get("/labels/b1").status_code != 200:
            assert time.monotonic() < deadline, "the worker never handled the event"
            time.sleep(0.05)
        assert client.get("/labels/b1").json()["event_id"] == event_id
        time.sleep(0.2)

    finished = spans.get_finished_spans()
    servers = [s for s in finished if s.kind == SpanKind.SERVER and s.attributes.get("http.route") == "/labels/{batch}"
               and s.attributes.get("http.request.method") == "POST"]  # type: ignore[union-attr]
    assert len(servers) == 1, [s.name for s in finished]  # one server span per request
    request = servers[0]
    (publish,) = [s for s in finished if s.name == "publish labels.submitted"]
    (handle,) = [s for s in finished if s.name == "handle labels.submitted"]
    assert request.name == "POST /labels/{batch}"
    assert request.attributes["http.response.status_code"] == 200  # type: ignore[index]
    assert request.context.span_id in ancestors(publish, finished)
    assert handle.parent is not None and handle.parent.span_id == publish.context.span_id
    # the caller's traceparent was continued: one trace from the client through the worker
    assert {format(s.context.trace_id, "032x") for s in (request, publish, handle)} == {TRACEPARENT.split("-")[1]}


def ancestors(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[int]:
    """Span ids of ``span``'s parent, grandparent, ... among ``spans``."""
    by_id = {s.context.span_id: s for s in spans}
    out: list[int] = []
    parent = span.parent
    while parent is not None:
        out.append(parent.span_id)
        parent = by_id[parent.span_id].parent if parent.span_id in by_id else None
    return out


def test_a_bad_setting_stops_the_app_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.common.errors import ConfigError

    monkeypatch.setenv("DLFORGE_DOCS", "cassandra://db")
    app = create_app([ServicePart(Service("x"))])
    with pytest.raises(ConfigError, match="DLFORGE_DOCS"), TestClient(app):
        pass
