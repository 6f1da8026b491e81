"""The console's HTTP part: the single page and its assets, served from the package.

Every asset is a file of this package (no CDN, no build step): plain ES modules, one stylesheet.
The pages are public files; everything they show comes from the API with the signed-in user's
token, so a page without a token shows the sign-in form and nothing else. Pages never put a
user-provided string into HTML: the scripts build elements and set ``textContent``; the
Content-Security-Policy below allows scripts, styles and connections to this origin only.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field, field_validator

from dlforge.common.app import ServicePart, deps_of
from dlforge.common.app import create_app as create_common_app
from dlforge.common.errors import NotFound
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import Backends, Service
from dlforge.common.settings import CommonSettings, load_settings

service: Service[ConsoleSettings] = Service("console")
router = APIRouter(tags=["console"])

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".ico": "image/x-icon", ".json": "application/json"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(path: str) -> tuple[bytes, str]:
    """The bytes and content type of ``static/<path>``; NotFound for anything outside it or unknown."""
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("..", ".") or p.startswith(".") or "\\" in p for p in parts):
        raise NotFound(f"no console asset {path!r}")
    suffix = PurePosixPath(path).suffix
    if suffix not in _TYPES:
        raise NotFound(f"no console asset {path!r}")
    node = resources.files("dlforge.console").joinpath("static", *parts)
    if not node.is_file():
        raise NotFound(f"no console asset {path!r}")
    return node.read_bytes(), _TYPES[suffix]


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/", include_in_schema=False)
async def index() -> Response:
    data, media = _asset("index.html")
    return Response(data, media_type=media, headers=SECURITY_HEADERS)


@router.get("/console/{path:path}", responses={200: {"description": "a page asset"}, **error_responses(404)},
            summary="Console asset")
async def asset(path: str) -> Response:
    """A file of the console (script, style, image)."""
    data, media = _asset(path)
    return Response(data, media_type=media, headers=SECURITY_HEADERS)


class ConsoleSettings(CommonSettings):
    """What the console reads besides the common settings (``DLFORGE_CONSOLE_…``)."""

    console_trace_url: str | None = Field(
        default=None, max_length=2000,
        description="a trace viewer's page of one trace, with {trace_id} where the run's trace id goes, e.g. "
        "http://127.0.0.1:6006/trace/{trace_id}; unset: the run page shows the trace id without a link")

    @field_validator("console_trace_url")
    @classmethod
    def _trace_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not v.startswith(("http://", "https://")) or "{trace_id}" not in v:
            raise ValueError(f"{v!r}: give an http(s) URL with {{trace_id}} where the trace id goes")
        return v


class ConsoleConfig(BaseModel):
    """What the pages need to know about this deployment."""

    trace_url: str | None = Field(description="link to a run's trace in the configured trace viewer, with "
                                  "`{trace_id}` where the run's trace id goes (DLFORGE_CONSOLE_TRACE_URL, e.g. "
                                  "http://127.0.0.1:6006/trace/{trace_id}); null: no viewer configured")


@router.get("/console-config", response_model=ConsoleConfig)
async def console_config(settings: Annotated[ConsoleSettings, Depends(deps_of("console", ConsoleSettings))]
                         ) -> ConsoleConfig:
    """The console's deployment settings (read when the page loads)."""
    return ConsoleConfig(trace_url=settings.console_trace_url)


async def _build(settings: ConsoleSettings, backends: Backends) -> ConsoleSettings:
    return settings


def part() -> ServicePart[ConsoleSettings, ConsoleSettings]:
    return ServicePart(service=service, router=router, prefix="", settings=ConsoleSettings, build=_build)


def create_app(settings: CommonSettings | None = None) -> FastAPI:
    """The console service (split deployment): the pages, and the accounts (``/auth``) every service's
    tokens are verified against (``DLFORGE_AUTH_URL`` of the other services points here)."""
    from dlforge.common.auth import routes as auth

    return create_common_app([part(), auth.part()], settings=settings or load_settings())
