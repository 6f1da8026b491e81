"""One error body for every HTTP error, the handlers that produce it, and the OpenAPI that documents it.

Every error response of every service is an :class:`ErrorBody` — ``{"detail": "...", "errors": [...] | null,
"context": {...} | null}`` — whether it comes from a handler (:class:`~dlforge.common.errors.InvalidInput`,
``NotFound``, ``Conflict``), from request validation (FastAPI's ``RequestValidationError``, whose own body
has ``detail`` as an array), from routing (404 for an unknown path, 405 with an ``Allow`` header that lists
every method of the path, concrete paths before templated ones as OpenAPI matches them) or from a bug (500).

What the OpenAPI document says (:func:`truthful_openapi`):

- every operation documents 500, 422 where it takes input (FastAPI adds that one) and 400 where it takes a
  body (one that cannot be parsed), with ``ErrorBody``;
- the other error codes an operation can return are declared where it is defined, with
  ``responses=error_responses(404, 409)`` on the route decorator — the contract test
  (``tests/contract/test_openapi.py``) fails for an operation that returns a code it does not declare;
- pydantic JSON schemas embedded by hand (``openapi_extra``) keep their ``$defs`` working: the definitions
  move to ``#/components/schemas`` and their references follow.
"""

from __future__ import annotations

import copy
import http
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from dlforge.common.errors import Conflict, Forbidden, InvalidInput, NotFound, RetryableError, Unauthorized

ERROR_SCHEMA = "ErrorBody"
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

# What each error status means in this API (the description every operation's response gets).
STATUS_MEANINGS: dict[int, str] = {
    400: "the request body cannot be parsed (not UTF-8, broken multipart)",
    401: "no valid bearer token: none, unknown, revoked or expired (`WWW-Authenticate: Bearer`)",
    403: "the request asks for something the caller or this service may not do: a role too low for the "
         "project, or e.g. a folder outside the import roots",
    404: "a resource the request names does not exist",
    409: "the resource is not in a state that allows this request",
    413: "the request body is larger than the limit",
    415: "the request body has a media type this operation does not take",
    422: "the request's input is invalid; `errors` lists the fields that failed validation",
    429: "too many requests with this token (or sign-in attempts): wait the seconds `Retry-After` says",
    500: "an unexpected failure in the service (a bug); the detail names the trace id",
    503: "the service cannot answer now (a backend is down or still starting)",
}


class FieldError(BaseModel):
    """One input field that failed validation (pydantic's error shape: where, what, which rule)."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where the field is, e.g. ['body', 'classes', 0]")
    msg: str = Field(description="what is wrong with it")
    type: str = Field(description="the rule it broke, e.g. 'missing', 'too_short'")


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: str = Field(description="what was wrong, in words")
    errors: list[FieldError] | None = Field(
        default=None, description="the input fields that failed validation, one entry each (when there are any)")
    context: dict[str, Any] | None = Field(
        default=None, description="facts about the refusal a program can use, e.g. the unknown classes")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error codes it returns besides 422 and 500, documented with ErrorBody."""
    unknown = [c for c in codes if c not in STATUS_MEANINGS]
    if unknown:
        raise ValueError(f"no documented meaning for status {unknown}; add it to STATUS_MEANINGS")
    return {code: {"model": ErrorBody, "description": STATUS_MEANINGS[code]} for code in codes}


def _field_errors(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error dicts as JSON-safe FieldError dicts (an odd entry keeps its text)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict) and "msg" in item:
            loc = item.get("loc", ())
            entry = {k: v for k, v in item.items() if k not in ("loc", "msg", "type", "url")}
            entry = json.loads(json.dumps(entry, default=str))  # inputs and contexts as JSON
            out.append({"loc": [p if isinstance(p, int) else str(p) for p in loc], "msg": str(item["msg"]),
                        "type": str(item.get("type", "invalid")), **entry})
        else:
            out.append({"loc": [], "msg": str(item), "type": "invalid"})
    return out


def error_body(detail: str, *, details: object | None = None) -> dict[str, Any]:
    """The JSON of an ErrorBody; ``details`` is a list of field errors or a dict of facts (``context``)."""
    body: dict[str, Any] = {"detail": detail}
    if isinstance(details, list | tuple):
        body["errors"] = _field_errors(details)
    elif isinstance(details, dict):
        body["context"] = json.loads(json.dumps(details, default=str))
    elif details is not None:
        body["context"] = {"value": json.loads(json.dumps(details, default=str))}
    return body


def _summary(errors: Sequence[dict[str, Any]]) -> str:
    shown = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"invalid request: {shown}{more}"


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
_METHODS = tuple(m.lower() for m in _HTTP_METHODS)  # the operation keys of an OpenAPI path item


def allowed_methods(routes: Sequence[BaseRoute], scope: Mapping[str, Any]) -> list[str]:
    """Every method some route answers for this request's path (Starlette names only the first route's).

    Asks each route whether it fully matches the path with each method, which works through routers
    included in routers whatever their internals.
    """
    return [m for m in _HTTP_METHODS
            if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in routes)]


class ConcretePathsFirst:
    """405 for a method a concrete path lacks, even where a templated path would take the request.

    OpenAPI matches a concrete path before a templated one: ``GET /models/rebuild`` is an undocumented
    method of ``/models/rebuild``, not ``GET /models/{model_id}`` with the id ``rebuild``, which is
    where Starlette would route it. The concrete paths and their methods are the app's OpenAPI document's.
    """

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._concrete: dict[str, list[str]] | None = None

    def concrete_paths(self) -> dict[str, list[str]]:
        if self._concrete is None:
            paths: dict[str, Any] = self.api.openapi().get("paths", {})
            self._concrete = {path: sorted(m.upper() for m in item if m in _METHODS)
                              for path, item in paths.items() if "{" not in path}
        return self._concrete

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            methods = self.concrete_paths().get(path)
            if methods is not None and scope["method"] not in methods:
                detail = f"{scope['method']} is not allowed on {path}; allowed: {', '.join(methods)}"
                response = JSONResponse(error_body(detail), status_code=405, headers={"Allow": ", ".join(methods)})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to an ErrorBody response with its status (and a right ``Allow`` on 405)."""

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse(error_body(str(exc), details=exc.details), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=404)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=401,
                            headers={"WWW-Authenticate": 'Bearer realm="dlforge"'})

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse(error_body(str(exc), details=exc.details), status_code=403)

    @app.exception_handler(RetryableError)
    async def _retryable(_: Request, exc: RetryableError) -> JSONResponse:
        # a passing failure of something the answer depends on (e.g. the auth service): try again shortly
        return JSONResponse(error_body(f"try again shortly: {exc}"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=409)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc.errors())
        return JSONResponse({"detail": _summary(errors), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:
            methods = allowed_methods(request.app.router.routes, request.scope)
            headers["Allow"] = ", ".join(methods)
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(methods)}"
        elif exc.status_code == 404 and detail == http.HTTPStatus.NOT_FOUND.phrase:
            detail = f"no such path: {request.url.path}"
        if exc.status_code in (204, 304):  # no body allowed
            return Response(status_code=exc.status_code, headers=headers)
        return JSONResponse(error_body(detail), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # the server logs the exception (Starlette re-raises it after this response); the trace id links the two
        trace_id = request.scope.get("state", {}).get("trace_id", "unknown")
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); trace id {trace_id}"),
                            status_code=500)


# ------------------------------------------------------------------------------------------------
# The OpenAPI document
# ------------------------------------------------------------------------------------------------

def _error_ref() -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}}}


def _rewrite_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                name = v.removeprefix("#/$defs/")
                out[k] = f"#/components/schemas/{renames.get(name, name)}"
            else:
                out[k] = _rewrite_refs(v, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> Any:
    """A schema tree whose embedded ``$defs`` moved to ``schemas`` (renamed on a clash) with refs rewritten."""
    if isinstance(node, list):
        return [_hoist_defs(v, schemas) for v in node]
    if not isinstance(node, dict):
        return node
    if "$defs" in node:
        defs = node["$defs"]
        renames = {name: name for name in defs}
        for name, schema in defs.items():  # a component of the same name but another content: a new name
            target, n = name, 1
            while target in schemas and schemas[target] != _rewrite_refs(schema, renames):
                n += 1
                target = f"{name}{n}"
            renames[name] = target
        # refs among the definitions point at their new names too
        for name, schema in defs.items():
            schemas[renames[name]] = _rewrite_refs(schema, renames)
        node = _rewrite_refs({k: v for k, v in node.items() if k != "$defs"}, renames)
    return {k: _hoist_defs(v, schemas) for k, v in node.items()}


def truthful_openapi(generated: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's OpenAPI document with ErrorBody on every error response (see the module's docstring)."""
    doc = copy.deepcopy(generated)
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    doc["paths"] = _hoist_defs(doc.get("paths", {}), schemas)
    for item in doc["paths"].values():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = {"description": STATUS_MEANINGS[422], **_error_ref()}
            if "requestBody" in op:  # a body that cannot be parsed (not UTF-8, broken multipart) is a 400
                responses.setdefault("400", {"description": STATUS_MEANINGS[400], **_error_ref()})
            responses.setdefault("500", {"description": STATUS_MEANINGS[500], **_error_ref()})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    # ErrorBody and FieldError as pydantic writes them, refs into the components
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in body.pop("$defs", {}).items():
        schemas[name] = schema
    schemas[ERROR_SCHEMA] = body
    components["schemas"] = dict(sorted(schemas.items()))
    return doc


def use_truthful_openapi(app: FastAPI) -> None:
    """Serve :func:`truthful_openapi` of the app's routes as its ``/openapi.json`` (computed on first use)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_openapi(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
