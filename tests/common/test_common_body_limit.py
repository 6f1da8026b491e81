"""Request bodies stop being read at their route's limit, chunked or not, and nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel

from dlforge.common.app import ServicePart, backends_of, create_app
from dlforge.common.body_limit import DEFAULT_MAX_BODY_BYTES, body_limit
from dlforge.common.runtime import Backends, Service
from dlforge.common.settings import load_settings

LIMIT = 100_000
CHUNK = 10_000


class Note(BaseModel):
    text: str


def make_app(tmp_path: Path) -> FastAPI:
    router = APIRouter()

    @router.post("/upload")
    @body_limit(lambda settings: LIMIT)
    async def upload(request: Request, backends: Backends = Depends(backends_of)) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        await backends.docs.insert("uploads", {"_id": "u", "size": size})
        return {"size": size}

    @router.post("/notes")
    async def note(body: Note, backends: Backends = Depends(backends_of)) -> dict[str, int]:
        await backends.docs.insert("notes", {"_id": "n", "length": len(body.text)})
        return {"length": len(body.text)}

    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/d.db")
    return create_app([ServicePart(service=Service("limits"), router=router)], settings=settings, run_workers=False)


class CountingBody:
    """A chunked request body (no Content-Length) that counts how much of it the server pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            self.pulled += CHUNK
            yield b"x" * CHUNK


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = make_app(tmp_path)
    async with app.router.lifespan_context(app):
        # ASGITransport pulls the request body chunk by chunk as the app reads it, like a server does
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c, app


async def stored(app: FastAPI, collection: str) -> list[dict[str, Any]]:
    return await app.state.backends.docs.find(collection, None)


async def test_a_chunked_body_over_the_limit_stops_being_read_at_the_limit(
    client: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    c, app = client
    body = CountingBody(30 * LIMIT)  # 3 MB sent in chunks against a 100 kB limit
    r = await c.post("/upload", content=body)
    assert r.status_code == 413, r.text
    assert f"over the limit of {LIMIT} bytes" in r.json()["detail"]
    # the server stopped pulling with the chunk that crossed the limit
    assert LIMIT < body.pulled <= LIMIT + CHUNK
    assert await stored(app, "uploads") == []


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    client: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    c, app = client
    body = CountingBody(2 * LIMIT)

    async def declared() -> AsyncIterator[bytes]:
        async for chunk in body:
            yield chunk

    r = await c.post("/upload", content=declared(), headers={"content-length": str(2 * LIMIT)})
    assert r.status_code == 413 and f"declares {2 * LIMIT} bytes" in r.json()["detail"]
    assert body.pulled == 0
    assert await stored(app, "uploads") == []


async def test_a_body_within_the_limit_is_read_whole(client: tuple[httpx.AsyncClient, FastAPI]) -> None:
    c, app = client
    body = CountingBody(LIMIT)
    r = await c.post("/upload", content=body)
    assert r.status_code == 200 and r.json() == {"size": LIMIT}
    assert [d["size"] for d in await stored(app, "uploads")] == [LIMIT]


async def test_an_unmarked_route_has_the_default_limit(client: tuple[httpx.AsyncClient, FastAPI]) -> None:
    c, app = client
    text = "y" * DEFAULT_MAX_BODY_BYTES
    r = await c.post("/notes", json={"text": text})
    assert r.status_code == 413 and f"over the limit of {DEFAULT_MAX_BODY_BYTES} bytes" in r.json()["detail"]
    assert await stored(app, "notes") == []
    r = await c.post("/notes", json={"text": "short"})
    assert r.status_code == 200 and r.json() == {"length": 5}
