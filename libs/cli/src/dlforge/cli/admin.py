"""Accounts from the command line: ``dlforge admin create-user`` / ``create-token``, the local admin of
``dlforge up`` and the demo, and the short-lived token of an in-process run."""

from __future__ import annotations

import getpass
import re
import secrets
import sys
from typing import Any

from dlforge.common.auth.model import (
    ALL_PROJECTS,
    DEFAULT_PROJECT,
    TOKEN_NAME_PATTERN,
    Principal,
    at_least,
    check_grants,
)
from dlforge.common.auth.store import AuthStore, expiry
from dlforge.common.backends import open_docs
from dlforge.common.docs import DocumentStore
from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.common.settings import CommonSettings

LOCAL_ADMIN = "admin"
RUN_ACCOUNT = "dlforge-cli"
"""The account whose short-lived tokens in-process runs (``dlforge run``, the demo) use: operator of the
default project, no password (it cannot sign in)."""


async def _with_store(settings: CommonSettings, fn: Any) -> Any:
    docs: DocumentStore = open_docs(settings.docs)
    try:
        store = AuthStore(docs)
        await store.ensure_indexes()
        return await fn(store)
    finally:
        await docs.close()


def read_password(*, prompt: bool) -> str:
    """The new password: typed twice at a terminal, else the first line of stdin (never an argument)."""
    if prompt:
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the two passwords differ")
        return first
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise ConfigError("no password on stdin (give it as the first line, e.g. from a secrets file)")
    return line


async def create_user(settings: CommonSettings, name: str, *, password: str, project: str,
                      role: str) -> dict[str, Any]:
    """A user with ``role`` in ``project`` (``*``: every project); ConfigError saying what was wrong."""
    try:
        grants = check_grants({project: role})
        result: dict[str, Any] = await _with_store(
            settings, lambda store: store.create_user(name, password=password, grants=grants))
        return result
    except (ValueError, InvalidInput) as exc:
        raise ConfigError(str(exc)) from exc


async def create_token(settings: CommonSettings, user: str, *, project: str | None, role: str | None,
                       name: str, expires_days: float | None, service: bool = False) -> tuple[str, dict[str, Any]]:
    """A token of ``user`` (for ``project``/``role``, else the user's roles); a service token creates the
    service account ``user`` if it does not exist."""

    if not re.match(TOKEN_NAME_PATTERN, name):
        raise ConfigError(f"--name {name[:70]!r}: 1-64 letters, digits, spaces, '.', '_', ':', '@' or '-'")

    async def issue(store: AuthStore) -> tuple[str, dict[str, Any]]:
        if service:
            if await store.user(user) is None:
                await store.create_user(user, password=None, grants={})
            return await store.issue_token(user, kind="service", name=name, grants=None,
                                           expires_at=expiry(days=expires_days))
        found = await store.user(user)
        if found is None:
            raise ConfigError(f"no user {user!r} (dlforge admin create-user {user} ...)")
        grants = None
        if project is not None:
            grants = check_grants({project: role or "viewer"})
            held = found.get("grants", {})
            if not at_least(Principal(name=user, token_id=None, grants=held).role_in(project), grants[project]):
                raise ConfigError(f"{user} is not {grants[project]} in project {project!r} (holds {held}); a token "
                                  "cannot have more than its user")
        return await store.issue_token(user, kind="api", name=name, grants=grants,
                                       expires_at=expiry(days=expires_days))

    try:
        result: tuple[str, dict[str, Any]] = await _with_store(settings, issue)
        return result
    except (ValueError, InvalidInput) as exc:
        raise ConfigError(str(exc)) from exc


async def ensure_local_admin(settings: CommonSettings) -> str | None:
    """If the store has no user yet: create ``admin`` (admin of every project) with a random password and
    return the password (to print once); None if there were users already."""

    async def ensure(store: AuthStore) -> str | None:
        if await store.any_user():
            return None
        password = secrets.token_urlsafe(12)
        try:
            await store.create_user(LOCAL_ADMIN, password=password, grants={ALL_PROJECTS: "admin"})
        except InvalidInput:  # another process created it meanwhile
            return None
        return password

    result: str | None = await _with_store(settings, ensure)
    return result


async def run_token(store: AuthStore, *, hours: float) -> tuple[str, str]:
    """A token for an in-process run (the run account's, operator of the default project): (token, token id)."""
    if await store.user(RUN_ACCOUNT) is None:
        try:
            await store.create_user(RUN_ACCOUNT, password=None, grants={DEFAULT_PROJECT: "operator"})
        except InvalidInput:
            pass  # created meanwhile
    token, doc = await store.issue_token(RUN_ACCOUNT, kind="api", name="dlforge run", grants=None,
                                         expires_at=expiry(hours=hours))
    return token, str(doc["token_id"])


def sign_in_text(*, url: str, password: str, env: dict[str, str] | None = None) -> str:
    """How to sign in as the new local admin (printed once)."""
    start = ""
    if env:
        start = "start the platform on this state with\n    " + " ".join(f"{k}={v}" for k, v in env.items()) \
            + " dlforge up\nthen "
    return (f"{start}sign in at {url} as user '{LOCAL_ADMIN}' with password '{password}' (shown only now; "
            f"`dlforge admin create-user` adds people)")
