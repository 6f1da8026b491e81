"""The app factory: health and readiness, error mapping, HTTP spans as parents of publish spans."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi import APIRouter, Depends, Query
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, Field, create_model

from dlforge.common.app import ServicePart, backends_of, create_app, deps_of
from dlforge.common.errors import Conflict, InvalidInput, NotFound
from dlforge.common.events import Event, LabelsSubmitted, Topic
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.common.settings import CommonSettings, load_settings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Note(BaseModel):
    text: str = Field(max_length=100)


def make_router() -> APIRouter:
    router = APIRouter()

    @router.get("/page")
    async def page(size: int = Query(10, ge=1), sort: Literal["asc", "desc"] = "asc") -> dict[str, Any]:
        return {"size": size, "sort": sort}

    @router.post("/labels/{batch}/notes")
    async def note(batch: str, body: Note) -> dict[str, str]:
        return {"batch": batch, "text": body.text}

    @router.get("/bug")
    async def bug() -> dict[str, int]:
        return {"n": 1 // 0}

    @router.get("/missing", responses=error_responses(404))
    async def missing() -> None:
        raise NotFound("no dataset 'x'")

    return router


def make_app(bus_url: str, tmp_path: Path) -> Any:
    service = Service("shop")
    router = make_router()

    @router.post("/labels/{batch}")
    async def submit(batch: str, backends: Backends = Depends(backends_of)) -> dict[str, str]:
        if batch == "bad":
            raise InvalidInput("batch 'bad' is not a batch", details={"field": "batch"})
        event = Event.new(LabelsSubmitted(dataset_id="d", batch_id=batch, labels={"i": "good"}, annotator="p"),
                          run_id=f"run-{batch}")
        await backends.publish(event)
        return {"event_id": event.event_id}

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


def until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


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
        assert bad.json() == {"detail": "batch 'bad' is not a batch", "context": {"field": "batch"}}
        assert client.get("/missing").status_code == 404
        assert client.get("/missing").json() == {"detail": "no dataset 'x'"}
        assert client.get("/conflict").status_code == 409
        assert client.get("/conflict").json() == {"detail": "dataset 'x' is at version 3, not 2"}


def test_request_validation_errors_have_the_one_error_body(tmp_path: Path) -> None:
    with TestClient(make_app("memory://", tmp_path)) as client:
        r = client.get("/page", params={"size": "0", "sort": "sideways"})
        assert r.status_code == 422
        body = r.json()
        assert set(body) == {"detail", "errors"}
        assert [(e["loc"], e["type"]) for e in body["errors"]] == [
            (["query", "size"], "greater_than_equal"), (["query", "sort"], "literal_error")]
        assert body["detail"].startswith("invalid request: query.size: Input should be greater than or equal to 1;")
        broken = client.post("/labels/b1/notes", content=b'{"text": ', headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["errors"][0]["type"] == "json_invalid"


def test_405_lists_every_method_of_the_path_and_404_names_the_path(tmp_path: Path) -> None:
    with TestClient(make_app("memory://", tmp_path)) as client:
        # GET and POST /labels/{batch} are two routes; Starlette alone would name only the first one's methods
        r = client.delete("/labels/b1")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, POST"
        assert r.json() == {"detail": "DELETE is not allowed on /labels/b1; allowed: GET, POST"}
        assert client.options("/labels/b1").headers["allow"] == "GET, POST"
        missing = client.get("/nowhere")
        assert missing.status_code == 404 and missing.json() == {"detail": "no such path: /nowhere"}


def test_a_concrete_path_wins_over_a_template_as_in_openapi(tmp_path: Path) -> None:
    router = APIRouter()

    @router.get("/things/{name}")
    async def thing(name: str) -> dict[str, str]:
        return {"name": name}

    @router.post("/things/rebuild", status_code=202)
    async def rebuild() -> dict[str, str]:
        return {"state": "running"}

    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db")
    with TestClient(create_app([ServicePart(Service("shop"), router=router)], settings=settings,
                               run_workers=False)) as client:
        assert client.get("/things/bolt").json() == {"name": "bolt"}
        assert client.post("/things/rebuild").status_code == 202
        # Starlette alone would answer GET /things/rebuild as the thing named 'rebuild'
        r = client.get("/things/rebuild")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json() == {"detail": "GET is not allowed on /things/rebuild; allowed: POST"}
        wrong = client.delete("/things/bolt")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


def test_a_bug_is_a_500_with_the_error_body_and_the_trace_id(tmp_path: Path) -> None:
    with TestClient(make_app("memory://", tmp_path), raise_server_exceptions=False) as client:
        r = client.get("/bug", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 500
        assert r.json() == {"detail": f"internal error (ZeroDivisionError); trace id {TRACEPARENT.split('-')[1]}"}


def test_the_openapi_document_declares_the_error_body_everywhere(tmp_path: Path) -> None:
    doc = create_app([ServicePart(Service("shop"), router=make_router())]).openapi()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorBody"]["required"] == ["detail"]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    ops = {(m.upper(), path): op for path, item in doc["paths"].items() for m, op in item.items()}
    for (method, path), op in ops.items():
        assert op["responses"]["500"]["content"]["application/json"]["schema"] == error, (method, path)
    missing = ops[("GET", "/missing")]["responses"]
    assert sorted(missing) == ["200", "404", "500"]  # declared 404; no parameters, so no 422
    assert missing["404"]["content"]["application/json"]["schema"] == error
    page = ops[("GET", "/page")]["responses"]
    assert sorted(page) == ["200", "422", "500"]
    assert page["422"]["content"]["application/json"]["schema"] == error
    notes = ops[("POST", "/labels/{batch}/notes")]["responses"]
    assert sorted(notes) == ["200", "400", "422", "500"]  # a body: an unparsable one is a 400


def test_embedded_pydantic_schemas_have_their_definitions_in_the_components() -> None:
    class Inner(BaseModel):
        size: int

    class Outer(BaseModel):
        inner: Inner
        more: list[Inner] = []

    router = APIRouter()

    @router.post("/raw", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": Outer.model_json_schema()}}}})
    async def raw() -> dict[str, str]:
        return {}

    doc = create_app([ServicePart(Service("shop"), router=router)]).openapi()
    text = json.dumps(doc)
    assert "$defs" not in text
    body = doc["paths"]["/raw"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["inner"] == {"$ref": "#/components/schemas/Inner"}
    assert doc["components"]["schemas"]["Inner"]["properties"]["size"]["type"] == "integer"
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)
    assert refs and set(refs) <= set(doc["components"]["schemas"])


def test_embedded_definitions_of_the_same_name_but_another_shape_get_their_own_name() -> None:
    class Inner(BaseModel):
        size: int

    class First(BaseModel):
        inner: Inner

    other_inner = create_model("Inner", colour=(str, ...))  # another model that pydantic also calls Inner
    Second = create_model("Second", inner=(other_inner, ...))

    router = APIRouter()

    @router.post("/a", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": First.model_json_schema()}}}})
    async def a() -> None:
        return None

    @router.post("/b", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": Second.model_json_schema()}}}})
    async def b() -> None:
        return None

    doc = create_app([ServicePart(Service("shop"), router=router)]).openapi()
    schemas = doc["components"]["schemas"]
    body = {p: doc["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"] for p in ("/a", "/b")}
    assert body["/a"]["properties"]["inner"] == {"$ref": "#/components/schemas/Inner"}
    assert body["/b"]["properties"]["inner"] == {"$ref": "#/components/schemas/Inner2"}
    assert list(schemas["Inner"]["properties"]) == ["size"]
    assert list(schemas["Inner2"]["properties"]) == ["colour"]


def test_the_request_span_is_the_parent_of_the_publish_span_and_the_handler(
    bus_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with TestClient(make_app(bus_url, tmp_path)) as client:
        wait_ready(client)
        spans.clear()
        response = client.post("/labels/b1", headers={"traceparent": TRACEPARENT})
        assert response.status_code == 200
        event_id = response.json()["event_id"]
        until(lambda: client.get("/labels/b1").status_code == 200, "the worker handles the event")
        assert client.get("/labels/b1").json()["event_id"] == event_id
        # the handler's span ends after the record it wrote is visible
        until(lambda: any(s.name == "handle labels.submitted" for s in spans.get_finished_spans()),
              "the handler's span ends")

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


# ------------------------------------------------------------------------------------------------
# typed wiring: a part's settings are validated at start, its deps built once
# ------------------------------------------------------------------------------------------------


class ShopSettings(CommonSettings):
    shop_level: int = Field(default=3, ge=1, le=10)


class StockSettings(CommonSettings):
    stock_mode: Literal["fifo", "lifo"] = "fifo"


class Pricing:
    """A plug-in the shop builds from its settings."""

    def __init__(self, level: int) -> None:
        self.level = level


def shop_part(builds: list[ShopSettings], seen: list[tuple[str, int, int]]) -> ServicePart[ShopSettings, Pricing]:
    service = Service[Pricing]("shop")
    router = APIRouter()

    @service.handles(Topic.LABELS_SUBMITTED)
    async def handle(event: Event, ctx: HandlerContext[Pricing]) -> None:
        assert isinstance(event.payload, LabelsSubmitted)
        seen.append((event.payload.batch_id, id(ctx.deps), ctx.deps.level))

    @router.get("/level")
    async def level(pricing: Pricing = Depends(deps_of("shop", Pricing))) -> dict[str, int]:
        return {"level": pricing.level, "id": id(pricing)}

    async def build(settings: ShopSettings, backends: Backends) -> Pricing:
        builds.append(settings)
        return Pricing(settings.shop_level)

    return ServicePart(service, router=router, settings=ShopSettings, build=build)


def test_a_part_is_built_once_from_its_settings_and_every_event_gets_the_same_deps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLFORGE_SHOP_LEVEL", "7")
    builds: list[ShopSettings] = []
    seen: list[tuple[str, int, int]] = []
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db",
                             poll_seconds=0.05)
    app = create_app([shop_part(builds, seen)], settings=settings)
    with TestClient(app) as client:
        backends = client.app.state.backends  # type: ignore[attr-defined]
        for n in range(6):
            event = Event.new(LabelsSubmitted(dataset_id="d", batch_id=f"b{n}", labels={"i": "good"}, annotator="p"),
                              run_id=f"run-{n}")
            client.portal.call(backends.publish, event)  # type: ignore[union-attr]
        until(lambda: len(seen) >= 6, "all 6 events handled")
        served = client.get("/level").json()
    assert len(builds) == 1 and builds[0].shop_level == 7  # the part's own variable, read once at start
    assert builds[0].docs == settings.docs  # the common fields are the app's
    assert sorted(b for b, _, _ in seen) == [f"b{n}" for n in range(6)]
    assert {(deps_id, level) for _, deps_id, level in seen} == {(served["id"], 7)}  # one object, routes too


def test_bad_part_settings_stop_the_start_before_anything_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlforge.common.errors import ConfigError

    monkeypatch.setenv("DLFORGE_SHOP_LEVEL", "eleven")
    monkeypatch.setenv("DLFORGE_STOCK_MODE", "random")
    builds: list[ShopSettings] = []
    stock = ServicePart(Service("stock"), settings=StockSettings)
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db")
    app = create_app([shop_part(builds, []), stock], settings=settings)
    with pytest.raises(ConfigError) as failed, TestClient(app):
        pass
    # one message naming every bad variable of every part; nothing was opened or built
    assert "DLFORGE_SHOP_LEVEL" in str(failed.value) and "DLFORGE_STOCK_MODE" in str(failed.value)
    assert not (tmp_path / "d.db").exists() and not (tmp_path / "objects").exists()
    assert builds == []


def test_serve_exits_2_naming_a_bad_part_setting_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlforge.common.app import serve

    monkeypatch.setenv("DLFORGE_SHOP_LEVEL", "0")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db",
                             http_port=0)
    with pytest.raises(SystemExit) as exited:
        serve(create_app([shop_part([], [])], settings=settings), settings)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dlforge: invalid settings: DLFORGE_SHOP_LEVEL: ") and "greater than or equal to 1" in err
    assert not (tmp_path / "d.db").exists()
