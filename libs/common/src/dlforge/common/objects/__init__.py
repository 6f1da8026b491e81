"""The ObjectStore port: named blobs (datasets, checkpoints, models, reports).

The port is synchronous on purpose: it is used from handler threads, training processes and
the event loop alike (the latter through ``asyncio.to_thread``). Backends implement five
streaming primitives; the byte/file/JSON helpers are built on them.
"""

from __future__ import annotations

import json
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from dlforge.common.errors import InvalidInput

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/=+@]*$")


def check_key(key: str) -> str:
    """Keys are relative, slash-separated, without '..' or empty segments."""
    if not _KEY.match(key) or ".." in key.split("/") or "//" in key or key.endswith("/") or len(key) > 900:
        raise InvalidInput(f"invalid object key {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime
    content_type: str


class ObjectStore(ABC):
    """Port: put, read, stat, list, delete objects and hand out presigned GET URLs."""

    @abstractmethod
    def put_stream(
        self, key: str, stream: BinaryIO, *, length: int = -1, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Store ``stream`` under ``key`` without holding it in memory (length -1: unknown)."""

    @abstractmethod
    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A readable stream of the object; raises NotFound."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, etag, time and type of the object; raises NotFound."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (no error if it is already gone)."""

    @abstractmethod
    def presigned_get_url(self, key: str, *, expires: timedelta = timedelta(hours=1)) -> str:
        """A URL that reads the object without credentials until it expires."""

    def ping(self) -> None:  # noqa: B027 - optional readiness hook
        """Raise if the backend cannot be reached."""

    # helpers built on the primitives -------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        return self.put_stream(key, BytesIO(data), length=len(data), content_type=content_type)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def put_file(self, key: str, path: str | Path, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        p = Path(path)
        with p.open("rb") as stream:
            return self.put_stream(key, stream, length=p.stat().st_size, content_type=content_type)

    def get_file(self, key: str, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".part")
        with self.open(key) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(p)
        return p

    def put_json(self, key: str, value: Any) -> ObjectInfo:
        return self.put_bytes(key, json.dumps(value).encode(), content_type="application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def exists(self, key: str) -> bool:
        from dlforge.common.errors import NotFound

        try:
            self.stat(key)
        except NotFound:
            return False
        return True
