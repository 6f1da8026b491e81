"""The FastAPI app factory every service uses: lifespan runs the worker, health, tracing, errors.

``create_app([part])`` builds one service's app; ``create_app(parts, mount_prefix=True)`` serves
several services from one process (each router under ``/<service>``) on shared backends.
Every part's routes need a bearer token with the right role (:mod:`dlforge.common.auth`; ``DLFORGE_AUTH``).
Nothing happens at import time. At start the lifespan loads and validates every part's settings
(one bad ``DLFORGE_…`` variable of any part stops the start, naming it), opens the backends, builds
each part's dependencies once (:attr:`ServicePart.build`), runs the start-up hooks, and only then
starts the workers, which hand those dependencies to the handlers as ``ctx.deps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypeVar as DefaultTypeVar

from dlforge.common.auth.enforcement import AuthMiddleware, AuthRuntime, authorizer, use_auth_openapi
from dlforge.common.body_limit import BodyLimitMiddleware
from dlforge.common.errors import ConfigError
from dlforge.common.http_errors import ConcretePathsFirst, install_error_handlers, use_truthful_openapi
from dlforge.common.runtime import Backends, D, Service, Worker
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.common.tracing import configure_telemetry, extract_context, tracer

log = logging.getLogger(__name__)


S = DefaultTypeVar("S", bound=CommonSettings, default=CommonSettings)
T = TypeVar("T")


@dataclass
class ServicePart(Generic[S, D]):
    """One service as an app sees it: its event handlers, its REST router, its settings and start-up.

    ``settings`` is the service's settings class: the app loads it at start (its own ``DLFORGE_…``
    variables from the environment, the common ones from the app's settings) and refuses to start
    on a bad value. ``build`` turns the validated settings into the service's dependencies (its
    plug-ins, clients, caches), once per process; handlers get them as ``ctx.deps``, routes through
    :func:`deps_of`. Once every part was built, ``on_built`` gets this part's deps (start-up work that
    needs them), then ``on_start`` runs; the workers start after both.

    ``also`` holds further consumers of the same service that must not wait behind its main one
    (each its own consumer group and worker, without deps), e.g. the trainer's pruning decisions,
    which arrive while the main worker is busy training.
    """

    service: Service[D]
    router: APIRouter | None = None
    on_start: Callable[[Backends], Awaitable[None]] | None = None
    prefix: str | None = None  # where the router goes when several services share an app
    also: tuple[Service, ...] = ()
    settings: type[S] = CommonSettings  # type: ignore[assignment]
    build: Callable[[S, Backends], Awaitable[D]] | None = None
    on_built: Callable[[D, Backends], Awaitable[None]] | None = None
    on_stop: Callable[[D], Awaitable[None]] | None = None
    """at shutdown, once the workers stopped: ends what ``on_built`` started (the trainer's job leases)"""
    root_router: APIRouter | None = None
    """routes outside the service's prefix, e.g. the labeler's ``POST /runs/{run_id}/rerun``"""


def settings_for(cls: type[S], common: CommonSettings) -> S:
    """``cls`` settings of a process configured with ``common``: ``common`` itself if it is one, else
    the environment's ``DLFORGE_…`` values of ``cls``'s own fields and ``common``'s common ones.

    Raises ConfigError naming each bad variable.
    """
    if isinstance(common, cls):
        return common
    return load_settings(cls, **common.model_dump())


def part_settings(parts: Sequence[ServicePart[Any, Any]], common: CommonSettings) -> list[CommonSettings]:
    """Every part's validated settings, in order; one ConfigError naming every bad variable of every part."""
    loaded: list[CommonSettings] = []
    problems: list[str] = []
    for part in parts:
        try:
            loaded.append(settings_for(part.settings, common))
        except ConfigError as exc:
            problem = str(exc).removeprefix("invalid settings: ")
            if problem not in problems:  # parts that share a settings class fail alike
                problems.append(problem)
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return loaded


def deps_of(service: str, cls: type[T]) -> Callable[[Request], T]:
    """A FastAPI dependency: the dependencies ``service``'s part built at start (of type ``cls``)."""

    def dependency(request: Request) -> T:
        deps = getattr(request.app.state, "deps", {}).get(service)
        if not isinstance(deps, cls):
            raise RuntimeError(f"the app has no {cls.__name__} for service {service!r}: was its part built?")
        return deps

    return dependency


class TracingMiddleware:
    """A server span per HTTP request, continuing a W3C ``traceparent`` if the caller sent one."""

    def __init__(self, app: ASGIApp, service_name: str) -> None:
        self.app = app
        self.service_name = service_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctx = extract_context(headers)
        status_holder: dict[str, int] = {}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        with tracer().start_as_current_span(
            f"{scope['method']} {scope['path']}",
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"],
                        "dlforge.service": self.service_name},
        ) as span:
            # error bodies name the trace (a 500's handler runs outside this span)
            scope.setdefault("state", {})["trace_id"] = format(span.get_span_context().trace_id, "032x")
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:  # name the span by its route template, not the (high-cardinality) path
                    span.update_name(f"{scope['method']} {route}")
                    span.set_attribute("http.route", route)
                status = status_holder.get("status", 500)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))


class Health(BaseModel):
    """The process is up; the services it serves."""

    status: Literal["ok"]
    services: list[str]


class Readiness(BaseModel):
    """Whether the backends answer and the workers have joined; each check's outcome."""

    status: Literal["ready", "not ready", "starting"]
    checks: dict[str, str] = Field(default_factory=dict, description="'ok', 'joining' or the failure")


async def backends_of(request: Request) -> Backends:
    """FastAPI dependency: the process's backends (async: FastAPI runs a plain ``def`` dependency in a
    worker thread, a thread hop per request)."""
    backends: Backends = request.app.state.backends
    return backends


def create_app(
    parts: Sequence[ServicePart[Any, Any]],
    *,
    settings: CommonSettings | None = None,
    backends: Backends | None = None,
    mount_prefix: bool = False,
    run_workers: bool = True,
    title: str | None = None,
) -> FastAPI:
    names = [p.service.name for p in parts]
    app_name = title or ("dlforge" if len(parts) != 1 else f"dlforge {names[0]}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_telemetry(names[0] if len(names) == 1 else "dlforge")
        own = backends is None
        try:
            common = backends.settings if backends is not None else (settings or load_settings())
            loaded = part_settings(parts, common)  # before anything is opened: a bad variable stops here
            b = backends or Backends.from_settings(common)
        except ConfigError as exc:
            app.state.startup_error = exc  # serve() reports it as a bad setting, not a crash
            raise
        await b.start()
        try:
            app.state.auth = await AuthRuntime.start(common, b.docs)
            deps: dict[str, Any] = {}
            for part, part_s in zip(parts, loaded, strict=True):
                deps[part.service.name] = await part.build(part_s, b) if part.build is not None else None
            app.state.settings = {p.service.name: s for p, s in zip(parts, loaded, strict=True)}
            app.state.deps = deps
            app.state.backends = b
            for part in parts:
                if part.on_built is not None:
                    await part.on_built(deps[part.service.name], b)
            for part in parts:
                if part.on_start is not None:
                    await part.on_start(b)
        except BaseException as exc:
            if isinstance(exc, ConfigError):
                app.state.startup_error = exc
            if own:
                await b.stop()
            raise
        auth: AuthRuntime = app.state.auth
        stop = asyncio.Event()
        workers: list[Worker[Any]] = []
        if run_workers:
            workers += [Worker(p.service, b, deps=deps[p.service.name]) for p in parts]
            workers += [Worker(s, b, deps=None) for p in parts for s in p.also]
        app.state.workers = {w.service.name: w for w in workers}
        app.state.stop = stop
        tasks = [asyncio.create_task(w.run(stop), name=w.consumer) for w in workers]
        try:
            yield
        finally:
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=600) if tasks else (set(), set())
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    log.error("worker %s ended with %r", t.get_name(), t.exception())
            for part in parts:
                if part.on_stop is not None:
                    try:
                        await part.on_stop(deps[part.service.name])
                    except Exception:
                        log.exception("stopping %s failed", part.service.name)
            await auth.stop()
            if own:
                await b.stop()

    extra: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's own request spans would duplicate TracingMiddleware's (two SERVER spans per request);
        # its request metrics and logs only when they are exported (configure_telemetry installs the
        # providers either way, and recording into a provider nobody reads costs per request)
        exporting = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        extra["telemetry"] = {"tracing": False, "metrics": exporting, "logs": exporting}
    app = FastAPI(title=app_name, version="0.1.0", lifespan=lifespan, **extra)
    app.state.parts = list(parts)
    app.add_middleware(ConcretePathsFirst, api=app)
    app.add_middleware(AuthMiddleware, api=app)  # after tracing (a refusal is traced), before routing
    app.add_middleware(TracingMiddleware, service_name=app_name)
    app.add_middleware(BodyLimitMiddleware)  # request bodies stop being read at their route's limit

    install_error_handlers(app)
    use_truthful_openapi(app)
    use_auth_openapi(app, settings=backends.settings if backends is not None else settings)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok", services=names)

    @app.get("/readyz", tags=["health"], response_model=Readiness,
             responses={503: {"model": Readiness, "description": "not ready: a backend or a worker is not"}})
    async def readyz(request: Request) -> JSONResponse:
        b: Backends | None = getattr(request.app.state, "backends", None)
        checks: dict[str, str] = {}
        if b is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        for name, probe in (
            ("bus", b.bus.ping()),
            ("docs", b.docs.ping()),
            ("objects", asyncio.to_thread(b.objects.ping)),
        ):
            try:
                async with asyncio.timeout(5):  # not wait_for: on 3.11 it can drop a cancellation
                    await probe
                checks[name] = "ok"
            except Exception as exc:  # readiness reports every failure, whatever its type
                checks[name] = f"{type(exc).__name__}: {exc}"
        workers = getattr(request.app.state, "workers", {})
        for wname, worker in workers.items():
            checks[f"worker:{wname}"] = "ok" if worker.ready.is_set() else "joining"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    for part in parts:
        if part.router is not None:
            prefix = "" if not mount_prefix else (
                part.prefix if part.prefix is not None else f"/{part.service.name}")
            app.include_router(part.router, prefix=prefix, dependencies=[Depends(authorizer(prefix))])
        if part.root_router is not None:
            app.include_router(part.root_router, dependencies=[Depends(authorizer(""))])
    return app


def serve(app: FastAPI, settings: CommonSettings) -> None:
    """Run ``app`` with uvicorn; SIGTERM finishes in-flight events, then the process exits with 0.

    Every part's settings are validated first: a bad value exits with status 2 and a message naming
    the variable, before anything is opened or served; so does a part whose dependencies cannot be
    built from its settings. Exits with status 3 if the app did not start otherwise (e.g. a backend
    could not be reached).
    """
    import uvicorn

    try:
        part_settings(getattr(app.state, "parts", []), settings)
    except ConfigError as exc:
        sys.stderr.write(f"dlforge: {exc}\n")
        raise SystemExit(2) from exc

    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="info",
                            access_log=settings.http_access_log, timeout_graceful_shutdown=600)
    server = uvicorn.Server(config)

    # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown: the lifespan above finishes
    # the in-flight events and commits) and then re-raises the signal to the handler that was
    # installed before it. With the default handler that kills the process (status 143) although
    # the shutdown was clean; this handler makes it a normal exit, and asks for a graceful stop if
    # a signal comes before uvicorn listens.
    def stop_gracefully(signum: int, frame: object) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_gracefully)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # The imported modules (torch, FastAPI, pydantic, ...: some 300,000 objects) live as long as the
    # process. Moved out of the collector's reach, they are no longer walked by every full collection:
    # such a walk stops every request for 0.1-0.5 s on a busy machine, and comes every few thousand requests.
    # A young generation of 10,000 (not 700) objects: requests in flight are not promoted by a collection
    # every few milliseconds, so the older generations fill, and are collected, far less often
    # (benchmarks/labels.py: the collector's CPU during 1,000 submissions fell from ~130 ms to ~15 ms).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        server.run()  # uvicorn itself exits with status 3 when the lifespan's start-up failed
    finally:
        error = getattr(app.state, "startup_error", None)
        if not server.started and isinstance(error, ConfigError):  # a part could not be built from its settings
            sys.stderr.write(f"dlforge: {error}\n")
            raise SystemExit(2)
    if not server.started:
        raise SystemExit(3)
