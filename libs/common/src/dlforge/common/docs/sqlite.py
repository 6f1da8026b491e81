"""SQLite DocumentStore: one table per collection, JSON bodies, indexes on json_extract()."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dlforge.common.docs import Doc, DocumentStore, SortSpec, check_collection, check_field
from dlforge.common.errors import Conflict, InvalidInput, NotFound

# UPDATE ... RETURNING (SQLite >= 3.35) lets update() run as one statement
_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_TOP_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@functools.lru_cache(maxsize=1024)
def _table(collection: str) -> str:
    return '"c_' + check_collection(collection).replace(".", "_").replace("-", "_") + '"'


def _path_expr(field: str) -> str:
    return f"json_extract(body, '$.{check_field(field)}')"


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list)):
        raise InvalidInput("find() compares scalar values only")
    return value


class SqliteDocumentStore(DocumentStore):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self._tables: set[str] = set()

    def _locked(self, fn: Any) -> Any:
        # Statements are small: a thread hop would cost more than the query, so they run inline.
        with self._lock:
            return fn()

    def _ensure_table(self, collection: str) -> str:
        table = _table(collection)
        if table not in self._tables:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} "
                "(id TEXT PRIMARY KEY, version INTEGER NOT NULL, body TEXT NOT NULL)"
            )
            self._tables.add(table)
        return table

    @staticmethod
    def _load(row: tuple[str, int, str]) -> Doc:
        doc: Doc = json.loads(row[2])
        doc["_id"] = row[0]
        doc["_version"] = row[1]
        return doc

    async def insert(self, collection: str, doc: Mapping[str, Any]) -> Doc:
        if "_id" not in doc or not isinstance(doc["_id"], str):
            raise InvalidInput("a document needs a string _id")
        body = {k: v for k, v in doc.items() if k not in ("_id", "_version")}

        def run() -> Doc:
            table = self._ensure_table(collection)
            try:
                self._conn.execute(
                    f"INSERT INTO {table} (id, version, body) VALUES (?, 1, ?)", (doc["_id"], json.dumps(body))
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"{collection}/{doc['_id']}: {exc}") from exc
            return {**body, "_id": doc["_id"], "_version": 1}

        return self._locked(run)

    async def get(self, collection: str, doc_id: str) -> Doc | None:
        def run() -> Doc | None:
            table = self._ensure_table(collection)
            row = self._conn.execute(f"SELECT id, version, body FROM {table} WHERE id = ?", (doc_id,)).fetchone()
            return None if row is None else self._load(row)

        return self._locked(run)

    async def update(
        self, collection: str, doc_id: str, changes: Mapping[str, Any], *, expected_version: int
    ) -> Doc:
        sets = {k: v for k, v in changes.items() if k not in ("_id", "_version")}
        if _RETURNING and all(_TOP_FIELD.match(k) for k in sets):
            return self._locked(lambda: self._update_in_place(collection, doc_id, sets, expected_version))

        def run() -> Doc:
            table = self._ensure_table(collection)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    f"SELECT id, version, body FROM {table} WHERE id = ?", (doc_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"{collection}/{doc_id} does not exist")
                if row[1] != expected_version:
                    raise Conflict(
                        f"{collection}/{doc_id} is at version {row[1]}, not {expected_version}"
                    )
                body = json.loads(row[2])
                body.update(sets)
                try:
                    self._conn.execute(
                        f"UPDATE {table} SET version = ?, body = ? WHERE id = ? AND version = ?",
                        (expected_version + 1, json.dumps(body), doc_id, expected_version),
                    )
                except sqlite3.IntegrityError as exc:
                    raise Conflict(f"{collection}/{doc_id}: {exc}") from exc
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return {**body, "_id": doc_id, "_version": expected_version + 1}

        return self._locked(run)

    def _update_in_place(
        self, collection: str, doc_id: str, sets: Mapping[str, Any], expected_version: int
    ) -> Doc:
        """One statement instead of a read-modify-write transaction (the common, simple-field case)."""
        table = self._ensure_table(collection)
        body_expr, params = "body", []
        if sets:
            body_expr = "json_set(body, " + ", ".join(f"'$.{k}', json(?)" for k in sets) + ")"
            params = [json.dumps(v) for v in sets.values()]
        try:
            row = self._conn.execute(
                f"UPDATE {table} SET version = version + 1, body = {body_expr} WHERE id = ? AND version = ? "
                "RETURNING id, version, body",
                (*params, doc_id, expected_version),
            ).fetchone()
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"{collection}/{doc_id}: {exc}") from exc
        if row is not None:
            return self._load(row)
        current = self._conn.execute(f"SELECT version FROM {table} WHERE id = ?", (doc_id,)).fetchone()
        if current is None:
            raise NotFound(f"{collection}/{doc_id} does not exist")
        raise Conflict(f"{collection}/{doc_id} is at version {current[0]}, not {expected_version}")

    async def find(
        self,
        collection: str,
        where: Mapping[str, Any] | None = None,
        *,
        sort: SortSpec = (),
        limit: int | None = None,
    ) -> list[Doc]:
        clauses, params = [], []
        for field, value in (where or {}).items():
            if field == "_id":
                clauses.append("id = ?")
            elif value is None:
                clauses.append(f"{_path_expr(field)} IS NULL")
                continue
            else:
                clauses.append(f"{_path_expr(field)} = ?")
            params.append(_param(value))
        order = []
        for field, direction in sort:
            if direction not in (1, -1):
                raise InvalidInput("sort direction must be 1 or -1")
            expr = "id" if field == "_id" else ("version" if field == "_version" else _path_expr(field))
            order.append(f"{expr} {'ASC' if direction == 1 else 'DESC'}")

        def run() -> list[Doc]:
            table = self._ensure_table(collection)
            sql = f"SELECT id, version, body FROM {table}"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            if order:
                sql += " ORDER BY " + ", ".join(order)
            if limit is not None:
                sql += f" LIMIT {int(limit)}"
            return [self._load(r) for r in self._conn.execute(sql, params).fetchall()]

        return self._locked(run)

    async def ensure_unique(self, collection: str, fields: Sequence[str]) -> None:
        if not fields:
            raise InvalidInput("ensure_unique needs at least one field")
        exprs = ", ".join(_path_expr(f) for f in fields)
        name = '"u_' + check_collection(collection).replace(".", "_").replace("-", "_") + "_" + "_".join(
            f.replace(".", "_") for f in fields
        ) + '"'

        def run() -> None:
            table = self._ensure_table(collection)
            try:
                self._conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {table} ({exprs})")
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"{collection} already holds duplicates of {list(fields)}") from exc

        self._locked(run)

    async def delete(self, collection: str, doc_id: str) -> None:
        def run() -> None:
            table = self._ensure_table(collection)
            self._conn.execute(f"DELETE FROM {table} WHERE id = ?", (doc_id,))

        self._locked(run)

    async def ping(self) -> None:
        self._locked(lambda: self._conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        await asyncio.sleep(0)
        with self._lock:
            self._conn.close()
