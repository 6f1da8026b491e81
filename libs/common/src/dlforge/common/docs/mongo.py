"""MongoDB DocumentStore on motor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from dlforge.common.docs import Doc, DocumentStore, SortSpec, check_collection, check_field
from dlforge.common.errors import Conflict, InvalidInput, NotFound


class MongoDocumentStore(DocumentStore):
    def __init__(self, url: str, database: str) -> None:
        self.client: AsyncIOMotorClient[Any] = AsyncIOMotorClient(url, tz_aware=True, serverSelectionTimeoutMS=5000)
        self.db = self.client[database]

    def _coll(self, collection: str) -> Any:
        return self.db[check_collection(collection)]

    async def insert(self, collection: str, doc: Mapping[str, Any]) -> Doc:
        if "_id" not in doc or not isinstance(doc["_id"], str):
            raise InvalidInput("a document needs a string _id")
        stored = {**{k: v for k, v in doc.items() if k != "_version"}, "_version": 1}
        try:
            await self._coll(collection).insert_one(dict(stored))
        except DuplicateKeyError as exc:
            raise Conflict(f"{collection}/{doc['_id']}: {exc.details}") from exc
        return stored

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        doc: Doc | None = await self._coll(collection).find_one({"_id": doc_id})
        return doc

    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expected_version: int
    ) -> Doc:
        sets = {k: v for k, v in changes.items() if k not in ("_id", "_version")}
        sets["_version"] = expected_version + 1
        try:
            result = await self._coll(collection).find_one_and_update(
                {"_id": doc_id, "_version": expected_version},
                {"$set": sets},
                return_document=True,
            )
        except DuplicateKeyError as exc:
            raise Conflict(f"{collection}/{doc_id}: {exc.details}") from exc
        if result is None:
            current = await self.get(collection, doc_id)
            if current is None:
                raise NotFound(f"{collection}/{doc_id} does not exist")
            raise Conflict(f"{collection}/{doc_id} is at version {current['_version']}, not {expected_version}")
        doc: Doc = result
        return doc

    async def find(
        self,
        collection: str,
        where: Mapping[str, Any] | None = None,
        *,
        sort: SortSpec = (),
        limit: int | None = None,
    ) -> list[Doc]:
        query: dict[str, Any] = {}
        for field, value in (where or {}).items():
            if field != "_id":
                check_field(field)
            if isinstance(value, (dict, list)):
                raise InvalidInput("find() compares scalar values only")
            query[field] = value
        cursor = self._coll(collection).find(query)
        if sort:
            cursor = cursor.sort([(f, ASCENDING if d == 1 else DESCENDING) for f, d in sort])
        if limit is not None:
            cursor = cursor.limit(int(limit))
        return [doc async for doc in cursor]

    async def ensure_unique(self, collection: str, fields: Sequence[str]) -> None:
        if not fields:
            raise InvalidInput("ensure_unique needs at least one field")
        for f in fields:
            check_field(f)
        try:
            await self._coll(collection).create_index([(f, ASCENDING) for f in fields], unique=True)
        except DuplicateKeyError as exc:
            raise Conflict(f"{collection} already holds duplicates of {list(fields)}") from exc

    async def delete(self, collection: str, doc_id: str) -> None:
        await self._coll(collection).delete_one({"_id": doc_id})

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def close(self) -> None:
        self.client.close()
