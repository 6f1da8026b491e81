"""Accounts for tests of apps with auth on: users and API tokens made in the auth store before an app starts
(as `dlforge admin` does), and the projects of runs and datasets (as an upload records them)."""

from __future__ import annotations

from collections.abc import Mapping

from dlforge.common.auth.store import AuthStore
from dlforge.common.docs.sqlite import SqliteDocumentStore

PASSWORD = "correct horse battery staple"


async def create_accounts(docs_url: str, users: Mapping[str, Mapping[str, str]],
                          resources: Mapping[tuple[str, str], str] | None = None) -> dict[str, str]:
    """Create each user (password :data:`PASSWORD`, the given grants) and one API token of theirs, and register
    each ``(kind, id) -> project`` of ``resources``, in the SQLite document store at ``docs_url``: name -> token."""
    docs = SqliteDocumentStore(docs_url.removeprefix("sqlite:///"))
    store = AuthStore(docs)
    await store.ensure_indexes()
    tokens: dict[str, str] = {}
    for name, grants in users.items():
        await store.create_user(name, password=PASSWORD, grants=grants)
        tokens[name], _ = await store.issue_token(name, kind="api", name="test", grants=None, expires_at=None)
    for (kind, resource_id), project in (resources or {}).items():
        await store.register(kind, resource_id, project)
    await docs.close()
    return tokens
