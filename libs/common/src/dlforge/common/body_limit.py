"""Request bodies are read only up to a limit, with or without a ``Content-Length``.

:class:`BodyLimitMiddleware` wraps the ASGI ``receive`` of every HTTP request and counts the body
bytes the app pulls. Once the count passes the route's limit it raises a 413 :class:`BodyTooLarge`
(an ``HTTPException``, so FastAPI's body parsing re-raises it and the app answers
``{"detail": ...}``) and nothing more of the body is read. A declared ``Content-Length`` over the
limit is refused at the first read, before any byte of the body.

The limit is the route's own when its endpoint is marked with :func:`body_limit` (e.g. the
labeler's upload: ``DLFORGE_LABELER_MAX_UPLOAD_BYTES``, read from the labeler's settings that the
app loaded at start), else :data:`DEFAULT_MAX_BODY_BYTES`. It is looked up at the first read, when
routing has put the endpoint in the ASGI scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypeVar as DefaultTypeVar

from dlforge.common.settings import CommonSettings

DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Every JSON body of the API fits (a label submission of 50,000 items is ~3 MB)."""

_ATTRIBUTE = "__dlforge_body_limit__"
S = DefaultTypeVar("S", bound=CommonSettings, default=CommonSettings)
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def body_limit(
    limit: Callable[[S], int], *, settings: type[S] = CommonSettings  # type: ignore[assignment]
) -> Callable[[Endpoint], Endpoint]:
    """Mark an endpoint whose request body may be larger (or must be smaller) than the default.

    ``limit`` gets the ``settings`` the app loaded at start (a service's settings class: that
    service's; default: the process's common settings) and returns the largest body in bytes.
    """

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _ATTRIBUTE, (settings, limit))
        return endpoint

    return mark


class BodyTooLarge(HTTPException):
    """The request body passed its limit; nothing more of it was read."""

    def __init__(self, *, limit: int, declared: int | None = None) -> None:
        what = f"declares {declared} bytes" if declared is not None else "is larger"
        super().__init__(413, f"the request body {what}, over the limit of {limit} bytes; nothing was read "
                              "beyond the limit and nothing was stored")
        self.limit = limit


def _limit_of(scope: Scope) -> int:
    marked: tuple[type[CommonSettings], Callable[[Any], int]] | None = getattr(scope.get("endpoint"), _ATTRIBUTE,
                                                                                None)
    if marked is None:
        return DEFAULT_MAX_BODY_BYTES
    cls, limit = marked
    state = getattr(scope.get("app"), "state", None)
    loaded = [*getattr(state, "settings", {}).values(), getattr(getattr(state, "backends", None), "settings", None)]
    settings = next((s for s in loaded if isinstance(s, cls)), None)  # the part's own, loaded at start
    return limit(settings) if settings is not None else DEFAULT_MAX_BODY_BYTES


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    """Stops reading a request body at its route's limit and answers 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int | None = None
        received = 0

        async def limited() -> Message:
            nonlocal limit, received
            if limit is None:
                limit = _limit_of(scope)
                declared = _declared_length(scope)
                if declared is not None and declared > limit:
                    raise BodyTooLarge(limit=limit, declared=declared)
            if received > limit:
                raise BodyTooLarge(limit=limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit=limit)
            return message

        await self.app(scope, limited, send)
