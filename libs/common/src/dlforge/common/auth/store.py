"""Users, API tokens, the audit log and the project of each run and dataset, in the DocumentStore.

Collections (owned by the auth part alone):

- ``auth_users``: ``{_id: name, password_hash (argon2id) | null, grants: {project: role}, disabled}``;
  a service account has no password and cannot sign in.
- ``auth_tokens``: ``{_id: token id, hash: SHA-256 of the token, prefix (shown in listings), user,
  kind (api | session | service), name, grants | null (null: the user's), created_at, expires_at,
  revoked_at}``. The token itself is never stored: it is shown once when issued. A token is a
  random 256-bit secret, so one SHA-256 suffices (a slow password hash would cost every request).
- ``auth_audit``: one entry per write request and per label submission: who, which token,
  method, route, path parameters, status, when, and what the handler added (``detail``). The
  entries of requests answered at the same moment share one document (``entries``, written in one
  go: a group commit), whose id sorts by time.
- ``auth_resources``: ``{_id: "<kind>:<id>", kind, id, project}`` for runs and datasets.

Read-modify-write (grants, revocation) goes through the store's versions (optimistic concurrency).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dlforge.common.auth.model import Principal, Role, capped, check_grants, check_user
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import Conflict, InvalidInput, NotFound

USERS = "auth_users"
TOKENS = "auth_tokens"
AUDIT = "auth_audit"
RESOURCES = "auth_resources"
TOKEN_PREFIX = "dlf_"
TokenKind = Literal["api", "session", "service"]

_hasher = PasswordHasher()
# verified against when the user does not exist, so an unknown name takes as long as a wrong password
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def now() -> datetime:
    return datetime.now(UTC)


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _public_token(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in ("name", "user", "kind", "prefix", "grants", "created_at", "expires_at",
                                    "revoked_at")} | {"token_id": doc["_id"]}


class AuthStore:
    """The auth part's documents: users, tokens, audit entries, resource projects."""

    def __init__(self, docs: DocumentStore) -> None:
        self.docs = docs

    async def ensure_indexes(self) -> None:
        await self.docs.ensure_unique(TOKENS, ["hash"])

    # -- users ---------------------------------------------------------------------------------

    async def create_user(self, name: str, *, password: str | None, grants: Mapping[str, str]) -> dict[str, Any]:
        """A new user (Conflict if the name is taken); ``password`` None makes a service account."""
        check_user(name)
        checked = check_grants(grants)
        if password is not None and not 8 <= len(password) <= 1024:
            raise InvalidInput("the password must be 8-1024 characters")
        hashed = await asyncio.to_thread(_hasher.hash, password) if password is not None else None
        doc = {"_id": name, "name": name, "password_hash": hashed, "grants": checked, "disabled": False,
               "created_at": iso(now())}
        try:
            await self.docs.insert(USERS, doc)
        except Conflict as exc:
            raise InvalidInput(f"user {name!r} exists", status_code=409) from exc
        return self.public_user(doc)

    @staticmethod
    def public_user(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {"name": doc["_id"], "projects": dict(doc.get("grants", {})), "disabled": bool(doc.get("disabled")),
                "service": doc.get("password_hash") is None, "created_at": doc.get("created_at")}

    async def user(self, name: str) -> dict[str, Any] | None:
        return await self.docs.get(USERS, name)

    async def users(self) -> list[dict[str, Any]]:
        return [self.public_user(d) for d in await self.docs.find(USERS, sort=[("_id", 1)], limit=10_000)]

    async def any_user(self) -> bool:
        return bool(await self.docs.find(USERS, limit=1))

    async def set_grant(self, name: str, project: str, role: Role | None) -> dict[str, Any]:
        """Give ``name`` ``role`` in ``project`` (None removes the grant); retried on a concurrent change."""
        if role is not None:
            check_grants({project: role})
        for _ in range(10):
            doc = await self.docs.get(USERS, name)
            if doc is None:
                raise NotFound(f"no user {name!r}")
            grants = {p: r for p, r in doc.get("grants", {}).items() if p != project}
            if role is not None:
                grants[project] = role
            try:
                doc = await self.docs.update(USERS, name, {"grants": grants}, expected_version=doc["_version"])
                return self.public_user(doc)
            except Conflict:
                continue
        raise InvalidInput(f"user {name!r} is being changed by someone else; try again", status_code=409)

    async def _change(self, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        for _ in range(10):
            doc = await self.docs.get(USERS, name)
            if doc is None:
                raise NotFound(f"no user {name!r}")
            try:
                return await self.docs.update(USERS, name, dict(fields), expected_version=doc["_version"])
            except Conflict:
                continue
        raise InvalidInput(f"user {name!r} is being changed by someone else; try again", status_code=409)

    async def set_password(self, name: str, password: str) -> dict[str, Any]:
        """Give ``name`` a new password (8-1024 characters)."""
        if not 8 <= len(password) <= 1024:
            raise InvalidInput("the password must be 8-1024 characters")
        hashed = await asyncio.to_thread(_hasher.hash, password)
        return self.public_user(await self._change(name, {"password_hash": hashed}))

    async def set_disabled(self, name: str, disabled: bool) -> dict[str, Any]:
        """Disable (or enable again) ``name``: a disabled user's tokens stop working and it cannot sign in."""
        return self.public_user(await self._change(name, {"disabled": disabled}))

    async def check_password(self, name: str, password: str) -> dict[str, Any] | None:
        """The user if ``password`` is theirs (and they may sign in), else None; as slow either way."""
        doc = await self.docs.get(USERS, name)
        stored = doc.get("password_hash") if doc is not None else None

        def verify() -> bool:
            try:
                return bool(_hasher.verify(stored or _DUMMY_HASH, password))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        ok = await asyncio.to_thread(verify)
        if not ok or doc is None or stored is None or doc.get("disabled"):
            return None
        return doc

    # -- tokens --------------------------------------------------------------------------------

    async def issue_token(
        self,
        user: str,
        *,
        kind: TokenKind,
        name: str,
        grants: Mapping[str, str] | None,
        expires_at: datetime | None,
    ) -> tuple[str, dict[str, Any]]:
        """A new token of ``user``: (the token, shown only now; its public record)."""
        if await self.docs.get(USERS, user) is None:
            raise NotFound(f"no user {user!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        doc = {"_id": uuid.uuid4().hex[:16], "hash": token_hash(token), "prefix": token[:12], "user": user,
               "kind": kind, "name": name, "grants": check_grants(grants) if grants is not None else None,
               "created_at": iso(now()), "expires_at": iso(expires_at) if expires_at else None, "revoked_at": None}
        await self.docs.insert(TOKENS, doc)
        return token, _public_token(doc)

    async def tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        where = {"user": user} if user is not None else None
        return [_public_token(d) for d in await self.docs.find(TOKENS, where, sort=[("created_at", -1)],
                                                              limit=10_000)]

    async def live_tokens(self, user: str) -> int:
        """How many of ``user``'s tokens are neither revoked nor expired."""
        at = now()
        return sum(1 for d in await self.docs.find(TOKENS, {"user": user}, limit=10_000)
                   if not d.get("revoked_at") and not (d.get("expires_at")
                                                       and datetime.fromisoformat(d["expires_at"]) <= at))

    async def token(self, token_id: str) -> dict[str, Any] | None:
        doc = await self.docs.get(TOKENS, token_id)
        return _public_token(doc) if doc is not None else None

    async def revoke(self, token_id: str) -> dict[str, Any]:
        for _ in range(10):
            doc = await self.docs.get(TOKENS, token_id)
            if doc is None:
                raise NotFound(f"no token {token_id!r}")
            if doc.get("revoked_at"):
                return _public_token(doc)
            try:
                doc = await self.docs.update(TOKENS, token_id, {"revoked_at": iso(now())},
                                             expected_version=doc["_version"])
                return _public_token(doc)
            except Conflict:
                continue
        raise InvalidInput(f"token {token_id!r} is being changed by someone else; try again", status_code=409)

    async def resolve(self, token: str) -> Principal | None:
        """The principal of a token, or None (unknown, revoked, expired, or its user disabled or gone)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        found = await self.docs.find(TOKENS, {"hash": token_hash(token)}, limit=1)
        if not found:
            return None
        doc = found[0]
        if doc.get("revoked_at"):
            return None
        expires = doc.get("expires_at")
        if expires and datetime.fromisoformat(expires) <= now():
            return None
        user = await self.docs.get(USERS, doc["user"])
        if user is None or user.get("disabled"):
            return None
        if doc["kind"] == "service":
            return Principal(name=user["_id"], token_id=doc["_id"], grants={}, kind="service", expires_at=expires)
        held: dict[str, Role] = dict(user.get("grants", {}))
        grants = held if doc.get("grants") is None else capped(doc["grants"], held)
        return Principal(name=user["_id"], token_id=doc["_id"], grants=grants, kind="user", expires_at=expires)

    # -- audit ---------------------------------------------------------------------------------

    async def audit(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Append audit entries, in order, as one document (its id sorts by time)."""
        await self.docs.insert(AUDIT, {"_id": f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}",
                                       "entries": [dict(e) for e in entries]})

    async def audit_entries(self, *, user: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The latest entries, newest first (of ``user`` only: among the latest 10,000 documents)."""
        docs = await self.docs.find(AUDIT, sort=[("_id", -1)], limit=limit if user is None else 10_000)
        out: list[dict[str, Any]] = []
        for doc in docs:
            for i, entry in reversed(list(enumerate(doc.get("entries", [])))):
                if user is None or entry.get("who") == user:
                    out.append({**entry, "entry_id": f"{doc['_id']}.{i}"})
                    if len(out) >= limit:
                        return out
        return out

    # -- resources -----------------------------------------------------------------------------

    async def register(self, kind: str, resource_id: str, project: str) -> bool:
        """Record that ``kind``/``resource_id`` belongs to ``project``: True if this call recorded it, False if it
        was ``project``'s already; InvalidInput (409) if it belongs to another."""
        key = f"{kind}:{resource_id}"
        try:
            await self.docs.insert(RESOURCES, {"_id": key, "kind": kind, "id": resource_id, "project": project})
            return True
        except Conflict:
            current = await self.docs.get(RESOURCES, key)
            if current is not None and current.get("project") != project:
                raise InvalidInput(f"{kind} {resource_id!r} exists in another project", status_code=409) from None
            return False

    async def project_of(self, kind: str, resource_id: str) -> str | None:
        doc = await self.docs.get(RESOURCES, f"{kind}:{resource_id}")
        return str(doc["project"]) if doc is not None else None

    async def forget(self, kind: str, resource_id: str) -> None:
        await self.docs.delete(RESOURCES, f"{kind}:{resource_id}")


def expiry(*, days: float | None = None, hours: float | None = None) -> datetime | None:
    if days is None and hours is None:
        return None
    return now() + timedelta(days=days or 0, hours=hours or 0)
