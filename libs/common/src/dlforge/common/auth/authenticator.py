"""Who a bearer token belongs to, and which project a run or dataset is in: the ``Authenticator`` port.

Two implementations:

- :class:`StoreAuthenticator` reads the auth part's collections (``dlforge up``: one process, and any
  service that shares the document store while ``DLFORGE_AUTH_URL`` is unset);
- :class:`IntrospectingAuthenticator` asks the console service (``DLFORGE_AUTH_URL``) with the
  process's own service token (``DLFORGE_AUTH_SERVICE_TOKEN``): ``POST /auth/introspect``,
  ``GET``/``PUT /auth/resources/{kind}/{id}`` (the split deployment).

Both keep answers for ``DLFORGE_AUTH_CACHE_SECONDS`` (a revoked token stops working within that
time in other processes; at once in the one that revoked it); a resource's project never changes,
so it is kept as long as the process (up to a bounded number of entries). An answer of the auth service
that is not one (429, 5xx, anything unexpected) raises RetryableError (503 to the caller) and is not kept.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from typing import Protocol
from urllib.parse import quote

import httpx

from dlforge.common.auth.model import Principal
from dlforge.common.auth.store import AuthStore, token_hash
from dlforge.common.errors import InvalidInput, RetryableError

MAX_CACHED = 10_000


class Authenticator(Protocol):
    """Port: resolve tokens to principals, and runs/datasets to their project."""

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``; None if it is unknown, revoked or expired."""

    async def project_of(self, kind: str, resource_id: str) -> str | None:
        """The project of run or dataset ``resource_id`` (``kind`` ``run``/``dataset``); None if unknown."""

    async def register(self, kind: str, resource_id: str, project: str) -> bool:
        """Record the project of a new run or dataset: True if this call recorded it (False: it was that
        project's already); InvalidInput (409) if it is another project's."""

    async def release(self, kind: str, resource_id: str) -> None:
        """Undo a :meth:`register` that returned True (the creation it reserved the id for failed)."""

    def forget_tokens(self) -> None:
        """Drop cached token answers (after a revocation or a change of grants in this process)."""


class _Cache:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tokens: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self.projects: OrderedDict[str, str] = OrderedDict()

    def token(self, key: str) -> tuple[bool, Principal | None]:
        hit = self.tokens.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def keep_token(self, key: str, principal: Principal | None) -> None:
        self.tokens[key] = (time.monotonic() + self.seconds, principal)
        self.tokens.move_to_end(key)
        while len(self.tokens) > MAX_CACHED:
            self.tokens.popitem(last=False)

    def keep_project(self, key: str, project: str) -> None:
        self.projects[key] = project
        while len(self.projects) > MAX_CACHED:
            self.projects.popitem(last=False)


class StoreAuthenticator:
    """Reads the auth collections directly (one process, or services sharing the document store).

    ``service_token`` (``DLFORGE_AUTH_SERVICE_TOKEN`` of the console service) is also accepted as the
    token of the service principal ``services``: the deployments hand the same secret to every
    service, so no account must exist before they start (per-service tokens from ``dlforge admin
    create-token NAME --service`` work as well).
    """

    def __init__(self, store: AuthStore, *, cache_seconds: float, service_token: str | None = None) -> None:
        self.store = store
        self._cache = _Cache(cache_seconds)
        self._service_hash = token_hash(service_token) if service_token else None

    async def authenticate(self, token: str) -> Principal | None:
        key = token_hash(token)
        if self._service_hash is not None and hmac.compare_digest(key, self._service_hash):
            return Principal(name="services", token_id=None, grants={}, kind="service")
        hit, principal = self._cache.token(key)
        if hit:
            return principal
        principal = await self.store.resolve(token)
        self._cache.keep_token(key, principal)
        return principal

    async def project_of(self, kind: str, resource_id: str) -> str | None:
        key = f"{kind}:{resource_id}"
        if key in self._cache.projects:
            return self._cache.projects[key]
        project = await self.store.project_of(kind, resource_id)
        if project is not None:
            self._cache.keep_project(key, project)
        return project

    async def register(self, kind: str, resource_id: str, project: str) -> bool:
        created = await self.store.register(kind, resource_id, project)
        self._cache.keep_project(f"{kind}:{resource_id}", project)
        return created

    async def release(self, kind: str, resource_id: str) -> None:
        await self.store.forget(kind, resource_id)
        self._cache.projects.pop(f"{kind}:{resource_id}", None)

    def forget_tokens(self) -> None:
        self._cache.tokens.clear()


class IntrospectingAuthenticator:
    """Asks the console service's auth part over HTTP, as a service (its own token)."""

    def __init__(self, url: str, service_token: str, *, cache_seconds: float,
                 client: httpx.AsyncClient | None = None) -> None:
        self._client = client or httpx.AsyncClient(base_url=url.rstrip("/"), timeout=10)
        self._headers = {"Authorization": f"Bearer {service_token}"}
        self._cache = _Cache(cache_seconds)

    async def _call(self, method: str, path: str, json: object | None = None) -> httpx.Response:
        try:
            response = await self._client.request(method, path, json=json, headers=self._headers)
        except httpx.TransportError as exc:
            raise RetryableError(f"the auth service cannot be reached ({exc})") from exc
        if response.status_code in (401, 403):
            raise RetryableError(f"the auth service refused this service's token ({response.status_code}): "
                                 "check DLFORGE_AUTH_SERVICE_TOKEN")
        if response.status_code >= 500 or response.status_code == 429:
            raise RetryableError(f"the auth service failed or is busy ({response.status_code})")
        return response

    @staticmethod
    def _unexpected(response: httpx.Response) -> RetryableError:
        return RetryableError(f"the auth service answered {response.status_code} to {response.request.method} "
                              f"{response.request.url.path}")

    async def authenticate(self, token: str) -> Principal | None:
        key = token_hash(token)
        hit, principal = self._cache.token(key)
        if hit:
            return principal
        response = await self._call("POST", "/auth/introspect", {"token": token})
        if response.status_code != 200:  # never an answer about the token: not cached, not "inactive"
            raise self._unexpected(response)
        body = response.json()
        principal = Principal.from_public(body["principal"]) if body.get("active") else None
        self._cache.keep_token(key, principal)
        return principal

    async def project_of(self, kind: str, resource_id: str) -> str | None:
        key = f"{kind}:{resource_id}"
        if key in self._cache.projects:
            return self._cache.projects[key]
        response = await self._call("GET", f"/auth/resources/{kind}/{quote(resource_id, safe='')}")
        if response.status_code in (404, 422):  # unknown, or not even a valid id: no run or dataset has it
            return None
        if response.status_code != 200:
            raise self._unexpected(response)
        project = str(response.json()["project"])
        self._cache.keep_project(key, project)
        return project

    async def register(self, kind: str, resource_id: str, project: str) -> bool:
        response = await self._call("PUT", f"/auth/resources/{kind}/{quote(resource_id, safe='')}",
                                    {"project": project})
        if response.status_code == 409:
            raise InvalidInput(f"{kind} {resource_id!r} exists in another project", status_code=409)
        if not response.is_success:
            raise self._unexpected(response)
        self._cache.keep_project(f"{kind}:{resource_id}", project)
        return bool(response.json().get("created", True))

    async def release(self, kind: str, resource_id: str) -> None:
        response = await self._call("DELETE", f"/auth/resources/{kind}/{quote(resource_id, safe='')}")
        if not response.is_success and response.status_code != 404:
            raise self._unexpected(response)
        self._cache.projects.pop(f"{kind}:{resource_id}", None)

    def forget_tokens(self) -> None:
        self._cache.tokens.clear()

    async def close(self) -> None:
        await self._client.aclose()
