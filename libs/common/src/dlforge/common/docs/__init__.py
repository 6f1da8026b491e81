"""The DocumentStore port: JSON documents in named collections.

Every document has a string ``_id`` and a ``_version`` that starts at 1 and grows by one on each
update; :meth:`DocumentStore.update` succeeds only if the caller saw the current version
(optimistic concurrency). Unique keys over one or more fields refuse a second document with the
same values, which is what idempotency markers rely on.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from dlforge.common.errors import InvalidInput

Doc = dict[str, Any]
SortSpec = Sequence[tuple[str, Literal[1, -1]]]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,100}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_collection(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"invalid collection name {name!r}")
    return name


def check_field(name: str) -> str:
    if not _FIELD.match(name):
        raise InvalidInput(f"invalid field name {name!r}")
    return name


class DocumentStore(ABC):
    """Port: insert, get, update (versioned), find, unique keys."""

    @abstractmethod
    async def insert(self, collection: str, doc: Mapping[str, Any]) -> Doc:
        """Store a new document (``_id`` required); Conflict if its id or a unique key exists."""

    @abstractmethod
    async def get(self, collection: str, doc_id: str) -> Doc | None:
        """The document or None."""

    @abstractmethod
    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expected_version: int
    ) -> Doc:
        """Set top-level fields if the stored ``_version`` equals ``expected_version``.

        Raises NotFound if there is no such document, Conflict if the version moved on.
        """

    @abstractmethod
    async def find(
        self,
        collection: str,
        where: Mapping[str, Any] | None = None,
        *,
        sort: SortSpec = (),
        limit: int | None = None,
    ) -> list[Doc]:
        """Documents whose fields (dotted paths allowed) equal the given values."""

    @abstractmethod
    async def ensure_unique(self, collection: str, fields: Sequence[str]) -> None:
        """Refuse, from now on, two documents with equal values of ``fields``."""

    async def delete(self, collection: str, doc_id: str) -> None:  # noqa: B027
        """Remove one document (optional for backends; used by clean-ups)."""

    async def ping(self) -> None:  # noqa: B027
        """Raise if the backend cannot be reached."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""

    async def upsert(self, collection: str, doc: Mapping[str, Any], *, retries: int = 5) -> Doc:
        """Insert, or overwrite the stored fields of, the document with this ``_id`` (last write wins)."""
        from dlforge.common.errors import Conflict

        for _ in range(retries):
            current = await self.get(collection, doc["_id"])
            try:
                if current is None:
                    return await self.insert(collection, doc)
                changes = {k: v for k, v in doc.items() if k not in ("_id", "_version")}
                return await self.update(collection, doc["_id"], changes, expected_version=current["_version"])
            except Conflict:
                continue
        raise Conflict(f"{collection}/{doc['_id']}: too many concurrent writers")
