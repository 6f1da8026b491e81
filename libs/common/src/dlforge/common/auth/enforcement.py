"""Enforcement of the auth contract in every app :func:`dlforge.common.app.create_app` builds.

Two steps per request:

1. :class:`AuthMiddleware` (before routing) lets the open paths through (``OPEN_PATHS``, and the
   concrete paths of routes declared ``role("public")``), answers
   401 (with ``WWW-Authenticate: Bearer``) to a request without a valid, unexpired bearer token
   and 429 (with ``Retry-After``) to a token over its rate, puts the principal in
   ``request.state.principal``, and writes an audit entry for every write request (any method but
   GET/HEAD/OPTIONS) when its response starts: who, token id, method, route, path parameters,
   status, time, and ``request.state.audit_detail`` if the handler set it.
2. :func:`authorizer` (a dependency of every part's router) checks the route's role: the route's
   ``openapi_extra`` ``x-dlforge-role`` (see :func:`role`), else viewer for reads and operator for
   writes. A path parameter ``run_id`` or ``dataset_id`` (or the one ``x-dlforge-resource`` names)
   is checked against that run's or dataset's project: no role there at all answers 404 as for an
   unknown id, a lower role 403. A resource the auth part does not know (an unknown id, or one made
   before auth was on) is taken as the default project's: it needs the role there (else 404/403).
   Without such a parameter the role must be held in some project; handlers that take a project or
   an id in the body check it themselves (:meth:`Principal.require`), and list handlers show only
   the principal's projects (:func:`visible_projects`).

With ``DLFORGE_AUTH=off`` every request's principal is :meth:`Principal.anonymous` (admin everywhere)
and nothing is checked, limited or audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlforge.common.auth.authenticator import Authenticator, IntrospectingAuthenticator, StoreAuthenticator
from dlforge.common.auth.model import DEFAULT_PROJECT, ROLES, Principal, at_least
from dlforge.common.auth.ratelimit import LoginBackoff, RateLimiter
from dlforge.common.auth.store import AuthStore, iso, now
from dlforge.common.errors import ConfigError, Forbidden, InvalidInput, NotFound, RetryableError
from dlforge.common.http_errors import STATUS_MEANINGS, error_body
from dlforge.common.settings import CommonSettings, load_settings

log = logging.getLogger(__name__)

ROLE_KEY = "x-dlforge-role"
RESOURCE_KEY = "x-dlforge-resource"
PUBLIC = "public"
SERVICE = "service"
SIGNED_IN = "signed-in"  # any valid token (one's own account: /auth/me, tokens, sign-out)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/auth/login", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/console/",)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RESOURCE_PARAMS = (("run_id", "run"), ("dataset_id", "dataset"))
USER_RATE_FACTOR = 2  # a user's bucket: twice a token's (a browser and a CLI together), however many tokens


def role(needed: str, *, resource: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``openapi_extra=`` of a route that needs ``needed`` instead of the default: a role (``viewer`` ...
    ``admin``, in the project of the run or dataset the path names, else in some project), ``signed-in``
    (any valid token), ``service`` (a service's token, or an admin of every project) or ``public`` (no token);
    ``resource`` ``{"param", "kind", "strip"}`` names a path parameter that identifies a run or dataset."""
    if needed not in (*ROLES, PUBLIC, SERVICE, SIGNED_IN):
        raise ValueError(f"unknown role {needed!r}")
    extra: dict[str, Any] = {ROLE_KEY: needed}
    if resource is not None:
        extra[RESOURCE_KEY] = dict(resource)
    return extra


def resource(param: str, kind: str, *, strip: str = "") -> dict[str, Any]:
    """``openapi_extra=`` of a route whose path parameter ``param`` identifies a ``kind`` (after removing ``strip``)."""
    return {RESOURCE_KEY: {"param": param, "kind": kind, "strip": strip}}


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class AuditWriter:
    """Group commit of audit entries: the entries of the requests answered at one moment are written as one
    document, before any of those responses starts (a write request answered has its entry stored)."""

    def __init__(self, store: AuthStore) -> None:
        self.store = store
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def write(self, entry: dict[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, done))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # the requests answered in this turn of the loop join the group
                group, self._pending = self._pending, []
                try:
                    await self.store.audit([entry for entry, _ in group])
                except Exception as exc:  # every waiting request learns it
                    for _, done in group:
                        done.set_exception(exc)
                    continue
                for _, done in group:
                    done.set_result(None)
        finally:
            self._flushing = None


@dataclass
class AuthRuntime:
    """What enforcement needs in a process, built once at start from the settings."""

    mode: str
    authenticator: Authenticator
    limiter: RateLimiter
    store: AuthStore | None
    settings: CommonSettings
    audit: AuditWriter | None = None
    streams: dict[str, int] = field(default_factory=dict)  # open event streams per principal
    logins: LoginBackoff = field(default_factory=LoginBackoff)  # wrong passwords per user name

    @classmethod
    async def start(cls, settings: CommonSettings, docs: Any) -> AuthRuntime:
        store: AuthStore | None = None
        authenticator: Authenticator
        if settings.auth_url:
            assert settings.auth_service_token is not None  # the settings refuse a URL without it
            authenticator = IntrospectingAuthenticator(settings.auth_url,
                                                       settings.auth_service_token.get_secret_value(),
                                                       cache_seconds=settings.auth_cache_seconds)
        else:
            store = AuthStore(docs)
            if settings.auth == "required":
                await store.ensure_indexes()
            service_token = settings.auth_service_token.get_secret_value() if settings.auth_service_token else None
            authenticator = StoreAuthenticator(store, cache_seconds=settings.auth_cache_seconds,
                                               service_token=service_token)
        return cls(mode=settings.auth, authenticator=authenticator,
                   limiter=RateLimiter(rate=settings.auth_rate, burst=settings.auth_burst), store=store,
                   settings=settings, audit=AuditWriter(store) if store is not None else None)

    async def stop(self) -> None:
        if isinstance(self.authenticator, IntrospectingAuthenticator):
            await self.authenticator.close()


def runtime_of(request: Request) -> AuthRuntime:
    runtime: AuthRuntime | None = getattr(request.app.state, "auth", None)
    if runtime is None:
        raise RuntimeError("the app has no auth runtime: was it started (lifespan)?")
    return runtime


def principal_of(request: Request) -> Principal:
    """The principal of the request (:meth:`Principal.anonymous` while auth is off)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Forbidden("this request has no principal (an open path)")
    return principal


def visible_projects(request: Request, needed: str = "viewer") -> set[str] | None:
    """The projects whose runs and datasets the request's principal may list; None: every project."""
    return principal_of(request).projects(needed)


async def visible_ids(request: Request, kind: str, ids: Iterable[str], needed: str = "viewer") -> set[str]:
    """Those of ``ids`` (runs or datasets) in a project where the principal holds ``needed`` (all while auth is
    off or for a principal of every project; an id whose project is not known is left out)."""
    principal = principal_of(request)
    projects = principal.projects(needed)
    wanted = set(ids)
    if projects is None:
        return wanted
    authenticator = runtime_of(request).authenticator
    return {i for i in wanted if await authenticator.project_of(kind, i) in projects}


async def check_resource(request: Request, kind: str, resource_id: str, project: str) -> None:
    """Before creating run or dataset ``resource_id`` in ``project``: InvalidInput (409) if that id is
    another project's (no-op while auth is off). Writes nothing."""
    runtime = runtime_of(request)
    if runtime.mode != "off":
        held = await runtime.authenticator.project_of(kind, resource_id)
        if held is not None and held != project:
            raise InvalidInput(f"{kind} {resource_id!r} exists in another project", status_code=409)


async def register_resource(request: Request, kind: str, resource_id: str, project: str) -> None:
    """Record the project of a run or dataset this request created (no-op while auth is off).

    The auth part also records it from ``dataset.uploaded``; doing it before answering closes the
    moment in which a new id would not be known yet. An id another project took meanwhile stays
    that project's (logged). Creating handlers use :func:`reserved_resources` instead.
    """
    runtime = runtime_of(request)
    if runtime.mode != "off":
        try:
            await runtime.authenticator.register(kind, resource_id, project)
        except InvalidInput:
            log.warning("%s %s was registered to another project meanwhile; it stays there", kind, resource_id)


@contextlib.asynccontextmanager
async def reserved_resources(request: Request, ids: Iterable[tuple[str, str]], project: str) -> AsyncIterator[None]:
    """Register ``(kind, id)`` pairs to ``project`` before creating them, and release those this call recorded if
    the block fails: InvalidInput (409), with nothing held, if one is another project's (so a creator never gets
    a run or dataset recorded in another project, whoever wins a race). No-op while auth is off."""
    runtime = runtime_of(request)
    if runtime.mode == "off":
        yield
        return
    recorded: list[tuple[str, str]] = []

    async def release() -> None:
        for kind, resource_id in reversed(recorded):
            try:
                await runtime.authenticator.release(kind, resource_id)
            except Exception:  # the id stays reserved to this project: safe, only not reusable elsewhere
                log.exception("could not release %s %s", kind, resource_id)

    try:
        for kind, resource_id in ids:
            if await runtime.authenticator.register(kind, resource_id, project):
                recorded.append((kind, resource_id))
    except BaseException:
        await release()
        raise
    try:
        yield
    except BaseException:
        await release()
        raise


MAX_STREAMS = 8  # open event streams per principal


def stream_key(request: Request) -> str | None:
    """Whose streams to count (None while auth is off): the principal's name."""
    runtime: AuthRuntime | None = getattr(request.app.state, "auth", None)
    principal = getattr(request.state, "principal", None)
    if runtime is None or runtime.mode == "off" or not isinstance(principal, Principal):
        return None
    return principal.name


def check_stream_slot(request: Request) -> None:
    """Before opening an event stream: 429 (with Retry-After) if the principal has ``MAX_STREAMS`` open."""
    key = stream_key(request)
    if key is not None and runtime_of(request).streams.get(key, 0) >= MAX_STREAMS:
        raise InvalidInput(f"{key} has {MAX_STREAMS} event streams open, the most allowed; close one first",
                           status_code=429, headers={"Retry-After": "5"})


@contextlib.contextmanager
def stream_slot(request: Request) -> Iterator[None]:
    """Count an open event stream of the request's principal while the block runs."""
    key = stream_key(request)
    if key is None:
        yield
        return
    streams = runtime_of(request).streams
    streams[key] = streams.get(key, 0) + 1
    try:
        yield
    finally:
        streams[key] -= 1
        if streams[key] <= 0:
            del streams[key]


async def still_allowed(request: Request, kind: str, resource_id: str, needed: str = "viewer") -> bool:
    """Whether the request's token is still valid and holds ``needed`` in the project of ``kind``/``resource_id``
    (for a long response such as an event stream; asks the authenticator, whose answers are cached)."""
    runtime: AuthRuntime | None = getattr(request.app.state, "auth", None)
    if runtime is None or runtime.mode == "off" or getattr(request.state, "principal", None) is None:
        return True
    token = _bearer(request.scope)
    if token is None:
        return False
    try:
        principal = await runtime.authenticator.authenticate(token)
        project = await runtime.authenticator.project_of(kind, resource_id) or DEFAULT_PROJECT
    except RetryableError:
        return True  # cannot tell now: the next check decides
    return principal is not None and not _expired(principal) and principal.can(project, needed)


def audit(request: Request, **detail: Any) -> None:
    """Add facts to the request's audit entry (e.g. which dataset and items a label submission named)."""
    current = getattr(request.state, "audit_detail", None) or {}
    request.state.audit_detail = {**current, **detail}


def _refusal(status: int, detail: str, headers: dict[str, str] | None = None,
             context: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(error_body(detail, details=context), status_code=status, headers=headers)


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def rate_refusal(limiter: RateLimiter, principal: Principal) -> JSONResponse | None:
    """The 429 answer of a request over its rate, else None (the request is counted).

    Each token has a bucket, and each user one of ``USER_RATE_FACTOR`` times its size beside it (so that
    minting more tokens does not raise a user's rate). Services are not limited: they are few, trusted,
    share one service account, and carry the load of every user they serve (introspection, project look-ups).
    """
    if principal.kind == "service":
        return None
    checks = ((principal.token_id or principal.name, "this token", 1),
              (f"user:{principal.name}", f"the tokens of {principal.name}", USER_RATE_FACTOR))
    for key, whose, factor in checks:
        rate, burst = limiter.rate * factor, limiter.burst * factor
        wait = limiter.take(key, rate=rate, burst=burst)
        if wait > 0:
            return _refusal(429, f"too many requests with {whose}: over {rate:g}/s (bursts of {burst}); retry after "
                            f"{wait:.2f} s", {"Retry-After": str(max(1, math.ceil(wait)))})
    return None


def _expired(principal: Principal) -> bool:
    return principal.expires_at is not None and datetime.fromisoformat(principal.expires_at) <= now()


class AuthMiddleware:
    """Authentication, rate limit and audit of every request (see the module's docstring)."""

    def __init__(self, app: ASGIApp, api: Any) -> None:
        self.app = app
        self.api = api
        self._public: frozenset[tuple[str, str]] | None = None

    def public(self, method: str, path: str) -> bool:
        """Whether ``method path`` is open: an open path, or a concrete path whose route declares ``role("public")``
        (read from the app's OpenAPI document once)."""
        if is_open(path):
            return True
        if self._public is None:
            paths: dict[str, Any] = self.api.openapi().get("paths", {})
            self._public = frozenset((m.upper(), p) for p, item in paths.items() if "{" not in p
                                     for m, op in item.items() if isinstance(op, dict) and op.get(ROLE_KEY) == PUBLIC)
        return (method, path) in self._public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        runtime: AuthRuntime | None = getattr(self.api.state, "auth", None)
        path = scope["path"]
        if runtime is not None and runtime.mode == "off":
            state["principal"] = Principal.anonymous()
            await self.app(scope, receive, send)
            return
        if self.public(scope["method"], path):
            await self.app(scope, receive, send)
            return
        if runtime is None:
            await _refusal(503, "the service is starting")(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await _refusal(401, "no bearer token: send 'Authorization: Bearer <token>' (a token from POST "
                           "/auth/login or `dlforge admin create-token`)",
                           {"WWW-Authenticate": 'Bearer realm="dlforge"'})(scope, receive, send)
            return
        try:
            principal = await runtime.authenticator.authenticate(token)
        except RetryableError as exc:
            await _refusal(503, f"cannot check the token now: {exc}")(scope, receive, send)
            return
        if principal is None or _expired(principal):
            await _refusal(401, "the bearer token is unknown, revoked or expired",
                           {"WWW-Authenticate": 'Bearer realm="dlforge", error="invalid_token"'})(scope, receive, send)
            return
        refusal = rate_refusal(runtime.limiter, principal)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        state["principal"] = principal
        if scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self._audited(scope, send, runtime, principal))

    def _audited(self, scope: Scope, send: Send, runtime: AuthRuntime, principal: Principal) -> Send:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                await write_audit(runtime, scope, principal, message["status"])
            await send(message)

        return send_wrapper


async def write_audit(runtime: AuthRuntime, scope: Scope, principal: Principal, status: int) -> None:
    """Store the audit entry of a request (failures are logged: the request's effect happened)."""
    state = scope.get("state", {})
    route = state.get("audit_route")
    if route is None:
        template = getattr(scope.get("route"), "path", None)
        route = f"{scope['method']} {template or scope['path']}"
    entry = {"who": principal.name, "token_id": principal.token_id, "method": scope["method"], "route": route,
             "path": scope["path"], "path_params": dict(scope.get("path_params") or {}), "status": status,
             "at": iso(now()), "detail": state.get("audit_detail")}
    try:
        if runtime.audit is not None:
            await runtime.audit.write(entry)
        else:
            log.info("audit %s", entry)  # a service without the store: its log is the record
    except Exception:
        log.exception("could not write the audit entry %s", entry)


def _resource_params(route: Any, path_params: Mapping[str, str]) -> list[tuple[str, str]]:
    found = [(kind, str(path_params[p])) for p, kind in RESOURCE_PARAMS if p in path_params]
    extra = (getattr(route, "openapi_extra", None) or {}).get(RESOURCE_KEY)
    if extra and extra["param"] in path_params:
        value = str(path_params[extra["param"]])
        if value.startswith(extra.get("strip", "")):
            found.append((extra["kind"], value[len(extra.get("strip", "")):]))
    return found


def needed_role(route: Any, method: str) -> str:
    declared = (getattr(route, "openapi_extra", None) or {}).get(ROLE_KEY)
    if declared:
        return str(declared)
    return "viewer" if method in READ_METHODS else "operator"


def authorizer(prefix: str) -> Callable[[Request], Awaitable[None]]:
    """The dependency every part's router gets (``prefix``: where the router is mounted)."""

    async def authorize(request: Request) -> None:
        runtime: AuthRuntime | None = getattr(request.app.state, "auth", None)
        principal = getattr(request.state, "principal", None)
        route = request.scope.get("route")
        request.state.audit_route = f"{request.method} {prefix}{getattr(route, 'path', request.url.path)}"
        if runtime is None or runtime.mode == "off" or principal is None:
            return  # auth off, or an open path
        assert isinstance(principal, Principal)
        needed = needed_role(route, request.method)
        if needed in (PUBLIC, SIGNED_IN):
            return
        if needed == SERVICE:
            if principal.kind != "service" and principal.projects("admin") is not None:
                raise Forbidden(f"{principal.name} is not a service (nor an admin of every project)")
            return
        named = False
        for kind, resource_id in _resource_params(route, request.path_params):
            # an id the auth part never registered (made before auth was on, or a name derived from a run's)
            # is taken as the default project's, where runs without a project have always been
            project = await runtime.authenticator.project_of(kind, resource_id) or DEFAULT_PROJECT
            named = True
            held = principal.role_in(project)
            if held is None:
                raise NotFound(f"no {kind} {resource_id!r}")  # as if it did not exist: it is not the caller's
            if not at_least(held, needed):
                raise Forbidden(f"{principal.name} is {held} in project {project!r}; {request.method} "
                                f"{request.url.path} needs {needed}",
                                details={"project": project, "needed": needed, "held": held})
        if not named and not principal.can_somewhere(needed):
            raise Forbidden(f"{principal.name} is not {needed} in any project; {request.method} {request.url.path} "
                            f"needs {needed}", details={"needed": needed, "held": dict(principal.grants)})

    return authorize


# ------------------------------------------------------------------------------------------------
# The OpenAPI document
# ------------------------------------------------------------------------------------------------

_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}


def document_auth(doc: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with the bearer scheme, and 401/403/429 (ErrorBody) on every protected operation."""
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "a token from POST /auth/login or `dlforge admin create-token` (prefix dlf_)"}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            needed = op.get(ROLE_KEY) or ("viewer" if method.upper() in READ_METHODS else "operator")
            if is_open(path) or needed == PUBLIC:
                op["security"] = []
                continue
            op["security"] = [{"bearer": []}]
            op.setdefault(ROLE_KEY, needed)
            for code in (401, 403, 429):
                response = op["responses"].setdefault(str(code), {"description": STATUS_MEANINGS[code],
                                                                  "content": ref})
                if code in _HEADERS:
                    response.setdefault("headers", {}).update(_HEADERS[code])
    return doc


def use_auth_openapi(app: Any, *, settings: CommonSettings | None) -> None:
    """Serve :func:`document_auth` of the app's (truthful) OpenAPI document while auth is required; with
    ``DLFORGE_AUTH=off`` the document says no operation needs a token, as is then the case.

    The mode is the started app's, else that of ``settings`` (the app's, if given), else the environment's.
    """
    generate = app.openapi
    done: dict[str, Any] = {}

    def mode() -> str:
        runtime: AuthRuntime | None = getattr(app.state, "auth", None)
        if runtime is not None:
            return runtime.mode
        if settings is not None:
            return settings.auth
        try:
            return load_settings().auth
        except ConfigError:
            return "required"

    def openapi() -> dict[str, Any]:
        if "doc" not in done:
            doc = generate()
            done["doc"] = document_auth(doc) if mode() == "required" else doc
            app.openapi_schema = done["doc"]
        return done["doc"]

    app.openapi = openapi
