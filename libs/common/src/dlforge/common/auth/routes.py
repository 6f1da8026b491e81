"""The auth part: ``/auth/...`` routes, and the consumer that records each run's and dataset's project.

- ``POST /auth/login`` ``{"username", "password"}`` -> a session token (``DLFORGE_AUTH_SESSION_HOURS``);
  401 on bad credentials; attempts are limited per client address and per user name (429 + Retry-After).
- ``POST /auth/logout`` revokes the token of the request; ``GET /auth/me`` says who it is.
- ``GET/POST /auth/tokens``, ``DELETE /auth/tokens/{token_id}``: one's own tokens (an admin of every
  project: anyone's). A token's roles never exceed its user's nor the calling token's (asked for more: 403);
  a token made by an expiring API token expires no later; at most 50 live tokens per user (409), new tokens
  limited per user (429 with Retry-After).
- ``POST /auth/password``: change one's own password (with the current one).
- ``GET/POST /auth/users``, ``PUT/DELETE /auth/users/{name}/grants/{project}``, ``PUT /auth/users/{name}/disabled``,
  ``GET /auth/audit``:
  administration (admin of every project; a project's grants also by that project's admin).
- ``POST /auth/introspect``, ``GET/PUT /auth/resources/{kind}/{id}``: for services (their own token,
  ``dlforge admin create-token NAME --service``), see :mod:`dlforge.common.auth.authenticator`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from dlforge.common.app import ServicePart
from dlforge.common.auth.enforcement import AuthRuntime, audit, principal_of, role, runtime_of
from dlforge.common.auth.model import (
    GrantProject,
    Principal,
    Role,
    TokenName,
    UserName,
    at_least,
    check_grants,
    check_user,
)
from dlforge.common.auth.store import AuthStore, expiry, iso, now
from dlforge.common.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from dlforge.common.events import DatasetUploaded, Event, RunDeleted, Topic
from dlforge.common.http_errors import error_responses
from dlforge.common.runtime import HandlerContext, Service

LOGIN_RATE = 5.0  # sign-in attempts per second and client address, on average (generous: a proxy is one address)
LOGIN_BURST = 100
MINT_RATE = 0.2  # new tokens per second and user, on average
MINT_BURST = 10
MAX_LIVE_TOKENS = 50  # unrevoked, unexpired tokens per user

log = logging.getLogger(__name__)
service: Service[None] = Service("auth")
router = APIRouter(tags=["auth"])


def store_of(request: Request) -> AuthStore:
    runtime = runtime_of(request)
    if runtime.store is None:
        raise InvalidInput("this service verifies tokens through DLFORGE_AUTH_URL; manage accounts there",
                           status_code=503)
    return runtime.store


Store = Annotated[AuthStore, Depends(store_of)]
Runtime = Annotated[AuthRuntime, Depends(runtime_of)]
Me = Annotated[Principal, Depends(principal_of)]


def _platform_admin(principal: Principal) -> None:
    if principal.projects("admin") is not None:
        raise Forbidden(f"{principal.name} is not an admin of every project ('*'); this needs one")


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: UserName
    password: str = Field(min_length=1, max_length=1024)


class User(BaseModel):
    name: str
    projects: dict[str, Role] = Field(description="project ('*': every project) -> role")
    disabled: bool = False
    service: bool = Field(default=False, description="a service account (no password, cannot sign in)")
    created_at: str | None = None


class Session(BaseModel):
    token: str = Field(description="the bearer token; shown only now")
    token_id: str
    user: User
    expires_at: str | None


class Me_(BaseModel):
    name: str
    token_id: str | None
    kind: Literal["user", "service", "anonymous"]
    projects: dict[str, Role]
    expires_at: str | None


class Token(BaseModel):
    token_id: str
    name: str
    user: str
    kind: Literal["api", "session", "service"]
    prefix: str = Field(description="the token's first characters, to recognize it")
    grants: dict[str, Role] | None = Field(description="project -> role; null: the user's roles")
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class NewToken(Token):
    token: str = Field(description="the bearer token; shown only now, stored only as a hash")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TokenName = "api"
    user: UserName | None = Field(default=None, description="whose token (default: yours; others: admin only)")
    projects: dict[GrantProject, Role] | None = Field(
        default=None, max_length=100, description="project -> role, each at most the user's; null: the user's roles")
    expires_days: float | None = Field(default=None, gt=0, le=3650)


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: UserName
    password: str = Field(min_length=8, max_length=1024)
    projects: dict[GrantProject, Role] = Field(default_factory=dict, max_length=100)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_user(v)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)


class DisabledRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disabled: StrictBool


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role


class Introspect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200)


class Introspection(BaseModel):
    active: bool
    principal: Me_ | None = None


class ResourceProject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: GrantProject


class Resource(BaseModel):
    kind: Literal["run", "dataset"]
    id: str
    project: str
    created: bool | None = Field(default=None, description="PUT: whether this request recorded it")


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    entry_id: str
    who: str
    token_id: str | None
    method: str
    route: str
    path: str
    path_params: dict[str, Any]
    status: int
    at: str
    detail: dict[str, Any] | None = None


ProjectPath = Annotated[str, Path(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,63}|\*)$")]
NamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")]
IdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


# ------------------------------------------------------------------------------------------------
# signing in
# ------------------------------------------------------------------------------------------------


async def _audit_login(request: Request, runtime: AuthRuntime, *, username: str, status: int, outcome: str,
                       token_id: str | None = None) -> None:
    """An audit entry of a sign-in attempt (never the password)."""
    client = request.client.host if request.client else "unknown"
    entry = {"who": username, "token_id": token_id, "method": "POST", "route": "POST /auth/login",
             "path": request.url.path, "path_params": {}, "status": status, "at": iso(now()),
             "detail": {"outcome": outcome, "address": client}}
    try:
        if runtime.audit is not None:
            await runtime.audit.write(entry)
    except Exception:
        log.exception("could not write the audit entry %s", entry)


def _too_many(message: str, wait: float) -> InvalidInput:
    return InvalidInput(f"{message}; retry after {wait:.1f} s", status_code=429,
                        headers={"Retry-After": str(max(1, math.ceil(wait)))})


@router.post("/auth/login", response_model=Session, openapi_extra=role("public"),
             responses=error_responses(401, 429))
async def login(body: Login, request: Request, store: Store, runtime: Runtime) -> Session:
    """Exchange a user name and password for a session token (expires after DLFORGE_AUTH_SESSION_HOURS).

    Attempts are limited per client address (generously: behind a proxy everyone shares one) and, strictly,
    per user name: after ``LOGIN_FREE_FAILURES`` wrong passwords in a row the name waits 1 s, then 2, 4 ...
    (up to 15 min) between attempts; 429 with ``Retry-After``. Every attempt is audited (never the password).
    """
    client = request.client.host if request.client else "unknown"
    wait = runtime.limiter.take(f"login:{client}", rate=LOGIN_RATE, burst=LOGIN_BURST)
    if wait > 0:
        await _audit_login(request, runtime, username=body.username, status=429, outcome="address throttled")
        raise _too_many(f"too many sign-in attempts from {client}", wait)
    wait = runtime.logins.wait(body.username)
    if wait > 0:
        await _audit_login(request, runtime, username=body.username, status=429, outcome="user name throttled")
        raise _too_many(f"too many wrong passwords for {body.username}", wait)
    user = await store.check_password(body.username, body.password)
    if user is None:
        runtime.logins.failed(body.username)
        await _audit_login(request, runtime, username=body.username, status=401, outcome="wrong user name or password")
        raise Unauthorized("wrong user name or password")
    runtime.logins.succeeded(body.username)
    token, doc = await store.issue_token(user["_id"], kind="session", name="session", grants=None,
                                         expires_at=expiry(hours=runtime.settings.auth_session_hours))
    await _audit_login(request, runtime, username=body.username, status=200, outcome="signed in",
                       token_id=doc["token_id"])
    return Session(token=token, token_id=doc["token_id"], user=User(**store.public_user(user)),
                   expires_at=doc["expires_at"])


@router.post("/auth/logout", response_model=Token, openapi_extra=role("signed-in"), responses=error_responses(404))
async def logout(me: Me, store: Store, runtime: Runtime) -> Token:
    """Revoke the token this request was sent with."""
    if me.token_id is None:
        raise NotFound("this request has no token to revoke")
    revoked = await store.revoke(me.token_id)
    runtime.authenticator.forget_tokens()
    return Token(**revoked)


@router.get("/auth/me", response_model=Me_, openapi_extra=role("signed-in"))
async def me(me: Me) -> Me_:
    """Who the token belongs to, and its roles per project."""
    return Me_(**me.public())


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------


async def _calling_token(me: Principal, store: AuthStore) -> dict[str, Any] | None:
    """The public record of the token the request came with (None: no token, e.g. the local admin)."""
    return await store.token(me.token_id) if me.token_id is not None else None


def _limited(caller: Mapping[str, Any] | None) -> bool:
    """Whether the calling token is narrower than its user: an API token with its own grants or an expiry.
    A session (signed in with the password) and an unlimited, unexpiring API token stand for the user."""
    if caller is None or caller["kind"] == "session":
        return False
    return caller["grants"] is not None or caller["expires_at"] is not None


def _could_have_made(me: Principal, caller: Mapping[str, Any], doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` (a token of the same user) is the calling, limited token or one it could have made:
    roles within its own, expiring no later."""
    if doc["token_id"] == caller["token_id"]:
        return True
    grants = doc.get("grants")
    if grants is None or any(not me.can(p, r) for p, r in grants.items()):
        return False
    limit = caller["expires_at"]
    return limit is None or (doc.get("expires_at") is not None
                             and datetime.fromisoformat(doc["expires_at"]) <= datetime.fromisoformat(limit))


@router.get("/auth/tokens", response_model=list[Token], openapi_extra=role("signed-in"),
            responses=error_responses(403))
async def list_tokens(me: Me, store: Store,
                      user: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")] = None,
                      ) -> list[Token]:
    """Your tokens (an admin of every project: anyone's, ``user`` to pick one; never the tokens themselves).
    A limited token (its own grants or an expiry) sees only itself and the tokens it could have made."""
    whose = user if user is not None else me.name
    if whose != me.name:
        _platform_admin(me)
    found = await store.tokens(whose)
    caller = await _calling_token(me, store)
    if whose == me.name and caller is not None and _limited(caller):
        found = [t for t in found if _could_have_made(me, caller, t)]
    return [Token(**t) for t in found]


@router.post("/auth/tokens", status_code=201, response_model=NewToken, openapi_extra=role("signed-in"),
             responses=error_responses(403, 404, 409, 429))
async def create_token(body: TokenRequest, me: Me, store: Store, runtime: Runtime) -> NewToken:
    """A new API token, with at most the roles of its user and of the token that asks (shown once).

    ``projects`` null: the user's roles (asked with a limited token: that token's roles). A token made
    by an expiring API token expires no later than it. A user holds at most ``MAX_LIVE_TOKENS`` live tokens."""
    wait = runtime.limiter.take(f"mint:{me.name}", rate=MINT_RATE, burst=MINT_BURST)
    if wait > 0:
        raise InvalidInput(f"too many new tokens for {me.name}; retry after {wait:.1f} s", status_code=429,
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
    whose = body.user or me.name
    if whose != me.name:
        _platform_admin(me)
    elif me.kind != "user":
        raise Forbidden(f"a {me.kind} principal cannot hold tokens")
    user = await store.user(whose)
    if user is None:
        raise NotFound(f"no user {whose!r}")
    caller = await _calling_token(me, store)
    requested = body.projects
    if requested is None and _limited(caller):
        requested = dict(me.grants)  # a limited token passes on its own roles, never its user's all
    if requested is not None:
        holder = Principal(name=whose, token_id=None, grants=user.get("grants", {}))
        over = {p: r for p, r in requested.items() if not at_least(holder.role_in(p), r)}
        if over:
            raise Forbidden(f"{whose} does not hold {over}; a token cannot have more than its user",
                            details={"over": over})
        if whose == me.name:
            beyond = {p: r for p, r in requested.items() if not me.can(p, r)}
            if beyond:
                raise Forbidden(f"the token of this request does not hold {beyond}; a token cannot make one with "
                                "more than itself", details={"over": beyond})
    expires_at = expiry(days=body.expires_days)
    if caller is not None and caller["kind"] == "api" and caller["expires_at"] is not None:
        limit = datetime.fromisoformat(caller["expires_at"])
        expires_at = limit if expires_at is None or expires_at > limit else expires_at
    live = await store.live_tokens(whose)
    if live >= MAX_LIVE_TOKENS:
        raise InvalidInput(f"{whose} holds {live} live tokens, the most allowed ({MAX_LIVE_TOKENS}); revoke some "
                           "(DELETE /auth/tokens/{token_id}) first", status_code=409,
                           details={"live": live, "max": MAX_LIVE_TOKENS})
    token, doc = await store.issue_token(whose, kind="api", name=body.name, grants=requested,
                                         expires_at=expires_at)
    return NewToken(token=token, **doc)


@router.delete("/auth/tokens/{token_id}", response_model=Token, openapi_extra=role("signed-in"),
               responses=error_responses(403, 404))
async def revoke_token(token_id: IdPath, me: Me, store: Store, runtime: Runtime) -> Token:
    """Revoke a token (yours; an admin of every project: anyone's; a limited token: itself and those it could
    have made)."""
    doc = await store.token(token_id)
    if doc is None or (doc["user"] != me.name and me.projects("admin") is not None):
        raise NotFound(f"no token {token_id!r}")
    if doc["user"] == me.name:
        caller = await _calling_token(me, store)
        if caller is not None and _limited(caller) and not _could_have_made(me, caller, doc):
            raise NotFound(f"no token {token_id!r}")
    revoked = await store.revoke(token_id)
    runtime.authenticator.forget_tokens()
    return Token(**revoked)


# ------------------------------------------------------------------------------------------------
# users and grants
# ------------------------------------------------------------------------------------------------


@router.get("/auth/users", response_model=list[User], openapi_extra=role("admin"), responses=error_responses(403))
async def list_users(me: Me, store: Store) -> list[User]:
    _platform_admin(me)
    return [User(**u) for u in await store.users()]


@router.post("/auth/users", status_code=201, response_model=User, openapi_extra=role("admin"),
             responses=error_responses(403, 409))
async def create_user(body: UserRequest, me: Me, store: Store) -> User:
    """A new user with a password and roles per project."""
    _platform_admin(me)
    return User(**await store.create_user(body.name, password=body.password, grants=check_grants(body.projects)))


@router.put("/auth/users/{name}/grants/{project}", response_model=User, openapi_extra=role("admin"),
            responses=error_responses(403, 404, 409))
async def set_grant(name: NamePath, project: ProjectPath, body: GrantRequest, me: Me, store: Store,
                    runtime: Runtime) -> User:
    """Give a user a role in a project (an admin of that project may)."""
    if not me.can(project, "admin") or (project == "*" and me.projects("admin") is not None):
        raise Forbidden(f"{me.name} is not an admin of project {project!r}")
    user = User(**await store.set_grant(name, project, body.role))
    runtime.authenticator.forget_tokens()
    return user


@router.delete("/auth/users/{name}/grants/{project}", response_model=User, openapi_extra=role("admin"),
               responses=error_responses(403, 404, 409))
async def remove_grant(name: NamePath, project: ProjectPath, me: Me, store: Store, runtime: Runtime) -> User:
    """Take a user's role in a project away."""
    if not me.can(project, "admin") or (project == "*" and me.projects("admin") is not None):
        raise Forbidden(f"{me.name} is not an admin of project {project!r}")
    user = User(**await store.set_grant(name, project, None))
    runtime.authenticator.forget_tokens()
    return user


@router.post("/auth/password", response_model=User, openapi_extra=role("signed-in"),
             responses=error_responses(401, 403, 429))
async def change_password(body: PasswordChange, request: Request, me: Me, store: Store, runtime: Runtime) -> User:
    """Change one's own password (the current one is asked again; wrong ones count as failed sign-ins)."""
    if me.kind != "user":
        raise Forbidden(f"a {me.kind} principal has no password")
    wait = runtime.logins.wait(me.name)
    if wait > 0:
        raise _too_many(f"too many wrong passwords for {me.name}", wait)
    if await store.check_password(me.name, body.old_password) is None:
        runtime.logins.failed(me.name)
        raise Unauthorized("the current password is wrong")
    runtime.logins.succeeded(me.name)
    user = User(**await store.set_password(me.name, body.new_password))
    audit(request, user=me.name, change="password")
    return user


@router.put("/auth/users/{name}/disabled", response_model=User, openapi_extra=role("admin"),
            responses=error_responses(403, 404, 409))
async def set_disabled(name: NamePath, body: DisabledRequest, me: Me, store: Store, runtime: Runtime) -> User:
    """Disable a user (its tokens stop working at once here, within DLFORGE_AUTH_CACHE_SECONDS elsewhere; it
    cannot sign in), or enable it again. Admin of every project; not oneself."""
    _platform_admin(me)
    if name == me.name and body.disabled:
        raise InvalidInput("you cannot disable yourself", status_code=409)
    user = User(**await store.set_disabled(name, body.disabled))
    runtime.authenticator.forget_tokens()
    return user


@router.get("/auth/audit", response_model=list[AuditEntry], openapi_extra=role("admin"),
            responses=error_responses(403))
async def audit_log(me: Me, store: Store,
                    user: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")] = None,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[AuditEntry]:
    """The latest audit entries, newest first: every write request and label submission."""
    _platform_admin(me)
    return [AuditEntry(**e) for e in await store.audit_entries(user=user, limit=limit)]


# ------------------------------------------------------------------------------------------------
# for services
# ------------------------------------------------------------------------------------------------


@router.post("/auth/introspect", response_model=Introspection, openapi_extra=role("service"),
             responses=error_responses(403))
async def introspect(body: Introspect, runtime: Runtime) -> Introspection:
    """Whether a token is active, and its principal (for services that verify tokens through this one)."""
    principal = await runtime.authenticator.authenticate(body.token)
    if principal is None:
        return Introspection(active=False)
    return Introspection(active=True, principal=Me_(**principal.public()))


@router.get("/auth/resources/{kind}/{resource_id}", response_model=Resource, openapi_extra=role("service"),
            responses=error_responses(403, 404))
async def get_resource(kind: Literal["run", "dataset"], resource_id: IdPath, store: Store) -> Resource:
    """The project of a run or dataset."""
    project = await store.project_of(kind, resource_id)
    if project is None:
        raise NotFound(f"no {kind} {resource_id!r}")
    return Resource(kind=kind, id=resource_id, project=project)


@router.put("/auth/resources/{kind}/{resource_id}", response_model=Resource, openapi_extra=role("service"),
            responses=error_responses(403, 409))
async def put_resource(kind: Literal["run", "dataset"], resource_id: IdPath, body: ResourceProject,
                       store: Store) -> Resource:
    """Record the project of a new run or dataset (409 if it is another project's)."""
    created = await store.register(kind, resource_id, body.project)
    return Resource(kind=kind, id=resource_id, project=body.project, created=created)


@router.delete("/auth/resources/{kind}/{resource_id}", response_model=Resource, openapi_extra=role("service"),
               responses=error_responses(403, 404))
async def delete_resource(kind: Literal["run", "dataset"], resource_id: IdPath, store: Store) -> Resource:
    """Forget the project of a run or dataset whose creation failed after its id was reserved."""
    project = await store.project_of(kind, resource_id)
    if project is None:
        raise NotFound(f"no {kind} {resource_id!r}")
    await store.forget(kind, resource_id)
    return Resource(kind=kind, id=resource_id, project=project)


# ------------------------------------------------------------------------------------------------
# the consumer: projects of runs and datasets, from dataset.uploaded
# ------------------------------------------------------------------------------------------------


@service.handles(Topic.DATASET_UPLOADED)
async def _uploaded(event: Event, ctx: HandlerContext[None]) -> None:
    payload = event.payload
    assert isinstance(payload, DatasetUploaded)
    store = AuthStore(ctx.docs)
    for kind, resource_id in (("dataset", payload.dataset_id), ("run", event.run_id)):
        try:
            await store.register(kind, resource_id, payload.project)
        except InvalidInput:  # the id was another project's first: it stays there
            continue


@service.deletes_runs
async def _deleted(event: Event, ctx: HandlerContext[None]) -> None:
    store = AuthStore(ctx.docs)
    await store.forget("run", event.run_id)
    payload = event.payload
    if isinstance(payload, RunDeleted) and payload.dataset_id:
        await store.forget("dataset", payload.dataset_id)


def part() -> ServicePart:
    """The auth part: its routes (mounted at ``/auth``) and its consumer."""
    return ServicePart(service=service, router=router, prefix="")
